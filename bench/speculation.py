"""The cloud's speculation guesses: how long they take, and the facts behind edge.speculate's tolerance
(the speculation rows of bench/rtt.py).

    python -m bench.speculation                  # models/default: guess decode ms/token, batch 1 and 8
    python -m bench.speculation --sentences 40   # a quicker run

`guess_timing`: the cloud's guess codec (sllm.cloud.guesses.GuessCodec, the edge bundle's ONNX graphs) decodes
validation sentence vectors as h_t, B rows per call, greedy, with edge-chat's repetition controls (each row's
answer: the sentences before it) and without, then re-encodes the sentences; ms per decoded token (eos
included, as the server counts them), median over interleaved rounds, and whether each guess equals the
edge's own decode of that h_t (EdgeRuntime.decode) token for token.

`tolerance_facts` measures, on real sentences, what the tolerance must separate: the same sentence encoded
by the edge alone and by the cloud in a padded batch (the same encoder.onnx), float16 rounding on the
wire, and the closest pair of distinct sentences; and how often the cloud's guess gives the edge's tokens.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

MAX_SENTENCES = 60  # the pairwise distances are quadratic; 60 sentences are plenty to show the gap


def tolerance_facts(rt, sentences: list[list[int]]) -> dict:
    """The edge runtime `rt` vs the cloud's guess codec on the same graphs, on `sentences` (token id lists)."""
    from sllm.cloud.guesses import GuessCodec
    from sllm.sentences.sampling import SamplingConfig

    codec = GuessCodec(rt.bundle)
    ids = sentences[:MAX_SENTENCES]
    v_edge = np.concatenate([rt.encode([t]) for t in ids])  # one sentence per call, as the edge encodes
    v_cloud = codec.encode(ids)  # all in one padded batch, as the cloud re-encodes its guesses
    scale = np.maximum(1, np.abs(v_edge).max(1))  # edge.speculate.same_sentence scales by max(1, max|v|)
    dist = np.abs(v_edge[:, None] - v_edge[None]).max(-1) / scale[:, None]
    distinct = np.array([[a != b for b in ids] for a in ids])
    guessed = codec.decode(v_edge)
    return {"sentences": len(ids), "encoder_max_abs_alone_vs_batched": float(np.abs(v_edge - v_cloud).max()),
            "float16_rounding_max_scaled": float((np.abs(v_edge - v_edge.astype(np.float16)).max(1) / scale).max()),
            "closest_distinct_pair_scaled": float(dist[distinct].min()) if distinct.any() else None,
            "greedy_tokens_identical": sum(a == rt.decode(v, SamplingConfig()).ids for a, v in zip(guessed, v_edge))}


def tolerance_line(f: dict) -> str:
    """The facts in one markdown sentence."""
    from sllm.edge.speculate import TOLERANCE

    closest = "n/a" if f["closest_distinct_pair_scaled"] is None else f"{f['closest_distinct_pair_scaled']:.3f}"
    return (f"Tolerance (edge.speculate, {TOLERANCE:g} x max(1, max|v|)) against {f['sentences']} prompt sentences: "
            f"max|alone - batched| of encoder vectors {f['encoder_max_abs_alone_vs_batched']:.1e}, float16 rounding "
            f"{f['float16_rounding_max_scaled']:.1e}, closest pair of distinct sentences {closest} (both scaled); "
            f"the cloud's guess (the edge's graphs, batched) gives the edge's tokens on {f['greedy_tokens_identical']}/"
            f"{f['sentences']} of their vectors.")


def guess_cases(sentences: list[list[int]], batch: int, controls) -> list[tuple[list, list]]:
    """Calls of `batch` rows over `sentences`: (controls per row, history per row); row i's answer history is the
    two sentences before it (with controls), as an answer's third sentence would have."""
    calls = []
    for start in range(0, len(sentences) - batch + 1, batch):
        rows = range(start, start + batch)
        calls.append(([controls] * batch, [sentences[max(0, i - 2):i] if controls else [] for i in rows]))
    return calls


def guess_timing(codec, vectors: np.ndarray, sentences: list[list[int]], batches: list[int], rounds: int,
                 reference=None) -> list[dict]:
    """ms per decoded token of codec.decode (and of the re-encode) on `vectors` as h_t, per batch size, with
    edge-chat's repetition controls and without. reference(h [d], controls, history) -> the edge's tokens."""
    from sllm.sentences.sampling import AnswerOptions

    out = []
    for controls in (None, AnswerOptions()):
        for batch in batches:
            calls = guess_cases(sentences, batch, controls)
            decode_ms, encode_ms, tokens, guesses = [], [], 0, []
            for r in range(rounds):
                t_dec = t_enc = 0.0
                for i, (ctl, hist) in enumerate(calls):
                    h = vectors[i * batch:(i + 1) * batch]
                    t0 = time.perf_counter()
                    got = codec.decode(h, ctl, hist)
                    t1 = time.perf_counter()
                    ready = [t for t in got if t]
                    if ready:
                        codec.encode(ready)
                    t_dec, t_enc = t_dec + t1 - t0, t_enc + time.perf_counter() - t1
                    if r == 0:
                        guesses += got
                tokens = sum(len(t) + 1 for t in guesses)
                decode_ms.append(t_dec * 1e3 / tokens)
                encode_ms.append(t_enc * 1e3 / tokens)
            row = {"controls": controls is not None, "batch": batch, "calls": len(calls), "guesses": len(guesses),
                   "tokens": tokens, "decode_ms_per_token": statistics.median(decode_ms),
                   "decode_ms_per_token_min": min(decode_ms), "encode_ms_per_token": statistics.median(encode_ms)}
            if reference is not None:
                edge = [reference(vectors[i * batch + k], ctl[k], hist[k])
                        for i, (ctl, hist) in enumerate(calls) for k in range(batch)]
                row["same_as_edge"] = sum(a == b for a, b in zip(guesses, edge))
            out.append(row)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.speculation", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=Path("models/default"), help="an export folder (edge/, cloud/)")
    ap.add_argument("--sentences", type=int, default=200, help="validation sentences decoded as h_t per case")
    ap.add_argument("--batch", default="1,8", help="guesses per call (comma-separated)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads")
    ap.add_argument("--json", type=Path, help="write the rows here")
    args = ap.parse_args(argv)

    from bench.texts import validation_text
    from sllm.cloud.guesses import GuessCodec
    from sllm.edge.runtime import EdgeRuntime
    from sllm.runtime.manifest import cloud_weights_sha256, read_manifest
    from sllm.sentences.sampling import SamplingConfig

    rt = EdgeRuntime.load(args.model / "edge", device="cpu", threads=args.threads)
    cloud = read_manifest(args.model / "cloud", kind="cloud")
    codec = GuessCodec.load(args.model / "edge", cloud["model_id"], rt.d_model, cloud_weights_sha256(cloud),
                            args.threads)
    text = validation_text(rt.tokenizer, rt.max_sentence_tokens, rt.split_on_comma)
    sentences = text.sentences[:args.sentences]
    vectors = rt.encode(sentences)

    def edge_decode(h, controls, history):
        if controls is None:
            return rt.decode(h, SamplingConfig()).ids
        return rt.decode(h, controls, controls.max_tokens or None, answer=history).ids

    rows = guess_timing(codec, vectors, sentences, [int(b) for b in args.batch.split(",")], args.rounds, edge_decode)
    print(f"{args.model}: {len(sentences)} validation sentence vectors as h_t, {args.rounds} rounds, "
          f"{args.threads} thread(s)")
    print("| controls | batch | guesses | tokens | decode ms/token (median, min) | re-encode ms/token | same as edge |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {'on' if r['controls'] else 'off'} | {r['batch']} | {r['guesses']} | {r['tokens']} | "
              f"{r['decode_ms_per_token']:.3f} ({r['decode_ms_per_token_min']:.3f}) | {r['encode_ms_per_token']:.3f} | "
              f"{r.get('same_as_edge', '-')}/{r['guesses']} |")
    if args.json:
        args.json.write_text(json.dumps({"model": str(args.model), "threads": args.threads, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
