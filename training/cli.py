"""`sllm-train`: train, evaluate and plot. Runs as one process or under torchrun.

    sllm-train svae --config configs/svae-small.json train.max_steps=2000
    sllm-train sllm --config configs/sllm-small.json sllm.svae_checkpoint=runs/svae-small
    sllm-train baseline --config configs/baseline-small.json data.tokenizer=runs/sllm-small/checkpoints/...
    sllm-train prepare corpus/ --out data/prepared/mine --config configs/svae-small.json   # then data.dataset=...
    torchrun --standalone --nproc_per_node=2 -m sllm.training.cli svae ...
    sllm-train eval runs/svae                          # or models/default (its svae/)
    sllm-train reconstruct runs/svae "Any text, of any length."
    sllm-train generate models/default "The state of the Union is strong."
    sllm-train compare models/default                   # the SLLM vs its baseline/, same tokens
    sllm-train compare models/default models/default/baseline --text my.txt   # ... on any text
    sllm-train compare models/default --heldout         # ... on the bundled held-out register
    sllm-train plot runs/svae
    sllm-train size configs/paper/*.json                # or: sllm-train svae --config ... --dry-run
    sllm-train recover-svae models/default              # svae/ from the edge's ONNX graphs
    sllm-train refit-stop models/default                # the stop head and its threshold
    sllm-train calibrate-stop models/default            # the stop rule's calibration (weights unchanged)
"""
from __future__ import annotations

from sllm.runtime.roles import require_role

require_role("train", "sllm-train")  # before anything heavy: one line, not a traceback, in an edge install

import json
import sys
from pathlib import Path
from typing import Optional

import typer

from sllm.modeling.config import ConfigError
from sllm.runtime.console import APP_SETTINGS, run_command
from sllm.runtime.models import ModelError, resolve_model
from sllm.sentences.sampling import DEFAULT_NO_REPEAT_NGRAM, DEFAULT_NO_REPEAT_SENTENCE, DEFAULT_REPETITION_PENALTY
from sllm.training.config import RunConfig, apply_overrides, load_run_config

app = typer.Typer(**APP_SETTINGS, no_args_is_help=True, help="Train and evaluate sllm models.")


_TEXT = typer.Option(None, "--text", help="score this text instead of the validation split: .txt (one document), "
                     ".jsonl(.gz) (a 'text' field a line) or a folder of them; repeat for more; prepared with the "
                     "model's own tokenizer and segmentation, all of it held out")
_HELDOUT = typer.Option(False, "--heldout", help="score the bundled held-out register (data/heldout), a register "
                        "no training run reads")


def _text_source(text: Optional[list[Path]], heldout: bool):
    from sllm.training.text_data import choose

    try:
        return choose(text, heldout)
    except ValueError as e:
        _fail(str(e))


def _user_errors():
    from sllm.sentences.tokenizer import TokenizerError
    from sllm.training.checkpoint import CheckpointError
    from sllm.training.data.corpus import CorpusError
    from sllm.training.data.shards import DatasetError

    return (ConfigError, CheckpointError, TokenizerError, CorpusError, DatasetError, FloatingPointError)


def _fail(message: str) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


def _model(spec: Path) -> Path:
    """A checkpoint, run dir or export folder given as a local path or a model-hub id (runtime.models)."""
    try:
        return resolve_model(spec)
    except ModelError as e:
        _fail(str(e))


def build_run_config(config: Optional[Path], overrides: list[str], out: Optional[str], cls=RunConfig):
    run = load_run_config(config) if config else cls()
    if not isinstance(run, cls):
        raise ConfigError(f"{config} is a {run.kind!r} run config; this command trains {cls().kind!r}")
    run = apply_overrides(run, overrides)
    if out:
        run.train.out_dir = out
    run.validate()
    return run


def _train(cls, task_factory, config: Optional[Path], overrides: Optional[list[str]], out: Optional[str],
           dry_run: bool = False) -> None:
    from sllm.training.trainer import Trainer

    try:
        run = build_run_config(config, overrides or [], out, cls)
        if dry_run:  # no data, no weights: the model on the meta device and the sizes it implies
            from sllm.training.sizing import render, size_run

            import os

            typer.echo(render(str(config or run.kind), size_run(run), int(os.environ.get("WORLD_SIZE", "1"))))
            return
        task = task_factory(run, log=_log_main)
        result = Trainer(task, run.train, run, log=_log_main).fit()
    except _user_errors() as e:
        _fail(str(e))
    _log_main(json.dumps(result))


_OVERRIDES = typer.Argument(None, help="section.key=value overrides, e.g. train.max_steps=500")
_CONFIG = typer.Option(None, "--config", "-c", help="run config JSON file")
_OUT = typer.Option(None, "--out", "-o", help="run directory (train.out_dir)")
_DRY_RUN = typer.Option(False, "--dry-run", help="build the model on the meta device and print parameters, "
                        "optimizer and activation memory and the largest batch per GPU size; train nothing")


@app.command()
def svae(overrides: list[str] = _OVERRIDES, config: Optional[Path] = _CONFIG, out: Optional[str] = _OUT,
         dry_run: bool = _DRY_RUN):
    """Train a SentenceVAE (stage 1). Re-running with the same --out resumes exactly."""
    from sllm.training.tasks.sentence_vae import SentenceVAETask

    _train(RunConfig, SentenceVAETask, config, overrides, out, dry_run)


@app.command()
def sllm(overrides: list[str] = _OVERRIDES, config: Optional[Path] = _CONFIG, out: Optional[str] = _OUT,
         dry_run: bool = _DRY_RUN):
    """Train an SLLM (stage 2): a SentenceVAE grafted onto OPT blocks (sllm.svae_checkpoint, opt.pretrained)."""
    from sllm.training.config import SLLMRunConfig
    from sllm.training.tasks.sllm import SLLMTask

    _train(SLLMRunConfig, SLLMTask, config, overrides, out, dry_run)


@app.command()
def baseline(overrides: list[str] = _OVERRIDES, config: Optional[Path] = _CONFIG, out: Optional[str] = _OUT,
             dry_run: bool = _DRY_RUN):
    """Train the token-level OPT baseline on the same passages (data.tokenizer: the SLLM's tokenizer)."""
    from sllm.training.config import BaselineRunConfig
    from sllm.training.tasks.opt_baseline import OPTBaselineTask

    _train(BaselineRunConfig, OPTBaselineTask, config, overrides, out, dry_run)


@app.command()
def prepare(
    corpus: Optional[list[str]] = typer.Argument(None, help="corpus files or folders (.jsonl, .jsonl.gz, .txt); "
                                                "none: the bundled corpus (or the --config run's data.corpus)"),
    out: Path = typer.Option(..., "--out", "-o", help="dataset folder; an unfinished preparation there resumes"),
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="a run config: its data settings and "
                                          "sentence limit, so the dataset fits that run (options below override)"),
    tokenizer: Optional[str] = typer.Option(None, help="tokenizer.json, a folder holding one, or a training run; "
                                            "default: train a byte-level BPE on the training split"),
    vocab_size: Optional[int] = typer.Option(None, help="of the BPE trained here [8192]"),
    max_sentence_tokens: Optional[int] = typer.Option(None, help="the model's sentence limit [64]"),
    split_on_comma: Optional[bool] = typer.Option(None, "--split-on-comma/--no-split-on-comma",
                                                  help="segmentation option [split]"),
    val_fraction: Optional[float] = typer.Option(None, help="documents held out per source [0.02]"),
    split_seed: Optional[int] = typer.Option(None, help="[0]"),
    max_passage_sentences: Optional[int] = typer.Option(None, help="stage-2 passage limit [64]"),
    max_passage_tokens: Optional[int] = typer.Option(None, help="stage-2 passage limit [1000]"),
    max_documents: int = typer.Option(0, help="only the corpus's first N documents (0 = all)"),
    shard_mb: float = typer.Option(256.0, help="text per shard, in millions of characters"),
    workers: int = typer.Option(0, help="processes that segment and tokenize (0 = one per CPU core)"),
):
    """Segment and tokenize a corpus into a prepared dataset (sharded, memory-mapped token arrays with
    sentence, paragraph, document and passage indices, and a manifest of hashes); train on it with
    data.dataset=OUT. Streaming, parallel, resumable; the same files for any number of workers."""
    from sllm.sentences.tokenizer import TokenizerError
    from sllm.training.data.corpus import CorpusError
    from sllm.training.data.prepare import PrepareConfig, prepare_dataset
    from sllm.training.data.shards import DatasetError

    try:
        cfg = PrepareConfig()
        if config:
            run = load_run_config(config)
            limit = {"sentence_vae": lambda r: r.model.max_sentence_tokens,
                     "sllm": lambda r: r.svae.max_sentence_tokens,
                     "opt_baseline": lambda r: r.max_sentence_tokens}[run.kind](run)
            cfg = PrepareConfig.for_run(run.data, limit)
        given = {"tokenizer": tokenizer, "vocab_size": vocab_size, "max_sentence_tokens": max_sentence_tokens,
                 "split_on_comma": split_on_comma, "val_fraction": val_fraction, "split_seed": split_seed,
                 "max_passage_sentences": max_passage_sentences, "max_passage_tokens": max_passage_tokens}
        for key, value in given.items():
            if value is not None:
                setattr(cfg, key, value)
        if corpus:
            cfg.corpus = list(corpus)
        cfg.max_documents, cfg.shard_mb = max_documents, shard_mb
        prepare_dataset(cfg, out, workers=workers, log=_log_err)
    except (ConfigError, CorpusError, DatasetError, TokenizerError) as e:
        _fail(str(e))


@app.command()
def size(
    configs: list[Path] = typer.Argument(..., help="run configs (a path, or a shipped config's name)"),
    processes: int = typer.Option(1, help="processes (GPUs) of the run: DDP's gradient buckets count from 2"),
    markdown: bool = typer.Option(False, "--markdown", help="one Markdown table row a config"),
):
    """Size runs without a GPU: each model built on the meta device; parameters, AdamW and training
    state memory, activation memory per sample (analytic), FLOPs per token and the largest batch per
    process on 24, 40 and 80 GB cards (the formulas: sllm.training.sizing)."""
    from sllm.training.sizing import TABLE_HEADER, render, size_run, table_row

    try:
        sized = [(str(c), size_run(load_run_config(c))) for c in configs]
    except (ConfigError, OSError) as e:
        _fail(str(e))
    if markdown:
        typer.echo(TABLE_HEADER)
    for name, s in sized:
        typer.echo(table_row(Path(name).stem, s, processes) if markdown else render(name, s, processes))


@app.command("eval")
def evaluate(
    checkpoint: Path = typer.Argument(..., help="checkpoint dir, run dir, export folder (models/default)"
                                      " or model-hub id ORG/NAME[@REV]"),
    n_exact: int = typer.Option(1000, help="validation sentences to reconstruct greedily"),
    n_loss: int = typer.Option(20_000, help="validation sentences for loss / PPL"),
    weights: str = typer.Option("ema", help="'ema' or 'model'"),
    report: Optional[Path] = typer.Option(None, help="write the report here (.md; a .json beside it)"),
    text_files: Optional[list[Path]] = _TEXT,
    heldout: bool = _HELDOUT,
):
    """Validation loss, PPL, exact-match reconstruction and the paper's Table 2 inputs (a SentenceVAE
    checkpoint, the SentenceVAE inside an SLLM checkpoint, or an export folder's svae/); on the
    run's validation split, or on --text / --heldout."""
    from sllm.training.evaluate import evaluate_sentence_vae, render_markdown, validation_sentences
    from sllm.training.load import load_sentence_vae

    source = _text_source(text_files, heldout)
    try:
        trained = load_sentence_vae(_model(checkpoint), weights=weights)
        val = validation_sentences(trained, log=_log_err, text=source)
        if len(val) == 0:
            _fail(f"{source.label}: no sentences to evaluate")
        result = evaluate_sentence_vae(trained, val, n_loss=n_loss, n_exact=n_exact)
    except _user_errors() as e:
        _fail(str(e))
    result["text"] = source.label
    text = render_markdown(result, f"SentenceVAE evaluation: {trained.path} on {source.label}")
    typer.echo(text)
    if report:
        report.parent.mkdir(parents=True, exist_ok=True)
        report.write_text(text)
        report.with_suffix(".json").write_text(json.dumps(result, indent=2))


EMPTY_TEXT = "nothing to reconstruct: the text is empty or only whitespace"


@app.command()
def reconstruct(
    checkpoint: Path = typer.Argument(..., help="checkpoint dir, run dir, export folder (models/default)"
                                      " or model-hub id ORG/NAME[@REV]"),
    text: Optional[str] = typer.Argument(None, help="text to reconstruct; read from stdin when left out"),
    as_json: bool = typer.Option(False, "--json", help="print the pieces as a JSON list"),
    weights: str = typer.Option("ema", help="'ema' or 'model'"),
    file: Optional[Path] = typer.Option(None, "--file", "-f", help="reconstruct this file instead: .txt, "
                                        ".jsonl(.gz) (a 'text' field a line) or a folder of them"),
):
    """Encode any text sentence by sentence and decode it back (greedy). Sentences over the
    token limit are split, never truncated; empty or blank text reconstructs to nothing."""
    from sllm.training.evaluate import reconstruct_documents, reconstruct_text
    from sllm.training.load import load_sentence_vae

    if file is not None:
        if text is not None:
            _fail("give the text or --file, not both")
        from sllm.training.data.corpus import CorpusError, load_documents

        try:
            texts = [d.text for d in load_documents([str(file)])]
            trained = load_sentence_vae(_model(checkpoint), weights=weights)
            pieces = reconstruct_documents(trained, texts)
        except (*_user_errors(), CorpusError, ValueError) as e:
            _fail(str(e))
        _print_pieces(pieces, as_json)
        return
    if text is None:
        data = sys.stdin.buffer.read() if hasattr(sys.stdin, "buffer") else sys.stdin.read().encode()
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            _fail(f"stdin is not valid UTF-8 text ({e})")
    try:
        trained = load_sentence_vae(_model(checkpoint), weights=weights)
        pieces = reconstruct_text(trained, text)
    except (*_user_errors(), ValueError) as e:
        _fail(str(e))
    _print_pieces(pieces, as_json)


def _print_pieces(pieces: list[dict], as_json: bool) -> None:
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
    checkpoint: Path = typer.Argument(..., help="SLLM checkpoint dir, run dir, export folder (models/default)"
                                      " or model-hub id ORG/NAME[@REV]"),
    prompt: Optional[str] = typer.Argument(None, help="prompt text; read from stdin when left out"),
    max_sentences: int = typer.Option(8, help="stop after this many sentences"),
    temperature: float = typer.Option(0.0, help="0 = greedy"),
    top_k: int = typer.Option(0),
    top_p: float = typer.Option(1.0),
    seed: Optional[int] = typer.Option(None),
    repetition_penalty: float = typer.Option(DEFAULT_REPETITION_PENALTY, help="1 = off (edge-chat's option)"),
    no_repeat_ngram_size: int = typer.Option(DEFAULT_NO_REPEAT_NGRAM, help="0 = off (edge-chat's option)"),
    no_repeat_sentence: bool = typer.Option(DEFAULT_NO_REPEAT_SENTENCE, "--no-repeat-sentence/--allow-repeat-sentence"),
    stop_threshold: Optional[float] = typer.Option(None, min=0.0, max=1.0, help="end when P(stop) >= this; default: "
                                                   "an export's edge threshold, else the head's argmax"),
    calibrate_stop: bool = typer.Option(True, "--calibrate-stop/--raw-stop", help="edge-chat's option: P(stop) "
                                        "calibrated by an export's stop calibration, or raw"),
):
    """Continue a prompt sentence by sentence with a trained SLLM (torch reference, one process): the
    text edge-chat gives with the same options."""
    from sllm.modeling.generate import SamplingConfig
    from sllm.modeling.sllm_generate import SLLMGenerator
    from sllm.sentences.sampling import AnswerOptions, with_bundle_stop
    from sllm.training.load import load_sllm

    if prompt is None:
        prompt = sys.stdin.read()
    try:
        sampling = SamplingConfig(temperature, top_k, top_p, seed, repetition_penalty, no_repeat_ngram_size,
                                  no_repeat_sentence)
        trained = load_sllm(_model(checkpoint))
        gen = SLLMGenerator(trained.model, trained.tokenizer, trained.run.data.split_on_comma)
        stop = with_bundle_stop(AnswerOptions(stop_threshold=stop_threshold, calibrate_stop=calibrate_stop),
                                trained.stop_threshold, trained.stop_calibration)  # edge-chat's resolution
        for sentence in gen.generate(prompt, max_sentences, sampling, stop.stop_threshold,
                                     stop_calibration=stop.stop_calibration):
            typer.echo(sentence.text, nl=False)
            sys.stdout.flush()
    except (*_user_errors(), ValueError) as e:
        _fail(str(e))
    typer.echo("")


@app.command()
def compare(
    sllm_checkpoint: Path = typer.Argument(..., help="SLLM checkpoint or run dir, an export folder or a "
                                           "model-hub id ORG/NAME[@REV]"),
    baseline_checkpoint: Optional[Path] = typer.Argument(None, help="token-level OPT baseline checkpoint, run dir or "
                                                         "bundle; default: the export folder's baseline/"),
    n_passages: int = typer.Option(0, help="passages to score (0 = all)"),
    report: Optional[Path] = typer.Option(None, help="also write the table here (.md; a .json beside it)"),
    text_files: Optional[list[Path]] = _TEXT,
    heldout: bool = _HELDOUT,
):
    """Token-level PPL of an SLLM and its baseline over exactly the same tokens: of the SLLM run's
    validation split, or of any text (--text FILE, --heldout)."""
    from sllm.training.evaluate_lm import compare_sllm_baseline, render_comparison

    source = _text_source(text_files, heldout)
    try:
        result = compare_sllm_baseline(_model(sllm_checkpoint), baseline_checkpoint and _model(baseline_checkpoint),
                                       n_passages, log=_log_err, text=source)
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
    from sllm.training.exact_curve import exact_match_curve
    from sllm.training.plot import plot_metrics

    try:
        rows = exact_match_curve(run_dir, exact_match, log=_log_err) if exact_match > 0 else None
        path = plot_metrics(run_dir, out, rows)
    except _user_errors() as e:
        _fail(str(e))
    typer.echo(str(path))


@app.command("recover-svae")
def recover_svae(
    model: Path = typer.Argument(..., help="export folder holding edge/ (fp32 graphs), e.g. models/default"),
    config: Path = typer.Option(Path("configs/sllm-small.json"), "--config", "-c",
                                help="the run config the model was trained with (its data split and training "
                                     "settings are recorded; the model config comes from the graphs)"),
    dtype: str = typer.Option("float16", help="float16 (half the bytes) or float32"),
    n_verify: int = typer.Option(500, help="validation sentences the recovery is checked on"),
    force: bool = typer.Option(False, help="replace an existing MODEL/svae"),
):
    """Write MODEL/svae: the torch SentenceVAE recovered from MODEL/edge's ONNX graphs (checked to
    reproduce them), with its run config and tokenizer, so `eval`, `compare`, `reconstruct`,
    `generate` and a stage-2 run (sllm.svae_checkpoint=MODEL) can use the exported model."""
    from sllm.training.svae_folder import DTYPES, FOLDER, recover_svae_folder
    from sllm.training.svae_from_onnx import RecoveryError

    if dtype not in DTYPES:
        _fail(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if (model / FOLDER).exists() and not force:
        _fail(f"{model / FOLDER} exists; pass --force to replace it")
    try:
        loaded = load_run_config(config)
        run = RunConfig(data=loaded.data, train=loaded.train)
        recover_svae_folder(model, run, dtype, n_verify, log=_log_err)
    except (*_user_errors(), RecoveryError, ValueError) as e:
        _fail(str(e))


@app.command("refit-stop")
def refit_stop(
    model: Path = typer.Argument(..., help="export folder with svae/, cloud/ and edge/ (models/default)"),
    positive_weight: float = typer.Option(5.0, help="loss weight of 'the paragraph ends here' (1 for the rest)"),
    gamma: float = typer.Option(2.0, help="focal loss gamma (stage 2's stop_focal_gamma)"),
    train_passages: int = typer.Option(4000, help="training passages the features come from"),
    sweep: str = typer.Option("", help="comma-separated other positive weights to report (not written)"),
    cache_dir: Optional[str] = typer.Option(None, help="data cache (default: the run config's)"),
    report: Optional[Path] = typer.Option(None, help="write the report here (.json; a .md beside it)"),
):
    """Refit the termination head of an exported SLLM on frozen features of training passages, with
    its rare positive class weighted, choose its decision threshold on the validation split (max F1),
    and rewrite MODEL/cloud and the edge manifest (new weights hash, stop_threshold) in place."""
    from sllm.training.stop_head import refit_model, render_report

    try:
        weights = tuple(float(w) for w in sweep.split(",") if w.strip())
        result = refit_model(model, positive_weight, gamma, train_passages, cache_dir=cache_dir, sweep=weights,
                             log=_log_err)
    except (*_user_errors(), ValueError) as e:
        _fail(str(e))
    text = render_report(result)
    typer.echo(text)
    if report:
        report.parent.mkdir(parents=True, exist_ok=True)
        report.with_suffix(".json").write_text(json.dumps(result, indent=2))
        report.with_suffix(".md").write_text(text)


@app.command("calibrate-stop")
def calibrate_stop(
    model: Path = typer.Argument(..., help="export folder with svae/, cloud/ and edge/ (models/default)"),
):
    """Fit the stop rule's calibration of an exported SLLM (the head's Platt scale and a paragraph-length
    prior on the validation split, the threshold matched to its paragraph lengths; what sllm-export
    writes) and write it into MODEL/edge/manifest.json; the weights stay as they are."""
    from sllm.training.stop_head import calibrate_model

    try:
        result = calibrate_model(model, log=_log_err)
    except (*_user_errors(), ValueError) as e:
        _fail(str(e))
    typer.echo(json.dumps({k: v for k, v in result.items() if k != "hazard"}, indent=2))


def _log_main(*args) -> None:
    import os

    if os.environ.get("RANK", "0") == "0":
        print(*args, file=sys.stderr, flush=True)


def _log_err(*args) -> None:
    print(*args, file=sys.stderr, flush=True)


def main() -> None:
    run_command(app, "sllm-train")


if __name__ == "__main__":
    main()
