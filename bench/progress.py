"""Progress on stderr while the benchmark runs: one bar per section, a tick and its time when done.
stdout stays free for the final summary."""
from __future__ import annotations

import time
from contextlib import contextmanager


class BenchProgress:
    def __init__(self, enabled: bool = True):
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

        self.console = Console(stderr=True, quiet=not enabled)
        self.progress = Progress(SpinnerColumn(), TextColumn("{task.description:<34}"), BarColumn(),
                                 MofNCompleteColumn(), TimeElapsedColumn(), console=self.console, transient=True,
                                 disable=not enabled)
        self.t_start = time.perf_counter()

    def __enter__(self) -> "BenchProgress":
        self.progress.start()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.stop()

    def log(self, message: str) -> None:
        self.progress.console.print(f"[dim]{message}[/]", highlight=False)

    @contextmanager
    def section(self, name: str, total: int = 1):
        """`with progress.section("throughput", n) as advance:` ... call advance() n times."""
        task = self.progress.add_task(name, total=total)
        t0 = time.perf_counter()
        ok = False
        try:
            yield lambda: self.progress.advance(task)
            ok = True
        finally:
            self.progress.remove_task(task)
            mark = "[green]✓[/]" if ok else "[red]✗[/]"
            self.progress.console.print(f"{mark} {name} ({time.perf_counter() - t0:.1f} s; "
                                        f"{time.perf_counter() - self.t_start:.0f} s in all)")
