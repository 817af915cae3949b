"""Sentence-level speculation on the edge (issue 17): the edge verifies what the cloud guessed.

With `speculate` > 0 the cloud decodes each h_t itself, re-encodes that sentence, steps on it and
streams the next step at once, with the vector it assumed. The edge still decodes h_t (what it shows
is what the conversation is), re-encodes its sentence and compares:

    within tolerance -> Accept{position}: the guessed step is the next step, no round trip waited
    otherwise        -> Append{position, its own vector}: the cloud rolls back and steps on the edge's
    declined         -> Append{position, its own vector} (stop flag, limits, an empty guess)

The first append of a turn (the prompt) is Append{position, decoding}: it drops whatever the cloud
guessed past the conversation (an interrupted answer, a new turn), and says how this answer is decoded
(`turn_decoding`): the cloud's guesses apply the same repetition controls to the same earlier
sentences of the answer, and a sampled turn is not guessed at all (a greedy guess would be overruled
nearly every time). `SpeculativeStepper` is an `sllm.edge.loop.Stepper`,
so `sentence_loop`, `ChatSession` and the bench run it unchanged.

Tolerance: max|mine - assumed| <= TOLERANCE * max(1, max|mine|). The two encoders are the same
weights run by ONNX Runtime (edge) and torch (cloud): the export report measures max|ORT - torch|
~1e-6 on encoder vectors. The cloud rounds its guess as the edge's vectors are rounded on the wire,
and float16 (--wire-dtype float16) changes a value by at most half an ulp, 2^-11 |x| ~ 4.9e-4 |x|; the
vectors are LayerNorm outputs (|x| up to ~5). So the same sentence differs by < 4.9e-4 * max|x| plus
~1e-6, and TOLERANCE = 1e-3 leaves a 2x margin over float16 rounding. Two different sentences differ
by far more: on models/default the closest pair of distinct sentences measured (bench/rtt.py notes)
differs by > 0.05 in some coordinate, 50x the tolerance.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from sllm.protos.client import Conversation, StepResult
from sllm.protos.v1 import sllm_pb2 as pb
from sllm.sentences.sampling import SamplingConfig

TOLERANCE = 1e-3


def same_sentence(mine: np.ndarray, assumed: np.ndarray, tolerance: float = TOLERANCE) -> bool:
    """Does the cloud's assumed vector stand for the sentence the edge decoded?"""
    mine = np.asarray(mine, dtype=np.float32).reshape(-1)
    assumed = np.asarray(assumed, dtype=np.float32).reshape(-1)
    if mine.shape != assumed.shape:
        return False
    return float(np.abs(mine - assumed).max()) <= tolerance * max(1.0, float(np.abs(mine).max()))


def turn_decoding(sampling: SamplingConfig | None, max_tokens: int | None = None,
                  stop_threshold: float | None = None, min_sentences: int = 0, max_sentences: int = 0) -> pb.Decoding:
    """What the cloud needs to guess this turn's sentences as the edge decodes them (None: do not guess:
    an answer resumed after a rebuild, whose earlier sentences the new session's cloud never decoded),
    and where the edge ends the answer (`sentence_loop`'s stop rule), so that no guess goes past it."""
    if sampling is None or not sampling.greedy:
        return pb.Decoding(guess=False)
    return pb.Decoding(guess=True, repetition_penalty=sampling.repetition_penalty,
                       no_repeat_ngram_size=sampling.no_repeat_ngram_size,
                       no_repeat_sentence=sampling.no_repeat_sentence, max_tokens=max_tokens or 0,
                       stop_threshold=stop_threshold, min_sentences=min_sentences, max_sentences=max_sentences)


@dataclass
class SpeculationStats:
    accepted: int = 0  # guesses confirmed (no round trip waited)
    corrected: int = 0  # guesses the edge overruled (rolled back)
    declined: int = 0  # the cloud did not guess (stop flag, limits, an empty guess)
    plain: int = 0  # appends without a guess to check (prompts, no speculation)

    @property
    def acceptance(self) -> float:
        """Accepted guesses / generated sentences that had one to check (declined ones excluded)."""
        n = self.accepted + self.corrected
        return self.accepted / n if n else 0.0


class SpeculativeStepper:
    """The edge's stepper over one Conversation: checks the cloud's guesses, accepts or corrects them.

    perturb(position, vectors) -> vectors: a test hook applied to each generated sentence's vector
    before it is compared (or sent, without speculation): a forced mismatch."""

    def __init__(self, conv: Conversation | None = None, tolerance: float = TOLERANCE,
                 perturb: Callable[[int, np.ndarray], np.ndarray] | None = None):
        self.conv = conv
        self.tolerance = tolerance
        self.perturb = perturb
        self.turn_start = True
        self.decoding: pb.Decoding | None = None
        self.stats = SpeculationStats()

    def begin_turn(self, decoding: pb.Decoding | None = None) -> None:
        """The next append is a prompt: it drops whatever the cloud guessed past the conversation;
        `decoding` (turn_decoding) goes with it."""
        self.turn_start, self.decoding = True, decoding

    def append(self, vectors: np.ndarray) -> StepResult:
        conv = self.conv
        vectors = np.asarray(vectors, dtype=np.float32).reshape(-1, conv.dim)
        position = conv.confirmed  # where these vectors go
        turn_start, self.turn_start = self.turn_start, False
        if turn_start or len(vectors) != 1:
            self.stats.plain += 1
            if not conv.speculate:
                return conv.append(vectors)
            return conv.append(vectors, position=position, decoding=self.decoding)
        if self.perturb is not None:
            vectors = np.asarray(self.perturb(position, vectors), dtype=np.float32).reshape(-1, conv.dim)
        if not conv.speculate:
            self.stats.plain += 1
            return conv.append(vectors)
        guess = conv.speculative_step(position + 1)
        if guess.declined:
            self.stats.declined += 1
        elif same_sentence(vectors[0], guess.assumed, self.tolerance):
            self.stats.accepted += 1
            conv.accept(position)
            conv.past_length, conv.last = guess.past_length, guess
            return guess
        else:
            self.stats.corrected += 1
        return conv.append(vectors, position=position)
