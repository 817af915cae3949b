"""KV-cache bytes per context token (paper Table 3, memory), from the real cache tensors.

For each context length C, the longest run of whole validation sentences holding <= C tokens is
the context of both models: the SLLM's cloud engine runs its sentence vectors (one KV entry per
sentence), the baseline runs bos + the same tokens (one entry per token). Bytes are the sizes of
the caches they return (numel x element size, keys and values of every layer). The slope of a
least-squares line through (context tokens, bytes) is the cost of one more token of context, as
the paper measures it; the intercept (bos, rounding to whole sentences) does not enter it.

Analytically: baseline 2 x layers x d x bytes per element per token; SLLM the same per
sentence, so per token that divided by L (tokens per sentence): the saving tends to 1 - 1/L.
"""
from __future__ import annotations

import numpy as np
import torch

from bench.texts import ValidationText, flatten


def cache_nbytes(cache) -> int:
    """Bytes held by a transformers Cache (DynamicCache: .layers with .keys / .values)."""
    total = 0
    for layer in cache.layers:
        for t in (layer.keys, layer.values):
            if t is not None:
                total += t.numel() * t.element_size()
    return total


@torch.inference_mode()
def baseline_kv_bytes(model, ids: list[int]) -> int:
    out = model(input_ids=torch.tensor([ids], dtype=torch.long), use_cache=True)
    cache = getattr(out, "cache", None)  # transformers >= 5.24 names the field `cache`
    return cache_nbytes(out.past_key_values if cache is None else cache)


def sllm_kv_bytes(engine, vectors: np.ndarray) -> int:
    """Bytes of the valid cached positions (the slot's spare capacity is not counted)."""
    slot = engine.new_slot()
    engine.forward([slot], [np.asarray(vectors, dtype=np.float32)])
    slot.length += len(vectors)
    kv = slot.valid()
    return kv.numel() * kv.element_size()


def fit(x: list[float], y: list[float]) -> dict:
    slope, intercept = np.polyfit(np.asarray(x, dtype=float), np.asarray(y, dtype=float), 1)
    return {"bytes_per_token": float(slope), "intercept": float(intercept)}


def measure_kv(runtime, engine, baseline, text: ValidationText, contexts: list[int], bos_id: int) -> dict:
    max_tokens = baseline.config.max_position_embeddings - 1  # bos takes one position
    rows = []
    for C in sorted(set(min(c, max_tokens) for c in contexts)):
        sentences = text.prefix(C)
        if len(sentences) > engine.max_positions:
            sentences = sentences[: engine.max_positions]
        if not sentences:
            continue
        tokens = flatten(sentences)
        rows.append({"context_target": C, "context_tokens": len(tokens), "sentences": len(sentences),
                     "sllm_bytes": sllm_kv_bytes(engine, runtime.encode(sentences)),
                     "baseline_bytes": baseline_kv_bytes(baseline, [bos_id] + tokens)})
    x = [r["context_tokens"] for r in rows]
    sllm, base = fit(x, [r["sllm_bytes"] for r in rows]), fit(x, [r["baseline_bytes"] for r in rows])
    cfg = baseline.config
    elem = next(baseline.parameters()).element_size()
    tokens_per_sentence = sum(x) / max(sum(r["sentences"] for r in rows), 1)  # of the measured contexts
    return {
        "rows": rows, "sllm_fit": sllm, "baseline_fit": base,
        "reduction": 1.0 - sllm["bytes_per_token"] / base["bytes_per_token"],
        "analytic": {"baseline_bytes_per_token": 2 * cfg.num_hidden_layers * cfg.hidden_size * elem,
                     "sllm_bytes_per_sentence": engine.kv_bytes_per_sentence,
                     "tokens_per_sentence_in_contexts": tokens_per_sentence},
        "dtype": str(engine.dtype).replace("torch.", ""),
    }
