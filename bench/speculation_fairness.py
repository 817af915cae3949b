"""An honest client's step latency alone and beside four speculating neighbours (speculation's fairness).

    python -m bench.speculation_fairness                       # models/default, 8 rounds, about 1.5 min
    python -m bench.speculation_fairness --rounds 2 --json /tmp/fairness.json --md /tmp/fairness.md

A real `sllm-cloud serve` of MODEL/cloud (its own process, speculation on: --speculate-max 16
--speculate-answer-max 16, the SentenceVAE in MODEL/svae) on 127.0.0.1. The honest client is the edge
(sllm.edge.connect, speculate 8) answering validation prompts of the bundled corpus, up to 6 sentences
each; a step = the time from one answer sentence to the next. Its neighbours, four clients of one kind:
  honest      honest speculating edges asking without a pause (the control: any busy neighbour costs
              the server work, so the guards must show that the attackers cost no more than honest load);
  rewinder    lets the cloud guess 8 sentences, then rewinds to its prompt's end, again and again;
  accept_all  accepts every guess with no cap and a stop threshold of 1, in a new conversation each time
              the cloud declines to guess further.
Rounds interleave (alone, beside each kind), so a drifting background load hits all arms alike.
The server requires bearer tokens, as a server others can reach does: the honest client holds one and the
four neighbours share another (one tenant, or one attacker with four connections), so the server's fair
shares of guessing time (cloud.guess_shares, per credential) apply as they would in service.

The neighbours run in a second process (this module with --neighbours-of), as attackers run on their own
machines: only the server's work for their requests may reach the honest client, not their GIL or their
CPU. With --pin (the default; Linux, 2 CPUs or more) the server and the honest client are pinned to the
first half of the CPUs and the neighbours' process to the rest (2 CPUs: server + honest client on CPU 0,
neighbours on CPU 1) in EVERY arm, alone included, so the arms differ only by the server's work; the
server (--threads 0) and the edges then run one thread per CPU they hold. With one CPU, or --no-pin,
nothing is pinned and the output says so. The neighbours' request rate is bounded by their CPUs; it is
reported.

Per arm: the honest client's median step (all rounds' steps; min-max of the rounds' medians), the ratio
to alone and to the honest-neighbour control; the part of each step it waited for the cloud (the step that
made the sentence's h_t: what the server's work for others delays, apart from the CPU the honest edge
shares with the server on a 2-CPU machine) and its ratio to alone; the cores the server and the honest client's process kept
busy over its passes (/proc) and the server's counters (GetStats). Then each kind of neighbour alone for
--solo-s seconds: the server's CPU (less its idle CPU) per sentence they got and per request they sent.
"""
from __future__ import annotations

import argparse
import json
import os
import queue
import secrets
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

from bench.machine import LoadMonitor, _cpu_seconds, machine_info
from sllm.edge.api import AnswerOptions
from sllm.protos.client import CloudClient
from sllm.protos.v1 import sllm_pb2 as pb
from sllm.runtime.procs import with_parent_death_signal
from sllm.runtime.server_process import TOKEN_ENV, ServerProcess

N = 8  # sentences the cloud may run ahead of each client
NEIGHBOURS = 4
ARMS = {"alone": "alone", "honest": "beside four honest", "rewinder": "beside four rewinders",
        "accept_all": "beside four accept-all"}
COUNTERS = ("steps_total", "sentences_total", "speculative_steps_total", "speculation_accepted_total",
            "speculation_dropped_total", "speculation_decode_tokens_total")
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


def material(rt, count: int) -> tuple[list[str], object]:
    """(`count` prompts for the honest clients, the attackers' prompt as sentence vectors [n, d])."""
    texts = prompts(count + 1)
    return texts[:-1], rt.encode(list(rt.prompt_sentences(texts[-1])))


# ---------------------------------------------------------------- the clients

def honest(address: str, token: str, rt, texts: list[str], steps: list[float], stop: threading.Event | None = None,
           out: dict | None = None, ready: threading.Event | None = None, waits: list[float] | None = None) -> None:
    """An honest speculating edge: appends the seconds between its answer sentences to `steps`, and to `waits`
    the seconds of each that it waited for the cloud (the step that made the sentence's h_t: a reply, or a
    guess not streamed yet); with `stop`, asks its prompts over and over until it is set (out: messages =
    prompts asked, sentences received)."""
    from sllm import edge

    out = {} if out is None else out
    with edge.connect(address, rt, token=token, speculate=N, options=AnswerOptions()) as chat:
        while True:
            for text in texts:
                t0 = time.perf_counter()
                for sentence in chat.ask(text, max_sentences=6):
                    steps.append(time.perf_counter() - t0)
                    if waits is not None:
                        waits.append(sentence.cloud_step_ms / 1000)
                    out["sentences"] = out.get("sentences", 0) + 1
                    if ready is not None:
                        ready.set()
                    t0 = time.perf_counter()
                out["messages"] = out.get("messages", 0) + 1
                chat.reset()
                if stop is not None and stop.is_set():
                    return
            if stop is None:
                return


def rewinder(address: str, token: str, rt, prompt, stop: threading.Event, out: dict, ready: threading.Event) -> None:
    """Lets the cloud guess N sentences, then rewinds to the prompt's end, until `stop` (out: messages)."""
    p, decoding = len(prompt), pb.Decoding(guess=True, stop_threshold=1.0)
    with CloudClient(address, token) as c:
        conv = c.conversation(rt.model_id, rt.d_model, speculate=N, step_timeout=60)
        base = conv.append(prompt, position=0, decoding=decoding).past_length
        out["messages"] = 1
        ready.set()
        r = 0
        while not stop.is_set():
            for k in range(1, N + 1):
                if conv.speculative_step(base + k).declined:
                    break
            base = conv.append(prompt[-1:] * (1 + 0.01 * r), position=p, decoding=decoding).past_length
            out["messages"], r = out["messages"] + 1, r + 1
        conv.close()


def accept_all(address: str, token: str, rt, prompt, stop: threading.Event, out: dict, ready: threading.Event) -> None:
    """Accepts every guess, no cap, stop threshold 1; once the cloud declines, the same again in a new
    conversation, until `stop` (out: messages, sentences = guesses accepted)."""
    p = len(prompt)
    with CloudClient(address, token) as c:
        while not stop.is_set():
            conv = c.conversation(rt.model_id, rt.d_model, speculate=16, step_timeout=60)
            conv.append(prompt, position=0, decoding=pb.Decoding(guess=True, stop_threshold=1.0))
            out["messages"] = out.get("messages", 0) + 1
            ready.set()
            accepted = 0
            while not stop.is_set():
                if conv.speculative_step(p + accepted + 1).declined:
                    break
                conv.accept(p + accepted)
                accepted += 1
                out["messages"], out["sentences"] = out["messages"] + 1, out.get("sentences", 0) + 1
            conv.close()


def guarded(client, out: dict, *args) -> None:
    try:
        client(*args)
    except Exception as e:  # noqa: BLE001 - reported, the bench goes on
        out["error"] = repr(e)


# ---------------------------------------------------------------- CPU placement and accounting

def pin(pid: int, cpus: set[int]) -> None:
    """Every thread of `pid` onto `cpus` (sched_setaffinity of a pid moves its main thread only; threads
    started later inherit their creator's CPUs)."""
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            os.sched_setaffinity(int(tid), cpus)
        except (ProcessLookupError, FileNotFoundError):
            pass  # a thread that ended meanwhile


def placement(pid: int) -> dict[str, int]:
    """{"CPU list": threads} over the threads of `pid`: where they may run now."""
    out: dict[str, int] = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            key = ",".join(map(str, sorted(os.sched_getaffinity(int(tid)))))
        except (ProcessLookupError, FileNotFoundError):
            continue
        out[key] = out.get(key, 0) + 1
    return out


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process `pid`, all its threads, so far (/proc/PID/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def outside_sample(pids: tuple[int, ...]) -> tuple[float, float] | None:
    """(now, the machine's busy CPU seconds so far less those of `pids`); None off Linux."""
    machine = _cpu_seconds()
    return None if machine is None else (time.perf_counter(), machine[0] - sum(cpu_seconds(p) for p in pids))


def outside_cores(first: tuple[float, float] | None, last: tuple[float, float] | None) -> float | None:
    """Cores busy on average between two `outside_sample`s."""
    return None if first is None or last is None else round((last[1] - first[1]) / (last[0] - first[0]), 2)


def split_cpus(pin_asked: bool) -> tuple[set[int] | None, set[int] | None, str]:
    """(the server's and honest client's CPUs, the neighbours' CPUs, in words); None, None when unpinned."""
    if not pin_asked:
        return None, None, "unpinned (--no-pin): server, honest client and neighbours share all CPUs"
    if not hasattr(os, "sched_setaffinity"):
        return None, None, "unpinned (no sched_setaffinity here): server, honest client and neighbours share all CPUs"
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return None, None, "unpinned (one CPU): server, honest client and neighbours share it"
    half = len(cpus) // 2
    ours, theirs = set(cpus[:half]), set(cpus[half:])
    return ours, theirs, (f"pinned in every arm: server and honest client on CPU {_cpus(ours)}, "
                          f"the neighbours' process on CPU {_cpus(theirs)}")


def _cpus(cpus: set[int]) -> str:
    return ",".join(map(str, sorted(cpus)))


# ---------------------------------------------------------------- the neighbours' process

def serve_neighbours(address: str, model: Path, cpus: set[int] | None, count: int, threads: int) -> None:
    """The neighbours' side: JSON commands on stdin ({"start": KIND}, {"stop": true}), one JSON reply line
    each on stdout; ends at EOF."""
    from sllm.edge.runtime import EdgeRuntime

    if cpus:
        pin(os.getpid(), cpus)
    rt = EdgeRuntime.load(model / "edge", device="cpu", threads=threads)
    texts, attack_prompt = material(rt, count)
    token = os.environ[TOKEN_ENV]  # the neighbours' one credential (never on a command line)
    if cpus:
        pin(os.getpid(), cpus)  # ORT's pool threads, started by the load

    def say(reply: dict) -> None:
        sys.stdout.write(json.dumps(reply) + "\n")
        sys.stdout.flush()

    say({"ready": True})
    kind, stop, threads_, outs, t0 = None, threading.Event(), [], [], 0.0
    for line in sys.stdin:
        command = json.loads(line)
        if "start" in command:
            kind, stop, outs = command["start"], threading.Event(), [{} for _ in range(NEIGHBOURS)]
            readies = [threading.Event() for _ in range(NEIGHBOURS)]
            if kind == "honest":
                args = [(honest, o, address, token, rt, texts[i % len(texts):] + texts[:i % len(texts)], [], stop, o, r)
                        for i, (o, r) in enumerate(zip(outs, readies))]
            else:
                client = {"rewinder": rewinder, "accept_all": accept_all}[kind]
                args = [(client, o, address, token, rt, attack_prompt, stop, o, r) for o, r in zip(outs, readies)]
            threads_ = [threading.Thread(target=guarded, args=a, daemon=True) for a in args]
            t0 = time.perf_counter()
            for t in threads_:
                t.start()
            for r, o in zip(readies, outs):  # each has had its first reply (or failed)
                while not r.wait(0.05) and "error" not in o and time.perf_counter() - t0 < 60:
                    pass
            say({"started": kind})
        elif command.get("stop"):
            stop.set()
            for t in threads_:
                t.join(60)
            say({"stopped": kind, "wall_s": round(time.perf_counter() - t0, 3),
                 "messages": sum(o.get("messages", 0) for o in outs),
                 "sentences": sum(o.get("sentences", 0) for o in outs),
                 "errors": [o["error"] for o in outs if "error" in o]})


class Neighbours:
    """The neighbours' process (this module with --neighbours-of), driven over its stdin and stdout."""

    def __init__(self, address: str, token: str, model: Path, cpus: set[int] | None, count: int, threads: int):
        command = [sys.executable, "-m", "bench.speculation_fairness", "--neighbours-of", address,
                   "--model", str(model), "--prompts", str(count), "--edge-threads", str(threads)]
        if cpus:
            command += ["--cpus", _cpus(cpus)]
        self.proc = subprocess.Popen(with_parent_death_signal(command), stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, bufsize=1, cwd=ROOT,
                                     env={**os.environ, TOKEN_ENV: token})
        self.replies: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        try:
            self._expect("ready", 300)
        except BaseException:
            self.close()
            raise

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _read(self) -> None:
        for line in self.proc.stdout:
            try:
                reply = json.loads(line)
            except ValueError:
                reply = None
            if isinstance(reply, dict):
                self.replies.put(reply)
            else:
                sys.stdout.write(f"neighbours: {line}")  # a note of theirs, not a reply
        self.replies.put(None)

    def _expect(self, key: str, timeout: float) -> dict:
        try:
            reply = self.replies.get(timeout=timeout)
        except queue.Empty:
            raise RuntimeError(f"the neighbours' process did not say {key!r} within {timeout:g} s") from None
        if reply is None or key not in reply:
            raise RuntimeError(f"the neighbours' process ended or answered {reply!r} instead of {key!r} "
                               "(its errors are above)")
        return reply

    def start(self, kind: str) -> None:
        self.proc.stdin.write(json.dumps({"start": kind}) + "\n")
        self.proc.stdin.flush()
        self._expect("started", 120)

    def stop(self) -> dict:
        self.proc.stdin.write(json.dumps({"stop": True}) + "\n")
        self.proc.stdin.flush()
        return self._expect("stopped", 120)

    def close(self) -> None:
        try:
            self.proc.stdin.close()
            self.proc.wait(30)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()
            self.proc.wait(10)


# ---------------------------------------------------------------- the measurement

def spread(xs: list[float]) -> dict:
    ms = sorted(1000 * x for x in xs)
    return {"n": len(ms), "min_ms": round(ms[0], 2), "median_ms": round(statistics.median(ms), 2),
            "max_ms": round(ms[-1], 2)} if ms else {"n": 0}


def counters(stats_client: CloudClient) -> dict[str, int]:
    st = stats_client.stats()
    return {k: getattr(st, k) for k in COUNTERS}


def measure_arm(arm: str, address: str, token: str, rt, texts: list[str], server_pid: int,
                stats_client: CloudClient, neighbours: Neighbours) -> dict:
    """One arm of one round: the honest client's steps, the server's CPU and counters over it, the
    neighbours' counts."""
    if arm != "alone":
        neighbours.start(arm)
        time.sleep(0.3)
    c0, t0 = counters(stats_client), time.perf_counter()
    cpu0, mine0 = cpu_seconds(server_pid), cpu_seconds(os.getpid())
    steps: list[float] = []
    waits: list[float] = []
    try:
        honest(address, token, rt, texts, steps, waits=waits)
    finally:
        wall, cpu1, mine1 = time.perf_counter() - t0, cpu_seconds(server_pid), cpu_seconds(os.getpid())
        c1 = counters(stats_client)
        theirs = neighbours.stop() if arm != "alone" else {}
    return {"arm": arm, "steps": steps, "cloud_waits": waits, "wall_s": round(wall, 3), "server_cpu_s": round(cpu1 - cpu0, 3),
            "honest_client_cpu_s": round(mine1 - mine0, 3), "server": {k: c1[k] - c0[k] for k in COUNTERS},
            "neighbours": theirs}


def solo(kind: str, seconds: float, server_pid: int, stats_client: CloudClient, neighbours: Neighbours | None,
         idle_cores: float = 0.0) -> dict:
    """The server's work for four neighbours of `kind` alone for `seconds` (kind "idle": nobody), less
    `idle_cores` x the time: its CPU and counters per sentence they got (honest: answer sentences;
    accept_all: guesses accepted; rewinders get none) and per request they sent."""
    c0, cpu0, t0 = counters(stats_client), cpu_seconds(server_pid), time.perf_counter()
    if neighbours is not None:
        neighbours.start(kind)
    time.sleep(seconds)
    theirs = neighbours.stop() if neighbours is not None else {}
    wall, cpu, c1 = time.perf_counter() - t0, cpu_seconds(server_pid) - cpu0, counters(stats_client)
    work = {k: c1[k] - c0[k] for k in COUNTERS}
    cpu_theirs = cpu - idle_cores * wall
    sents, msgs = theirs.get("sentences", 0), theirs.get("messages", 0)
    return {"kind": kind, "wall_s": round(wall, 3), "server_cpu_s": round(cpu, 3),
            "server_cores_busy": round(cpu / wall, 3),
            "server": work, "requests": msgs, "sentences": sents, "requests_per_s": round(msgs / wall, 1),
            "sentences_per_s": round(sents / wall, 1),
            "server_cpu_ms_per_sentence": round(1000 * cpu_theirs / sents, 3) if sents else None,
            "server_cpu_ms_per_request": round(1000 * cpu_theirs / msgs, 3) if msgs else None,
            "guesses_per_sentence": round(work["speculative_steps_total"] / sents, 2) if sents else None,
            "decode_tokens_per_sentence": round(work["speculation_decode_tokens_total"] / sents, 1) if sents else None,
            "errors": theirs.get("errors", [])}


def summarize(records: list[dict]) -> dict:
    """Per arm: the honest client's steps (all rounds; min-max of the rounds' medians), the ratios, the
    server's CPU and counters over the honest client's passes, the neighbours' request rate."""
    out: dict[str, dict] = {}
    for arm in ARMS:
        rs = [r for r in records if r["arm"] == arm]
        steps = [x for r in rs for x in r["steps"]]
        medians = [1000 * statistics.median(r["steps"]) for r in rs if r["steps"]]
        wall, cpu = sum(r["wall_s"] for r in rs), sum(r["server_cpu_s"] for r in rs)
        mine = sum(r["honest_client_cpu_s"] for r in rs)
        theirs_msgs = sum(r["neighbours"].get("messages", 0) for r in rs)
        theirs_wall = sum(r["neighbours"].get("wall_s", 0.0) for r in rs)
        out[arm] = {"honest_step": spread(steps), "round_medians_ms": [round(m, 2) for m in medians],
                    "honest_cloud_wait": spread([x for r in rs for x in r["cloud_waits"]]),
                    "wall_s": round(wall, 2), "server_cpu_s": round(cpu, 3),
                    "server_cores_busy": round(cpu / wall, 3) if wall else None,
                    "honest_client_cores_busy": round(mine / wall, 3) if wall else None,
                    "server": {k: sum(r["server"][k] for r in rs) for k in COUNTERS},
                    "neighbour_requests_per_s": round(theirs_msgs / theirs_wall, 1) if theirs_wall else None,
                    "neighbour_errors": [e for r in rs for e in r["neighbours"].get("errors", [])]}
    base, control = out["alone"]["honest_step"].get("median_ms"), out["honest"]["honest_step"].get("median_ms")
    for s in out.values():
        med = s["honest_step"].get("median_ms")
        s["ratio_to_alone"] = round(med / base, 3) if med and base else None
        s["ratio_to_honest_neighbours"] = round(med / control, 3) if med and control else None
    wait_alone = out["alone"]["honest_cloud_wait"].get("median_ms")
    for s in out.values():
        w = s["honest_cloud_wait"].get("median_ms")
        s["cloud_wait_ratio_to_alone"] = round(w / wait_alone, 3) if w and wait_alone else None
    return out


def _f(x, digits: int = 2) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def tables(result: dict) -> list[str]:
    """The figures as markdown table lines: the honest client per arm, then the server's work per kind."""
    lines = ["| honest client | steps | median step ms (min-max of rounds) | x alone | x beside honest | "
             "median cloud wait ms per sentence | x alone | server cores busy | honest client cores busy | "
             "neighbour requests/s |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for arm, s in result["arms"].items():
        st, rm = s["honest_step"], s["round_medians_ms"]
        span = f" ({min(rm):.1f}-{max(rm):.1f})" if rm else ""
        lines.append(f"| {ARMS[arm]} | {st['n']} | {_f(st.get('median_ms'), 1)}{span} | {_f(s['ratio_to_alone'])} | "
                     f"{_f(s['ratio_to_honest_neighbours'])} | {_f(s['honest_cloud_wait'].get('median_ms'))} | "
                     f"{_f(s['cloud_wait_ratio_to_alone'])} | {_f(s['server_cores_busy'])} | "
                     f"{_f(s['honest_client_cores_busy'])} | "
                     f"{_f(s['neighbour_requests_per_s'], 1)} |")
    lines += ["", "| four neighbours alone | requests/s | sentences/s | server CPU ms / sentence | server CPU ms / "
              "request | guesses / sentence | decode tokens / sentence |", "|---|---:|---:|---:|---:|---:|---:|"]
    for kind, s in result["server_by_kind"].items():
        if kind != "idle":
            lines.append(f"| {kind} | {_f(s['requests_per_s'], 1)} | {_f(s['sentences_per_s'], 1)} | "
                         f"{_f(s['server_cpu_ms_per_sentence'])} | {_f(s['server_cpu_ms_per_request'])} | "
                         f"{_f(s['guesses_per_sentence'])} | {_f(s['decode_tokens_per_sentence'], 1)} |")
    return lines


def markdown(result: dict) -> str:
    info = result["machine"]
    idle = result["server_by_kind"]["idle"]["server_cores_busy"]
    lines = [f"# Speculation's fairness: `{result['model']}`", "",
             "`" + " ".join(["python -m bench.speculation_fairness", *result["argv"]]) + "`", "",
             f"{result['rounds']} interleaved rounds x {result['prompts']} prompts (up to 6 sentences each), "
             f"speculate {N}, {NEIGHBOURS} neighbours in their own process; commit {info['git_commit']}, "
             f"{info['cores']} CPUs ({info['cpu']}), {info['date_utc']} UTC.", "",
             f"CPU placement: {result['placement']}; server threads {result['server_threads'] or 'default'}.", "",
             *tables(result), "",
             "Cores busy: the server's (or the honest client's process's) CPU seconds over the honest client's "
             "passes per second of them. "
             f"The second table: each kind alone for {result['solo_s']:g} s, the server's CPU less its idle "
             f"{idle:.3f} cores, per sentence the neighbours got (honest: answer sentences; accept_all: guesses "
             "accepted; a rewinder gets none) and per request they sent (honest: a prompt asked; rewinder: an "
             "Append; accept_all: an Append or an Accept).", "",
             f"Machine load: {result['load_words']}; outside this bench's three processes (the bench, the server, "
             f"the neighbours): {result['outside_cores']} cores busy on average during the run."]
    if result["placement_seen"]:
        lines += ["", "Threads by CPU list at the end: " + "; ".join(
            f"{who} {where}" for who, where in result["placement_seen"].items())]
    errors = [e for s in result["arms"].values() for e in s["neighbour_errors"]]
    errors += [e for s in result["server_by_kind"].values() for e in s["errors"]]
    if errors:
        lines += ["", f"Neighbour errors: {errors}"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict | None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=Path("models/default"))
    ap.add_argument("--rounds", type=int, default=8, help="interleaved rounds (alone, then beside each kind)")
    ap.add_argument("--prompts", type=int, default=12, help="prompts the honest client answers per arm")
    ap.add_argument("--solo-s", type=float, default=4.0,
                    help="seconds each kind of neighbour runs alone for the server's work per kind")
    ap.add_argument("--threads", type=int, default=0,
                    help="server torch threads (0: one per CPU it is pinned to, or torch's default unpinned)")
    ap.add_argument("--pin", action=argparse.BooleanOptionalAction, default=True,
                    help="server + honest client on the first half of the CPUs, neighbours on the rest")
    ap.add_argument("--json", type=Path, help="write the figures here too")
    ap.add_argument("--md", type=Path, help="write the markdown tables here too")
    ap.add_argument("--neighbours-of", metavar="ADDRESS", help=argparse.SUPPRESS)  # the neighbours' process
    ap.add_argument("--cpus", help=argparse.SUPPRESS)
    ap.add_argument("--edge-threads", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.rounds < 1 or args.prompts < 1 or args.solo_s <= 0:
        ap.error("--rounds and --prompts must be at least 1, --solo-s above 0")

    if args.neighbours_of:
        cpus = {int(c) for c in args.cpus.split(",")} if args.cpus else None
        serve_neighbours(args.neighbours_of, args.model, cpus, args.prompts, args.edge_threads)
        return None

    from sllm.edge.runtime import EdgeRuntime

    ours, theirs, placement_words = split_cpus(args.pin)
    if ours:
        pin(os.getpid(), ours)  # the server inherits it
    server_threads = args.threads or (len(ours) if ours else 0)
    rt = EdgeRuntime.load(args.model / "edge", device="cpu", threads=len(ours) if ours else 0)
    texts, _ = material(rt, args.prompts)
    mine, theirs_token = secrets.token_hex(16), secrets.token_hex(16)
    server = ServerProcess.serve(args.model / "cloud", "--speculate-max", "16", "--speculate-answer-max", "16",
                                 "--grace", "1", "--device", "cpu", threads=server_threads,
                                 tokens=[mine, theirs_token],
                                 stop_timeout=30.0, name=f"the server of {args.model}")
    records: list[dict] = []
    by_kind: dict[str, dict] = {}
    seen: dict[str, dict] = {}
    info = machine_info(ROOT, server_threads)
    print(f"speculation fairness: {placement_words}", flush=True)
    neighbours = None
    try:
        server.start()
        neighbours = Neighbours(server.address, theirs_token, args.model, theirs, args.prompts,
                                len(theirs) if theirs else 0)
        honest(server.address, mine, rt, texts[:1], [])  # warm-up: sessions, ORT, the model thread
        if ours:
            pin(os.getpid(), ours)  # threads ORT and gRPC started before, whatever CPUs they took
            pin(server.pid, ours)
        pids = (os.getpid(), server.pid, neighbours.pid)
        with CloudClient(server.address, mine) as stats_client, LoadMonitor() as load:
            outside0 = outside_sample(pids)
            for r in range(args.rounds):
                for arm in ARMS:
                    records.append(measure_arm(arm, server.address, mine, rt, texts, server.pid, stats_client,
                                               neighbours))
                medians = {arm: spread([x for rec in records if rec["arm"] == arm for x in rec["steps"]])
                           for arm in ARMS}
                print(f"  round {r + 1}/{args.rounds}: " + ", ".join(
                    f"{ARMS[a]} {m.get('median_ms')} ms" for a, m in medians.items()) + " (medians so far)",
                      flush=True)
            by_kind["idle"] = solo("idle", args.solo_s, server.pid, stats_client, None)
            for kind in ("honest", "rewinder", "accept_all"):
                by_kind[kind] = solo(kind, args.solo_s, server.pid, stats_client, neighbours,
                                     by_kind["idle"]["server_cores_busy"])
            outside = outside_cores(outside0, outside_sample(pids))
        if ours:
            seen = {"server": placement(server.pid), "honest client": placement(os.getpid()),
                    "neighbours": placement(neighbours.pid)}
    finally:
        if neighbours is not None:
            neighbours.close()
        server.stop()

    result = {"model": str(args.model), "argv": list(sys.argv[1:] if argv is None else argv), "rounds": args.rounds,
              "prompts": len(texts), "speculate": N, "neighbours": NEIGHBOURS, "solo_s": args.solo_s,
              "placement": placement_words, "pinned": ours is not None, "server_threads": server_threads,
              "placement_seen": seen, "arms": summarize(records), "server_by_kind": by_kind,
              "load": load.summary(), "load_words": load.describe(), "outside_cores": outside,
              "machine": info}
    print(f"\nspeculation fairness: {args.model}, {args.rounds} rounds x {len(texts)} prompts, commit "
          f"{info['git_commit']}, {info['cores']} CPUs; {placement_words}")
    print("\n".join(tables(result)))
    print(f"server idle: {by_kind['idle']['server_cores_busy']:.3f} cores")
    for name, s in [*result["arms"].items(), *by_kind.items()]:
        errors = s.get("neighbour_errors") or s.get("errors")
        if errors:
            print(f"neighbour errors ({name}): {errors}")
    if seen:
        print("threads by CPU list at the end: " + "; ".join(f"{who} {where}" for who, where in seen.items()))
    print(f"machine load: {load.describe()}; outside this bench's three processes: {outside} cores busy on "
          "average during the run")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    if args.md:
        args.md.write_text(markdown(result))
    return result


if __name__ == "__main__":
    main()
