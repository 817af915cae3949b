"""Next-token choice for the ONNX decode loops, in numpy: greedy, temperature, top-k, top-p, seed, and
the repetition controls (sentences.sampling: repetition penalty, no-repeat n-grams, no repeated
sentence). The edge decodes with it, and the cloud's speculation guesses with it (`Picker.rows`: each
session's row with its own controls), so a guess is the sentence the edge decodes. No torch here.

The same rules as the torch reference `sllm.modeling.generate.pick_next` (greedy = argmax;
top-k keeps the logits >= the k-th largest, ties included; top-p keeps the most likely tokens
until the mass of the strictly more likely ones reaches p, the top token always stays), the
repetition controls applied before them in float32 as there, and the same seeding scheme as
`SLLMGenerator.generate` (sentence i of a turn draws from `seed + i`). Greedy decoding is
token-for-token the torch result; sampled decoding draws from the same distribution, but numpy's
random stream is not torch's, so a seed reproduces edge runs, not torch runs.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from sllm.sentences.sampling import RepetitionGuard, SamplingConfig, advance, guards_for

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


def control_repetition(logits: np.ndarray, guards: list[RepetitionGuard]) -> np.ndarray:
    """logits [B, V] with each row's repetition penalty applied and its banned tokens at -inf."""
    x = np.array(logits, dtype=np.float32)
    for row, guard in zip(x, guards):
        idx = guard.penalized()
        if idx:
            v, p = row[idx], np.float32(guard.penalty)
            row[idx] = np.where(v > 0, v / p, v * p)
        row[guard.banned()] = -np.inf
    return x


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


class Picker:
    """`pick(logits [A, V]) -> ids [A]` for one call of the decode loop (runtime.svae_onnx.decode_loop):
    its sampling, its random stream, and one repetition guard per row, which leave with their rows
    (a row that picks eos leaves the loop's batch)."""

    def __init__(self, sampling: Sampling, eos_id: int, answer: Sequence[Sequence[int]] = (), rows: int = 1):
        self.sampling = sampling
        self.rng = numpy_generator(sampling)
        self.eos_id = eos_id
        self.guards = guards_for(sampling, answer, eos_id, rows)
        self.room: np.ndarray | None = None  # [A] tokens each live row may still take (None: the loop's limit)

    @classmethod
    def rows(cls, options: Sequence[Sampling], answers: Sequence[Sequence[Sequence[int]]], eos_id: int,
             limits: Sequence[int]) -> "Picker":
        """Greedy picks for rows that each decode with their own repetition controls over their own answer,
        within their own token limit: row i gets the tokens `Picker(options[i], eos_id, answers[i])` gives
        it alone with max_tokens limits[i] (the cloud guesses every session's next sentence in one batch).
        A row without controls gets a guard that changes nothing (the same logits, the same argmax)."""
        if any(not o.greedy for o in options):
            raise ValueError("Picker.rows picks greedily: every row's options must be greedy")
        plain = Sampling()
        picker = cls(plain, eos_id)
        picker.guards = [RepetitionGuard(o if o.controls_repetition else plain, a if o.controls_repetition else (),
                                         eos_id) for o, a in zip(options, answers)]
        picker.room = np.asarray(limits, dtype=np.int64)
        return picker

    def __call__(self, logits: np.ndarray) -> np.ndarray:
        if self.guards is None:
            return pick_next(logits, self.sampling, self.rng)
        nxt = pick_next(control_repetition(logits, self.guards), self.sampling, self.rng)
        if self.room is not None:  # a row at its own limit ends here, as its own decode would have stopped
            nxt = np.where(self.room > 0, nxt, self.eos_id)
            self.room = self.room[nxt != self.eos_id] - 1
        self.guards = advance(self.guards, nxt.tolist(), self.eos_id)
        return nxt
