"""Soak: many edge clients against a real `sllm-cloud serve` process while faults are injected.

    python -m bench.soak                       # 60 s, 8 clients, models/default
    python -m bench.soak --duration 600 --clients 16 --json soak.json

Each client runs two-turn conversations (a prompt from the validation documents, then, --think seconds
later, a follow-up) through the edge API, greedy, and compares every answer with a fault-free run of the
same conversation run alone (one at a time, before the load). The same load runs first without
faults (--calm-duration), so what batching alone changes is told apart from what faults change.
In the fault phase a fault thread, in turn:
  - SIGKILLs the server and starts it again on the same port (sessions lost: clients rebuild),
  - SIGTERMs it (drain) and starts it again,
  - starts an `edge-chat` process and SIGKILLs it in the middle of an answer,
  - sends malformed bytes and an oversized message on a raw Converse stream,
  - floods health with unauthenticated Watch streams (some with 1 MiB service names).
A turn that fails before any of it reached the context is asked again on the same conversation, whose
session is rebuilt from the history vectors the edge keeps; a turn that fails part-way starts its conversation
over (for up to 30 s, with back-off).

Printed at the end: conversations completed, turns, turns whose greedy text differed from the
fault-free run and why, failed attempts by cause (the gRPC status the edge saw), conversations restarted and lost
(still failing after 30 s of retries), rebuilds between turns, faults injected and what they answered.

Why a turn differs: the client keeps every step's h_t, so a differing turn is compared with the reference step by
step. A near-tie is a greedy decision that close in the reference (two tokens' logits, or P(stop) and the
threshold, within NEAR_TIE_MARGIN) flipped by float rounding alone: the same sentences before it, h_t within
NEAR_TIE_H. The server's steps are not batch-invariant (torch's CPU matmul rounds a product of 1 row, 2-3 rows and
4 or more rows differently, and the short-context attention pads every session's past to the longest in the
batch), so who else is in a batch moves h_t by ~1e-6, in either phase. A turn after a differing one differs
because its context does. Anything else is "unexplained": a rebuilt session that does not hold what the
original held, a sentence lost or repeated, a stale step; those are listed first.
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
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np

from sllm import edge
from sllm.protos.v1 import sllm_pb2 as pb
from sllm.protos.wire import pack
from sllm.runtime.sampling import Picker, control_repetition
from sllm.runtime.server_process import TOKEN_ENV, ServerProcess
from sllm.runtime.svae_onnx import decode_loop
from sllm.sentences.sampling import AnswerOptions
from sllm.training.data.corpus import load_documents, split_documents

FOLLOW_UP = "Tell me more."
RETRY_FOR_S, BACKOFF_S = 30.0, 0.25  # a server restart takes a few seconds (torch import, model load)
# A differing turn is a near-tie when the two runs decoded the same sentences up to the one that differs, the
# h_t it was decoded from differs by float rounding only (the same inputs stepped in batches of other sizes:
# torch's CPU matmul rounds a 1-row product differently from a 2-row one, ~1e-6 on models/default), and the
# decision that flipped was that close: two tokens' logits, or P(stop) and the threshold.
NEAR_TIE_H = 1e-4  # max|h - h_ref| / max(1, max|h_ref|)
NEAR_TIE_MARGIN = 1e-3  # logits, or P(stop)


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
        self.server_starts = 1  # the fault thread counts restarts: a conversation says which server it ran on

    def add(self, key: str, n: int = 1, table: str = "counts") -> None:
        with self.lock:
            getattr(self, table)[key] += n


def cause(e: Exception) -> str:
    """The gRPC status behind an error (EdgeError and CloudError carry it as `.code`), else its first
    words."""
    code = getattr(e, "code", None)
    return code.name if isinstance(code, grpc.StatusCode) else " ".join(str(e).split()[:6])


@dataclass
class Turn:
    """One answer as the client saw it: its sentences' token ids and every step it took (the h_t and P(stop)
    each sentence was decoded from, and the last one, which ended the answer)."""

    text: str
    sentences: list[list[int]]
    hidden: list[np.ndarray]  # [d] per step: the prompt's, then one per appended sentence
    stop_probability: list[float]
    end: str  # TurnEnd.reason


@dataclass
class Conversation:
    prompt: str
    turns: list[Turn]
    events: list[str]  # what happened to this client on the way (failed attempts, rebuilds, server restarts)

    @property
    def answers(self) -> list[str]:
        return [t.text for t in self.turns]


class RecordingStepper:
    """The chat's stepper, with every step's h_t and P(stop) kept (the bench reads them; the product
    is unchanged)."""

    def __init__(self, stepper):
        self.stepper = stepper
        self.hidden: list[np.ndarray] = []
        self.stop_probability: list[float] = []

    def append(self, vectors: np.ndarray):
        step = self.stepper.append(vectors)
        self.hidden.append(np.array(step.hidden, dtype=np.float32))
        self.stop_probability.append(float(step.stop_probability))
        return step

    @classmethod
    def install(cls, chat) -> "RecordingStepper":
        """Record the steps of `chat` (an edge.connect conversation) from now on."""
        chat.session.stepper = recording = cls(chat.session.stepper)
        return recording

    def take(self) -> tuple[list[np.ndarray], list[float]]:
        steps = self.hidden, self.stop_probability
        self.hidden, self.stop_probability = [], []
        return steps

    def __getattr__(self, name):
        return getattr(self.stepper, name)


def recorded_turn(chat, text: str, max_sentences: int) -> Turn:
    """One answer of `chat` (its steps recorded: RecordingStepper.install), read to its end."""
    answer = chat.ask(text, max_sentences=max_sentences)
    said = answer.text()
    return Turn(said, [s.ids for s in answer.sentences], *chat.session.stepper.take(), answer.end.reason)


def run_conversation(target: str, runtime, token: str, prompt: str, max_sentences: int, tally: Tally,
                     stop_at: float, think_s: float = 0.0) -> Conversation | None:
    """Two turns on one conversation, `think_s` seconds apart (the user reads the answer), or None if it
    could not be completed.

    A turn that fails before any of it reached the context (its prompt's step) is asked again on the
    same conversation, whose session is then rebuilt from the edge's history vectors (counted in
    "turns retried" and "rebuilds"), as a user would ask again. A turn that fails part-way leaves part
    of an answer in the history, so the conversation is started over on a new session (counted in
    "conversations restarted"). Both for up to RETRY_FOR_S seconds with back-off; what the user would
    see then is the error."""
    give_up = min(time.monotonic() + RETRY_FOR_S, stop_at + RETRY_FOR_S)
    events: list[str] = []

    def notify(message: str) -> None:
        tally.add("rebuilds")
        events.append(f"server start {tally.server_starts}: {message}")

    chat, turns = None, []
    try:
        for attempt in itertools.count():
            started = tally.server_starts
            try:
                if chat is None:
                    chat, turns = edge.connect(target, runtime, token=token, notify=notify), []
                    RecordingStepper.install(chat)
                while len(turns) < 2:
                    turns.append(recorded_turn(chat, (prompt, FOLLOW_UP)[len(turns)], max_sentences))
                    if len(turns) < 2:
                        time.sleep(think_s)
                tally.add("turns", len(turns))
                events.append(f"attempt {attempt} completed on server start {started}"
                              if tally.server_starts == started else
                              f"attempt {attempt} completed; the server restarted during it ({started} -> "
                              f"{tally.server_starts})")
                return Conversation(prompt, turns, events)
            except edge.EdgeError as e:
                tally.add(cause(e), table="causes")
                tally.examples.setdefault(cause(e), str(e)[:300])
                stepped = chat is not None and chat.session.stepper.take()[0]  # steps of the failed turn
                events.append(f"attempt {attempt} failed in turn {len(turns)} after {len(stepped or [])} steps "
                              f"(server start {started} -> {tally.server_starts}): {cause(e)}")
                if time.monotonic() > give_up:
                    tally.add("conversations lost")
                    return None
                if chat is not None and not stepped:
                    tally.add("turns retried")
                else:
                    tally.add("conversations restarted")
                    if chat is not None:
                        chat.close()
                    chat = None
                time.sleep(min(2.0, BACKOFF_S * (attempt + 1)))
    finally:
        if chat is not None:
            chat.close()


def token_margins(runtime, hidden: np.ndarray, options: AnswerOptions, answer: list[list[int]]) -> list[tuple]:
    """Decode h_t as the edge does (greedy, decoder.onnx, the answer's repetition controls); per token:
    (the id picked, its logits after the controls [V])."""
    picker = Picker(options, runtime.spec.eos_id, answer, 1)
    seen = []

    def pick(logits: np.ndarray) -> np.ndarray:
        scores = (logits if picker.guards is None else control_repetition(logits, picker.guards))[0]
        nxt = picker(logits)
        seen.append((int(nxt[0]), scores))
        return nxt

    decode_loop(runtime.decoder, hidden.reshape(1, -1), runtime.spec, pick, options.max_tokens or None)
    return seen


def _parting(a: list[int], b: list[int]) -> int | None:
    """The first position where two token lists differ (None: one is a prefix of the other)."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)


def diagnose(runtime, got: Conversation, ref: Conversation, turn: int, options: AnswerOptions) -> dict:
    """Why turn `turn` differs from the reference: the first sentence that differs, how far apart the h_t it
    was decoded from are, and how close the decision that flipped was in the reference (a token's logit
    over the other run's token, or P(stop) over the threshold). kind: "near-tie", "after an earlier
    differing turn" (its context differs), or "unexplained" (a real difference in what was stepped)."""
    if any(g.text != r.text for g, r in zip(got.turns[:turn], ref.turns[:turn])):
        return {"kind": "after an earlier differing turn"}
    g, r = got.turns[turn], ref.turns[turn]
    k = next((i for i, (a, b) in enumerate(zip(g.sentences, r.sentences)) if a != b),
             min(len(g.sentences), len(r.sentences)))
    out = {"sentence": k, "ends": [g.end, r.end]}
    if k >= min(len(g.hidden), len(r.hidden)):
        return {**out, "kind": "unexplained", "why": "a step is missing"}
    # every step up to the one sentence k was decoded from (or the stop rule read)
    out["h_max_abs_diff"] = dh = max(float(np.abs(a - b).max()) for a, b in zip(g.hidden[:k + 1], r.hidden[:k + 1]))
    out["h_max_abs"] = scale = float(np.abs(r.hidden[k]).max())
    stopped = [t.end == "stop" and len(t.sentences) == k for t in (g, r)]
    if any(t.end == "repeat" and len(t.sentences) == k for t in (g, r)):
        return {**out, "kind": "unexplained", "why": "one ended on a repeated sentence (not kept to compare)"}
    if not any(stopped):
        # a token flipped: the reference's scores at the first token where the two sentences part
        mine = (g.sentences[k] if k < len(g.sentences) else []) + [runtime.spec.eos_id]
        theirs = (r.sentences[k] if k < len(r.sentences) else []) + [runtime.spec.eos_id]
        j = _parting(mine, theirs)
        if j is None:
            return {**out, "kind": "unexplained", "why": "the two sentences do not part"}
        seen = token_margins(runtime, r.hidden[k], options.for_sentence(k), r.sentences[:k])
        ours = [t for t, _ in seen]
        if ours[:j + 1] == theirs[:j + 1]:
            out["tokens"] = [runtime.detokenize([t]) for t in (mine[j], theirs[j])]
            out["margin"] = margin = float(seen[j][1][theirs[j]] - seen[j][1][mine[j]])
        else:
            # the per-token graph decodes the reference's own h_t to another sentence: the edge's sentence
            # graph (a Loop of the same step, rounded differently) chose at a tie there if the per-token
            # scores of the two tokens where they part are that close
            i = _parting(ours, theirs)
            if i is None:
                return {**out, "kind": "unexplained", "why": "the reference's h_t does not decode to its sentence"}
            out["why"] = "the per-token and whole-sentence graphs part at a tie in the reference's own decode"
            out["tokens"] = [runtime.detokenize([t]) for t in (ours[i], theirs[i])]
            out["margin"] = margin = float(seen[i][1][ours[i]] - seen[i][1][theirs[i]])
    else:
        # the stop rule flipped: P(stop) at this step against the threshold
        threshold = runtime.bundle.stop_threshold if options.stop_threshold is None else options.stop_threshold
        out["stop_probability"] = [g.stop_probability[k], r.stop_probability[k]]
        out["margin"] = margin = abs(r.stop_probability[k] - (0.5 if threshold is None else threshold))
    near = dh <= NEAR_TIE_H * max(1.0, scale) and margin <= NEAR_TIE_MARGIN
    return {**out, "kind": "near-tie" if near else "unexplained"}


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
            tally.server_starts += 1  # from here on a client waits for, then talks to, the next server process
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
    ap.add_argument("--think", type=float, default=0.5,
                    help="seconds between the two turns of a conversation (a fault then lands between turns, and "
                         "the next turn rebuilds the session from the history)")
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
        if None in reference.values():
            raise SystemExit("the reference run (one conversation at a time, no faults) failed")
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
              "fault_every_s": args.fault_every, "think_s": args.think, **phases}
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

    options = AnswerOptions(max_sentences=args.max_sentences)  # the chat's defaults, as run_conversation asks

    def client(k: int) -> None:
        local = random.Random(args.seed * 1000 + k)
        while time.monotonic() < stop_at:
            p = local.choice(prompts)
            got = run_conversation(server.address, runtime, token, p, args.max_sentences, tally, stop_at, args.think)
            if got is None:
                continue
            tally.add("conversations completed")
            for turn, (a, r) in enumerate(zip(got.answers, reference[p].answers)):
                if a != r:
                    why = diagnose(runtime, got, reference[p], turn, options)
                    tally.add("turns differing from the one-at-a-time run")
                    tally.add(f"differing: {why['kind']}")
                    tally.differing.append({"prompt": p, "turn": turn, "got": a, "expected": r, **why,
                                            "client": k, "events": got.events})

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
    kinds = ("near-tie", "after an earlier differing turn", "unexplained")
    return {"duration_s": round(time.monotonic() - t0, 1),
            **{k: tally.counts[k] for k in ("conversations completed", "turns",
                                            "turns differing from the one-at-a-time run")},
            "differing turns by kind": {kind: tally.counts[f"differing: {kind}"] for kind in kinds},
            **{k: tally.counts[k] for k in ("turns retried", "conversations restarted", "conversations lost",
                                            "rebuilds")},
            "failed attempts by cause": dict(tally.causes), "faults": dict(tally.faults),
            "an example of each cause": tally.examples,
            "differing turns (unexplained first, first 5)": sorted(
                tally.differing, key=lambda d: d["kind"] != "unexplained")[:5]}

if __name__ == "__main__":
    sys.exit(main())
