"""Cloud step time against context length: one new sentence per session on top of P cached ones,
for batches of 1, 16 and 64 sessions, through the cloud engine in this process (no gRPC).

    python -m bench.engine_context                 # models/default/cloud, 2 threads -> docs/results/
    python -m bench.engine_context --quick         # a smoke run: fewer points and repeats
    python -m bench.engine_context --against HEAD  # and git revision HEAD's engine, interleaved

The caches hold random keys/values: the time of a step does not depend on their values. A step is
computed and not kept (slot lengths stay at P), so every repeat measures the same point. The
engine before the KV-slot rewrite (commit 1489627: each step copied every session's cache into a
padded tensor and grew it with torch.cat) was measured by the same procedure on the same machine;
its figures are in docs/results/engine-context-before.json and are drawn beside the new ones.

--against REV imports REV's engine (cloud/engine.py, modeling/opt_block.py, modeling/opt_graft.py, from
git) with the same weights and measures it at every point too, its repeats interleaved with this
tree's, so a loaded machine slows both alike; it also times sessions that grow: B sessions stepped one
sentence at a time from empty, every step kept (where a cache's growth shows).
"""
from __future__ import annotations

import argparse
import importlib
import json
import statistics
import subprocess
import sys
import tempfile
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
GROWTH = ((1, 1023), (64, 128))  # (sessions, sentences each) stepped from empty


def filled_slot(engine: Engine, length: int, gen: torch.Generator):
    slot = engine.new_slot()
    slot.reserve(length)
    slot.length = length
    # the cached positions only: the same values whatever the capacity (drawn on the CPU, for any device)
    slot.valid().copy_(torch.randn(slot.valid().shape, generator=gen))
    return slot


def measure(engines: dict[str, Engine], batch: int, context: int, repeats: int, seed: int = 0) -> dict:
    """One step of `batch` sessions on top of `context` cached sentences, each engine's repeats interleaved."""
    setups = {}
    for name, engine in engines.items():
        gen = torch.Generator().manual_seed(seed)
        slots = [filled_slot(engine, context, gen) for _ in range(batch)]
        news = [np.random.default_rng(seed + i).standard_normal((1, engine.d)).astype(np.float32)
                for i in range(batch)]
        engine.forward(slots, news)  # warm-up
        setups[name] = (engine, slots, news)
    times = {name: [] for name in engines}
    for r in range(repeats):
        for name in (list(engines) if r % 2 == 0 else list(engines)[::-1]):
            engine, slots, news = setups[name]
            t, c = time.perf_counter(), time.process_time()
            engine.forward(slots, news)
            times[name].append((time.perf_counter() - t, time.process_time() - c))
    return _row({"batch": batch, "context": context, "reps": repeats}, times)


def measure_growth(engines: dict[str, Engine], batch: int, length: int, rounds: int) -> dict:
    """ms per step of `batch` sessions stepped one sentence at a time from empty to `length`, steps kept."""
    d = next(iter(engines.values())).d
    news = [np.random.default_rng(i).standard_normal((length, d)).astype(np.float32) for i in range(batch)]
    times = {name: [] for name in engines}
    for r in range(rounds):
        for name in (list(engines) if r % 2 == 0 else list(engines)[::-1]):
            engine = engines[name]
            slots = [engine.new_slot() for _ in range(batch)]
            t, c = time.perf_counter(), time.process_time()
            for p in range(length):
                engine.forward(slots, [v[p:p + 1] for v in news])
                for slot in slots:
                    slot.length += 1
            times[name].append(((time.perf_counter() - t) / length, (time.process_time() - c) / length))
    return _row({"batch": batch, "grown_to": length, "reps": rounds}, times)


def _row(row: dict, times: dict[str, list[tuple[float, float]]]) -> dict:
    """ms_* (wall clock) and cpu_ms_* (this process's CPU time: what a loaded machine's waits leave out) per
    engine, min / median / max; prefixed with the revision for --against's."""
    for name, pairs in times.items():
        for kind, ts in (("ms", [w for w, _ in pairs]), ("cpu_ms", [c for _, c in pairs])):
            prefix = kind if name == "now" else f"{name}_{kind}"
            row |= {f"{prefix}_min": 1e3 * min(ts), f"{prefix}_median": 1e3 * statistics.median(ts),
                    f"{prefix}_max": 1e3 * max(ts)}
    return row


def engine_at(rev: str, model) -> Engine:
    """The cloud engine of git revision `rev`, imported from a temporary directory, with `model`'s weights."""
    files = {"cloud/engine.py": "rev_engine", "modeling/opt_block.py": "rev_opt_block",
             "modeling/opt_graft.py": "rev_opt_graft"}
    tmp = Path(tempfile.mkdtemp(prefix="engine-at-"))
    for path, name in files.items():
        text = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:{path}"], capture_output=True, text=True,
                              check=True).stdout
        for other, other_name in files.items():
            text = text.replace("sllm." + other[:-3].replace("/", "."), other_name)
        (tmp / f"{name}.py").write_text(text)
    sys.path.insert(0, str(tmp))
    graft = importlib.import_module("rev_opt_graft").GraftedOPT(model.config)
    graft.load_state_dict(model.state_dict())
    return importlib.import_module("rev_engine").Engine(graft)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", type=Path, default=ROOT / "models/default/cloud")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=ROOT / "docs/results")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--against", metavar="REV", help="also measure git revision REV's engine, interleaved")
    ap.add_argument("--device", default="cpu", help="the engine's device (cpu, cuda, cuda:1 ...)")
    ap.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"),
                    help="the engine's compute dtype (half precision: a GPU)")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    model, _ = load_cloud_bundle(a.bundle)
    engines = {"now": Engine(model, a.device, a.dtype)}
    if a.against:
        engines[a.against] = engine_at(a.against, model)
    batches, contexts = ((1, 16), (1, 256)) if a.quick else (BATCHES, CONTEXTS)
    rows, growth = [], []
    for b in batches:
        for p in contexts:
            rows.append(measure(engines, b, p, 5 if a.quick else (30 if b * p < 20000 else 10)))
            print(json.dumps(rows[-1]), flush=True)
    if a.against:
        for b, n in ((1, 64),) if a.quick else GROWTH:
            growth.append(measure_growth(engines, b, n, 2 if a.quick else 4))
            print(json.dumps(growth[-1]), flush=True)
    result = {"engine": "after (KV slots in pages written in place, ragged batch, plain OPT blocks, PaddedPast "
                        "below 128)", "against": a.against, "threads": a.threads, "device": a.device,
              "dtype": a.dtype,
              "machine": machine_info(ROOT, a.threads), "rows": rows, "growth": growth}
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
             f"{after.get('device', 'cpu')}, {after.get('dtype', 'float32')}, {after['threads']} torch threads; {m['cpu']}, {m['cores']} cores, commit {m['git_commit']}, "
             f"{m['date_utc']} UTC. ms per step, median (min-max) over the repeats.", "",
             "Before: the engine of commit 1489627 (each step copied every session's cache into one padded tensor "
             "for Hugging Face's layers and grew each cache with torch.cat), measured by the same procedure on the "
             "same machine, quiet, before the rewrite. After: KV slots written in place, a ragged batch, plain OPT "
             "blocks, caches in pages of 16 sentences; below 128 sentences of context, one padded copy of every "
             "session's past per step, shared by all layers (modeling.opt_block.PaddedPast); on a CPU the "
             "small passes (one session up to 384 sentences, up to 32 short ones) run the same blocks in ONNX "
             "Runtime over the same slots (cloud.onnx_step).", "",
             "| sessions | context (sentences) | before ms | after ms | before / after |", "|---:|---:|---:|---:|---:|"]
    old = {(r["batch"], r["context"]): r for r in (before or {}).get("rows", [])}
    for r in after["rows"]:
        o = old.get((r["batch"], r["context"]))
        ratio = f"{o['ms_median'] / r['ms_median']:.1f}x" if o else "-"
        lines.append(f"| {r['batch']} | {r['context']} | {_cell(o) if o else '-'} | {_cell(r)} | {ratio} |")
    lines += ["", f"![step time vs context]({plot_name})", ""]
    rev = after.get("against")
    if rev:
        head = (f"| {rev} ms | now ms | {rev} / now | {rev} CPU ms | now CPU ms | {rev} / now (CPU) |\n"
                "|---:|---:|---:|---:|---:|---:|---:|---:|")
        lines += [f"Against `{rev}` (`--against {rev}`): the same points, its repeats interleaved with these, so a "
                  "loaded machine slows both alike. ms per step, median (min-max): wall clock, and this process's "
                  "CPU time (on a loaded machine the steadier one).", "", "| sessions | context " + head]
        lines += [f"| {r['batch']} | {r['context']} | {_compare(r, rev)}" for r in after["rows"]]
        lines += ["", "Sessions that grow (stepped one sentence at a time from empty, every step kept): ms per step.",
                  "", "| sessions | grown to " + head]
        lines += [f"| {r['batch']} | {r['grown_to']} | {_compare(r, rev)}" for r in after["growth"]]
        lines.append("")
    return "\n".join(lines)

def _compare(row: dict, rev: str) -> str:
    return " | ".join(f"{_cell(row, rev + '_' + kind)} | {_cell(row, kind)} | "
                      f"{row[rev + '_' + kind + 'ms_median'] / row[kind + 'ms_median']:.2f}x"
                      for kind in ("", "cpu_")) + " |"


def _cell(row: dict, prefix: str = "") -> str:
    return f"{row[prefix + 'ms_median']:.2f} ({row[prefix + 'ms_min']:.2f}-{row[prefix + 'ms_max']:.2f})"


if __name__ == "__main__":
    main()
