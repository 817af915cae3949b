"""Aggregate cloud throughput: steps/s with 1, 4, 16, 64 concurrent clients, batching on vs off.

    python -m bench.cloud_throughput                      # d=256, 4 layers, random weights
    python -m bench.cloud_throughput --clients 1,16 --duration 5 --threads 2

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
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from sllm.protos.client import CloudClient
from sllm.runtime.server_process import ServerProcess

RANDOM_MODEL_ID = "sllm-bench"


def bench_server(bundle: Path, threads: int, max_batch: int, batch_wait_ms: float, extra_args: Sequence[str] = (),
                 device: str = "auto") -> ServerProcess:
    """`sllm-cloud serve --bundle BUNDLE ... EXTRA_ARGS` on 127.0.0.1, a port the OS picks, no token;
    max_batch 1: no batching (one step per forward pass). Not started: `.start()`, or `.spawn()` then
    `.wait_ready()` to start several side by side (spawn from the thread that stops them:
    runtime.procs). `.last_lines()` tells why one died."""
    return ServerProcess.serve(bundle, "--max-batch", str(max_batch), "--batch-wait-ms", str(batch_wait_ms),
                               "--max-sessions", "256", "--grace", "1", "--device", device, *extra_args,
                               threads=threads, tokens=[], stop_timeout=30.0, name=f"the server of {bundle}")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process `pid` so far, all its threads (/proc/PID/stat; Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime (fields 14, 15)


def client_loop(target: str, model_id: str, d: int, stop_at: float, measure_from: float, steps_per_conv: int,
                seed: int, out: dict, token: str | None = None, session_keys: bool = False,
                prompt_vectors: int = 4) -> None:
    """One client's conversations until `stop_at` (out: steps, latencies): a prompt of
    `prompt_vectors` vectors, then `steps_per_conv` single-vector steps. session_keys: each
    conversation sends a key of its own (protos.client.SESSION_KEY_HEADER), as the edge does."""
    rng = np.random.default_rng(seed)
    steps, latencies = 0, []
    with CloudClient(target, token) as c:
        while time.perf_counter() < stop_at:
            if session_keys:
                c.session_key = f"bench-{seed}-{rng.integers(1 << 62)}"
            with c.conversation(model_id, d, dtype="float16") as conv:
                conv.append(rng.standard_normal((prompt_vectors, d)).astype(np.float32))
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
              session_keys: bool = False, prompt_vectors: int = 4, probe: Callable[[], float] | None = None) -> dict:
    """Aggregate steps/s of `clients` concurrent client threads (see the module doc), with the
    servers' counters over the measured window only (from the stats of `stats_targets`, each server
    straight: default `target`): steps answered, forward passes, mean batch; the per-step latency
    percentiles; the clients that failed (`errors`); and `probe_delta`, what `probe()` (e.g. a
    server's CPU seconds) grew by over the same window."""
    stats_targets = stats_targets or [target]
    probe = probe or (lambda: 0.0)
    start = time.perf_counter()
    measure_from, stop_at = start + warmup, start + warmup + duration
    outs = [{} for _ in range(clients)]
    threads = [threading.Thread(target=_counted, args=(outs[i], client_loop, target, model_id, d, stop_at,
                                                       measure_from, steps_per_conv, i, outs[i], token, session_keys,
                                                       prompt_vectors))
               for i in range(clients)]
    for t in threads:
        t.start()
    _sleep_until(measure_from)
    before, probe_before = _stats_sum(stats_targets, token), probe()
    _sleep_until(stop_at)
    after, probe_after = _stats_sum(stats_targets, token), probe()
    for t in threads:
        t.join()
    steps = sum(o["steps"] for o in outs)
    lat = np.array([x for o in outs for x in o["latencies"]]) * 1000
    server_steps, passes = after[0] - before[0], after[1] - before[1]
    return {"clients": clients, "steps_per_s": steps / duration,
            "errors": [o["error"] for o in outs if "error" in o],
            "server_steps": server_steps, "forward_passes": passes, "probe_delta": probe_after - probe_before,
            "mean_batch": server_steps / passes if passes else 0.0,
            "p50_ms": float(np.percentile(lat, 50)) if len(lat) else float("nan"),
            "p95_ms": float(np.percentile(lat, 95)) if len(lat) else float("nan")}


def _sleep_until(t: float) -> None:
    left = t - time.perf_counter()
    if left > 0:
        time.sleep(left)


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
            from sllm.modeling.cloud_bundle import write_random_cloud_bundle

            bundle = Path(tmp) / "bundle"
            write_random_cloud_bundle(bundle, model_id=RANDOM_MODEL_ID, d=args.d, layers=args.layers, heads=args.heads,
                                max_sentences=256)
        manifest = json.loads((bundle / "manifest.json").read_text())
        model_id, d = manifest["model_id"], manifest["d_model"]
        # both servers up at once and the points interleaved (on, off, on, off ...), so a drifting
        # background load on the machine hits both modes alike; off = --max-batch 1
        servers = {batching: bench_server(bundle, args.threads, args.max_batch if batching else 1, args.batch_wait_ms)
                   for batching in (True, False)}
        try:
            for server in servers.values():
                server.start()
            rows = {}
            for n in counts:
                for batching in (True, False):
                    r = rows[(batching, n)] = run_point(servers[batching].address, model_id, d, n, args.duration,
                                                        args.warmup, args.steps_per_conversation)
                    print(f"  batching={'on ' if batching else 'off'} clients={n:3d}: {r['steps_per_s']:8.1f} "
                          "steps/s", file=sys.stderr, flush=True)
        finally:
            for server in servers.values():
                server.stop()

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
