"""Sentence-level speculation on the edge: the edge verifies what the cloud guessed.

With `speculate` > 0 the cloud decodes each h_t itself, re-encodes that sentence, steps on it and
streams the next step at once, with the vector it assumed. The edge still decodes h_t (what it shows
is what the conversation is), re-encodes its sentence and compares:

    within tolerance -> Accept{position}: the guessed step is the next step, no round trip waited
    otherwise        -> Append{position, its own vector}: the cloud rolls back and steps on the edge's
    declined         -> Append{position, its own vector} (stop flag, limits, an empty guess)

The first append of a turn (the prompt) is Append{position, decoding}: it drops whatever the cloud
guessed past the conversation (an interrupted answer, a new turn), and says how this answer is decoded
(`decoding`): the cloud's guesses apply the same repetition controls to the same earlier sentences of
the answer, and a sampled turn is not guessed at all (a greedy guess would be overruled nearly every
time). `Speculation` appends on whatever Conversation it is given: `sllm.edge.remote.RemoteStepper`
(the edge's one stepper) hands it the conversation's current stream.

Tolerance: max|mine - assumed| <= TOLERANCE * max(1, max|mine|). The cloud re-encodes its guesses with
the edge's own encoder.onnx, in a padded batch where the edge encodes one sentence: max|alone - batched|
~5e-7 on models/default (bench/speculation.py). The cloud rounds its guess as the edge's vectors are
rounded on the wire, and float16 (--wire-dtype float16) changes a value by at most half an ulp,
2^-11 |x| ~ 4.9e-4 |x|; the vectors are LayerNorm outputs (|x| up to ~5). So the same sentence differs
by < 4.9e-4 * max|x| plus ~1e-6, and TOLERANCE = 1e-3 leaves a 2x margin over float16 rounding. Two
different sentences differ by far more: on models/default the closest pair of distinct sentences
measured (bench/rtt.py notes) differs by > 0.05 in some coordinate, 50x the tolerance.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from sllm.protos.client import Conversation, StepResult
from sllm.protos.v1 import sllm_pb2 as pb
from sllm.sentences.sampling import AnswerOptions

TOLERANCE = 1e-3


def same_sentence(mine: np.ndarray, assumed: np.ndarray, tolerance: float = TOLERANCE) -> bool:
    """Does the cloud's assumed vector stand for the sentence the edge decoded?"""
    mine = np.asarray(mine, dtype=np.float32).reshape(-1)
    assumed = np.asarray(assumed, dtype=np.float32).reshape(-1)
    if mine.shape != assumed.shape:
        return False
    return float(np.abs(mine - assumed).max()) <= tolerance * max(1.0, float(np.abs(mine).max()))


def decoding(options: AnswerOptions | None) -> pb.Decoding:
    """The wire's Decoding of an answer (the one place it is built): what the cloud needs to guess its
    sentences as the edge decodes them, and where the edge ends it (`options.ends`), so that no guess
    goes past it. None, or sampled decoding: do not guess (None: an answer resumed after a rebuild,
    whose earlier sentences the new session's cloud never decoded)."""
    if options is None or not options.greedy:
        return pb.Decoding(guess=False)
    calibration = options.stop_calibration
    return pb.Decoding(guess=True, repetition_penalty=options.repetition_penalty,
                       no_repeat_ngram_size=options.no_repeat_ngram_size, no_repeat_sentence=options.no_repeat_sentence,
                       max_tokens=options.max_tokens, stop_threshold=options.stop_threshold,
                       min_sentences=options.min_sentences, max_sentences=options.max_sentences,
                       **({} if calibration is None else {"stop_scale": calibration.scale,
                                                          "stop_offsets": calibration.offsets}))


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


class Speculation:
    """The edge's side of speculation for one conversation: appends its vectors on a Conversation, taking
    the cloud's guess instead of a round trip where it matches (the stream has speculate > 0), and
    counts what happened (`stats`).

    perturb(position, vectors) -> vectors: a test hook applied to each generated sentence's vector
    before it is compared (or sent, without speculation): a forced mismatch."""

    def __init__(self, tolerance: float = TOLERANCE, perturb: Callable[[int, np.ndarray], np.ndarray] | None = None):
        self.tolerance = tolerance
        self.perturb = perturb
        self.turn_start = True
        self.decoding: pb.Decoding | None = None
        self.stats = SpeculationStats()

    def begin_turn(self, decoding: pb.Decoding | None = None) -> None:
        """The next append is a prompt: it drops whatever the cloud guessed past the conversation;
        `decoding` (the function above) goes with it."""
        self.turn_start, self.decoding = True, decoding

    def append(self, conv: Conversation, vectors: np.ndarray) -> StepResult:
        """Append `vectors` [n, d] on `conv`, the session's stream now (given each call: a reconnect
        replaces it); the step of the last one, guessed or answered."""
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
