"""Decoder step latency, batch 1: ORT cached step vs torch eager cached step vs full recompute.

    OMP_NUM_THREADS=1 python -m bench.decoder_step               # d=256, 1 layer, random weights
    python -m bench.decoder_step --checkpoint runs/svae-small    # a trained model instead
    python -m bench.decoder_step --threads 2 --runs 1000

One decoder step = the logits of the next token of one sentence whose past holds P tokens
(bos + P-1 tokens). "cached" feeds one token and the KV cache of the P before it; "full
recompute" runs all P+1 tokens again without a cache (what a decoder without a cache does).
Random weights by default: latency does not depend on the values. The median of --runs timed
calls after --warmup untimed ones is shown, per past length.
"""
from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from sllm.export.onnx_export import export_decoder  # noqa: E402
from sllm.export.quantize import quantize_int8  # noqa: E402
from sllm.modeling.sentence_vae import SentenceVAE  # noqa: E402
from sllm.runtime.providers import cpu_session  # noqa: E402
from sllm.runtime.svae_onnx import decoder_step  # noqa: E402
from sllm.training.config import SentenceVAEConfig  # noqa: E402

# like configs/svae-small.json (d=256, 4 heads, ffn 1024, one block each side, vocab 4096)
SMALL = SentenceVAEConfig(vocab_size=4096, d_model=256, n_heads=4, ffn_dim=1024, encoder_layers=1,
                          decoder_layers=1, max_sentence_tokens=64)


def median_ms(fns: dict, runs: int, warmup: int, rounds: int = 10) -> dict[str, float]:
    """Median ms per call of each function. The functions take turns in `rounds` rounds, so load
    from other processes on the machine falls on all of them alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    per_round = max(1, runs // rounds)
    for _ in range(rounds):
        for name, fn in fns.items():
            for _ in range(per_round):
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
    return {name: 1e3 * statistics.median(t) for name, t in times.items()}


ORDER = ["ORT cached step (fp32)", "ORT cached step (int8)", "torch eager cached step",
         "torch eager full recompute", "ORT full recompute (fp32)"]
REFERENCE = "torch eager cached step"


def measure(dec, pasts: list[int], runs: int, warmup: int, threads: int, int8: bool = True) -> dict[str, list[float]]:
    """Median ms per decoder step of a SentenceDecoder `dec`, per past length P: {row name: [ms per P]}.
    The decoder is exported to ONNX in a temporary folder (fp32, and int8 unless int8=False) and
    timed against itself in torch; the caller sets torch's thread count."""
    cfg = dec.cfg
    if any(not 1 <= p <= cfg.max_sentence_tokens for p in pasts):
        raise ValueError(f"past lengths must be in 1..{cfg.max_sentence_tokens}")
    dec = dec.eval()
    logging.getLogger().setLevel(logging.ERROR)
    with tempfile.TemporaryDirectory() as tmp:
        fp32 = export_decoder(dec, Path(tmp) / "decoder.onnx")
        sessions = {"ORT cached step (fp32)": cpu_session(str(fp32), threads)}
        if int8:
            q = quantize_int8(fp32, Path(tmp) / "decoder.int8.onnx", ("MatMul",))
            sessions["ORT cached step (int8)"] = cpu_session(str(q), threads)

        rows: dict[str, list[float]] = {}
        g = torch.Generator().manual_seed(0)
        memory = torch.randn(1, cfg.d_model, generator=g)
        for P in pasts:
            seq = torch.randint(3, cfg.vocab_size, (1, P + 1), generator=g)
            seq[0, 0] = cfg.bos_id
            with torch.inference_mode():
                _, kv = dec(seq[:, :P], memory)  # the real cache of the P tokens before the step
            step = seq[:, P:]
            np_step, np_mem, np_kv, np_seq = step.numpy(), memory.numpy(), kv.numpy(), seq.numpy()
            empty = dec.empty_kv(1).numpy()
            fns = {name: (lambda s=sess: decoder_step(s, np_step, np_mem, np_kv)) for name, sess in sessions.items()}
            fns["torch eager cached step"] = lambda: dec(step, memory, kv)
            fns["torch eager full recompute"] = lambda: dec(seq, memory)
            fp32_sess = sessions["ORT cached step (fp32)"]
            fns["ORT full recompute (fp32)"] = lambda: decoder_step(fp32_sess, np_seq, np_mem, empty)
            with torch.inference_mode():
                times = median_ms(fns, runs, warmup)
            for name, ms in times.items():
                rows.setdefault(name, []).append(ms)
    return {name: rows[name] for name in ORDER if name in rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", help="a SentenceVAE/SLLM checkpoint (default: random weights, svae-small shape)")
    ap.add_argument("--past", default="1,16,63", help="past lengths P to time, comma-separated")
    ap.add_argument("--runs", type=int, default=500)
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--threads", type=int, default=1, help="intra-op threads for torch and ORT alike")
    ap.add_argument("--no-int8", action="store_true", help="skip the int8 decoder row")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.checkpoint:
        from sllm.export.exporter import load_checkpoint

        model, source = load_checkpoint(Path(args.checkpoint)).svae, f"trained weights from {args.checkpoint}"
    else:
        model, source = SentenceVAE(SMALL).eval(), "random weights (latency does not depend on them)"
    cfg = model.cfg
    pasts = [int(p) for p in args.past.split(",")]
    try:
        rows = measure(model.decoder, pasts, args.runs, args.warmup, args.threads, int8=not args.no_int8)
    except ValueError as e:
        ap.error(str(e))

    ref = rows[REFERENCE]
    print(f"decoder step latency, batch 1, {args.threads} thread(s), median of {args.runs} runs, interleaved "
          f"(torch {torch.__version__}, onnxruntime CPUExecutionProvider)")
    print(f"model: d={cfg.d_model}, {cfg.decoder_layers} decoder layer(s), {cfg.n_heads} heads, ffn {cfg.ffn_dim}, "
          f"vocab {cfg.vocab_size}; {source}")
    head = f"{'':28s}" + "".join(f"{f'P={p} ms':>11s}{'x torch':>9s}" for p in pasts)
    print(head)
    print("-" * len(head))
    for name, times in rows.items():
        print(f"{name:28s}" + "".join(f"{ms:11.3f}{r / ms:9.2f}" for ms, r in zip(times, ref)))
    print("x torch = torch eager cached step time / this row's time (higher is faster)")


if __name__ == "__main__":
    main()
