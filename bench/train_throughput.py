"""Training throughput per stage (SentenceVAE, SLLM, token-level baseline): target tokens per
second of `sllm-train`'s own trainer, and MFU on CUDA, for a few dozen steps a stage.

    python -m bench.train_throughput                          # the small configs, 30 steps each, on CPU
    python -m bench.train_throughput --size 125m --steps 100 --require-cuda \\
        --set train.precision=bf16 --set train.compile=true   # the paper's 125M shapes on a GPU

Data: each stage's own prepared dataset (its config's data settings) of the bundled corpus's first
--documents documents, made into a temporary folder with the shipped model's tokenizer (models/default/svae) or --tokenizer (an OPT
folder gives OPT's 50272-token vocabulary). Each stage trains from scratch (stage 2 on a fresh
SentenceVAE: throughput does not depend on the weights). The first log window (--warmup steps:
allocation, torch.compile) is left out; the figure is the remaining target tokens over their
time. The machine's load average is recorded before, every 2 s during, and after: on a shared
machine the figures are a floor, not the machine's speed.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

from bench.machine import machine_info

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("svae", "sllm", "baseline")
CONFIGS = {"small": {s: f"configs/{s}-small.json" for s in STAGES},
           **{size: {s: f"configs/paper/{s}-{size}.json" for s in STAGES} for size in ("125m", "350m", "1.3b")}}


class LoadSampler(threading.Thread):
    """The 1-minute load average every `every` seconds, while the stages run."""

    def __init__(self, every: float = 2.0):
        super().__init__(daemon=True)
        self.every, self.samples, self._done = every, [], threading.Event()

    def run(self) -> None:
        while not self._done.wait(self.every):
            self.samples.append(os.getloadavg()[0])

    def stop(self) -> list[float]:
        self._done.set()
        self.join()
        return self.samples


SENTENCE_LIMIT = {"sentence_vae": lambda r: r.model.max_sentence_tokens, "sllm": lambda r: r.svae.max_sentence_tokens,
                  "opt_baseline": lambda r: r.max_sentence_tokens}


def prepare_for(run, tokenizer: str, documents: int, out: Path) -> Path:
    """The stage's dataset: its own data settings, on the first `documents` documents."""
    from sllm.training.data.prepare import PrepareConfig, prepare_dataset

    cfg = PrepareConfig.for_run(run.data, SENTENCE_LIMIT[run.kind](run))
    cfg.tokenizer, cfg.max_documents = tokenizer, documents
    return prepare_dataset(cfg, out, workers=1, log=lambda *a, **k: None)


def stage_overrides(stage: str, tokenizer: str, steps: int, warmup: int, threads: int) -> list[str]:
    common = [f"data.tokenizer={tokenizer}", f"train.max_steps={steps}", f"train.log_every={warmup}",
              f"train.save_every={steps * warmup}", "train.eval_every=0", "train.eval_batches=1",
              f"train.threads={threads}", f"train.warmup_steps={max(1, steps // 10)}"]
    if stage == "sllm":
        common.append("sllm.svae_checkpoint=")  # a fresh SentenceVAE; its tokenizer is the dataset's
    return common


def measure(rows: list[dict], warmup: int) -> dict:
    """Tokens/s over the log windows after the first (rows: metrics.jsonl training rows)."""
    windows, prev = [], 0
    for r in rows:
        tokens = r["tokens_seen"] - prev
        prev = r["tokens_seen"]
        windows.append((r["step"], tokens, tokens / r["tokens_per_s"], r.get("mfu")))
    timed = [w for w in windows if w[0] > warmup] or windows
    tokens, seconds = sum(w[1] for w in timed), sum(w[2] for w in timed)
    mfus = [w[3] for w in timed if w[3] is not None]
    return {"tokens_per_s": tokens / seconds, "timed_steps": len(timed) * warmup, "timed_tokens": tokens,
            "seconds": seconds, "mfu": statistics.mean(mfus) if mfus else None,
            "first_window_tokens_per_s": windows[0][1] / windows[0][2]}


def run_stage(stage: str, config: str, overrides: list[str], tokenizer: str, documents: int, out: Path) -> dict:
    from sllm.training.cli import build_run_config
    from sllm.training.config import BaselineRunConfig, RunConfig, SLLMRunConfig
    from sllm.training.sizing import flops_per_token
    from sllm.training.tasks.opt_baseline import OPTBaselineTask
    from sllm.training.tasks.sentence_vae import SentenceVAETask
    from sllm.training.tasks.sllm import SLLMTask
    from sllm.training.trainer import Trainer

    cls, task_cls = {"svae": (RunConfig, SentenceVAETask), "sllm": (SLLMRunConfig, SLLMTask),
                     "baseline": (BaselineRunConfig, OPTBaselineTask)}[stage]
    run = build_run_config(ROOT / config, overrides, str(out / "run"), cls)
    run.data.dataset = str(prepare_for(run, tokenizer, documents, out / "dataset"))
    task = task_cls(run, log=lambda *a, **k: None)
    trainer = Trainer(task, run.train, run, log=lambda *a, **k: None)
    trainer.fit()
    rows = [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    params = sum(p.numel() for p in trainer.model.parameters())
    return {"config": config, "device": str(trainer.dist.device), "batch_size": run.train.batch_size,
            "precision": run.train.precision, "compile": run.train.compile, "params": params,
            "gflop_per_token": flops_per_token(run, trainer.model) / 1e9,
            **measure([r for r in rows if "loss" in r], run.train.log_every)}


def render(result: dict) -> str:
    m = result["machine"]
    during = result["load_during"]
    lines = [f"training throughput, {m['date_utc']} UTC, {m['cpu']} ({m['cores']} cores, {result['threads']} "
             f"threads), gpu: {m['gpu'] or 'none'}, commit {m['git_commit']}",
             f"load average (1 min): before {result['load_before']:.2f}, during "
             f"{min(during, default=0):.2f}-{max(during, default=0):.2f} (median "
             f"{statistics.median(during) if during else 0:.2f}), after {result['load_after']:.2f}",
             "", "| stage | config | params | batch | device | timed steps | target tokens/s | MFU |",
             "|---|---|---:|---:|---|---:|---:|---:|"]
    for stage, r in result["stages"].items():
        mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "-"
        lines.append(f"| {stage} | {r['config']} | {r['params'] / 1e6:.1f} M | {r['batch_size']} | {r['device']} | "
                     f"{r['timed_steps']} | {r['tokens_per_s']:,.0f} | {mfu} |")
    if result["load_before"] > result["machine"]["cores"] * 0.5 or max(during, default=0) > result["machine"]["cores"]:
        lines.append("\nThe machine was loaded by other work: these figures are a floor, not its speed.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.train_throughput", description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", choices=sorted(CONFIGS), default="small", help="which configs: the small ones "
                    "or configs/paper/*-SIZE.json")
    ap.add_argument("--stages", default=",".join(STAGES), help="comma-separated, of svae,sllm,baseline")
    ap.add_argument("--steps", type=int, default=30, help="training steps a stage")
    ap.add_argument("--warmup", type=int, default=10, help="steps left out first (also the log window)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--documents", type=int, default=2000, help="bundled-corpus documents to prepare")
    ap.add_argument("--tokenizer", default=str(ROOT / "models/default/svae"),
                    help="tokenizer.json or a folder with one (an OPT checkpoint folder: OPT's vocabulary)")
    ap.add_argument("--set", dest="overrides", action="append", default=[],
                    help="section.key=value for every stage, e.g. train.precision=bf16 (repeatable)")
    ap.add_argument("--require-cuda", action="store_true", help="fail at once when no CUDA device is visible")
    ap.add_argument("--json", type=Path, help="also write every figure here")
    args = ap.parse_args(argv)
    stages = [s for s in args.stages.split(",") if s]
    if unknown := set(stages) - set(STAGES):
        ap.error(f"unknown stages {sorted(unknown)}")
    if args.steps <= args.warmup:
        ap.error("--steps must exceed --warmup: the first window is left out")

    import torch

    if args.require_cuda and not torch.cuda.is_available():
        print("error: --require-cuda: torch sees no CUDA device (torch "
              f"{torch.__version__}, CUDA build {torch.version.cuda or 'none'})", file=sys.stderr)
        return 2
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    result = {"threads": args.threads, "machine": machine_info(ROOT, args.threads),
              "load_before": os.getloadavg()[0], "stages": {}}
    sampler = LoadSampler()
    sampler.start()
    with tempfile.TemporaryDirectory(prefix="train-throughput-") as tmp:
        for stage in stages:
            print(f"{stage}: {args.steps} steps ...", file=sys.stderr, flush=True)
            overrides = stage_overrides(stage, args.tokenizer, args.steps, args.warmup, args.threads) + args.overrides
            result["stages"][stage] = run_stage(stage, CONFIGS[args.size][stage], overrides, args.tokenizer,
                                                args.documents, Path(tmp) / stage)
            print(f"{stage}: {json.dumps(result['stages'][stage])}", file=sys.stderr, flush=True)
    result["load_during"] = sampler.stop()
    result["load_after"] = os.getloadavg()[0]
    print(render(result))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
