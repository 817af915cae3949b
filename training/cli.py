"""`sllm-train`: train, evaluate and plot. Runs as one process or under torchrun.

    sllm-train svae --config configs/svae-small.json train.max_steps=2000
    sllm-train sllm --config configs/sllm-small.json sllm.svae_checkpoint=runs/svae-small
    sllm-train baseline --config configs/baseline-small.json data.tokenizer=runs/sllm-small/checkpoints/...
    torchrun --standalone --nproc_per_node=2 -m training.cli svae ...
    sllm-train eval runs/svae
    sllm-train reconstruct runs/svae "Any text, of any length."
    sllm-train plot runs/svae
"""
from __future__ import annotations

from runtime.roles import require_role

require_role("train", "sllm-train")  # before anything heavy: one line, not a traceback, in an edge install

import json
import sys
from pathlib import Path
from typing import Optional

import typer

from modeling.config import ConfigError
from training.config import RunConfig, apply_overrides, load_run_config

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Train and evaluate sllm models.")


def _user_errors():
    from sentences.tokenizer import TokenizerError
    from training.checkpoint import CheckpointError
    from training.data.corpus import CorpusError

    return (ConfigError, CheckpointError, TokenizerError, CorpusError, FloatingPointError)


def _fail(message: str) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


def build_run_config(config: Optional[Path], overrides: list[str], out: Optional[str], cls=RunConfig):
    run = load_run_config(config) if config else cls()
    if not isinstance(run, cls):
        raise ConfigError(f"{config} is a {run.kind!r} run config; this command trains {cls().kind!r}")
    run = apply_overrides(run, overrides)
    if out:
        run.train.out_dir = out
    run.validate()
    return run


def _train(cls, task_factory, config: Optional[Path], overrides: Optional[list[str]], out: Optional[str]) -> None:
    from training.trainer import Trainer

    try:
        run = build_run_config(config, overrides or [], out, cls)
        task = task_factory(run, log=_log_main)
        result = Trainer(task, run.train, run, log=_log_main).fit()
    except _user_errors() as e:
        _fail(str(e))
    _log_main(json.dumps(result))


_OVERRIDES = typer.Argument(None, help="section.key=value overrides, e.g. train.max_steps=500")
_CONFIG = typer.Option(None, "--config", "-c", help="run config JSON file")
_OUT = typer.Option(None, "--out", "-o", help="run directory (train.out_dir)")


@app.command()
def svae(overrides: list[str] = _OVERRIDES, config: Optional[Path] = _CONFIG, out: Optional[str] = _OUT):
    """Train a SentenceVAE (stage 1). Re-running with the same --out resumes exactly."""
    from training.tasks.sentence_vae import SentenceVAETask

    _train(RunConfig, SentenceVAETask, config, overrides, out)


@app.command()
def sllm(overrides: list[str] = _OVERRIDES, config: Optional[Path] = _CONFIG, out: Optional[str] = _OUT):
    """Train an SLLM (stage 2): a SentenceVAE grafted onto OPT blocks (sllm.svae_checkpoint, opt.pretrained)."""
    from training.config import SLLMRunConfig
    from training.tasks.sllm import SLLMTask

    _train(SLLMRunConfig, SLLMTask, config, overrides, out)


@app.command()
def baseline(overrides: list[str] = _OVERRIDES, config: Optional[Path] = _CONFIG, out: Optional[str] = _OUT):
    """Train the token-level OPT baseline on the same passages (data.tokenizer: the SLLM's tokenizer)."""
    from training.config import BaselineRunConfig
    from training.tasks.opt_baseline import OPTBaselineTask

    _train(BaselineRunConfig, OPTBaselineTask, config, overrides, out)


@app.command("eval")
def evaluate(
    checkpoint: Path = typer.Argument(..., help="checkpoint dir or run dir"),
    n_exact: int = typer.Option(1000, help="validation sentences to reconstruct greedily"),
    n_loss: int = typer.Option(20_000, help="validation sentences for loss / PPL"),
    weights: str = typer.Option("ema", help="'ema' or 'model'"),
    report: Optional[Path] = typer.Option(None, help="write the report here (.md; a .json beside it)"),
):
    """Validation loss, PPL, exact-match reconstruction and the paper's Table 2 inputs (a SentenceVAE
    checkpoint, or the SentenceVAE inside an SLLM checkpoint)."""
    from training.evaluate import evaluate_sentence_vae, render_markdown, validation_sentences
    from training.load import load_sentence_vae

    try:
        trained = load_sentence_vae(checkpoint, weights=weights)
        val = validation_sentences(trained, log=_log_err)
        result = evaluate_sentence_vae(trained, val, n_loss=n_loss, n_exact=n_exact)
    except _user_errors() as e:
        _fail(str(e))
    text = render_markdown(result, f"SentenceVAE evaluation: {trained.path}")
    typer.echo(text)
    if report:
        report.parent.mkdir(parents=True, exist_ok=True)
        report.write_text(text)
        report.with_suffix(".json").write_text(json.dumps(result, indent=2))


EMPTY_TEXT = "nothing to reconstruct: the text is empty or only whitespace"


@app.command()
def reconstruct(
    checkpoint: Path = typer.Argument(..., help="checkpoint dir or run dir"),
    text: Optional[str] = typer.Argument(None, help="text to reconstruct; read from stdin when left out"),
    as_json: bool = typer.Option(False, "--json", help="print the pieces as a JSON list"),
    weights: str = typer.Option("ema", help="'ema' or 'model'"),
):
    """Encode any text sentence by sentence and decode it back (greedy). Sentences over the
    token limit are split, never truncated; empty or blank text reconstructs to nothing."""
    from training.evaluate import reconstruct_text
    from training.load import load_sentence_vae

    if text is None:
        data = sys.stdin.buffer.read() if hasattr(sys.stdin, "buffer") else sys.stdin.read().encode()
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            _fail(f"stdin is not valid UTF-8 text ({e})")
    try:
        trained = load_sentence_vae(checkpoint, weights=weights)
        pieces = reconstruct_text(trained, text)
    except (*_user_errors(), ValueError) as e:
        _fail(str(e))
    if not pieces:
        _log_err(EMPTY_TEXT)
    if as_json:
        typer.echo(json.dumps(pieces, ensure_ascii=False, indent=2))
    else:
        for piece in pieces:  # repr: control characters and edge whitespace stay visible
            typer.echo(f"{piece['input']!r} -> {piece['output']!r}")
    summary = f"{sum(p['exact'] for p in pieces)}/{len(pieces)} pieces reconstructed exactly"
    if as_json:  # stdout stays pure JSON
        _log_err(summary)
    else:
        typer.echo(summary)


@app.command()
def generate(
    checkpoint: Path = typer.Argument(..., help="SLLM checkpoint dir or run dir"),
    prompt: Optional[str] = typer.Argument(None, help="prompt text; read from stdin when left out"),
    max_sentences: int = typer.Option(8, help="stop after this many sentences"),
    temperature: float = typer.Option(0.0, help="0 = greedy"),
    top_k: int = typer.Option(0),
    top_p: float = typer.Option(1.0),
    seed: Optional[int] = typer.Option(None),
):
    """Continue a prompt sentence by sentence with a trained SLLM (torch reference, one process)."""
    from modeling.generate import SamplingConfig
    from modeling.sllm_generate import SLLMGenerator
    from training.load import load_sllm

    if prompt is None:
        prompt = sys.stdin.read()
    try:
        sampling = SamplingConfig(temperature, top_k, top_p, seed)
        trained = load_sllm(checkpoint)
        gen = SLLMGenerator(trained.model, trained.tokenizer, trained.run.data.split_on_comma)
        for sentence in gen.generate(prompt, max_sentences, sampling):
            typer.echo(sentence.text, nl=False)
            sys.stdout.flush()
    except (*_user_errors(), ValueError) as e:
        _fail(str(e))
    typer.echo("")


@app.command()
def compare(
    sllm_checkpoint: Path = typer.Argument(..., help="SLLM checkpoint or run dir"),
    baseline_checkpoint: Path = typer.Argument(..., help="token-level OPT baseline checkpoint or run dir"),
    n_passages: int = typer.Option(0, help="validation passages to score (0 = all)"),
    report: Optional[Path] = typer.Option(None, help="also write the table here (.md; a .json beside it)"),
):
    """Token-level validation PPL of an SLLM and its baseline over exactly the same tokens."""
    from training.evaluate_lm import compare_sllm_baseline, render_comparison

    try:
        result = compare_sllm_baseline(sllm_checkpoint, baseline_checkpoint, n_passages, log=_log_err)
    except _user_errors() as e:
        _fail(str(e))
    text = render_comparison(result)
    typer.echo(text)
    if report:
        report.parent.mkdir(parents=True, exist_ok=True)
        report.write_text(text)
        report.with_suffix(".json").write_text(json.dumps(result, indent=2))


@app.command()
def plot(run_dir: Path = typer.Argument(...), out: Optional[Path] = typer.Option(None),
         exact_match: int = typer.Option(0, help="also reconstruct this many validation sentences at every "
                                                 "saved checkpoint (SentenceVAE or SLLM runs) and plot exact match")):
    """Plot the metrics log (training loss, validation loss, tokens/s) to a PNG."""
    from training.exact_curve import exact_match_curve
    from training.plot import plot_metrics

    try:
        rows = exact_match_curve(run_dir, exact_match, log=_log_err) if exact_match > 0 else None
        path = plot_metrics(run_dir, out, rows)
    except _user_errors() as e:
        _fail(str(e))
    typer.echo(str(path))


def _log_main(*args) -> None:
    import os

    if os.environ.get("RANK", "0") == "0":
        print(*args, file=sys.stderr, flush=True)


def _log_err(*args) -> None:
    print(*args, file=sys.stderr, flush=True)


if __name__ == "__main__":
    app()
