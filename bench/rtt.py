"""The round trip: one conversation at a time over a delayed network, RTT 0/10/50/100 ms.

    python -m bench.rtt                 # models/default, 5 prompts, 128 output tokens; docs/results/rtt.{json,md,png}
    python -m bench.rtt --quick         # RTT 0 and 50 ms, 2 prompts, 32 tokens (a smoke test, < 2 min)
    python -m bench.rtt --chat          # answers as edge-chat gives them; docs/results/rtt-chat.{json,md,png}

Every variant runs its real server as its own process on 127.0.0.1, and the client in this
process reaches it through `bench.relay.RelayProcess` (RTT/2 added each way):
  sllm         the SLLM as it is: edge runtime (ONNX Runtime) + the edge sentence loop over a
               Converse stream (edge.remote.RemoteStepper, speculating 0) to `sllm-cloud
               serve` of MODEL/cloud; one round trip per sentence
  sllm_specN   the same with sentence-level speculation (--speculate 4,16): the server (--speculate-max
               N, guessing with MODEL/edge's graphs) runs up to N sentences ahead, the edge accepts or
               corrects each guess; a round trip only for a correction or a declined guess (see below)
  token_split  the token-level split: the same server code stepping the baseline OPT's own blocks
               once per token (modeling.token_bundle), the client holding embedding + LM head
               (bench.token_split); one round trip per token
  cloud_only   the baseline OPT generating on a server of its own with the fastest token-level
               engine the project has (the fused ONNX graph with its KV cache, ONNX Runtime, --threads
               as every process) and streaming, each gRPC reply the tokens made since the previous
               one (bench.cloud_only); one round trip per answer, none per token
Same prompts (validation text, bench.texts) for all, interleaved: for each RTT, each prompt runs
on every variant in turn. Greedy. The SLLM stops at the first sentence that takes it past
--output-tokens, ignoring the stop head; the token-level variants make exactly --output-tokens tokens.
With --chat the SLLM answers as edge-chat does with its defaults (repetition controls, the bundle's
stop threshold sent to the cloud with the prompt, at most 8 sentences): the product path, whose
answers end by the stop head; the token-level variants then write as many tokens as the plain SLLM's
answer to the same prompt (no sampled runs: the cloud does not guess sampled answers).

The report opens with the headline: each speculation row against cloud_only at 50 and 100 ms
(tok/s min / median / max, the ratio of the medians, outputs identical to the plain SLLM's), and
the machine's load before and during the run (bench.machine.LoadMonitor).

Per run: time to the first sentence (SLLM: encode the prompt, one round trip, decode it) or the
first token, from the moment the prompt is sent (sessions are opened before the clock starts, as a
chat holds its session across turns), tokens/s after it, and the whole answer's time (prompt sent
-> complete; a chat answer is complete after the step that says stop). Per variant and RTT: min / median /
max over the prompts. Beside the SLLM, the bound L / (RTT + t_sentence): L = tokens per sentence
after the first, t_sentence = time per sentence at RTT 0 (through the relay, which then adds only
its own small cost, measured and reported). Wire bytes are what passed through the relay (gRPC,
HTTP/2 framing, pings) per output token. Cloud work per output token comes from the servers' own
counters (GetStats, read straight from each server before and after an RTT's runs): forward passes,
Append steps, speculative steps and the tokens their SentenceVAE decoded.

Speculation rows add: the acceptance rate (guesses the edge confirmed / guesses it checked), the
round trips waited per generated sentence, the extra cloud work per output token against the sllm
row at the same RTT, and whether every output equals the sllm row's (greedy must). The edge tells
the cloud how it decodes each answer (edge.speculate.decoding): in these fixed-length runs, greedy
without controls and no stop rule within the answer, so the cloud guesses past its stop head as the
edge decodes past it; a guess the cloud still declines (its limits) waits a round trip as without
speculation, and the report counts them. Then the
sampled acceptance (each prompt once more per speculating variant, temperature
--sampled-temperature, straight to its server: the cloud guesses greedily, so sampled sentences
mostly go the correction path) and the tolerance facts (bench.speculation).

More SLLM rows: `sllm_variant(name, label, server_args, **client_options)` (server_args: a list,
or a function of the Ctx; client_options: SLLMRunner's, e.g. speculate=N).
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from bench import cloud_throughput
from bench.relay import RelayProcess, measure_overhead
from bench.summary import bench_parser, spread, spread_cell, write_results
from bench.texts import flatten
from sllm.runtime.server_process import ServerProcess

if TYPE_CHECKING:
    from sllm.edge.api import AnswerOptions

ROOT = Path(__file__).resolve().parents[1]
STEP_TIMEOUT_S = 120.0  # a stuck server fails the bench instead of hanging it
# the servers' GetStats counters read around each RTT's runs (what the cloud did for them)
COUNTERS = ("steps_total", "forward_passes_total", "speculative_steps_total", "speculation_accepted_total",
            "speculation_dropped_total", "speculation_decode_tokens_total")


@dataclass
class Run:
    variant: str
    rtt_ms: float
    prompt: int  # index into the prompts
    tokens: int  # output tokens
    units: int  # sentences (SLLM), tokens, or messages (cloud-only)
    first_tokens: int  # tokens of the first unit
    first_s: float  # prompt sent -> first sentence decoded / first token received
    rest_s: float  # first unit -> last unit
    answer_s: float = 0.0  # prompt sent -> the answer is complete (--chat: the step that says stop included)
    output: str = ""  # digest of the output token ids: speculative outputs are compared with the plain ones
    # the SLLM (edge.speculate.SpeculationStats): guesses the edge accepted / corrected / the cloud declined,
    # and the round trips waited after the first sentence (an append that needed its reply)
    accepted: int = 0
    corrected: int = 0
    declined: int = 0
    waited: int = 0
    appends: int = 0  # of generated sentences (all of them in a chat; all but the last in fixed-length runs)

    @property
    def tokens_per_s(self) -> float:
        return (self.tokens - self.first_tokens) / self.rest_s if self.rest_s > 0 else 0.0

    @property
    def answer_tokens_per_s(self) -> float:
        return self.tokens / self.answer_s if self.answer_s > 0 else 0.0

    def as_dict(self) -> dict:
        return {**asdict(self), "tokens_per_s": self.tokens_per_s, "answer_tokens_per_s": self.answer_tokens_per_s}


def timed(units: Iterator[list[int]], variant: str, rtt_ms: float, prompt: int, t0: float) -> Run:
    """A Run from an iterator of output units (the token ids of each), stamped as they come; the
    answer is complete when the iterator ends."""
    stamps, counts, digest = [], [], hashlib.sha1()
    for ids in units:
        stamps.append(time.perf_counter())
        counts.append(len(ids))
        digest.update(repr(list(ids)).encode())  # per unit: the same tokens cut into other units differ
    end = time.perf_counter()
    if not stamps:
        raise RuntimeError(f"{variant}: no output")
    return Run(variant, rtt_ms, prompt, sum(counts), len(counts), counts[0], stamps[0] - t0, stamps[-1] - stamps[0],
               end - t0, digest.hexdigest()[:16])


# ---------------------------------------------------------------- the variants

@dataclass
class Ctx:
    """What every variant may need: the loaded models, where to write temporary bundles, threads."""
    model_dir: Path
    runtime: object  # edge.runtime.EdgeRuntime
    baseline: object  # modeling.baseline_bundle.LoadedBaseline
    cloud_manifest: dict
    tmp: Path
    threads: int
    wire_dtype: str
    generator: str  # the cloud-only server's --generator
    bos: int
    edge_dir: Path | None = None  # the edge graphs speculating servers guess with (--edge-bundle), when one speculates
    chat: AnswerOptions | None = None  # --chat: the SLLM answers as edge-chat does with these options


@dataclass
class Variant:
    name: str
    label: str
    unit: str  # what its runs count as units: "sentence", "token" or (cloud-only) "message"
    server: Callable[[Ctx], tuple[ServerProcess, dict]]  # its server (not started), facts to report
    connect: Callable[[Ctx, str], object]  # a runner on `address` (the relay's): .run(prompt, tokens), .close()
    info: dict = field(default_factory=dict)
    speculate: int = 0  # sentences its server may run ahead (the SLLM with speculation)
    stats: bool = False  # its server is `sllm-cloud serve`: GetStats counts its work


class SLLMRunner:
    """The SLLM as edge-chat runs it: the edge sentence loop over one cloud session per prompt, through the
    edge's stepper, edge.remote.RemoteStepper (speculate 0: every sentence appended, its reply waited for).

    Fixed-length (ctx.chat None): greedy without controls, past the stop head, until `tokens`.
    Chat (ctx.chat): edge-chat's turn with those options: its repetition controls, and its stop rule,
    sent to the cloud with the prompt (edge.speculate.decoding); the answer ends where edge-chat's
    would, after the step that says so (`tokens` is ignored)."""

    def __init__(self, ctx: Ctx, address: str, wire_dtype: str | None = None, speculate: int = 0):
        from sllm.runtime.sampling import Sampling

        self.runtime, self.max_sentences = ctx.runtime, int(ctx.cloud_manifest["max_sentences"])
        self.dtype, self.speculate, self.chat = wire_dtype or ctx.wire_dtype, speculate, ctx.chat
        self.sampling = ctx.chat or Sampling()  # (answer options are a sampling) the sampled-acceptance runs set theirs
        self.address = address

    def open_stepper(self):
        from sllm.edge.remote import RemoteStepper
        from sllm.protos.client import CloudClient

        stepper = RemoteStepper(self.runtime.bundle, lambda: CloudClient(self.address), self.address,
                                wire_dtype=self.dtype, step_timeout=STEP_TIMEOUT_S, speculate=self.speculate)
        stepper.connect()
        conv = stepper.conv
        if conv.speculate != self.speculate:  # less would measure another row than the one it is labelled
            stepper.close()
            raise RuntimeError(f"asked to speculate {self.speculate}, granted {conv.speculate}: {conv.speculate_note}")
        return stepper

    def sentences(self, stepper, prompt: list[list[int]], min_tokens: int) -> Iterator[list[int]]:
        from bench.sllm_loop import PastStop, past_stop_options
        from sllm.edge.loop import SentenceEvent, sentence_loop

        room = self.max_sentences - len(prompt)
        if self.chat:
            events = self._chat_turn(stepper, prompt, room)
        else:  # the cloud guesses as this edge decodes: greedy, no controls, the stop rule never asked
            stepper.begin_turn(past_stop_options(room))
            events = sentence_loop(self.runtime, PastStop(stepper), prompt, self.sampling, room=room)
        total = 0
        try:
            for ev in events:
                if not isinstance(ev, SentenceEvent):
                    return
                yield ev.ids
                total += len(ev.ids)
                if not self.chat and (total >= min_tokens or ev.index + 1 == room):
                    return  # before the loop appends this sentence (nothing would read its step)
        finally:
            events.close()

    def _chat_turn(self, stepper, prompt: list[list[int]], room: int):
        """sllm.edge.chat.ChatSession.turn's answer, on a session that holds only this prompt."""
        from sllm.edge.chat import answer

        return answer(self.runtime, stepper, prompt, self.chat, room=room)

    def run(self, prompt: list[list[int]], tokens: int, variant: str, rtt_ms: float, index: int) -> Run:
        stepper = self.open_stepper()  # the session, before the clock starts
        try:
            run = timed(self.sentences(stepper, prompt, tokens), variant, rtt_ms, index, time.perf_counter())
        finally:
            stepper.close()
        s = stepper.speculation.stats
        # appends without a guess to check, but the prompt's, waited for their reply, as did corrections and declines
        return Run(**{**asdict(run), "accepted": s.accepted, "corrected": s.corrected, "declined": s.declined,
                      "waited": s.plain - 1 + s.corrected + s.declined,
                      "appends": s.plain - 1 + s.accepted + s.corrected + s.declined})

    def close(self) -> None:
        pass  # each run's stepper closed its own channel


def _serve_bundle(bundle: Path, ctx: Ctx, server_args: Sequence[str]) -> ServerProcess:
    return cloud_throughput.bench_server(bundle, ctx.threads, 64, 0.0, list(server_args), device="cpu")


def sllm_variant(name: str = "sllm", label: str = "SLLM (one round trip per sentence)",
                 server_args: Sequence[str] | Callable[[Ctx], list[str]] = (), **client_options) -> Variant:
    """An SLLM row: `sllm-cloud serve --bundle MODEL/cloud SERVER_ARGS` (a list, or a function of the
    Ctx), the client built with `SLLMRunner(ctx, address, **client_options)`."""

    def server(ctx: Ctx):
        args = list(server_args(ctx) if callable(server_args) else server_args)
        return _serve_bundle(ctx.model_dir / "cloud", ctx, args), {"server_args": args, "client_options": client_options}

    return Variant(name, label, "sentence", server, lambda ctx, address: SLLMRunner(ctx, address, **client_options),
                   speculate=int(client_options.get("speculate", 0)), stats=True)


def speculation_variant(n: int) -> Variant:
    """The SLLM with sentence-level speculation, up to `n` sentences ahead."""
    return sllm_variant(f"sllm_spec{n}", f"SLLM + speculation, N = {n}",
                        lambda ctx: ["--speculate-max", str(n), "--edge-bundle", str(ctx.edge_dir)], speculate=n)


class TokenRunner:
    """A token-level variant: anything with .stream(prompt_ids, max_new) or .chunks(prompt_ids, max_new)
    (the token ids of each message as it comes: the run's units), and optional open/close."""

    def __init__(self, generator, closer: Callable[[], None], bos: int):
        self.generator, self.closer, self.bos = generator, closer, bos

    def run(self, prompt: list[list[int]], tokens: int, variant: str, rtt_ms: float, index: int) -> Run:
        if hasattr(self.generator, "open"):
            self.generator.open()  # the session, before the clock starts
        ids = [self.bos] + flatten(prompt)
        t0 = time.perf_counter()
        units = (self.generator.chunks(ids, tokens) if hasattr(self.generator, "chunks")
                 else ([t] for t in self.generator.stream(ids, tokens)))
        return timed(units, variant, rtt_ms, index, t0)

    def close(self) -> None:
        self.closer()


def token_split_variant() -> Variant:
    def server(ctx: Ctx):
        from sllm.modeling.token_bundle import token_model_id, write_token_bundle

        bundle = ctx.tmp / "token-bundle"
        model_id = token_model_id(ctx.baseline.path)
        write_token_bundle(ctx.baseline.model, bundle, model_id)
        return _serve_bundle(bundle, ctx, []), {"model_id": model_id}

    def connect(ctx: Ctx, address: str):
        from bench.token_split import TokenSplit
        from sllm.modeling.token_bundle import token_model_id, token_tables
        from sllm.protos.client import CloudClient

        client = CloudClient(address)
        split = TokenSplit(client, token_model_id(ctx.baseline.path), *token_tables(ctx.baseline.model),
                           dtype=ctx.wire_dtype)
        return TokenRunner(split, client.close, ctx.bos)

    return Variant("token_split", "token-level split (one round trip per token)", "token", server, connect,
                   stats=True)


def cloud_only_variant() -> Variant:
    def server(ctx: Ctx):
        cmd = [sys.executable, "-m", "bench.cloud_only", "--baseline", str(ctx.baseline.path), "--port", "0",
               "--threads", str(ctx.threads), "--generator", ctx.generator,
               "--cache", str(ROOT / "runs" / "bench" / "cache")]
        # no health service; its engine and streaming mode, in words, come in its start line
        return ServerProcess(cmd, name="the cloud-only server", listen=None, health=False, cwd=ROOT,
                             stop_timeout=30.0), {}

    def connect(ctx: Ctx, address: str):
        from bench.cloud_only import CloudOnlyClient

        client = CloudOnlyClient(address)
        return TokenRunner(client, client.close, ctx.bos)

    return Variant("cloud_only", "cloud-only, streamed (one round trip per answer)", "message", server, connect)


def default_variants(speculate: Sequence[int] = (4, 16)) -> list[Variant]:
    # cloud-only right after the speculating rows: each prompt's runs of the headline follow each other
    return [sllm_variant(), *(speculation_variant(n) for n in speculate), cloud_only_variant(), token_split_variant()]


# ---------------------------------------------------------------- the measurement

def measure(ctx: Ctx, variants: list[Variant], prompts: list, rtts: list[float], tokens: int, warm_prompt,
            say: Callable[[str], None], sampled_temperature: float = 0.0) -> dict:
    """Every RTT in turn (runs, relay stats, wire bytes and server counters per variant and RTT), then
    the sampled acceptance runs of the speculating variants."""
    out = {"runs": [], "relays": {}, "wire": {}, "counters": {}, "sampled": []}
    with running_servers(ctx, variants, say) as servers:
        for rtt in rtts:
            measure_rtt(ctx, variants, servers, prompts, rtt, tokens, warm_prompt, say, out)
        speculating = [v for v in variants if v.speculate]
        if sampled_temperature > 0 and speculating:
            out["sampled"] = sampled_runs(ctx, speculating, servers, prompts, tokens, sampled_temperature, say)
    return out


@contextlib.contextmanager
def running_servers(ctx: Ctx, variants: list[Variant], say: Callable[[str], None]) -> Iterator[dict]:
    """Every variant's server (name -> address); stopped on the way out, with the last lines of any that died."""
    procs = {}
    try:
        for v in variants:  # all spawned (from this thread: runtime.procs) before waiting: they start side by side
            procs[v.name], info = v.server(ctx)
            procs[v.name].spawn()
            v.info.update(info)
        addresses = {}
        for v in variants:
            started = procs[v.name].wait_ready()
            addresses[v.name] = started["address"]
            v.info.update({k: started[k] for k in ("generator", "streaming") if k in started})
            say(f"{v.name}: server at {started['address']} {v.info}")
        yield addresses
    finally:
        for name, proc in procs.items():
            if proc.proc is not None and not proc.running():  # it died under the bench: say why
                say(f"{name}: the server exited with {proc.proc.returncode}; its last lines:\n{proc.last_lines()}")
            proc.stop()


def measure_rtt(ctx: Ctx, variants: list[Variant], servers: dict, prompts: list, rtt: float, tokens: int,
                warm_prompt, say: Callable[[str], None], out: dict) -> None:
    """One RTT: a relay and a runner per variant, a warm-up run each, then every prompt on every variant."""
    relays, runners, runs, before = {}, {}, [], {}
    try:
        for v in variants:
            relays[v.name] = RelayProcess(servers[v.name], rtt / 2e3).start()
            runners[v.name] = v.connect(ctx, relays[v.name].address)
            runners[v.name].run(warm_prompt, 8, v.name, rtt, -1)  # connect, warm caches; not reported
        for v in variants:
            before[v.name] = (_bytes(relays[v.name]), server_counters(servers[v.name]) if v.stats else None)
        for i, prompt in enumerate(prompts):
            want = None
            for v in variants:
                r = runners[v.name].run(prompt, want or tokens, v.name, rtt, i)
                if ctx.chat and v.unit == "sentence" and want is None:
                    want = r.tokens  # the token-level variants write as many tokens as the first chat answer
                runs.append(r)
                say(f"RTT {rtt:5g} ms  prompt {i}  {v.name:12s} {r.tokens_per_s:8.1f} tok/s  first "
                    f"{r.first_s * 1e3:7.1f} ms  ({r.tokens} tokens, {r.units} {v.unit}s)"
                    + (f"  accepted {r.accepted} corrected {r.corrected} declined {r.declined}" if v.speculate else ""))
        for v in variants:
            out["relays"][(v.name, rtt)] = relays[v.name].stats()
            produced = sum(r.tokens for r in runs if r.variant == v.name)
            out["wire"][(v.name, rtt)] = (_bytes(relays[v.name]) - before[v.name][0]) / produced if produced else 0.0
    finally:
        for runner in runners.values():
            runner.close()
        for relay in relays.values():
            relay.stop()
    # after the streams are closed, so that what a server did for them (its last guesses) is in
    for v in variants:
        if v.stats:
            now, then = server_counters(servers[v.name]), before[v.name][1]
            out["counters"][(v.name, rtt)] = {k: now[k] - then[k] for k in now}
    out["runs"] += runs


def sampled_runs(ctx: Ctx, variants: list[Variant], servers: dict, prompts: list, tokens: int, temperature: float,
                 say: Callable[[str], None]) -> list[Run]:
    """Each prompt once more on each speculating variant, sampled (seeded), straight to its server: the
    acceptance when the edge samples and the cloud guesses greedily (it does not depend on the delay)."""
    from sllm.runtime.sampling import Sampling

    runs = []
    for v in variants:
        runner = v.connect(ctx, servers[v.name])
        runner.sampling = Sampling(temperature, seed=0)  # sentence i samples with seed i
        try:
            for i, prompt in enumerate(prompts):
                runs.append(r := runner.run(prompt, tokens, v.name, 0.0, i))
                say(f"sampled T={temperature:g}  prompt {i}  {v.name:12s} accepted {r.accepted} corrected "
                    f"{r.corrected} declined {r.declined}")
        finally:
            runner.close()
    return runs


def server_counters(address: str) -> dict:
    """COUNTERS of the server at `address`, asked straight (not through the relay, whose bytes are counted)."""
    from sllm.protos.client import CloudClient

    with CloudClient(address) as client:
        stats = client.stats()
    return {k: int(getattr(stats, k)) for k in COUNTERS}


def _bytes(relay: RelayProcess) -> int:
    st = relay.stats()
    return st["up"]["bytes"] + st["down"]["bytes"]


# ---------------------------------------------------------------- summary

def summarize(variants: list[Variant], rtts: list[float], measured: dict) -> dict:
    runs = measured["runs"]
    rows = {(v.name, rtt): summary_row(v, rtt, [r for r in runs if r.variant == v.name and r.rtt_ms == rtt],
                                       measured) for v in variants for rtt in rtts}
    reference = next((v.name for v in variants if v.unit == "sentence" and not v.speculate), None)
    for v in variants:
        for rtt in rtts:
            if v.speculate and reference is not None:
                compare_with_reference(rows[(v.name, rtt)], rows[(reference, rtt)], runs)
    bounds = {v.name: sllm_bound([r for r in runs if r.variant == v.name], rtts)
              for v in variants if v.unit == "sentence" and not v.speculate}
    out = {"rows": list(rows.values()), "bounds": bounds, "reference": reference}
    if measured.get("sampled"):
        out["sampled"] = {v.name: speculation_counts([r for r in measured["sampled"] if r.variant == v.name])
                          for v in variants if v.speculate}
    return out


def summary_row(v: Variant, rtt: float, mine: list[Run], measured: dict) -> dict:
    """One variant at one RTT: speed, first unit, wire bytes, and where measured, the cloud's work."""
    row = {"variant": v.name, "rtt_ms": rtt, "rtt_applied_ms": measured["relays"][(v.name, rtt)]["rtt_applied_ms"],
           "runs": len(mine), "tokens": sum(r.tokens for r in mine),
           "tokens_per_s": spread([r.tokens_per_s for r in mine]), "first_ms": spread([r.first_s * 1e3 for r in mine]),
           "answer_ms": spread([r.answer_s * 1e3 for r in mine]),
           "answer_tokens_per_s": spread([r.answer_tokens_per_s for r in mine]),
           "tokens_per_unit": sum(r.tokens for r in mine) / sum(r.units for r in mine),
           "wire_bytes_per_token": measured["wire"][(v.name, rtt)]}
    if v.unit == "sentence":  # 1.0 without speculation: every appended sentence waits for its step
        row["round_trips_per_sentence"] = sum(r.waited for r in mine) / max(1, sum(r.appends for r in mine))
    counters = measured.get("counters", {}).get((v.name, rtt))
    if counters is not None:
        row["cloud_per_token"] = {k.removesuffix("_total"): n / row["tokens"] for k, n in counters.items()}
    if v.speculate:
        row["speculation"] = speculation_counts(mine)
    return row


def speculation_counts(runs: list[Run]) -> dict:
    accepted, corrected, declined = (sum(getattr(r, k) for r in runs) for k in ("accepted", "corrected", "declined"))
    return {"runs": len(runs), "accepted": accepted, "corrected": corrected, "declined": declined,
            "acceptance": accepted / (accepted + corrected) if accepted + corrected else 0.0,
            "declined_per_run": declined / len(runs) if runs else 0.0}


def compare_with_reference(row: dict, ref: dict, runs: list[Run]) -> None:
    """A speculating row against the plain SLLM's at the same RTT: the cloud work speculation adds per
    output token, and whether each prompt's output is the same (greedy: it must be)."""
    spec = row["speculation"]
    mine, theirs = row["cloud_per_token"], ref["cloud_per_token"]
    spec["extra_per_token"] = {k: mine[k] - theirs[k] for k in ("forward_passes", "speculation_decode_tokens")}
    want = {r.prompt: r.output for r in runs if r.variant == ref["variant"] and r.rtt_ms == ref["rtt_ms"]}
    got = [r for r in runs if r.variant == row["variant"] and r.rtt_ms == row["rtt_ms"]]
    spec["identical_outputs"] = sum(r.output == want.get(r.prompt) for r in got)


def sllm_bound(mine: list[Run], rtts: list[float]) -> dict:
    """L / (RTT + t_sentence): one round trip per sentence on top of the time a sentence takes at the lowest RTT."""
    at0 = [r for r in mine if r.rtt_ms == min(rtts)]
    L = sum(r.tokens - r.first_tokens for r in mine) / max(1, sum(r.units - 1 for r in mine))
    t_sentence = sum(r.rest_s for r in at0) / max(1, sum(r.units - 1 for r in at0))
    return {"L": L, "t_sentence_ms": t_sentence * 1e3, "measured_at_rtt_ms": min(rtts),
            "tokens_per_s": {str(rtt): L / ((rtt - min(rtts)) / 1e3 + t_sentence) for rtt in rtts}}


# ---------------------------------------------------------------- report

def render(results: dict) -> str:
    s, cfg = results["summary"], results["config"]
    names = [v["name"] for v in results["variants"]]
    row = {(r["variant"], r["rtt_ms"]): r for r in s["rows"]}
    ov = results["relay_overhead"]
    lines = [
        "# The round trip: one conversation over a delayed network",
        "",
        (f"`{results['command']}` on {results['machine']['cpu']} ({results['machine']['cores']} cores, shared), "
        f"{results['machine']['date_utc']} UTC, commit {results['machine']['git_commit']}. "
        f"{cfg['prompts']} prompts of >= {cfg['prompt_tokens']} tokens (validation text), {output_words(cfg)}, "
        f"{cfg['threads']} thread(s) per process, {cfg['wire_dtype']} vectors on the wire."),
        "",
        "Variants: " + "; ".join(f"**{v['name']}**: {v['label']}" + (f" ({v['info']['generator']}; "
                                 f"{v['info'].get('streaming', 'one message per token')})"
                                 if v["info"].get("generator") else "") for v in results["variants"]) + ".",
        "",
        *([f"Load (bench.machine.LoadMonitor): {results['load_note']}.", ""] if results.get("load_note") else []),
        *headline(results),
        (f"The relay (bench/relay.py: a process of its own, delaying each direction by RTT/2) adds "
         f"{ov['added_median_ms'] * 1e3:.0f} us (median; p90 {ov['added_p90_ms'] * 1e3:.0f} us) to a round trip at "
         "0 ms. ping = median round trip of a 600-byte ping-pong through it at that RTT; applied = the mean delay it "
         "applied to the bench's own traffic, both directions added (wake-ups run late on a loaded machine)."),
        "",
        "## Tokens/s per conversation after the first sentence / token (median, min-max over prompts)",
        "",
        "| RTT ms | ping | applied | " + " | ".join(names) + " | "
        + " | ".join(f"bound L/(RTT+t) {n}" for n in s["bounds"]) + " |",
        "|---:|---:|---:|" + "---:|" * (len(names) + len(s["bounds"])),
    ]
    for rtt in cfg["rtts"]:
        applied = statistics.mean(row[(n, rtt)]["rtt_applied_ms"] for n in names)
        cells = [spread_cell(row[(n, rtt)]["tokens_per_s"], "{:.0f}") for n in names]
        cells += [f"{b['tokens_per_s'][str(rtt)]:.0f}" for b in s["bounds"].values()]
        lines.append(f"| {rtt:g} | {results['relay_ping_ms'][str(rtt)]:.2f} | {applied:.2f} | " + " | ".join(cells)
                     + " |")
    lines += ["", "## Time to the first sentence (SLLM) / first token, ms (median, min-max)", "",
              "| RTT ms | " + " | ".join(names) + " |", "|---:|" + "---:|" * len(names)]
    for rtt in cfg["rtts"]:
        cells = [spread_cell(row[(n, rtt)]["first_ms"], "{:.1f}") for n in names]
        lines.append(f"| {rtt:g} | " + " | ".join(cells) + " |")
    lines += ["", "## Whole answers: prompt sent -> answer complete (median, min-max)", "",
              "Tokens / answer time, then the answer time in ms. An SLLM answer is complete after the step that "
              "says stop (chat) or with its last sentence (fixed length); a token-level one with its last token.",
              "", "| RTT ms | " + " | ".join(names) + " |", "|---:|" + "---:|" * len(names)]
    for rtt in cfg["rtts"]:
        cells = [spread_cell(row[(n, rtt)]["answer_tokens_per_s"], "{:.0f}") + " tok/s, "
                 + spread_cell(row[(n, rtt)]["answer_ms"], "{:.0f}") + " ms" for n in names]
        lines.append(f"| {rtt:g} | " + " | ".join(cells) + " |")
    lines += ["", "## Wire bytes per output token (through the relay: gRPC + HTTP/2 framing)", "",
              "| RTT ms | " + " | ".join(names) + " |", "|---:|" + "---:|" * len(names)]
    for rtt in cfg["rtts"]:
        lines.append(f"| {rtt:g} | " + " | ".join(f"{row[(n, rtt)]['wire_bytes_per_token']:.0f}" for n in names) + " |")
    lines += [""]
    for n, b in s["bounds"].items():
        lines.append(f"Bound for {n}: L = {b['L']:.2f} tokens per sentence (after the first, measured on these runs), "
                     f"t_sentence = {b['t_sentence_ms']:.2f} ms (per sentence at RTT {b['measured_at_rtt_ms']:g}).")
    lines += render_speculation(results)
    lines += [
        "",
        ("What this shows: how one conversation's speed falls with the round trip when every sentence (SLLM) or "
        "every token (token-level split) waits for one, how much of it sentence-level speculation wins back, "
        "against a server that generates alone and streams. "
        "What it does not show: a real network (loss, jitter, bandwidth: the relay only delays, on loopback), "
        "many conversations at once (see cloud-cost.md), a GPU cloud (whose SentenceVAE decode for speculation "
        "would be far faster than this CPU's), or quality. Figures measured on a CPU shared with "
        "other work are provisional; re-measure on a quiet machine with the command above."),
        "",
        f"![tok/s vs RTT]({results['plot']})" if results.get("plot") else "",
    ]
    return "\n".join(lines) + "\n"


def load_words(load: dict) -> str:
    """LoadMonitor's figures in words: during the run its "other processes" include this bench's own
    servers and relays (they are not its threads), so only "before" measures the machine's other work."""
    before, during = load["before"], load["during"]
    other = during["other_cores"] or {}
    return (f"before the servers started, other processes used {before.get('other_cores', 0):.2f} of "
            f"{load['cores']} cores (load average {before.get('load1') or 0:.2f}); during the run, other "
            f"processes and this bench's servers and relays used {load['other_cores_mean']:.2f} cores on average "
            f"(max {other.get('max', 0):.2f}), load average {(during['load1'] or {}).get('median', 0):.2f} (median)")


def output_words(cfg: dict) -> str:
    """What each run generates, in words."""
    chat = cfg.get("chat")
    if not chat:
        return f"{cfg['output_tokens']} output tokens, greedy"
    return (f"answers as edge-chat gives them ({', '.join(f'{k} {v}' for k, v in chat.items())}; stop threshold "
            "None = the bundle's), the token-level variants writing as many tokens as the SLLM's answer to the "
            "same prompt, greedy")


def render_speculation(results: dict) -> list[str]:
    """The speculation section: per row what it accepted, waited and cost the cloud; sampled acceptance;
    the tolerance facts (the comparison with cloud-only is `headline`)."""
    s, rtts = results["summary"], results["config"]["rtts"]
    spec = [v["name"] for v in results["variants"] if v.get("speculate")]
    ref = s.get("reference")
    if not spec or ref is None:
        return []
    row = {(r["variant"], r["rtt_ms"]): r for r in s["rows"]}
    lines = ["", f"## Sentence-level speculation against {ref}: acceptance, round trips, extra cloud work", "",
             ("Per output token, from the server's counters: forward passes (batched steps, speculative ones "
              "included) and the tokens its SentenceVAE decoded to guess; extra = minus the same on the "
              f"{ref} row. round trips / sentence: appends that waited for their reply, per generated sentence "
              "appended (all of them in a chat, all but the last in fixed-length runs; corrections + declined "
              "guesses; 1.00 without speculation). wasted = guesses the "
              "cloud sent that the edge did not accept (corrected, or past the end of a run; one still in flight "
              "when a run ends is not in it, its pass and decode tokens are)."), "",
             "| RTT ms | variant | acceptance | declined / run | round trips / sentence | wire B / token | "
             "passes / token (extra) | SVAE decode tokens / token | wasted guesses / run | output = " + ref + " |",
             "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for rtt in rtts:
        for n in [ref, *spec]:
            lines.append(speculation_table_row(row[(n, rtt)], rtt))
    lines += ["", declined_note(s, spec, rtts, bool(results["config"].get("chat")))]
    if s.get("sampled"):
        t = results["config"]["sampled_temperature"]
        lines += ["", f"Sampled decoding (temperature {t:g}, seeded; the cloud guesses greedily), each prompt once, "
                      "straight to the server: " + "; ".join(
                          f"{n}: acceptance {c['acceptance']:.2f} ({c['accepted']} accepted, {c['corrected']} "
                          f"corrected, {c['declined']} declined)" for n, c in s["sampled"].items()) + "."]
    if results.get("tolerance"):
        from bench.speculation import tolerance_line

        lines += ["", tolerance_line(results["tolerance"])]
    return lines


def speculation_table_row(r: dict, rtt: float) -> str:
    cloud, sp = r["cloud_per_token"], r.get("speculation")
    extra = f" ({sp['extra_per_token']['forward_passes']:+.3f})" if sp else ""
    wasted = (cloud["speculative_steps"] - cloud["speculation_accepted"]) * r["tokens"] / r["runs"]
    cells = [f"{rtt:g}", r["variant"], f"{sp['acceptance']:.2f}" if sp else "-",
             f"{sp['declined_per_run']:.1f}" if sp else "-", f"{r['round_trips_per_sentence']:.2f}",
             f"{r['wire_bytes_per_token']:.0f}", f"{cloud['forward_passes']:.3f}{extra}",
             f"{cloud['speculation_decode_tokens']:.2f}", f"{wasted:.1f}",
             f"{sp['identical_outputs']}/{r['runs']}" if sp else "-"]
    return "| " + " | ".join(cells) + " |"


def declined_note(s: dict, spec: list[str], rtts: list[float], chat: bool = False) -> str:
    """The guesses the cloud declined: one round trip each that speculation did not hide."""
    rows = [r for r in s["rows"] if r["variant"] in spec]
    declined, runs = sum(r["speculation"]["declined"] for r in rows), sum(r["runs"] for r in rows)
    if chat:
        return (f"Declined guesses: {declined} in {runs} speculating runs. The edge sends its stop rule with the "
                "prompt, so the cloud guesses up to where the answer ends; each declined guess is a round trip "
                "speculation did not hide.")
    return (f"Declined guesses: {declined} in {runs} speculating runs ({declined / max(1, runs):.1f} per run). "
            "These runs decode past the stop head (fixed length) and say so with the prompt, so the cloud guesses "
            "past it too; each declined guess is a round trip speculation did not hide.")


HEADLINE_RTTS = (50.0, 100.0)


def headline(results: dict) -> list[str]:
    """Speculation against the cloud-only baseline at 50 and 100 ms, from the same interleaved runs:
    tok/s min / median / max, the ratio per prompt (each prompt's runs follow each other, so a load that
    comes and goes moves both), and whether speculation changed an output."""
    s, cfg = results["summary"], results["config"]
    row = {(r["variant"], r["rtt_ms"]): r for r in s["rows"]}
    spec = [v["name"] for v in results["variants"] if v.get("speculate")]
    cloud = next((v for v in results["variants"] if v["name"] == "cloud_only"), None)
    rtts = [r for r in cfg["rtts"] if r in HEADLINE_RTTS]
    if not spec or cloud is None or not rtts:
        return []
    info = cloud["info"]
    lines = ["## Headline: sentence-level speculation against cloud-only", "",
             (f"cloud_only runs {info.get('generator', '?')}, streaming by {info.get('streaming', '?')}. "
              "tok/s: whole answers (prompt sent -> answer complete: the figure to compare) and after the first "
              "sentence / message (a stream whose first reply came late catches up in a burst, which inflates it); "
              "median (min-max) over the prompts; x = the speculating run's tok/s over cloud_only's on the same "
              "prompt, median (min-max) over the prompts. "
              f"output = {s['reference']}: greedy outputs identical with and without speculation."), "",
             "| RTT ms | variant | whole answers, tok/s | x | after the first unit, tok/s | x | output = "
             f"{s['reference']} |", "|---:|---|---:|---:|---:|---:|---:|"]
    for rtt in rtts:
        for n in [*spec, "cloud_only"]:
            r, cells = row[(n, rtt)], [f"{rtt:g}", n]
            for metric in ("answer_tokens_per_s", "tokens_per_s"):
                ratios = paired_ratios(results["runs"], n, "cloud_only", rtt, metric)
                cells += [spread_cell(r[metric], "{:.0f}"),
                          spread_cell(spread(ratios), "{:.2f}") if n != "cloud_only" and ratios else "-"]
            sp = r.get("speculation")
            cells.append(f"{sp['identical_outputs']}/{r['runs']}" if sp else "-")
            lines.append("| " + " | ".join(cells) + " |")
    return lines + [""]


def paired_ratios(runs: list[dict], variant: str, other: str, rtt: float, metric: str) -> list[float]:
    """`metric` of each run of `variant` at `rtt` over `other`'s on the same prompt."""
    theirs = {r["prompt"]: r[metric] for r in runs if r["variant"] == other and r["rtt_ms"] == rtt}
    return [r[metric] / theirs[r["prompt"]] for r in runs
            if r["variant"] == variant and r["rtt_ms"] == rtt and theirs.get(r["prompt"])]


def plot(results: dict, out: Path, name: str = "rtt.png") -> str:
    from bench.plots import _save, plt

    s, rtts = results["summary"], results["config"]["rtts"]
    # a chat's answers are short: the whole answer (first sentence and the step that says stop included) is
    # its speed; the bound, per sentence after the first, is drawn for fixed-length runs only
    chat = bool(results["config"].get("chat"))
    metric = "answer_tokens_per_s" if chat else "tokens_per_s"
    colors = {"sllm": "tab:blue", "sllm_spec4": "tab:purple", "sllm_spec16": "tab:orange", "token_split": "tab:red",
              "cloud_only": "tab:green"}
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for v in results["variants"]:
        rows = sorted((r for r in s["rows"] if r["variant"] == v["name"]), key=lambda r: r["rtt_ms"])
        med = [r[metric]["median"] for r in rows]
        err = [[m - r[metric]["min"] for m, r in zip(med, rows)], [r[metric]["max"] - m for m, r in zip(med, rows)]]
        ax.errorbar([r["rtt_ms"] for r in rows], med, yerr=err, marker="o", capsize=3, label=v["label"],
                    color=colors.get(v["name"]), linestyle="--" if v.get("speculate") else "-")
    for n, b in ({} if chat else s["bounds"]).items():
        ax.plot(rtts, [b["tokens_per_s"][str(r)] for r in rtts], ":", color=colors.get(n, "gray"),
                label=f"bound L/(RTT + t_sentence), {n}")
    ax.set(yscale="log", xlabel="round-trip time added by the relay, ms",
           ylabel="output tokens / s, " + ("whole answers (edge-chat's defaults)" if chat else "after the first unit"),
           title="One conversation over a delayed network (median, min-max over prompts)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    return _save(fig, out, name)


# ---------------------------------------------------------------- command

def parser() -> argparse.ArgumentParser:
    ap = bench_parser(__doc__, "RTT 0,50; 2 prompts; 32 output tokens")
    ap.add_argument("--rtts", help="comma-separated RTTs in ms (default 0,10,50,100)")
    ap.add_argument("--prompts", type=int, help="prompts (default 5)")
    ap.add_argument("--prompt-tokens", type=int, default=64, help="each prompt: whole sentences, at least this")
    ap.add_argument("--output-tokens", type=int, help="output tokens per run (default 128)")
    ap.add_argument("--threads", type=int, default=1, help="intra-op threads of every process")
    ap.add_argument("--wire-dtype", choices=("float16", "float32"), default="float16")
    ap.add_argument("--generator", choices=("auto", "hf"), default="auto", help="the cloud-only server's engine "
                    "(auto: the fastest, the baseline's fused ONNX graph with its KV cache; hf: torch eager)")
    ap.add_argument("--speculate", default="4,16", help="comma-separated N of the speculation rows ('' = none)")
    ap.add_argument("--sampled-temperature", type=float, default=0.8,
                    help="the sampled-acceptance runs' temperature (0 = none; none with --chat: the cloud does "
                    "not guess sampled answers)")
    ap.add_argument("--chat", action="store_true", help="answers as edge-chat gives them (its default repetition "
                    "controls and stop rule, at most 8 sentences) instead of fixed-length plain greedy runs; "
                    "writes rtt-chat.*")
    return ap


def speculation_setup(args, variants: list[Variant], say: Callable[[str], None]) -> Path | None:
    """The edge bundle the speculating servers guess with (the edge's own graphs: MODEL/edge), when a variant
    speculates."""
    if not any(v.speculate for v in variants):
        return None
    say(f"speculating servers guess with the edge graphs in {args.model / 'edge'}")
    return args.model / "edge"


def main(argv: list[str] | None = None, variants: list[Variant] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    args = parser().parse_args(argv)
    rtts = [float(x) for x in (args.rtts or ("0,50" if args.quick else "0,10,50,100")).split(",")]
    n_prompts = args.prompts or (2 if args.quick else 5)
    tokens = args.output_tokens or (32 if args.quick else 128)
    variants = variants or default_variants([int(n) for n in args.speculate.split(",") if n.strip() not in ("", "0")])
    if args.chat and variants[0].unit != "sentence":
        raise SystemExit("--chat: the first variant must be an SLLM one (the others match its answers' lengths)")
    stem = "rtt-chat" if args.chat else "rtt"
    sampled_temperature = 0.0 if args.chat else args.sampled_temperature

    from transformers.utils import logging as hf_logging

    from bench.machine import LoadMonitor, machine_info
    from bench.texts import validation_text
    from sllm.edge.api import AnswerOptions
    from sllm.edge.runtime import EdgeRuntime
    from sllm.modeling.baseline_bundle import FOLDER, load_baseline_bundle
    from sllm.runtime.manifest import read_manifest

    hf_logging.set_verbosity_error()

    t0 = time.perf_counter()

    def say(msg: str) -> None:
        print(f"[{time.perf_counter() - t0:6.1f} s] {msg}", file=sys.stderr, flush=True)

    rt = EdgeRuntime.load(args.model / "edge", device="cpu", threads=args.threads)
    baseline = load_baseline_bundle(args.model / FOLDER)
    if baseline.tokenizer.to_json_str() != rt.tokenizer.to_json_str():
        raise SystemExit(f"error: {args.model / FOLDER} has another tokenizer than the SLLM's edge bundle")
    text = validation_text(rt.tokenizer, rt.max_sentence_tokens, rt.split_on_comma)
    prompts = text.prompts(args.prompt_tokens, n_prompts)
    overhead = measure_overhead()
    say(f"relay overhead at 0 ms: {overhead['added_median_ms'] * 1e3:.0f} us per round trip (median)")
    # what a small ping-pong really takes through the relay at each RTT (sleep wake-ups run late)
    pings = {str(rtt): measure_overhead(20, one_way_s=rtt / 2e3)["relayed_median_ms"] for rtt in rtts}
    with tempfile.TemporaryDirectory(prefix="sllm-rtt-") as tmp:
        edge_dir = speculation_setup(args, variants, say)
        ctx = Ctx(args.model, rt, baseline, read_manifest(args.model / "cloud", kind="cloud"), Path(tmp), args.threads,
                  args.wire_dtype, args.generator, int(rt.bundle.manifest["bos_id"]), edge_dir,
                  AnswerOptions() if args.chat else None)
        with LoadMonitor() as load:  # its "before" sample is taken before any server starts
            measured = measure(ctx, variants, prompts, rtts, tokens, text.prompts(16, 1)[0], say,
                               sampled_temperature)
        tolerance = None
        if edge_dir is not None:
            from bench.speculation import tolerance_facts

            tolerance = tolerance_facts(rt, [s for p in prompts for s in p])
    results = {
        "command": shlex.join(["python", "-m", "bench.rtt", *argv]), "wall_s": time.perf_counter() - t0,
        "machine": machine_info(ROOT, args.threads),
        "config": {"model": str(args.model), "rtts": rtts, "prompts": n_prompts, "prompt_tokens": args.prompt_tokens,
                   "output_tokens": tokens, "threads": args.threads, "wire_dtype": args.wire_dtype,
                   "quick": args.quick, "text": text.source, "sampled_temperature": sampled_temperature,
                   "edge_bundle": str(edge_dir) if edge_dir else None, "chat": asdict(ctx.chat) if ctx.chat else None},
        "load": load.summary(), "load_note": load_words(load.summary()),
        "relay_overhead": overhead, "relay_ping_ms": pings,
        "variants": [{"name": v.name, "label": v.label, "unit": v.unit, "speculate": v.speculate, "info": v.info}
                     for v in variants],
        "summary": summarize(variants, rtts, measured),
        "tolerance": tolerance,
        "relays": [{"variant": k[0], "rtt_ms": k[1], **st} for k, st in measured["relays"].items()],
        "runs": [r.as_dict() for r in measured["runs"]],
        "sampled_runs": [r.as_dict() for r in measured["sampled"]],
    }
    args.out.mkdir(parents=True, exist_ok=True)
    results["plot"] = plot(results, args.out, f"{stem}.png")
    print(write_results(args.out, stem, results, render))
    say(f"wrote {args.out / stem}.md, {stem}.json and {results['plot']} in {results['wall_s']:.0f} s")
    return results


if __name__ == "__main__":
    main()
