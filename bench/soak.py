"""Soak: many edge clients against a real `sllm-cloud serve` process while faults are injected.

    python -m bench.soak                       # 60 s, 8 clients, models/default
    python -m bench.soak --duration 600 --clients 16 --json soak.json

Each client runs two-turn conversations (a prompt from the validation documents, then a
follow-up) through the edge API, greedy, and compares every answer with a fault-free run of the
same conversation run alone (one at a time, before the load). The same load runs first without
faults (--calm-duration), so what batching alone changes is told apart from what faults change.
In the fault phase a fault thread, in turn:
  - SIGKILLs the server and starts it again on the same port (sessions lost: clients rebuild),
  - SIGTERMs it (drain) and starts it again,
  - starts an `edge-chat` process and SIGKILLs it in the middle of an answer,
  - sends malformed bytes and an oversized message on a raw Converse stream,
  - floods health with unauthenticated Watch streams (some with 1 MiB service names).
Between turns, a session lost to a fault is rebuilt from the history vectors the edge keeps; a turn
that fails part-way starts its conversation over (for up to 30 s, with back-off).

Printed at the end: conversations completed, turns, turns whose greedy text differed from the
fault-free run, failed attempts by cause (the gRPC status the edge saw), conversations restarted and lost (still
failing after 30 s of retries), rebuilds between turns, faults injected and what they answered.
"""
from __future__ import annotations

import argparse
import collections
import itertools
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import grpc
import numpy as np

from sllm import edge
from sllm.protos.v1 import sllm_pb2 as pb
from sllm.protos.wire import pack
from sllm.runtime.server_process import TOKEN_ENV, ServerProcess
from sllm.training.data.corpus import load_documents, split_documents

FOLLOW_UP = "Tell me more."
RETRY_FOR_S, BACKOFF_S = 30.0, 0.25  # a server restart takes a few seconds (torch import, model load)


def soak_server(bundle: Path, token_file: Path, log: Path) -> ServerProcess:
    """`sllm-cloud serve` in its own process (the one launcher); a restart takes the port it got first."""
    return ServerProcess.serve(bundle, "--token-file", str(token_file), "--grace", "2", threads=1, log_path=log,
                               startup_timeout=60.0, stop_timeout=30.0)


def conversation_prompts(count: int, seed: int) -> list[str]:
    """First sentences of held-out documents of the bundled corpus (short enough to be one prompt)."""
    docs = load_documents(None)
    _, val = split_documents(docs, 0.02, 0)
    rng = random.Random(seed)
    texts = []
    for doc in rng.sample(val, min(len(val), count * 3)):
        first = doc.text.strip().split(". ")[0].strip()
        if 20 <= len(first) <= 200:
            texts.append(first + ".")
        if len(texts) == count:
            break
    return texts


class Tally:
    def __init__(self):
        self.lock = threading.Lock()
        self.counts: collections.Counter = collections.Counter()
        self.causes: collections.Counter = collections.Counter()
        self.faults: collections.Counter = collections.Counter()
        self.examples: dict[str, str] = {}  # cause -> one message
        self.differing: list[dict] = []

    def add(self, key: str, n: int = 1, table: str = "counts") -> None:
        with self.lock:
            getattr(self, table)[key] += n


def cause(e: Exception) -> str:
    """The gRPC status behind an error (EdgeError and CloudError carry it as `.code`), else its first
    words."""
    code = getattr(e, "code", None)
    return code.name if isinstance(code, grpc.StatusCode) else " ".join(str(e).split()[:6])


def run_conversation(target: str, runtime, token: str, prompt: str, max_sentences: int, tally: Tally,
                     stop_at: float) -> list[str] | None:
    """Two turns on one conversation; the answers, or None if it could not be completed.

    Between turns a lost session is rebuilt from the edge's history vectors (counted in
    "rebuilds"). A turn that fails part-way leaves part of an answer in the history, so the
    conversation is started over on a new session (counted in "conversations restarted"), for up
    to RETRY_FOR_S seconds with back-off; what the user would see then is the error."""
    give_up = min(time.monotonic() + RETRY_FOR_S, stop_at + RETRY_FOR_S)
    for attempt in itertools.count():
        chat = None
        try:
            chat = edge.connect(target, runtime, token=token, notify=lambda m: tally.add("rebuilds"))
            answers = [chat.ask(text, max_sentences=max_sentences).text() for text in (prompt, FOLLOW_UP)]
            tally.add("turns", len(answers))
            return answers
        except edge.EdgeError as e:
            tally.add(cause(e), table="causes")
            tally.examples.setdefault(cause(e), str(e)[:300])
            if time.monotonic() > give_up:
                tally.add("conversations lost")
                return None
            tally.add("conversations restarted")
            time.sleep(min(2.0, BACKOFF_S * (attempt + 1)))
        finally:
            if chat is not None:
                chat.close()


def raw_stream(target: str, token: str, messages: list, raw: bool = False) -> str:
    """Messages on one Converse stream; the status it ended with."""
    with grpc.insecure_channel(target, options=[("grpc.max_send_message_length", 64 << 20)]) as channel:
        call = channel.stream_stream("/sllm.v1.SentenceLM/Converse",
                                     request_serializer=None if raw else pb.ClientMessage.SerializeToString,
                                     response_deserializer=pb.ServerMessage.FromString)
        try:
            for _ in call(iter(messages), timeout=10, metadata=(("authorization", f"Bearer {token}"),)):
                pass
            return "OK"
        except grpc.RpcError as e:
            return e.code().name


def watch_flood(target: str, streams: int = 100, huge: int = 8) -> str:
    """Unauthenticated health Watch streams, some with 1 MiB service names, held a second, then cancelled:
    how they ended (the server keeps a few per address and refuses the huge names)."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)]) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        calls = [stub.Watch(health_pb2.HealthCheckRequest(service="x" * (1 << 20) if i < huge else ""), timeout=5)
                 for i in range(streams)]
        for c in calls:  # the first answer (SERVING), or the refusal of a huge name
            try:
                next(c)
            except grpc.RpcError:
                pass
        time.sleep(1.0)
        ended = collections.Counter(c.code().name for c in calls if c.done())
        for c in calls:
            c.cancel()
    return ", ".join(f"{name} {n}" for name, n in sorted(ended.items())) or "none ended"


def inject_faults(server: ServerProcess, runtime, token: str, model: Path, prompt: str, tally: Tally,
                  stop: threading.Event, every_s: float, rng: random.Random) -> None:
    """Faults until `stop`; the server is restarted from this thread, so it gets SIGTERM when the
    thread ends (runtime.procs): after the clients, when the phase is over."""
    kinds = ["server SIGKILL + restart", "server SIGTERM drain + restart", "client SIGKILL mid-answer",
             "malformed message", "oversized message", "health Watch flood"]
    i = 0
    while not stop.wait(every_s):
        kind = kinds[i % len(kinds)] if i < len(kinds) else rng.choice(kinds)
        i += 1
        if kind.startswith("server"):
            server.stop(sig=signal.SIGKILL if "KILL" in kind else signal.SIGTERM)
            server.start()
            tally.add(kind, table="faults")
        elif kind.startswith("client"):
            env = {**os.environ, TOKEN_ENV: token, "OMP_NUM_THREADS": "1"}
            proc = subprocess.Popen([sys.executable, "-m", "sllm.edge", "--server", server.address, "--bundle",
                                     str(model / "edge"), "--prompt", prompt, "--max-sentences", "32"],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
            time.sleep(rng.uniform(0.8, 1.5))  # start-up is about 0.8 s: kill it around its first sentences
            proc.kill()
            proc.wait()
            tally.add(kind, table="faults")
        elif kind == "health Watch flood":
            tally.add(f"{kind} -> {watch_flood(server.address)}", table="faults")
        elif kind == "malformed message":
            status = raw_stream(server.address, token, [b"\x0a\xff\xff\xff\xff garbage"], raw=True)
            tally.add(f"{kind} -> {status}", table="faults")
        else:
            d = runtime.d_model
            huge = pb.ClientMessage(append=pb.Append(vectors=pack(np.zeros((1 << 16, d), np.float32), "float32")))
            opened = pb.ClientMessage(open=pb.Open(model_id=runtime.model_id, dim=d))
            status = raw_stream(server.address, token, [opened, huge])
            tally.add(f"{kind} -> {status}", table="faults")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--duration", type=float, default=60.0, help="seconds of load with faults")
    ap.add_argument("--calm-duration", type=float, default=20.0,
                    help="seconds of the same load without faults first (0 = skip)")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--model", type=Path, default=Path("models/default"))
    ap.add_argument("--max-sentences", type=int, default=4, help="per answer")
    ap.add_argument("--fault-every", type=float, default=5.0, help="seconds between faults")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = ap.parse_args(argv)

    rng = random.Random(args.seed)
    work = Path(tempfile.mkdtemp(prefix="sllm-soak-"))
    token = f"soak-{rng.getrandbits(64):016x}"
    (work / "tokens").write_text(token + "\n")
    server = soak_server(args.model / "cloud", work / "tokens", work / "server.log")
    runtime = edge.load_runtime(args.model / "edge", "cpu", 1)
    prompts = conversation_prompts(args.prompts, args.seed)
    server.start()
    try:
        t0 = time.monotonic()
        reference = {p: run_conversation(server.address, runtime, token, p, args.max_sentences, Tally(), 1e18)
                     for p in prompts}  # one conversation at a time: no batching, no faults
        print(f"reference: {len(prompts)} conversations in {time.monotonic() - t0:.1f} s", file=sys.stderr)
        phases = {}
        # the same load without faults first: batched steps round differently from batch-1 steps, and
        # a near-tie in the decoder can then flip a greedy token; this phase measures that alone
        for name, duration, with_faults in (("without faults", args.calm_duration, False),
                                            ("with faults", args.duration, True)):
            if duration > 0:
                phases[name] = run_phase(server, runtime, token, prompts, reference, args, duration, with_faults, rng)
                print(f"{name}: done", file=sys.stderr)
    finally:
        server.stop()
    report = {"clients": args.clients, "model": str(args.model), "max_sentences": args.max_sentences,
              "fault_every_s": args.fault_every, **phases}
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


def run_phase(server: ServerProcess, runtime, token: str, prompts: list[str], reference: dict, args, duration: float,
              with_faults: bool, rng: random.Random) -> dict:
    """`args.clients` clients for `duration` seconds (faults every `args.fault_every` s if asked)."""
    tally = Tally()
    stop = threading.Event()
    stop_at = time.monotonic() + duration

    def client(k: int) -> None:
        local = random.Random(args.seed * 1000 + k)
        while time.monotonic() < stop_at:
            p = local.choice(prompts)
            answers = run_conversation(server.address, runtime, token, p, args.max_sentences, tally, stop_at)
            if answers is None:
                continue
            tally.add("conversations completed")
            for turn, (a, r) in enumerate(zip(answers, reference[p])):
                if a != r:
                    tally.add("turns differing from the one-at-a-time run")
                    tally.differing.append({"prompt": p, "turn": turn, "got": a, "expected": r})

    threads = [threading.Thread(target=client, args=(k,), daemon=True) for k in range(args.clients)]
    if with_faults:
        threads.append(threading.Thread(target=inject_faults, args=(server, runtime, token, args.model, prompts[0],
                                                                    tally, stop, args.fault_every, rng), daemon=True))
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads[: args.clients]:
        t.join(duration + 300)
    stop.set()
    for t in threads[args.clients:]:
        t.join(120)
    return {"duration_s": round(time.monotonic() - t0, 1),
            **{k: tally.counts[k] for k in ("conversations completed", "turns",
                                            "turns differing from the one-at-a-time run", "conversations restarted",
                                            "conversations lost", "rebuilds")},
            "failed attempts by cause": dict(tally.causes), "faults": dict(tally.faults),
            "an example of each cause": tally.examples, "differing turns (first 3)": tally.differing[:3]}

if __name__ == "__main__":
    sys.exit(main())
