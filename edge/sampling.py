"""Next-token choice for the edge decoder, in numpy: greedy, temperature, top-k, top-p, seed.

The same rules as the torch reference `modeling.generate.pick_next` (greedy = argmax;
top-k keeps the logits >= the k-th largest, ties included; top-p keeps the most likely tokens
until the mass of the strictly more likely ones reaches p, the top token always stays), and
the same seeding scheme as `SLLMGenerator.generate` (sentence i of a turn draws from
`seed + i`). Greedy decoding is token-for-token the torch result; sampled decoding draws
from the same distribution, but numpy's random stream is not torch's, so a seed reproduces
edge runs, not torch runs.
"""
from __future__ import annotations

import numpy as np

from sentences.sampling import SamplingConfig

Sampling = SamplingConfig  # the one sampling config, shared with the torch reference


def numpy_generator(sampling: Sampling) -> np.random.Generator | None:
    """A seeded generator (seed set), a fresh one (unseeded), None (greedy: no randomness)."""
    if sampling.greedy:
        return None
    return np.random.default_rng(sampling.seed)


def _softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(axis=-1, keepdims=True)
    e = np.exp(x)
    return e / e.sum(axis=-1, keepdims=True)


def filter_logits(logits: np.ndarray, sampling: Sampling) -> np.ndarray:
    """Temperature-scaled logits [B, V] with the tokens top-k / top-p exclude set to -inf."""
    x = np.asarray(logits, dtype=np.float32) / np.float32(sampling.temperature)
    V = x.shape[-1]
    if 0 < sampling.top_k < V:
        kth = np.partition(x, V - sampling.top_k, axis=-1)[:, V - sampling.top_k][:, None]  # k-th largest
        x = np.where(x < kth, np.float32(-np.inf), x)
    if sampling.top_p < 1.0:
        order = np.argsort(-x, axis=-1, kind="stable")  # [B, V] descending
        sorted_x = np.take_along_axis(x, order, axis=-1)
        probs = _softmax(sorted_x.astype(np.float64))
        before = np.cumsum(probs, axis=-1) - probs  # mass of the strictly more likely tokens
        sorted_x = np.where(before >= sampling.top_p, np.float32(-np.inf), sorted_x)  # top token always stays
        out = np.empty_like(x)
        np.put_along_axis(out, order, sorted_x, axis=-1)
        x = out
    return x


def pick_next(logits: np.ndarray, sampling: Sampling, rng: np.random.Generator | None) -> np.ndarray:
    """logits [B, V] -> next token ids int64 [B] (greedy, or temperature / top-k / top-p sampling)."""
    logits = np.asarray(logits)
    if sampling.greedy:
        return logits.argmax(axis=-1).astype(np.int64)
    if rng is None:
        raise ValueError("sampling needs a random generator (numpy_generator)")
    probs = _softmax(filter_logits(logits, sampling).astype(np.float64))  # [B, V]
    cdf = np.cumsum(probs, axis=-1)
    u = rng.random(len(probs)) * cdf[:, -1]  # one draw per row
    picks = np.array([np.searchsorted(row, x, side="right") for row, x in zip(cdf, u)], dtype=np.int64)
    return np.minimum(picks, probs.shape[-1] - 1)
