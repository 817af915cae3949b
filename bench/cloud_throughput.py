"""Aggregate cloud throughput: steps/s with 1, 4, 16, 64 concurrent clients, batching on vs off.

    python bench/cloud_throughput.py                      # d=256, 4 layers, random weights
    python bench/cloud_throughput.py --clients 1,16 --duration 5 --threads 2

The server runs as its own process (`sllm-cloud serve`, so its GIL is its own); the clients are
threads here. Each client runs conversations of a 4-sentence prompt then single-sentence steps
(a new conversation after --steps-per-conversation), as fast as answers come back, for --duration
seconds after a warm-up. A step = one Append answered (h_t + stop flag). Vectors are random:
the model and the wire do not care what the weights are.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from protos.client import CloudClient  # noqa: E402

RANDOM_MODEL_ID = "sllm-bench"


def start_server(bundle: Path, batching: bool, threads: int, max_batch: int, batch_wait_ms: float):
    cmd = [sys.executable, "-m", "cloud.cli", "serve", "--bundle", str(bundle), "--port", "0",
           "--batching" if batching else "--no-batching", "--max-batch", str(max_batch),
           "--batch-wait-ms", str(batch_wait_ms), "--max-sessions", "256", "--grace", "1"]
    if threads:
        cmd += ["--threads", str(threads)]
    env = {**os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
    proc = subprocess.Popen(cmd, cwd=ROOT, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env)
    for line in proc.stderr:
        entry = json.loads(line)
        if entry["event"] == "server_start":
            threading.Thread(target=lambda: [None for _ in proc.stderr], daemon=True).start()  # keep draining
            return proc, entry["address"]
    raise RuntimeError(f"the server did not start (exit code {proc.wait()})")


def client_loop(target: str, model_id: str, d: int, stop_at: float, measure_from: float, steps_per_conv: int,
                seed: int, out: dict, token: str | None = None, session_keys: bool = False) -> None:
    """One client's conversations until `stop_at` (out: steps, latencies). session_keys: each
    conversation sends a key of its own (protos.client.SESSION_KEY_HEADER), as the edge does."""
    rng = np.random.default_rng(seed)
    steps, latencies = 0, []
    with CloudClient(target, token) as c:
        while time.perf_counter() < stop_at:
            if session_keys:
                c.session_key = f"bench-{seed}-{rng.integers(1 << 62)}"
            with c.conversation(model_id, d, dtype="float16") as conv:
                conv.append(rng.standard_normal((4, d)).astype(np.float32))
                for _ in range(steps_per_conv):
                    v = rng.standard_normal(d).astype(np.float32)
                    t0 = time.perf_counter()
                    conv.append(v)
                    t1 = time.perf_counter()
                    if t1 >= stop_at:
                        break
                    if t0 >= measure_from:
                        steps += 1
                        latencies.append(t1 - t0)
    out["steps"], out["latencies"] = steps, latencies


def _counted(out: dict, loop, *args) -> None:
    """client_loop, its failure kept in out["error"] (the point reports failures, it does not die)."""
    try:
        loop(*args)
    except Exception as e:  # noqa: BLE001 - counted and reported
        out.setdefault("steps", 0)
        out.setdefault("latencies", [])
        out["error"] = repr(e)


def _stats_sum(targets: list[str], token: str | None) -> tuple[int, int]:
    """(steps, forward passes) summed over the servers at `targets`."""
    steps = passes = 0
    for target in targets:
        with CloudClient(target, token) as c:
            st = c.stats()
        steps, passes = steps + st.steps_total, passes + st.forward_passes_total
    return steps, passes


def run_point(target: str, model_id: str, d: int, clients: int, duration: float, warmup: float,
              steps_per_conv: int, token: str | None = None, stats_targets: list[str] | None = None,
              session_keys: bool = False) -> dict:
    """Aggregate steps/s of `clients` concurrent client threads (see the module doc), with the
    servers' mean batch (from the stats of `stats_targets`, each server straight: default `target`),
    the per-step latency percentiles and the clients that failed (`errors`)."""
    stats_targets = stats_targets or [target]
    start = time.perf_counter()
    measure_from, stop_at = start + warmup, start + warmup + duration
    outs = [{} for _ in range(clients)]
    before = _stats_sum(stats_targets, token)
    threads = [threading.Thread(target=_counted, args=(outs[i], client_loop, target, model_id, d, stop_at,
                                                       measure_from, steps_per_conv, i, outs[i], token, session_keys))
               for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    after = _stats_sum(stats_targets, token)
    steps = sum(o["steps"] for o in outs)
    lat = np.array([x for o in outs for x in o["latencies"]]) * 1000
    passes = after[1] - before[1]
    return {"clients": clients, "steps_per_s": steps / duration,
            "errors": [o["error"] for o in outs if "error" in o],
            "mean_batch": (after[0] - before[0]) / passes if passes else 0.0,
            "p50_ms": float(np.percentile(lat, 50)) if len(lat) else float("nan"),
            "p95_ms": float(np.percentile(lat, 95)) if len(lat) else float("nan")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--d", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--clients", default="1,4,16,64")
    ap.add_argument("--duration", type=float, default=4.0, help="measured seconds per point")
    ap.add_argument("--warmup", type=float, default=1.0)
    ap.add_argument("--steps-per-conversation", type=int, default=60)
    ap.add_argument("--threads", type=int, default=0, help="server torch threads (0 = default)")
    ap.add_argument("--max-batch", type=int, default=64)
    ap.add_argument("--batch-wait-ms", type=float, default=0.0)
    ap.add_argument("--bundle", type=Path, help="a cloud bundle to use instead of a random one")
    args = ap.parse_args()
    counts = [int(x) for x in args.clients.split(",")]

    with tempfile.TemporaryDirectory() as tmp:
        bundle = args.bundle
        if bundle is None:
            from modeling.cloud_bundle import write_random_cloud_bundle

            bundle = Path(tmp) / "bundle"
            write_random_cloud_bundle(bundle, model_id=RANDOM_MODEL_ID, d=args.d, layers=args.layers, heads=args.heads,
                                max_sentences=256)
        manifest = json.loads((bundle / "manifest.json").read_text())
        model_id, d = manifest["model_id"], manifest["d_model"]
        # both servers up at once and the points interleaved (on, off, on, off ...), so a drifting
        # background load on the machine hits both modes alike
        servers = {}
        try:
            for batching in (True, False):
                servers[batching] = start_server(bundle, batching, args.threads, args.max_batch, args.batch_wait_ms)
            rows = {}
            for n in counts:
                for batching in (True, False):
                    r = rows[(batching, n)] = run_point(servers[batching][1], model_id, d, n, args.duration,
                                                        args.warmup, args.steps_per_conversation)
                    print(f"  batching={'on ' if batching else 'off'} clients={n:3d}: {r['steps_per_s']:8.1f} "
                          "steps/s", file=sys.stderr, flush=True)
        finally:
            for proc, _ in servers.values():
                proc.terminate()
                proc.wait(timeout=30)

    print(f"\ncloud throughput: d={d}, {manifest['num_layers']} layers, float16 on the wire, "
          f"{os.cpu_count()} CPUs, server torch threads="
          f"{args.threads or os.environ.get('OMP_NUM_THREADS', 'default')}, "
          f"{args.duration:g} s per point")
    print(f"{'clients':>7} | {'batching on':>12} {'mean batch':>10} {'p50 ms':>7} {'p95 ms':>7} | "
          f"{'batching off':>12} {'p50 ms':>7} {'p95 ms':>7} | {'speed-up':>8}")
    print("-" * 98)
    for n in counts:
        on, off = rows[(True, n)], rows[(False, n)]
        print(f"{n:7d} | {on['steps_per_s']:12.1f} {on['mean_batch']:10.2f} {on['p50_ms']:7.2f} {on['p95_ms']:7.2f} | "
              f"{off['steps_per_s']:12.1f} {off['p50_ms']:7.2f} {off['p95_ms']:7.2f} | "
              f"{on['steps_per_s'] / max(off['steps_per_s'], 1e-9):7.2f}x")
    print("(steps/s: aggregate Append answers per second over all clients; a step = one sentence's h_t + stop flag)")


if __name__ == "__main__":
    main()
