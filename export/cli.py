"""`sllm-export`: a trained checkpoint -> OUT/edge (ONNX + tokenizer) and OUT/cloud, verified against torch.

    sllm-export runs/sllm-small --out bundles/sllm-small
    sllm-export runs/svae-small --out bundles/svae-small --quantize int8 --n-verify 200
    sllm-export runs/baseline-small --out models/default     # token-level baseline -> models/default/baseline
    sllm-export org/sllm-small-ckpt@v1 --out bundles/x       # a checkpoint on a model hub (huggingface_hub cache)
    python -m sllm.export CHECKPOINT --out DIR                # the same command

Exit status: 0 exported and verified; 1 verification failed (nothing installed); 2 user error.
"""
from __future__ import annotations

from sllm.runtime.roles import require_role

require_role("export", "sllm-export")  # before anything heavy: one line, not a traceback, in an edge install

import time
from pathlib import Path
from typing import Optional

import typer

from sllm.runtime.console import APP_SETTINGS, run_command
from sllm.runtime.models import ModelError, resolve_model

app = typer.Typer(**APP_SETTINGS, no_args_is_help=True, help=__doc__.split("\n\n")[0])


class _Steps:
    """A rich progress line per export step on stderr, with a tick and the time of each finished step."""

    def __init__(self, steps: list[str]):
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

        self.console = Console(stderr=True)
        self.progress = Progress(SpinnerColumn(), TextColumn("{task.description:<16}"), BarColumn(),
                                 MofNCompleteColumn(), TimeElapsedColumn(), console=self.console, transient=True)
        self.task = self.progress.add_task("start", total=len(steps))
        self.current: str | None = None
        self.t0 = time.perf_counter()

    def __enter__(self):
        self.progress.start()
        return self

    def _finish_current(self, ok: bool = True) -> None:
        if self.current is not None:
            mark = "[green]✓[/]" if ok else "[red]✗[/]"
            self.progress.console.print(f"{mark} {self.current} ({time.perf_counter() - self.t0:.1f} s)")
            self.progress.advance(self.task)
        self.current = None

    def __call__(self, name: str) -> None:
        self._finish_current()
        self.current, self.t0 = name, time.perf_counter()
        self.progress.update(self.task, description=name)

    def __exit__(self, exc_type, exc, tb):
        self._finish_current(ok=exc_type is None)
        self.progress.stop()
        return False


def _fail(message: str, code: int = 2):
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


@app.command()
def export(
    checkpoint: Path = typer.Argument(..., help="a SentenceVAE or SLLM checkpoint dir, a run dir (its latest), or "
                                      "a model-hub id ORG/NAME[@REV] holding one"),
    out: Path = typer.Option(..., "--out", "-o", help="output folder: DIR/edge and DIR/cloud are written"),
    quantize: Optional[str] = typer.Option(None, "--quantize", help="int8: dynamic int8 weights in encoder and decoder (fp32 is the default)"),
    force: bool = typer.Option(False, "--force", help="replace bundles of a different model in DIR"),
    n_verify: int = typer.Option(100, "--n-verify", help="validation sentences whose greedy tokens must match torch"),
    weights: str = typer.Option("ema", "--weights", help="ema (default) or model"),
    sentences: Optional[Path] = typer.Option(None, "--sentences", help="a text file to verify on instead of the "
                                             "checkpoint's validation split"),
):
    """Export CHECKPOINT to DIR/edge (encoder.onnx, decoder.onnx with KV cache, tokenizer, manifest, report)
    and DIR/cloud (grafted OPT blocks + termination head); prove ORT == torch first. A token-level
    baseline checkpoint (opt_baseline) goes to DIR/baseline instead (fp16 Hugging Face folder, verified)."""
    from sllm.export.exporter import STEPS, ExportError, VerificationFailed, checkpoint_kind, export_checkpoint
    from sllm.runtime.manifest import BundleError

    try:
        checkpoint = resolve_model(checkpoint)
        _, kind = checkpoint_kind(checkpoint, ("sllm", "sentence_vae", "opt_baseline"))
    except (ModelError, ExportError) as e:
        _fail(str(e))
    if kind == "opt_baseline":
        if quantize:
            _fail("--quantize applies to the edge graphs; a baseline is exported in float16")
        _export_baseline(checkpoint, out, weights, force)
        return

    steps = [s for s in STEPS if s != "quantize" or quantize]
    try:
        with _Steps(steps) as progress:
            result = export_checkpoint(checkpoint, out, quantize=quantize, force=force, n_verify=n_verify,
                                       weights=weights, sentences_file=sentences, progress=progress)
    except (ExportError, BundleError) as e:
        _fail(str(e))
    except VerificationFailed as e:
        _fail(str(e), code=1)
    typer.echo((result.edge / "report.md").read_text())
    typer.echo(f"edge bundle:  {result.edge}")
    typer.echo(f"cloud bundle: {result.cloud if result.cloud else '(none: stage-1 checkpoint)'}")
    typer.echo(f"model id:     {result.report['model_id']}")


def _export_baseline(checkpoint: Path, out: Path, weights: str, force: bool) -> None:
    from sllm.export.baseline_bundle import STEPS, BaselineExportError, BaselineVerificationFailed, export_baseline

    try:
        with _Steps(list(STEPS)) as progress:
            result = export_baseline(checkpoint, out, weights=weights, force=force, progress=progress)
    except BaselineExportError as e:
        _fail(str(e))
    except BaselineVerificationFailed as e:
        _fail(str(e), code=1)
    m, v = result.manifest, result.manifest["verification"]
    typer.echo(f"baseline:     {result.path} ({m['parameters'] / 1e6:.2f} M parameters, float16)")
    typer.echo(f"verified:     max |logit diff| {v['max_abs_diff']:.3g} (limit {v['limit']:.3g}), argmax agreement "
               f"{v['argmax_agreement']:.1%} over {v['positions']} positions")
    typer.echo(f"model id:     {m['model_id']}")


def main() -> None:
    run_command(app, "sllm-export")


if __name__ == "__main__":
    main()
