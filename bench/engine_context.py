"""Cloud step time against context length: one new sentence per session on top of P cached ones,
for batches of 1, 16 and 64 sessions, through the cloud engine in this process (no gRPC).

    python -m bench.engine_context                 # models/default/cloud, 2 threads -> docs/results/
    python -m bench.engine_context --quick         # a smoke run: fewer points and repeats

The caches hold random keys/values: the time of a step does not depend on their values. A step is
computed and not kept (slot lengths stay at P), so every repeat measures the same point. The
engine before the KV-slot rewrite (commit 1489627: each step copied every session's cache into a
padded tensor and grew it with torch.cat) was measured by the same procedure on the same machine;
its figures are in docs/results/engine-context-before.json and are drawn beside the new ones.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from bench.machine import machine_info
from bench.plots import context_plot
from sllm.cloud.engine import Engine
from sllm.modeling.cloud_bundle import load_cloud_bundle

ROOT = Path(__file__).resolve().parents[1]
BATCHES = (1, 16, 64)
CONTEXTS = (1, 16, 64, 256, 512, 1023)


def filled_slot(engine: Engine, length: int, gen: torch.Generator):
    slot = engine.new_slot()
    slot.reserve(length)
    slot.buf.normal_(generator=gen)
    slot.length = length
    return slot


def measure(engine: Engine, batch: int, context: int, repeats: int, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    slots = [filled_slot(engine, context, gen) for _ in range(batch)]
    news = [np.random.default_rng(seed + i).standard_normal((1, engine.d)).astype(np.float32) for i in range(batch)]
    engine.forward(slots, news)  # warm-up (the first step also grows each slot by one position)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        engine.forward(slots, news)
        times.append(time.perf_counter() - t)
    return {"batch": batch, "context": context, "ms_min": 1e3 * min(times), "ms_median": 1e3 * statistics.median(times),
            "ms_max": 1e3 * max(times), "reps": repeats}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", type=Path, default=ROOT / "models/default/cloud")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=ROOT / "docs/results")
    ap.add_argument("--quick", action="store_true")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    model, _ = load_cloud_bundle(a.bundle)
    engine = Engine(model, "cpu", "float32")
    batches, contexts = ((1, 16), (1, 256)) if a.quick else (BATCHES, CONTEXTS)
    rows = []
    for b in batches:
        for p in contexts:
            rows.append(measure(engine, b, p, 5 if a.quick else (30 if b * p < 20000 else 10)))
            print(json.dumps(rows[-1]), flush=True)
    result = {"engine": "after (KV slots written in place, ragged batch, plain OPT blocks, PaddedPast below 64)",
              "threads": a.threads,
              "machine": machine_info(ROOT, a.threads), "rows": rows}
    a.out.mkdir(parents=True, exist_ok=True)
    suffix = "-quick" if a.quick else ""
    (a.out / f"engine-context{suffix}.json").write_text(json.dumps(result, indent=1))
    before_file = ROOT / "docs/results/engine-context-before.json"
    before = json.loads(before_file.read_text()) if before_file.is_file() else None
    name = context_plot(before, result, a.out, f"engine-context{suffix}.png")
    (a.out / f"engine-context{suffix}.md").write_text(render(before, result, name))
    print(f"wrote {a.out / f'engine-context{suffix}.json'}, .md and {a.out / name}")


def render(before: dict | None, after: dict, plot_name: str) -> str:
    m = after["machine"]
    lines = ["# Cloud step time vs context length", "",
             f"`python -m bench.engine_context`: one step of one new sentence per session on top of P cached ones, "
             f"through the cloud engine in one process (no gRPC), models/default's grafted OPT (4 layers, d=256), "
             f"fp32, {after['threads']} torch threads; {m['cpu']}, {m['cores']} cores, commit {m['git_commit']}, "
             f"{m['date_utc']} UTC. ms per step, median (min-max) over the repeats.", "",
             "Before: the engine of commit 1489627 (each step copied every session's cache into one padded tensor "
             "for Hugging Face's layers and grew each cache with torch.cat), measured by the same procedure on the "
             "same machine, quiet, before the rewrite. After: KV slots written in place, a ragged batch, plain OPT "
             "blocks; below 64 sentences of context, one padded copy of every session's past per step, shared by "
             "all layers (modeling.opt_block.PaddedPast).", "",
             "| sessions | context (sentences) | before ms | after ms | before / after |", "|---:|---:|---:|---:|---:|"]
    old = {(r["batch"], r["context"]): r for r in (before or {}).get("rows", [])}
    for r in after["rows"]:
        o = old.get((r["batch"], r["context"]))
        ratio = f"{o['ms_median'] / r['ms_median']:.1f}x" if o else "-"
        lines.append(f"| {r['batch']} | {r['context']} | {_cell(o) if o else '-'} | {_cell(r)} | {ratio} |")
    lines += ["", f"![step time vs context]({plot_name})", ""]
    return "\n".join(lines)

def _cell(row: dict) -> str:
    return f"{row['ms_median']:.2f} ({row['ms_min']:.2f}-{row['ms_max']:.2f})"


if __name__ == "__main__":
    main()
