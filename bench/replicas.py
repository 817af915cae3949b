"""Replicas behind nginx on this machine (issue 15): what the balancer costs, what a failover costs.

    python -m bench.replicas                     # models/default; writes docs/deploy/figures.{md,json}
    python -m bench.replicas --quick             # fewer repeats and shorter points (a couple of minutes)

Everything runs on 127.0.0.1: `sllm-cloud serve` replicas (one torch thread each) behind nginx
(cloud.cluster, the code behind `sllm-cloud cluster`), clients as threads of this process.
  - balancer overhead per step: one conversation's single-sentence steps straight to a replica vs
    through nginx to the same replica, interleaved (median and p95 of each, and the difference);
  - rebuild time vs history length: the edge's way back to a lost session (`sllm.edge.remote.RemoteStepper`:
    a fresh channel, GetModelInfo, Open{history} prefilled by the replica) through nginx, for 1, 32,
    256 and 1,024 history sentences (random vectors: the timing does not depend on their values);
  - failover as seen by the user: a conversation through nginx with 2 replicas; the replica that holds
    it is SIGKILLed between two steps; the next step (detect the broken stream, reconnect, nginx skips
    the dead replica, rebuild, retry) against the median step: the extra wait between two sentences;
  - capacity: aggregate steps/s with 16 and 64 clients (bench/cloud_throughput.py's client loop, a key
    per conversation) against 1 replica straight, 1 replica behind nginx and 2 replicas behind nginx.
    On 2 cores the replicas, nginx and the clients share the same 2 cores: this shows what the
    balancer costs and that nothing fails, not a speed-up.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench import cloud_throughput
from sllm.cloud.cluster import Cluster, ClusterConfig
from sllm.edge.remote import RemoteStepper
from sllm.edge.runtime import EdgeRuntime
from sllm.protos.client import CloudClient

TOKEN = "bench-replicas"
HISTORY_LENGTHS = (1, 32, 256, 1024)


def _ms(seconds: list[float]) -> dict:
    a = np.array(seconds) * 1000
    return {"median_ms": float(np.median(a)), "p95_ms": float(np.percentile(a, 95)), "n": len(a)}


def _vectors(n: int, d: int, seed: int) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal((n, d)) * 0.5).astype(np.float32)


def _attached(address: str) -> int:
    with CloudClient(address, TOKEN) as c:
        return c.stats().attached_sessions


def _session(runtime: EdgeRuntime, target: str) -> RemoteStepper:
    def factory() -> CloudClient:
        return CloudClient(target, TOKEN)

    s = RemoteStepper(runtime.bundle, factory, target, step_timeout=60)
    s.connect()
    return s


def balancer_overhead(cluster: Cluster, runtime: EdgeRuntime, steps: int, rounds: int) -> dict:
    d = runtime.d_model
    times = {"direct": [], "nginx": []}
    sessions = {"direct": _session(runtime, cluster.replicas[0].address), "nginx": None}
    # through nginx to replica 0: a key that hashes there (found by trying)
    for i in range(64):
        s = _session(runtime, cluster.address)
        if _attached(cluster.replicas[0].address) == 2:
            sessions["nginx"] = s
            break
        s.close()
    assert sessions["nginx"] is not None, "no key hashed to replica 0"
    for name, s in sessions.items():
        s.append(_vectors(4, d, 0))
    for r in range(rounds):
        for name, s in sessions.items():
            for k in range(steps):
                v = _vectors(1, d, r * steps + k)
                t0 = time.perf_counter()
                s.append(v)
                times[name].append(time.perf_counter() - t0)
    for s in sessions.values():
        s.close()
    direct, nginx = _ms(times["direct"]), _ms(times["nginx"])
    return {"direct": direct, "nginx": nginx, "overhead_median_ms": nginx["median_ms"] - direct["median_ms"]}


def rebuild_times(cluster: Cluster, runtime: EdgeRuntime, repeats: int) -> list[dict]:
    d = runtime.d_model
    rows = []
    s = _session(runtime, cluster.address)
    for n in HISTORY_LENGTHS:
        s.history = list(_vectors(n, d, n))
        times = []
        for _ in range(repeats):
            s.drop("bench", resumable=False)  # a fresh rebuild, as after a lost replica
            t0 = time.perf_counter()
            s._rebuild("bench")  # noqa: SLF001
            times.append(time.perf_counter() - t0)
        rows.append({"history": n, **_ms(times)})
    s.close()
    return rows


def failover(cluster: Cluster, runtime: EdgeRuntime, repeats: int, history: int) -> dict:
    d = runtime.d_model
    extra, normal = [], []
    for rep in range(repeats):
        s = _session(runtime, cluster.address)
        s.append(_vectors(history, d, rep))
        steps = []
        for k in range(10):
            t0 = time.perf_counter()
            s.append(_vectors(1, d, 100 + k))
            steps.append(time.perf_counter() - t0)
        holder = next(r.index for r in cluster.replicas if r.running() and _attached(r.address))
        cluster.signal_replica(holder, signal.SIGKILL)
        cluster.replicas[holder].wait(10)
        t0 = time.perf_counter()
        s.append(_vectors(1, d, 999))
        failed_over = time.perf_counter() - t0
        assert s.rebuilds == 1, s.rebuilds
        base = statistics.median(steps)
        normal.append(base)
        extra.append(failed_over - base)
        s.close()
        cluster.restart_replica(holder)
        cluster.wait_routed([True] * len(cluster.replicas))
    return {"history": history, "repeats": repeats, "normal_step_median_ms": statistics.median(normal) * 1000,
            "extra_ms": _ms(extra)}


def capacity(bundle: Path, directory: Path, model_id: str, d: int, clients: list[int], seconds: float,
             warmup: float) -> list[dict]:
    rows = []
    for replicas in (1, 2):
        config = ClusterConfig(bundle=bundle, replicas=replicas, tokens=[TOKEN], threads=1, grace_s=2)
        with Cluster(config, directory / f"capacity-{replicas}") as cluster:
            targets = [r.address for r in cluster.replicas]
            setups = ([("1 replica, straight", cluster.replicas[0].address)] if replicas == 1 else []) + \
                [(f"{replicas} replica{'s' if replicas > 1 else ''}, nginx", cluster.address)]
            for n in clients:
                for name, target in setups:
                    r = cloud_throughput.run_point(target, model_id, d, n, seconds, warmup, 60, TOKEN,
                                                   stats_targets=targets, session_keys=True)
                    rows.append({"setup": name, **r})
                    print(f"  {name:22s} clients={n:3d}: {r['steps_per_s']:8.1f} steps/s, "
                          f"{len(r['errors'])} failed clients", file=sys.stderr, flush=True)
    return rows


def _capacity_notes(rows: list[dict]) -> list[str]:
    by = {(r["setup"], r["clients"]): r for r in rows}
    notes = []
    for n in sorted({r["clients"] for r in rows}):
        one, two, straight = (by.get((k, n)) for k in ("1 replica, nginx", "2 replicas, nginx", "1 replica, straight"))
        if one and two and straight:
            notes.append(f"- {n} clients: 2 replicas / 1 replica behind nginx = "
                         f"{two['steps_per_s'] / max(one['steps_per_s'], 1e-9):.2f}x; 1 replica behind nginx / "
                         f"straight = {one['steps_per_s'] / max(straight['steps_per_s'], 1e-9):.2f}x")
    failed = sum(len(r["errors"]) for r in rows)
    return notes + [
        "",
        f"This machine has {os.cpu_count()} cores, shared by the replicas (one torch thread each), nginx and the "
        "client threads. A second replica can put a second core to work where one replica's single thread "
        "left it idle, but it also halves each replica's batches (the mean batch column) and competes with "
        "the clients and nginx for the same cores: the ratios above are overhead and contention on one "
        "small machine, not the speed-up of replicas on machines (or GPUs) of their own. "
        f"Correctness: {failed} client(s) failed over all points."]


def write(results: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "figures.json").write_text(json.dumps(results, indent=2) + "\n")
    o, f = results["balancer_overhead"], results["failover"]
    lines = [
        "# Replicas behind nginx: measured figures",
        "",
        f"`python -m bench.replicas{' --quick' if results['quick'] else ''}` on this machine ({results['machine']}); "
        "everything on 127.0.0.1, one torch thread per replica, clients as threads of the bench process. "
        "Model: the bundled `models/default` (d=256, 4 layers). Raw numbers: `figures.json`.",
        "",
        "## Balancer overhead per step (loopback)",
        "",
        "| path | median ms | p95 ms | steps |",
        "|---|---|---|---|",
        f"| straight to the replica | {o['direct']['median_ms']:.2f} | {o['direct']['p95_ms']:.2f} | "
        f"{o['direct']['n']} |",
        f"| through nginx, same replica | {o['nginx']['median_ms']:.2f} | {o['nginx']['p95_ms']:.2f} | "
        f"{o['nginx']['n']} |",
        "",
        f"nginx adds **{o['overhead_median_ms']:.2f} ms** per step (median) on loopback: one more hop each way.",
        "",
        "## Rebuild time vs history length",
        "",
        "The edge's way back to a lost session, through nginx: a fresh channel, GetModelInfo, then "
        "Open{history} prefilled by the replica in one forward pass.",
        "",
        "| history sentences | median ms | p95 ms | repeats |",
        "|---|---|---|---|",
        *[f"| {r['history']:,} | {r['median_ms']:.1f} | {r['p95_ms']:.1f} | {r['n']} |" for r in results["rebuild"]],
        "",
        "## Failover as seen by the user",
        "",
        f"A conversation of {f['history']} sentences through nginx with 2 replicas; the replica holding it "
        "is SIGKILLed between two steps; the next step detects the broken stream, reconnects (nginx skips "
        "the dead replica), rebuilds the session on the other one and retries the step.",
        "",
        f"- a normal step: {f['normal_step_median_ms']:.1f} ms (median)",
        f"- extra wait on the step that failed over: **{f['extra_ms']['median_ms']:.0f} ms** median, "
        f"{f['extra_ms']['p95_ms']:.0f} ms p95, over {f['repeats']} failovers",
        "",
        "## Capacity: 1 vs 2 replicas behind the balancer",
        "",
        "| setup | clients | steps/s | mean batch | p50 ms | p95 ms | failed clients |",
        "|---|---|---|---|---|---|---|",
        *[f"| {r['setup']} | {r['clients']} | {r['steps_per_s']:.0f} | {r['mean_batch']:.1f} | {r['p50_ms']:.1f} | "
          f"{r['p95_ms']:.1f} | {len(r['errors'])} |" for r in results["capacity"]],
        "",
        *_capacity_notes(results["capacity"]),
        "",
    ]
    (out / "figures.md").write_text("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=Path("models/default"), help="folder with edge/ and cloud/")
    ap.add_argument("--out", type=Path, default=Path("docs/deploy"), help="where figures.md and figures.json go")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--clients", default="16,64")
    args = ap.parse_args(argv)
    quick = args.quick
    runtime = EdgeRuntime.load(args.model / "edge", threads=1)
    results: dict = {"quick": quick, "machine": f"{os.cpu_count()} CPUs, {sys.platform}"}
    with tempfile.TemporaryDirectory(prefix="sllm-bench-replicas-") as tmp:
        config = ClusterConfig(bundle=args.model / "cloud", replicas=2, tokens=[TOKEN], threads=1, grace_s=2)
        with Cluster(config, Path(tmp) / "cluster") as cluster:
            print("balancer overhead ...", file=sys.stderr, flush=True)
            results["balancer_overhead"] = balancer_overhead(cluster, runtime, 50 if quick else 100,
                                                             2 if quick else 5)
            print("rebuild times ...", file=sys.stderr, flush=True)
            results["rebuild"] = rebuild_times(cluster, runtime, 3 if quick else 7)
            print("failovers ...", file=sys.stderr, flush=True)
            results["failover"] = failover(cluster, runtime, 2 if quick else 5, 32)
        print("capacity ...", file=sys.stderr, flush=True)
        results["capacity"] = capacity(args.model / "cloud", Path(tmp), runtime.model_id, runtime.d_model,
                                       [int(x) for x in args.clients.split(",")], 2.0 if quick else 5.0,
                                       1.0 if quick else 2.0)
    write(results, args.out)
    print((args.out / "figures.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
