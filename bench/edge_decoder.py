"""The edge decoder (the SLLM's single-machine bottleneck) under each ONNX Runtime option we tried:
I/O binding, graph optimisation level, threads, spinning, the int8 bundle. Decoder tokens/s,
min / median / max over interleaved rounds, and the int8 bundle's exact-match change vs fp32.

    python -m bench.edge_decoder                        # models/default/edge -> docs/results/edge-decoder.*
    python -m bench.edge_decoder --quick --out /tmp/ed  # a smoke test (about a minute)

What a round is: every option decodes the same validation sentence vectors (the bundle's
encoder on whole validation sentences), batch 1, greedy, as the edge decodes h_t, one option
after the other in an order that rotates each round (so the spinning pool of a 2-thread session
and background load fall on every option alike). tokens/s = decoder steps / wall seconds (a step
makes one token; the eos step counts). It shows the decoder alone, not a chat turn.
"""
from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from sllm.runtime.providers import cpu_session
from sllm.runtime.svae_onnx import decode_loop


@dataclass(frozen=True)
class Option:
    name: str
    graph: str = "fp32"  # or "int8": the decoder of the int8 bundle (export.quantize, MatMul weights)
    steps: str = "run"  # "run": session.run (runtime.svae_onnx.KVSteps), "bound": through BoundSession (I/O binding)
    level: str = "all"  # graph optimisation (runtime.providers.LEVELS)
    threads: int = 1
    spinning: bool = True


class BoundSession:
    """A decoder session whose `run` (what `sllm.runtime.svae_onnx.KVSteps` calls) goes through an ONNX
    Runtime I/O binding instead of `session.run`: ORT writes the present KV cache straight into one of
    two flat buffers kept between calls (the one the past is not read from: [.., P, hd] is a
    contiguous prefix of either), and the logits into a reused buffer. It returns views of them, so
    a step allocates nothing and the cache never goes through a new numpy array; the next step's
    past is the view it returned. Measured here against the session itself, in the edge's own loop."""

    OUTPUTS = ["logits", "present_kv"]

    def __init__(self, session):
        self.session, self.io = session, session.io_binding()
        logits = next(o for o in session.get_outputs() if o.name == "logits").shape  # [B, T, V]
        # V is a fixed size; T may be too (a graph that gives the last position's logits only)
        self.vocab, self.logits_len = int(logits[-1]), logits[1] if isinstance(logits[1], int) else None
        self._kv = [np.empty(0, dtype=np.float32), np.empty(0, dtype=np.float32)]
        self._logits, self._logits_shape = np.empty(0, dtype=np.float32), None
        self._bound: dict[str, np.ndarray] = {}  # bound inputs stay alive: ORT reads their memory at run

    def _buffer(self, which: int, size: int) -> np.ndarray:
        if self._kv[which].size < size:
            self._kv[which] = np.empty(size, dtype=np.float32)
        return self._kv[which]

    def run(self, output_names: list[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        if list(output_names) != self.OUTPUTS:
            raise ValueError(f"BoundSession runs {self.OUTPUTS}, not {output_names}")
        past, B, T = feeds["past_kv"], *feeds["ids"].shape
        for name, value in feeds.items():
            if name != "past_kv" and self._bound.get(name) is not value:  # the fixed inputs: bound once
                self._bound[name] = value = np.ascontiguousarray(value)
                self.io.bind_cpu_input(name, value)
        self.io.bind_input("past_kv", "cpu", 0, np.float32, list(past.shape), past.ctypes.data)
        present_shape = [*past.shape[:4], past.shape[4] + T, past.shape[5]]
        dst = self._buffer(1 if np.may_share_memory(past, self._kv[0]) else 0, int(np.prod(present_shape)))
        self.io.bind_output("present_kv", "cpu", 0, np.float32, present_shape, dst.ctypes.data)
        logits_shape = [B, self.logits_len or T, self.vocab]
        size = int(np.prod(logits_shape))
        if self._logits.size < size:
            self._logits, self._logits_shape = np.empty(size, dtype=np.float32), None
        if logits_shape != self._logits_shape:  # bound once while the shape stays (every step after the first)
            self.io.bind_output("logits", "cpu", 0, np.float32, logits_shape, self._logits.ctypes.data)
            self._logits_shape = logits_shape
        self.session.run_with_iobinding(self.io)
        return [self._logits[:size].reshape(logits_shape),
                dst[: int(np.prod(present_shape))].reshape(present_shape)]


REFERENCE = "session.run, graph optimisation all, 1 thread"  # the edge's loop (runtime.svae_onnx.KVSteps)
OPTIONS = (  # each differs from the reference in one setting
    Option(REFERENCE),
    Option("I/O binding, preallocated past/present buffers", steps="bound"),
    Option("graph optimisation extended (here the same graph as all)", level="extended"),
    Option("graph optimisation basic", level="basic"),
    Option("no graph optimisation", level="disable"),
    Option("2 threads", threads=2),
    Option("2 threads, no spinning", threads=2, spinning=False),
    Option("int8 bundle's decoder", graph="int8"),
)


def _argmax(logits: np.ndarray) -> np.ndarray:
    return logits.argmax(axis=-1)


def decode_all(session, vectors: np.ndarray, spec) -> tuple[list[list[int]], int]:
    """Each vector on its own (batch 1, as the edge decodes): (token lists, decoder steps)."""
    out, steps = [], 0
    for v in vectors:
        ids = decode_loop(session, v[None], spec, _argmax)[0]
        out.append(ids)
        steps += min(len(ids) + 1, spec.max_sentence_tokens)  # + the eos step, unless cut at the limit
    return out, steps


def measure(sessions: dict[Option, object], vectors: np.ndarray, spec, rounds: int) -> dict:
    """Interleaved rounds -> per option: tokens/s and CPU ms per step per round, tokens of round 1."""
    rows = {o: {"tokens_per_s": [], "cpu_ms_per_step": []} for o in sessions}
    tokens = {}
    options = list(sessions)
    for o in options:  # warm-up: first runs allocate and pick kernels
        decode_all(sessions[o], vectors[:2], spec)
    for r in range(rounds):
        for o in options[r % len(options):] + options[: r % len(options)]:
            t0, c0 = time.perf_counter(), time.process_time()
            out, steps = decode_all(sessions[o], vectors, spec)
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
            rows[o]["tokens_per_s"].append(steps / wall)
            rows[o]["cpu_ms_per_step"].append(1e3 * cpu / steps)
            tokens.setdefault(o, out)
    return {"rows": rows, "tokens": tokens}


def _spread(xs: list[float]) -> dict:
    return {"min": min(xs), "median": statistics.median(xs), "max": max(xs)}


def int8_bundle(edge_dir: Path, manifest: dict, tmp: Path) -> tuple[Path, Path]:
    """The graphs `sllm-export --quantize int8` ships (export.exporter.QUANTIZED_GRAPHS)."""
    from sllm.export.exporter import QUANTIZED_GRAPHS
    from sllm.export.quantize import quantize_int8

    ops = QUANTIZED_GRAPHS["int8"]
    enc = quantize_int8(edge_dir / manifest["encoder_file"], tmp / "encoder.int8.onnx", ops["encoder"])
    dec = quantize_int8(edge_dir / manifest["decoder_file"], tmp / "decoder.int8.onnx", ops["decoder"])
    return enc, dec


def run(edge_dir: Path, quick: bool, sentences: int, rounds: int, exact_sentences: int,
        corpus: list[str] | None = None, log=print) -> dict:
    from bench.machine import machine_info
    from bench.texts import validation_text
    from sllm.export import verify
    from sllm.runtime.edge_bundle import load_edge_bundle

    bundle = load_edge_bundle(edge_dir, 1)
    m, spec = bundle.manifest, bundle.spec
    if m.get("quantization", {}).get("decoder", "fp32") != "fp32":
        raise SystemExit(f"{edge_dir} ships an int8 decoder already: give an fp32 bundle")
    text = validation_text(bundle.tokenizer, spec.max_sentence_tokens, bool(m["split_on_comma"]), corpus)
    timed = text.sentences[:sentences]
    vectors = bundle.encode_ids(timed)
    log(f"{len(timed)} validation sentences, {sum(map(len, timed))} tokens; {rounds} rounds x {len(OPTIONS)} options")
    with tempfile.TemporaryDirectory(prefix="edge-decoder-") as tmp:
        enc8, dec8 = int8_bundle(edge_dir, m, Path(tmp))
        paths = {"fp32": edge_dir / m["decoder_file"], "int8": dec8}
        sessions = {o: cpu_session(paths[o.graph], o.threads, level=o.level, spinning=o.spinning) for o in OPTIONS}
        sessions = {o: BoundSession(x) if o.steps == "bound" else x for o, x in sessions.items()}
        measured = measure(sessions, vectors, spec, rounds)

        log(f"int8 vs fp32 exact match on {exact_sentences} validation sentences")
        exact = text.sentences[:exact_sentences]
        fp32_pair = (bundle.encoder, bundle.decoder)
        int8_pair = (cpu_session(enc8, 1), cpu_session(dec8, 1))
        fp32_out = verify.ort_reconstruct(*fp32_pair, spec, bundle.tokenizer.pad_id, exact)
        effect = verify.quantization_effect(exact, spec, bundle.tokenizer.pad_id, fp32_pair, int8_pair, fp32_out)

    ref_rates = measured["rows"][OPTIONS[0]]["tokens_per_s"]
    ref_tokens = measured["tokens"][OPTIONS[0]]
    options = []
    for o in OPTIONS:
        row = measured["rows"][o]
        same = float(np.mean([a == b for a, b in zip(measured["tokens"][o], ref_tokens)]))
        options.append({**asdict(o), "tokens_per_s": _spread(row["tokens_per_s"]),
                         "ms_per_step_median": 1e3 / statistics.median(row["tokens_per_s"]),
                         "cpu_ms_per_step_median": statistics.median(row["cpu_ms_per_step"]),
                         # paired by round: the two ran back to back, under the same load
                         "vs_reference": _spread([a / b for a, b in zip(row["tokens_per_s"], ref_rates)]),
                         "same_tokens_as_reference": same, "rounds": row})
    return {"mode": "quick" if quick else "full",
            "machine": machine_info(Path(__file__).resolve().parents[1], 1),
            "bundle": {"path": str(edge_dir), "model_id": bundle.model_id, "d_model": int(m["d_model"]),
                       "layers": int(m["n_layers"]), "heads": int(m["n_heads"]), "vocab": int(m["vocab_size"])},
            "sentences": len(timed), "decoder_steps_per_round": int(sum(min(len(t) + 1, spec.max_sentence_tokens)
                                                                        for t in ref_tokens)),
            "rounds": rounds, "reference": REFERENCE, "options": options,
            "int8": {k: v for k, v in effect.items() if k not in ("speed_fp32", "speed_int8")}}


def render(r: dict) -> str:
    b, q, mach = r["bundle"], r["int8"], r["machine"]
    where = (f"`{r['command']}` ({r['mode']}), {mach['date_utc']} UTC, {mach['cpu']}, {mach['cores']} cores, load "
             f"average at start {mach['load_average_at_start']}; onnxruntime {mach['versions'].get('onnxruntime')}, "
             f"commit {mach['git_commit']}.")
    how = (f"Bundle `{b['path']}` ({b['model_id']}): decoder d={b['d_model']}, {b['layers']} block(s), {b['heads']} "
           f"heads, vocab {b['vocab']}. {r['sentences']} validation sentences decoded one at a time (batch 1, greedy, "
           f"as the edge decodes h_t), {r['decoder_steps_per_round']} decoder steps per option per round, "
           f"{r['rounds']} rounds; the options take turns in an order that rotates each round. tokens/s = decoder "
           "steps / wall seconds (min / median / max over rounds); x reference = this option's rate / the "
           "reference's in the same round (median, with min-max); CPU ms = process CPU time per step (all threads).")
    lines = ["# Edge decoder: ONNX Runtime options", "", where, "", how, "",
             "| option | tokens/s min / median / max | ms per step | CPU ms per step | x reference | same tokens |",
             "|---|---|---|---|---|---|"]
    for o in r["options"]:
        t, v = o["tokens_per_s"], o["vs_reference"]
        lines.append(f"| {o['name']} | {t['min']:,.0f} / **{t['median']:,.0f}** / {t['max']:,.0f} | "
                     f"{o['ms_per_step_median']:.3f} | {o['cpu_ms_per_step_median']:.3f} | {v['median']:.2f}x "
                     f"({v['min']:.2f}-{v['max']:.2f}) | {o['same_tokens_as_reference']:.1%} |")
    kept = ("The edge runs the reference: `sllm.runtime.svae_onnx.KVSteps` in sessions from `sllm.runtime.providers` (graph "
            "optimisation all, ORT's default; intra-op threads as `edge-chat --threads` sets them, 0 = ORT's choice). "
            "The int8 decoder ships when a bundle is exported with `sllm-export --quantize int8`.")
    int8 = (f"int8 bundle (`sllm-export --quantize int8`: encoder MatMul + Gather, decoder MatMul weights, dynamic "
            f"quantization) against fp32 on {q['sentences']} validation sentences, encoder and decoder both ONNX "
            "Runtime, greedy:")
    caveat = ("What this shows: the decoder alone, on this machine, under whatever load shared it (the load average "
              "above); the ranks of the options more than their absolute rates. It does not show a chat turn (encode, "
              "cloud step and detokenizing are not in it) nor other CPUs, where thread counts behave differently.")
    lines += ["", kept, "", int8, "", "| | fp32 | int8 |", "|---|---|---|",
              (f"| exact-match reconstruction | {q['exact_match_fp32']:.1%} | {q['exact_match_int8']:.1%} "
               f"({q['exact_match_int8'] - q['exact_match_fp32']:+.1%}) |"),
              f"| sentences decoded exactly as fp32 | 100% | {q['same_tokens_as_fp32']:.1%} |",
              (f"| sentence vectors: min cosine to fp32 / max abs diff | 1 / 0 | {q['vectors_min_cosine']:.4f} / "
               f"{q['vectors_max_abs_diff']:.3g} |"), "", caveat]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.edge_decoder", description=__doc__.split("\n\n")[0])
    ap.add_argument("--edge", type=Path, default=Path("models/default/edge"), help="an fp32 edge bundle")
    ap.add_argument("--out", type=Path, default=Path("docs/results"), help="where edge-decoder.{json,md} go")
    ap.add_argument("--quick", action="store_true", help="20 sentences, 4 rounds, 200 for exact match")
    ap.add_argument("--sentences", type=int, help="validation sentences timed per option per round (default 60)")
    ap.add_argument("--rounds", type=int, help="interleaved rounds (default 15)")
    ap.add_argument("--exact-sentences", type=int, help="validation sentences for int8 exact match (default 1000)")
    ap.add_argument("--corpus", action="append", default=None, help="validation text source (default: bundled)")
    args = ap.parse_args(argv)
    sentences = args.sentences or (20 if args.quick else 60)
    rounds = args.rounds or (4 if args.quick else 15)
    exact = args.exact_sentences or (200 if args.quick else 1000)
    if min(sentences, rounds, exact) < 1:
        ap.error("--sentences, --rounds and --exact-sentences must be >= 1")
    r = run(args.edge, args.quick, sentences, rounds, exact, args.corpus, log=lambda s: print(s, file=sys.stderr))
    r["command"] = shlex.join(["python", "-m", "bench.edge_decoder", *(sys.argv[1:] if argv is None else argv)])
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "edge-decoder.json").write_text(json.dumps(r, indent=2, default=str) + "\n")
    md = render(r)
    (args.out / "edge-decoder.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
