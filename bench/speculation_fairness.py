"""An honest client's step latency alone and beside four rewinding speculators (speculation's fairness).

    python -m bench.speculation_fairness                       # models/default, 5 rounds
    python -m bench.speculation_fairness --rounds 2 --json /tmp/fairness.json

A real `sllm-cloud serve` of MODEL/cloud (its own process, speculation on: --speculate-max 16
--speculate-answer-max 16, the SentenceVAE in MODEL/svae) on 127.0.0.1. The honest client is the edge
(sllm.edge.connect, speculate 8) answering validation prompts of the bundled corpus, up to 6 sentences
each; a step = the time from one answer sentence to the next. A rewinder lets the cloud guess 8 sentences,
then rewinds to its prompt's end with a sentence of its own, again and again (what the cloud's
speculation-stop guards against). The control: the same honest client beside four other honest
speculating clients that ask without a pause, as the rewinders send; any busy neighbour slows a step on a
shared machine, so what the server's guards must show is that rewinders slow it no more than honest load
does. Rounds interleave (alone, beside honest clients, beside rewinders), so a drifting background load
hits all alike. The clients share this machine's cores (and this process's GIL) with the server.
"""
from __future__ import annotations

import argparse
import json
import statistics
import threading
import time
from pathlib import Path

from bench.machine import LoadMonitor, machine_info
from sllm.edge.api import AnswerOptions
from sllm.protos.client import CloudClient
from sllm.protos.v1 import sllm_pb2 as pb
from sllm.runtime.server_process import ServerProcess

N = 8  # sentences the cloud may run ahead of each client
ROOT = Path(__file__).resolve().parent.parent


def prompts(count: int) -> list[str]:
    """The first sentences (about 200 characters) of `count` validation documents of the bundled corpus."""
    from sllm.training.data.corpus import load_documents, split_documents

    _, val = split_documents(load_documents(None))
    out = []
    for doc in val:
        text = " ".join(doc.text.split())[:240]
        text = text[:text.rfind(".") + 1] or text
        if len(text) > 40:
            out.append(text)
    return out[:count]


def honest(address: str, rt, texts: list[str], steps: list[float], stop: threading.Event | None = None) -> None:
    """An honest speculating edge: appends the seconds between its answer sentences to `steps`; with `stop`,
    asks its prompts over and over until it is set."""
    from sllm import edge

    with edge.connect(address, rt, speculate=N, options=AnswerOptions()) as chat:
        while True:
            for text in texts:
                t0 = time.perf_counter()
                for _ in chat.ask(text, max_sentences=6):
                    steps.append(time.perf_counter() - t0)
                    t0 = time.perf_counter()
                chat.reset()
                if stop is not None and stop.is_set():
                    return
            if stop is None:
                return


def neighbours(address: str, rt, texts: list[str], attack_prompt) -> tuple[threading.Event, list, list[dict]]:
    """Four honest clients asking without a pause (the control), started: (stop, threads, their outs)."""
    stop, outs = threading.Event(), [{} for _ in range(4)]
    threads = [threading.Thread(target=honest, args=(address, rt, texts[i % len(texts):] + texts[:i % len(texts)],
                                                     [], stop)) for i in range(4)]
    for t in threads:
        t.start()
    return stop, threads, outs


def rewinders(address: str, rt, texts: list[str], attack_prompt) -> tuple[threading.Event, list, list[dict]]:
    """Four rewinders, started: (stop, threads, their outs)."""
    stop, outs = threading.Event(), [{} for _ in range(4)]
    threads = [threading.Thread(target=rewinder, args=(address, rt, attack_prompt, stop, o)) for o in outs]
    for t in threads:
        t.start()
    return stop, threads, outs


def rewinder(address: str, rt, prompt, stop: threading.Event, out: dict) -> None:
    """Lets the cloud guess N sentences, then rewinds to the prompt's end, until `stop` (out: messages, error)."""
    p, sent, decoding = len(prompt), 0, pb.Decoding(guess=True, stop_threshold=1.0)
    try:
        with CloudClient(address) as c:
            conv = c.conversation(rt.model_id, rt.d_model, speculate=N, step_timeout=60)
            base, sent = conv.append(prompt, position=0, decoding=decoding).past_length, 1
            r = 0
            while not stop.is_set():
                for k in range(1, N + 1):
                    if conv.speculative_step(base + k).declined:
                        break
                base = conv.append(prompt[-1:] * (1 + 0.01 * r), position=p, decoding=decoding).past_length
                sent, r = sent + 1, r + 1
            conv.close()
    except Exception as e:  # noqa: BLE001 - reported, the bench goes on
        out["error"] = repr(e)
    out["messages"] = out.get("messages", 0) + sent


def spread(xs: list[float]) -> dict:
    ms = sorted(1000 * x for x in xs)
    return {"n": len(ms), "min_ms": round(ms[0], 2), "median_ms": round(statistics.median(ms), 2),
            "max_ms": round(ms[-1], 2)} if ms else {"n": 0}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=Path("models/default"))
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds (alone, then beside rewinders)")
    ap.add_argument("--prompts", type=int, default=6, help="prompts the honest client answers per pass")
    ap.add_argument("--threads", type=int, default=0, help="server torch threads (0 = default)")
    ap.add_argument("--json", type=Path, help="write the figures here too")
    args = ap.parse_args(argv)

    from sllm.edge.runtime import EdgeRuntime

    rt = EdgeRuntime.load(args.model / "edge", device="cpu")
    texts = prompts(args.prompts + 1)
    attack_prompt = rt.encode(list(rt.prompt_sentences(texts[-1])))
    texts = texts[:-1]
    server = ServerProcess.serve(args.model / "cloud", "--speculate-max", "16", "--speculate-answer-max", "16",
                                 "--grace", "1", "--device", "cpu", threads=args.threads, tokens=[],
                                 stop_timeout=30.0, name=f"the server of {args.model}")
    alone: list[float] = []
    beside_honest: list[float] = []
    beside: list[float] = []
    attacks: list[dict] = []
    info = machine_info(ROOT, args.threads)
    try:
        server.start()
        honest(server.address, rt, texts[:1], [])  # warm-up: sessions, ORT, the model thread
        with LoadMonitor() as load:
            for r in range(args.rounds):
                honest(server.address, rt, texts, alone)
                for start, steps in ((neighbours, beside_honest), (rewinders, beside)):
                    stop, threads, outs = start(server.address, rt, texts, attack_prompt)
                    try:
                        time.sleep(0.3)
                        honest(server.address, rt, texts, steps)
                    finally:
                        stop.set()
                        for t in threads:
                            t.join(60)
                    if start is rewinders:
                        attacks += outs
                print(f"  round {r + 1}/{args.rounds}: alone {spread(alone)['median_ms']} ms, beside honest "
                      f"{spread(beside_honest)['median_ms']} ms, beside rewinders {spread(beside)['median_ms']} ms "
                      "(medians so far)", flush=True)
    finally:
        server.stop()

    a, h, b = spread(alone), spread(beside_honest), spread(beside)
    ratio = b["median_ms"] / a["median_ms"] if a.get("median_ms") else float("nan")
    against_honest = b["median_ms"] / h["median_ms"] if h.get("median_ms") else float("nan")
    result = {"model": str(args.model), "rounds": args.rounds, "speculate": N, "alone": a,
              "beside_four_honest": h, "beside_four_rewinders": b, "median_ratio": round(ratio, 3),
              "median_ratio_rewinders_vs_honest_neighbours": round(against_honest, 3), "rewinder_messages": sum(o.get("messages", 0) for o in attacks),
              "rewinder_errors": [o["error"] for o in attacks if "error" in o], "load": load.summary(), "machine": info}
    print(f"\nspeculation fairness: {args.model}, {args.rounds} rounds x {len(texts)} prompts, commit "
          f"{info['git_commit']}, {info['cores']} CPUs")
    print(f"{'honest step':<24} {'n':>5} {'min ms':>8} {'median ms':>10} {'max ms':>8}")
    for name, s in (("alone", a), ("beside four honest", h), ("beside four rewinders", b)):
        print(f"{name:<24} {s['n']:>5} {s.get('min_ms', float('nan')):>8.2f} {s.get('median_ms', float('nan')):>10.2f} "
              f"{s.get('max_ms', float('nan')):>8.2f}")
    print(f"median ratio beside rewinders / alone: {ratio:.2f}x; beside rewinders / beside honest clients: "
          f"{against_honest:.2f}x; rewinder messages: {result['rewinder_messages']}"
          + (f"; rewinder errors: {result['rewinder_errors']}" if result["rewinder_errors"] else ""))
    print(f"machine load: {load.describe()}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
