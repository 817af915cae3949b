"""Where the figures were measured: CPU, cores, threads, library versions, git commit, and how loaded
the machine was before and during the run (`LoadMonitor`: a thread that samples the load average and
the CPU time of every other process; a run on a busy machine is flagged, or refused on request)."""
from __future__ import annotations

import os
import platform
import subprocess
import sys
import threading
import time
from importlib import metadata
from pathlib import Path

PACKAGES = ("torch", "onnxruntime", "onnxruntime-gpu", "transformers", "grpcio", "protobuf", "numpy", "tokenizers")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def git_commit(root: Path) -> str:
    """HEAD's hash, with '+dirty' when tracked files differ from it (the figures then come from
    code that is not exactly that commit)."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                              timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (head or "unknown") + ("+dirty" if dirty else "")


def _cpu_seconds() -> tuple[float, float] | None:
    """(busy CPU seconds of the whole machine, of this process and its threads) so far; None off Linux."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
        ticks = os.sysconf("SC_CLK_TCK")
        user, nice, system, idle, iowait, irq, softirq, steal = (int(x) for x in fields[:8])
        busy = (user + nice + system + irq + softirq + steal) / ticks
    except (OSError, ValueError, IndexError):
        return None
    t = os.times()
    return busy, t.user + t.system + t.children_user + t.children_system


class LoadMonitor:
    """Samples, every `interval` s in a thread, the 1-minute load average and the share of the
    machine's cores busy with OTHER processes (all busy CPU time minus this process's). Use it around
    a measurement:

        with LoadMonitor() as load:      # one baseline sample of `interval` before the run
            ... measure ...
        load.summary()                   # before / during, min / median / max, and `busy` (a flag)

    `busy` is set when other processes used more than `max_other_cores` cores on average during
    the run (default: a quarter of the machine) or the load average before it exceeded the cores;
    `refuse=True` raises LoadedMachine at exit instead of returning a flagged summary."""

    def __init__(self, interval: float = 0.5, max_other_cores: float | None = None, refuse: bool = False):
        self.interval = interval
        self.cores = os.cpu_count() or 1
        self.max_other = self.cores / 4 if max_other_cores is None else max_other_cores
        self.refuse = refuse
        self.before: dict = {}
        self.samples: list[dict] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self, last):
        time.sleep(self.interval) if last is not None else None
        now, cpu = time.perf_counter(), _cpu_seconds()
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
        sample = {"load1": load}
        if last is not None and cpu is not None and last[1] is not None:
            dt = now - last[0]
            sample["other_cores"] = max(0.0, ((cpu[0] - last[1][0]) - (cpu[1] - last[1][1])) / dt)
        return sample, (now, cpu)

    def _run(self, last) -> None:
        while not self._stop.is_set():
            sample, last = self._sample(last)
            self.samples.append(sample)

    def __enter__(self) -> "LoadMonitor":
        start = (time.perf_counter(), _cpu_seconds())
        self.before, last = self._sample(start)  # other processes' CPU over one interval before the run
        self._thread = threading.Thread(target=self._run, args=(last,), daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self.refuse and exc[0] is None and self.summary()["busy"]:
            raise LoadedMachine(f"the machine was busy: {self.describe()}")

    def summary(self) -> dict:
        def spread(key):
            xs = sorted(x[key] for x in self.samples if x.get(key) is not None)
            if not xs:
                return None
            return {"min": round(xs[0], 2), "median": round(xs[len(xs) // 2], 2), "max": round(xs[-1], 2)}

        during = {"load1": spread("load1"), "other_cores": spread("other_cores"), "samples": len(self.samples)}
        other = [x["other_cores"] for x in self.samples if x.get("other_cores") is not None]
        mean_other = sum(other) / len(other) if other else 0.0
        busy = mean_other > self.max_other or (self.before.get("load1") or 0) > self.cores
        return {"cores": self.cores, "interval_s": self.interval, "before": self.before, "during": during,
                "other_cores_mean": round(mean_other, 2), "max_other_cores": self.max_other, "busy": busy}

    def describe(self) -> str:
        s = self.summary()
        d = s["during"]["other_cores"] or {}
        return (f"other processes used {s['other_cores_mean']:.2f} of {s['cores']} cores on average during the run "
                f"(max {d.get('max', 0):.2f}), load average {s['before'].get('load1')} before"
                + ("; BUSY: treat the figures as provisional" if s["busy"] else ""))


class LoadedMachine(RuntimeError):
    """A measurement refused because other processes were using the machine."""


def machine_info(root: Path, threads: int) -> dict:
    import torch

    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {
        "cpu": cpu_model(), "cores": os.cpu_count(), "threads": threads,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "platform": platform.platform(), "python": sys.version.split()[0],
        "versions": {name: v for name in PACKAGES if (v := _version(name))},
        "git_commit": git_commit(root),
        "load_average_at_start": [round(x, 2) for x in load] if load else None,
        "date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
    }
