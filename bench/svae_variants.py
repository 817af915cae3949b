"""SentenceVAE depth variants H1 / H2 / H4 at one width (paper Table 1 and Fig. 3, scaled down).

Each variant is `configs/svae-small.json` with encoder_layers = decoder_layers = k and a small,
equal budget (steps x batch), trained with the project's own trainer (`sllm-train svae`) into
WORK/svae-H{k}-{steps}x{batch} (one folder per budget); a run already at its step count is evaluated again, not retrained. They use the
SLLM bundle's tokenizer, so their vocabulary is the bundled model's. Evaluation, EMA weights:
validation loss and PPL (paper Eq. 10: tokens + eos) and greedy exact-match reconstruction.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable

from sllm.training.config import RunConfig, apply_overrides, load_run_config


def variant_config(base: Path | None, layers: int, steps: int, batch: int, threads: int, out_dir: Path,
                   cache_dir: Path, tokenizer: Path, corpus: list[str]) -> RunConfig:
    run = load_run_config(base) if base is not None and Path(base).is_file() else RunConfig()
    log_every = 10 if steps % 10 == 0 else 1  # save_every (= steps) must be a multiple of it
    run = apply_overrides(run, [
        f"model.encoder_layers={layers}", f"model.decoder_layers={layers}",
        f"train.max_steps={steps}", f"train.batch_size={batch}", f"train.warmup_steps={max(1, min(300, steps // 10))}",
        f"train.threads={threads}", "train.eval_every=0", "train.eval_batches=2", f"train.log_every={log_every}",
        f"train.save_every={steps}", "train.keep_checkpoints=1", "train.stop_at_step=0",
    ])
    run.train.out_dir = str(out_dir)
    run.data.cache_dir = str(cache_dir)
    run.data.tokenizer = str(tokenizer)
    run.data.corpus = list(corpus)
    run.validate()
    return run


def _done_steps(run_dir: Path) -> int:
    latest = run_dir / "latest"
    if not latest.is_file():
        return 0
    state = run_dir / latest.read_text().strip() / "trainer_state.json"
    return json.loads(state.read_text())["step"] if state.is_file() else 0


def train_variant(run: RunConfig, log: Callable[[str], None]) -> float:
    """Train (or finish) the run; seconds spent training now (0 when it was already done)."""
    from sllm.training.tasks.sentence_vae import SentenceVAETask
    from sllm.training.trainer import Trainer

    out = Path(run.train.out_dir)
    if _done_steps(out) >= run.train.max_steps:
        log(f"{out}: already trained to step {run.train.max_steps}; evaluating it")
        return 0.0
    t0 = time.perf_counter()
    Trainer(SentenceVAETask(run, log=log), run.train, run, log=log).fit()
    return time.perf_counter() - t0


def evaluate_variant(run_dir: Path, n_loss: int, n_exact: int, log: Callable[[str], None]) -> dict:
    from sllm.training.checkpoint import read_trainer_state
    from sllm.training.evaluate import exact_match, validation_loss, validation_sentences
    from sllm.training.load import load_stage1

    trained = load_stage1(run_dir)
    val = validation_sentences(trained, log=log)
    n = len(val) if n_loss <= 0 else min(n_loss, len(val))
    metrics = validation_loss(trained.model, val, n, 128)
    em = exact_match(trained, val, n_exact)
    cfg = trained.model.cfg
    state = read_trainer_state(trained.path)
    return {"layers": cfg.encoder_layers, "d_model": cfg.d_model, "vocab": cfg.vocab_size,
            "params": sum(p.numel() for p in trained.model.parameters()), "loss": metrics["loss"],
            "ppl": metrics["ppl"], "val_sentences": n, "val_tokens": metrics["tokens"],
            "exact_match": em["exact_match"], "exact_match_le16": em["exact_match_le16"],
            "exact_sentences": int(em["sentences"]), "steps": state["step"],
            "tokens_seen": state.get("tokens_seen", 0), "checkpoint": str(trained.path)}


def run_variants(layers: list[int], steps: int, batch: int, threads: int, work: Path, base_config: Path | None,
                 tokenizer: Path, corpus: list[str], n_loss: int, n_exact: int, log: Callable[[str], None],
                 advance: Callable[[], None] = lambda: None) -> dict:
    rows = []
    for k in layers:
        run = variant_config(base_config, k, steps, batch, threads, work / f"svae-H{k}-{steps}x{batch}", work / "cache", tokenizer,
                             corpus)
        train_s = train_variant(run, log)
        rows.append({"name": f"H{k}", **evaluate_variant(Path(run.train.out_dir), n_loss, n_exact, log),
                     "train_s": train_s})
        advance()
    from bench.quality import relative

    base = relative(base_config) if base_config else "RunConfig defaults"
    return {"source": f"trained by this benchmark: {base} with {'/'.join(map(str, layers))} blocks a side, {steps} "
                      f"steps x {batch} sentences each, into {relative(work)}/svae-H*-{steps}x{batch}", "steps": steps, "batch": batch,
            "base_config": str(base_config) if base_config else "RunConfig defaults", "rows": rows}


def recorded_h1(results_json: Path, base_config: Path | None, vocab: int) -> dict | None:
    """The recorded evaluation of the stage-1 model (`sllm-train eval runs/svae-small`), for --quick."""
    from sllm.modeling.sentence_vae import SentenceVAE

    if not Path(results_json).is_file():
        return None
    metrics = json.loads(Path(results_json).read_text())["metrics"]
    run = load_run_config(base_config) if base_config is not None and Path(base_config).is_file() else RunConfig()
    run.model.vocab_size = vocab
    params = sum(p.numel() for p in SentenceVAE(run.model).parameters())
    row = {"name": f"H{run.model.encoder_layers}", "layers": run.model.encoder_layers, "d_model": run.model.d_model,
           "vocab": vocab, "params": params, "loss": metrics["loss"], "ppl": metrics["ppl"],
           "val_tokens": metrics.get("tokens"), "exact_match": metrics["exact_match"],
           "exact_match_le16": metrics.get("exact_match_le16"), "exact_sentences": int(metrics["sentences"]),
           "steps": run.train.max_steps, "batch": run.train.batch_size}
    from bench.quality import relative

    return {"source": f"recorded: {relative(results_json)} (sllm-train eval of the {run.train.out_dir} run, "
                      f"{run.train.max_steps} steps x {run.train.batch_size}); not retrained in --quick",
            "steps": run.train.max_steps, "batch": run.train.batch_size, "rows": [row]}
