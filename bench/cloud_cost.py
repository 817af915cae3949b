"""Cloud cost per output token (issue 16 item 2): the SLLM and a token-level OPT in the same cloud
engine and server, at 1, 4, 16 and 64 concurrent conversations.

    python -m bench.cloud_cost            # models/default; docs/results/cloud-cost.{json,md}
    python -m bench.cloud_cost --quick    # clients 1,4,16, short windows, one round (a smoke test)

Both models are served by the real server (`sllm-cloud serve`, its own process, batching on):
  sllm    MODEL/cloud: the SLLM's grafted OPT, one step per SENTENCE
  token   the baseline OPT's own blocks (modeling.token_bundle), one step per TOKEN, batched across
          sessions the same way (the token-level split's cloud half)
The clients are bench/cloud_throughput.py's client loop (threads of this process, random vectors:
the compute does not depend on their values), each conversation a prompt then single steps, as
fast as answers come back. The same conversation in tokens for both: SLLM 4 prompt sentences + 60
steps, token-level round(4 L) prompt tokens + round(60 L) steps (capped by its positions).

Over a fixed window after a warm-up, from the server side: its process CPU-seconds (utime + stime
of /proc/PID/stat, all threads), steps answered and forward passes (GetStats). A step answers one
output unit: a token-level step = 1 token, an SLLM step = L tokens, L = mean tokens per generated
sentence of real greedy SLLM generations of MODEL (edge runtime + this server, validation prompts,
stop head ignored, run to >= --l-tokens tokens). Per model and concurrency: cloud forward passes per
output token, output tokens per cloud CPU-second, mean batch; and the ratio SLLM / token-level of
tokens per CPU-second, against the issue's goal of >= 0.7 x L at 64 clients. Models and client
counts are interleaved, --rounds times; min / median / max over the rounds.

What it does not show: the edge's cost (each client decodes its own sentences), or latency under
load (p50 per step is recorded). The CPU is shared with the 64 client threads and anything else
running: CPU-seconds are the server process's own, but its wall-clock throughput is not a capacity.
"""
from __future__ import annotations

import argparse
import shlex
import sys
import tempfile
import time
from pathlib import Path

from bench import cloud_throughput
from bench.summary import bench_parser, spread, spread_cell, write_results
from bench.texts import validation_text

ROOT = Path(__file__).resolve().parents[1]
PROMPT_SENTENCES, SENTENCES_PER_CONVERSATION = 4, 60
GOAL = 0.7  # x L: SLLM tokens per CPU-second over the token-level model's, at 64 clients


def measure_L(runtime, address: str, prompts: list, min_tokens: int, max_sentences: int, wire_dtype: str) -> dict:
    """Mean tokens per generated sentence of greedy SLLM generations through the server at `address`."""
    from bench.sllm_loop import GrpcStepper, generate
    from sllm.protos.client import CloudClient

    with CloudClient(address) as client:
        stepper = GrpcStepper(client, runtime.model_id, runtime.d_model, wire_dtype)
        runs = [generate(runtime, stepper, p, min_tokens, max_sentences) for p in prompts]
    tokens, sentences = sum(r.tokens for r in runs), sum(r.sentences for r in runs)
    return {"L": tokens / sentences, "tokens": tokens, "sentences": sentences, "generations": len(runs),
            "min_tokens": min_tokens, "how": f"{len(runs)} greedy SLLM generations (edge runtime + this server) of "
            f"validation prompts, stop head ignored, each to >= {min_tokens} tokens: tokens / sentences"}


def point(server: dict, clients: int, args) -> dict:
    """One measured window of `clients` conversations against one server; per-token figures."""
    proc, address = server["proc"], server["address"]
    r = cloud_throughput.run_point(address, server["model_id"], server["d"], clients, args.duration, args.warmup,
                                   server["steps"], prompt_vectors=server["prompt"],
                                   probe=lambda: cloud_throughput.cpu_seconds(proc.pid))
    tokens = r["server_steps"] * server["tokens_per_step"]
    cpu = r["probe_delta"]
    return {**r, "model": server["name"], "cpu_s": cpu, "cpu_busy": cpu / args.duration, "output_tokens": tokens,
            "tokens_per_s": tokens / args.duration,
            "passes_per_token": r["forward_passes"] / tokens if tokens else float("nan"),
            "tokens_per_cpu_s": tokens / cpu if cpu > 0 else float("nan")}


def summarize(points: list[dict], clients: list[int], L: float) -> list[dict]:
    rows = []
    for n in clients:
        row = {"clients": n}
        for model in ("sllm", "token"):
            mine = [p for p in points if p["clients"] == n and p["model"] == model]
            row[model] = {k: spread([p[k] for p in mine]) for k in
                          ("tokens_per_cpu_s", "passes_per_token", "mean_batch", "tokens_per_s", "cpu_busy", "p50_ms")}
            row[model]["errors"] = sum(len(p["errors"]) for p in mine)
        # the ratio per round (both models measured back to back), then its spread
        ratios = [s["tokens_per_cpu_s"] / t["tokens_per_cpu_s"] for s, t in
                  zip(*([p for p in points if p["clients"] == n and p["model"] == m] for m in ("sllm", "token")))]
        row["ratio"] = spread(ratios)
        row["ratio_over_L"] = spread([x / L for x in ratios])
        rows.append(row)
    return rows


def render(results: dict) -> str:
    cfg, L = results["config"], results["L"]["L"]
    m = results["machine"]
    lines = [
        "# Cloud cost per output token: the SLLM and a token-level OPT in the same engine",
        "",
        (f"`{results['command']}` on {m['cpu']} ({m['cores']} cores, shared), {m['date_utc']} UTC, commit "
        f"{m['git_commit']}; server torch threads {cfg['threads']}, device {cfg['device']}, {cfg['duration']:g} s "
        f"windows after {cfg['warmup']:g} s of warm-up, {cfg['rounds']} round(s), models and client counts "
        "interleaved; min-max over rounds in brackets."),
        "",
        (f"L = **{L:.2f}** tokens per sentence: {results['L']['how']} ({results['L']['tokens']} tokens in "
        f"{results['L']['sentences']} sentences)."),
        (f"Conversations: SLLM {cfg['shapes']['sllm']['prompt']} prompt sentences + {cfg['shapes']['sllm']['steps']} "
        f"steps; token-level {cfg['shapes']['token']['prompt']} prompt tokens + {cfg['shapes']['token']['steps']} "
        "steps (the same length in tokens). A step = one output sentence (L tokens) or one token."),
        "",
        ("| clients | SLLM tok / CPU-s | token-level tok / CPU-s | ratio | ratio / L | SLLM passes / tok | "
         "token passes / tok | SLLM mean batch | token mean batch | server CPU busy (SLLM / token) | "
         "tok/s wall (SLLM / token) |"),
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results["rows"]:
        s, t = r["sllm"], r["token"]
        lines.append(
            f"| {r['clients']} | {spread_cell(s['tokens_per_cpu_s'], '{:.0f}')} | "
            f"{spread_cell(t['tokens_per_cpu_s'], '{:.0f}')} | "
            f"{spread_cell(r['ratio'], '{:.2f}')} | {spread_cell(r['ratio_over_L'], '{:.2f}')} | "
            f"{s['passes_per_token']['median']:.4f} | {t['passes_per_token']['median']:.4f} | "
            f"{s['mean_batch']['median']:.1f} | {t['mean_batch']['median']:.1f} | "
            f"{s['cpu_busy']['median']:.2f} / {t['cpu_busy']['median']:.2f} | "
            f"{s['tokens_per_s']['median']:.0f} / {t['tokens_per_s']['median']:.0f} |")
    top = results["rows"][-1]
    lines += [
        "",
        f"Goal (issue 16): at 64 clients, SLLM tokens per cloud CPU-second >= {GOAL} x L x the token-level "
        f"model's, i.e. ratio / L >= {GOAL}. Measured at {top['clients']} clients: ratio / L = "
        f"{top['ratio_over_L']['median']:.2f} (median) -> "
        f"{'met' if top['ratio_over_L']['median'] >= GOAL else 'NOT met'}"
        + ("" if top["clients"] == 64 else " (64 clients not measured in this run)") + ".",
        "",
        ("What the columns mean: tok / CPU-s = output tokens answered per CPU-second of the server process "
        "(user + system, all threads); passes / tok = batched forward passes per output token (1/L x 1/batch for "
        "the SLLM, 1/batch for the token-level model); CPU busy = server CPU-seconds per wall second; tok/s wall = "
        "output tokens answered per second (on a GPU, a GPU-second is a wall second of the server's device). "
        "ratio / L may pass 1: the same conversation in tokens has ~L times more positions to attend over and an "
        "L times longer prompt, so a token-level step costs a little more than an SLLM step. Both "
        "servers run the same OPT blocks (d, layers, heads) with the same engine, batcher and wire. "
        "Figures measured on a CPU shared with other work are provisional: re-measure on a quiet machine with "
        "the command above."),
    ]
    return "\n".join(lines) + "\n"


def parser() -> argparse.ArgumentParser:
    ap = bench_parser(__doc__, "clients 1,4,16; 1.5 s windows; 1 round; L from 3 runs")
    ap.add_argument("--clients", help="comma-separated (default 1,4,16,64)")
    ap.add_argument("--duration", type=float, help="measured seconds per point (default 5)")
    ap.add_argument("--warmup", type=float, help="seconds before each window (default 1)")
    ap.add_argument("--rounds", type=int, help="times every point is measured (default 3)")
    ap.add_argument("--threads", type=int, default=1, help="server torch threads (and this process's ORT)")
    ap.add_argument("--device", default="cpu", help="the servers' --device (cpu, cuda)")
    ap.add_argument("--l-prompts", type=int, help="SLLM generations that measure L (default 8)")
    ap.add_argument("--l-tokens", type=int, default=128, help="tokens per L generation (at least)")
    ap.add_argument("--wire-dtype", choices=("float16", "float32"), default="float16", help="for the L generations")
    return ap


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    args = parser().parse_args(argv)
    q = args.quick
    clients = [int(x) for x in (args.clients or ("1,4,16" if q else "1,4,16,64")).split(",")]
    args.duration = args.duration or (1.5 if q else 5.0)
    args.warmup = args.warmup if args.warmup is not None else (0.5 if q else 1.0)
    args.rounds = args.rounds or (1 if q else 3)
    args.l_prompts = args.l_prompts or (3 if q else 8)

    from bench.machine import machine_info
    from sllm.edge.runtime import EdgeRuntime
    from sllm.modeling.baseline_bundle import FOLDER, load_baseline_bundle
    from sllm.modeling.token_bundle import token_model_id, write_token_bundle
    from sllm.runtime.manifest import read_manifest

    def say(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    t0 = time.perf_counter()
    rt = EdgeRuntime.load(args.model / "edge", device="cpu", threads=args.threads)
    baseline = load_baseline_bundle(args.model / FOLDER)
    cloud = read_manifest(args.model / "cloud", kind="cloud")
    text = validation_text(rt.tokenizer, rt.max_sentence_tokens, rt.split_on_comma)
    servers = {}
    with tempfile.TemporaryDirectory(prefix="sllm-cloud-cost-") as tmp:
        token_bundle, token_id = Path(tmp) / "token", token_model_id(baseline.path)
        write_token_bundle(baseline.model, token_bundle, token_id)
        try:
            for name, bundle in (("sllm", args.model / "cloud"), ("token", token_bundle)):  # spawned from this
                # thread (see runtime.procs), then waited for: they start side by side
                proc = cloud_throughput.bench_server(bundle, args.threads, 64, 0.0, device=args.device)
                proc.spawn()
                servers[name] = {"name": name, "proc": proc, "d": int(cloud["d_model"]),
                                 "model_id": cloud["model_id"] if name == "sllm" else token_id}
            for s in servers.values():
                s["address"] = s["proc"].wait_ready()["address"]
            Lm = measure_L(rt, servers["sllm"]["address"], text.prompts(64, args.l_prompts), args.l_tokens,
                           int(cloud["max_sentences"]), args.wire_dtype)
            L = Lm["L"]
            say(f"L = {L:.2f} tokens per sentence ({Lm['sentences']} sentences)")
            max_tokens = baseline.model.config.max_position_embeddings
            token_prompt = round(PROMPT_SENTENCES * L)
            servers["sllm"].update(prompt=PROMPT_SENTENCES, steps=SENTENCES_PER_CONVERSATION, tokens_per_step=L)
            servers["token"].update(prompt=token_prompt, tokens_per_step=1.0,
                                    steps=min(round(SENTENCES_PER_CONVERSATION * L), max_tokens - token_prompt - 1))
            points = []
            for k in range(args.rounds):
                for n in clients:
                    order = ("sllm", "token") if (k + n) % 2 == 0 else ("token", "sllm")
                    for name in order:
                        p = point(servers[name], n, args)
                        points.append({**p, "round": k})
                        say(f"round {k} clients {n:3d} {name:5s}: {p['tokens_per_cpu_s']:8.0f} tok/CPU-s  "
                            f"{p['passes_per_token']:.4f} passes/tok  batch {p['mean_batch']:5.1f}  "
                            f"cpu busy {p['cpu_busy']:.2f}" + (f"  ERRORS {p['errors'][:1]}" if p["errors"] else ""))
        finally:
            for s in servers.values():
                s["proc"].stop()
    results = {
        "command": shlex.join(["python", "-m", "bench.cloud_cost", *argv]), "wall_s": time.perf_counter() - t0,
        "machine": machine_info(ROOT, args.threads),
        "config": {"model": str(args.model), "clients": clients, "duration": args.duration, "warmup": args.warmup,
                   "rounds": args.rounds, "threads": args.threads, "device": args.device, "quick": q,
                   "shapes": {n: {"prompt": s["prompt"], "steps": s["steps"]} for n, s in servers.items()},
                   "token_model_id": token_id, "sllm_model_id": cloud["model_id"], "text": text.source},
        "L": Lm, "goal_ratio_over_L": GOAL,
        "rows": summarize(points, clients, L),
        "points": [{k: v for k, v in p.items() if k != "errors"} | {"errors": p["errors"][:3]} for p in points],
    }
    print(write_results(args.out, "cloud-cost", results, render))
    say(f"wrote {args.out / 'cloud-cost.md'} and cloud-cost.json in {results['wall_s']:.0f} s")
    return results


if __name__ == "__main__":
    main()
