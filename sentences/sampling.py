"""Decoding options shared by the torch reference and the edge (no torch, no numpy here), and the
repetition controls' bookkeeping, which both apply to their logits the same way:

    repetition_penalty    CTRL (Keskar et al. 2019): the logit of a token already in the answer is
                          divided by the penalty when positive, multiplied by it when negative
    no_repeat_ngram_size  a token that would repeat an n-gram of the answer's tokens is banned
    no_repeat_sentence    a sentence may not end (eos is banned) where it equals an earlier
                          sentence of the same answer: it has to say something else or go on

The answer's tokens are its sentences' tokens, concatenated (no bos/eos), then the tokens of the
sentence being decoded. The prompt does not count.

`AnswerOptions` is every option of one answer, declared once: edge-chat's command-line options
(`help` in a field's metadata), the Python API's keywords, and the wire's `Decoding` (built by
sllm.edge.speculate.decoding, parsed by sllm.cloud.service.parse_decoding) are made from its fields.
"""
from __future__ import annotations

import math
import struct
from dataclasses import dataclass, field, fields, replace
from typing import Sequence

# the repetition controls edge-chat, the edge API and `sllm-train generate` use unless told otherwise:
# chosen from bench/answer_quality.py's measurements (docs/model-card.md)
DEFAULT_REPETITION_PENALTY = 1.2
DEFAULT_NO_REPEAT_NGRAM = 3
DEFAULT_NO_REPEAT_SENTENCE = True
MIN_ANSWER_SENTENCES = 1  # the stop rule is asked from the answer's second sentence on: an answer is never empty


@dataclass(frozen=True)
class SamplingConfig:
    """How each token of a sentence is picked. The defaults are plain greedy decoding (no repetition
    controls): what the torch reference decodes with unless told otherwise."""

    temperature: float = field(default=0.0, metadata={"help": "0 = greedy"})
    top_k: int = field(default=0, metadata={"help": "0 = off"})
    top_p: float = field(default=1.0, metadata={"help": "1 = off"})
    seed: int | None = field(default=None, metadata={"help": "sentence i of a turn samples with seed + i"})
    repetition_penalty: float = field(default=1.0, metadata={
        "help": "divide the positive logits (multiply the negative ones) of tokens already in the answer; 1 = off"})
    no_repeat_ngram_size: int = field(default=0, metadata={"help": "never repeat an n-gram of the answer's tokens; "
                                                                   "0 = off"})
    no_repeat_sentence: bool = field(default=False, metadata={
        "help": "a sentence may not end where it equals an earlier one of the answer",
        "flags": ("--no-repeat-sentence/--allow-repeat-sentence",)})

    def __post_init__(self) -> None:
        for name in ("temperature", "top_p", "repetition_penalty"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ValueError(f"{name} must be a finite number, got {v!r}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0 (1 = off), got {self.repetition_penalty}")
        for name in ("top_k", "no_repeat_ngram_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{name} must be an integer >= 0 (0 = off), got {v!r}")
        if not isinstance(self.no_repeat_sentence, bool):
            raise ValueError(f"no_repeat_sentence must be true or false, got {self.no_repeat_sentence!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0):
            raise ValueError(f"seed must be None or an integer >= 0, got {self.seed!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def controls_repetition(self) -> bool:
        return self.repetition_penalty != 1 or self.no_repeat_ngram_size > 0 or self.no_repeat_sentence

    def for_sentence(self, i: int) -> "SamplingConfig":
        """The sampling of sentence i of an answer: seed + i, so each sentence draws afresh
        and a seeded answer is still reproducible."""
        return self if self.seed is None else replace(self, seed=self.seed + i)


class RepetitionGuard:
    """The repetition controls for one sentence being decoded, given the earlier sentences of its
    answer: which tokens the penalty applies to, which may not come next. `push` each token the
    sentence takes (not eos)."""

    def __init__(self, sampling: SamplingConfig, answer: Sequence[Sequence[int]], eos_id: int):
        self.n = sampling.no_repeat_ngram_size
        self.penalty = sampling.repetition_penalty
        self.eos_id = eos_id
        self.earlier = {tuple(s) for s in answer} if sampling.no_repeat_sentence else set()
        self.seq: list[int] = []
        self.seen: set[int] = set()
        self.follows: dict[tuple[int, ...], set[int]] = {}  # (n-1)-gram -> the tokens that followed it
        self.current: list[int] = []
        for sentence in answer:
            for t in sentence:
                self._add(t)

    def _add(self, token: int) -> None:
        self.seq.append(token)
        self.seen.add(token)
        n = self.n
        if n > 0 and len(self.seq) >= n:
            self.follows.setdefault(tuple(self.seq[len(self.seq) - n : -1]), set()).add(token)

    def push(self, token: int) -> None:
        self._add(token)
        self.current.append(token)

    def penalized(self) -> list[int]:
        """The answer's tokens so far (sorted), when the penalty is on."""
        return sorted(self.seen) if self.penalty != 1 else []

    def banned(self) -> list[int]:
        """The tokens that may not come next (sorted)."""
        out: set[int] = set()
        n = self.n
        if n > 0 and len(self.seq) >= n - 1:
            out |= self.follows.get(tuple(self.seq[len(self.seq) - (n - 1):]), set())
        if tuple(self.current) in self.earlier:
            out.add(self.eos_id)
        return sorted(out)


def guards_for(sampling: SamplingConfig, answer: Sequence[Sequence[int]], eos_id: int,
               rows: int) -> list[RepetitionGuard] | None:
    """One guard per row being decoded, or None when no control is on (nothing to do)."""
    if not sampling.controls_repetition:
        return None
    return [RepetitionGuard(sampling, answer, eos_id) for _ in range(rows)]


def advance(guards: list[RepetitionGuard], picked: Sequence[int], eos_id: int) -> list[RepetitionGuard]:
    """After a step: each live row's guard takes its token; rows that picked eos leave (as the
    decode loops drop them from the batch, in order)."""
    out = []
    for guard, token in zip(guards, picked):
        if token != eos_id:
            guard.push(int(token))
            out.append(guard)
    return out


def _chat_default(name: str, value):
    """SamplingConfig's field `name` (its help) with edge-chat's default."""
    return field(default=value, metadata=next(f for f in fields(SamplingConfig) if f.name == name).metadata)


@dataclass(frozen=True)
class AnswerOptions(SamplingConfig):
    """How one answer is decoded (its sampling, with edge-chat's repetition controls on) and where it
    ends. ValueError for an option out of range. On the wire (Decoding) 0 sentences means no cap."""

    repetition_penalty: float = _chat_default("repetition_penalty", DEFAULT_REPETITION_PENALTY)
    no_repeat_ngram_size: int = _chat_default("no_repeat_ngram_size", DEFAULT_NO_REPEAT_NGRAM)
    no_repeat_sentence: bool = _chat_default("no_repeat_sentence", DEFAULT_NO_REPEAT_SENTENCE)
    max_sentences: int = field(default=8, metadata={"help": "sentences per answer at most (the context may allow "
                                                             "fewer)"})
    max_tokens: int = field(default=0, metadata={"help": "tokens per sentence at most; 0 = the bundle's limit",
                                                 "flags": ("--max-sentence-tokens",)})
    stop_threshold: float | None = field(default=None, metadata={
        "help": "end the answer when P(stop) >= this (the calibrated P(stop) when the bundle has a stop calibration); "
                "default: the bundle's (chosen on validation)"})
    calibrate_stop: bool = field(default=True, metadata={
        "help": "decide on P(stop) calibrated by the bundle's stop calibration (the head's Platt scale and an "
                "answer-length prior, fitted on validation); off: the head's raw P(stop)",
        "flags": ("--calibrate-stop/--raw-stop",)})
    min_sentences: int = MIN_ANSWER_SENTENCES  # the stop rule is asked from this sentence of the answer on (0-based)
    # the calibration the stop rule applies (resolved from the bundle by `with_bundle_stop`; None: P(stop) itself)
    stop_calibration: StopCalibration | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        for name, what in (("max_sentences", ""), ("max_tokens", " (0 = the bundle's limit)"), ("min_sentences", "")):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{name} must be an integer >= 0{what}, got {v!r}")
        check_stop_threshold(self.stop_threshold)
        if not isinstance(self.calibrate_stop, bool):
            raise ValueError(f"calibrate_stop must be true or false, got {self.calibrate_stop!r}")
        if self.stop_calibration is not None and not isinstance(self.stop_calibration, StopCalibration):
            raise ValueError(f"stop_calibration must be a StopCalibration or None, got {self.stop_calibration!r}")

    def ends(self, answered: int, stop_flag: bool, stop_probability: float) -> bool:
        """Does the answer end after `answered` sentences, given this step's stop outputs (max_sentences 0:
        no cap, as on the wire)?"""
        if self.max_sentences and answered >= self.max_sentences:
            return True
        return answered >= self.min_sentences and stop_decision(stop_flag, stop_probability, self.stop_threshold,
                                                                self.stop_calibration, answered)


@dataclass(frozen=True)
class StopCalibration:
    """How the termination head's P(stop) becomes the probability the stop rule thresholds, at the
    answer's sentence n (n sentences answered):

        logit(P') = scale * logit(P(stop)) + offsets[n - 1]      (n past the table: its last entry)

    `scale` is a Platt slope on the head's log-odds; `offsets` hold the Platt intercept plus the log-odds
    of a paragraph-length prior (the hazard of "the paragraph ends at its sentence n" in the training
    corpus, weighted): both fitted on the validation split at export (training.stop_head), so a head
    that is confident in-domain and unsure on unseen text is pulled towards how long paragraphs are.
    `threshold`: the bundle's threshold on P' (a user's stop_threshold replaces it)."""

    scale: float
    offsets: tuple[float, ...]
    threshold: float

    def __post_init__(self) -> None:
        if isinstance(self.scale, bool) or not isinstance(self.scale, (int, float)) or not (
                math.isfinite(self.scale) and self.scale > 0):
            raise ValueError(f"stop calibration scale must be a finite number > 0, got {self.scale!r}")
        if not isinstance(self.offsets, tuple) or not self.offsets or not all(
                not isinstance(o, bool) and isinstance(o, (int, float)) and math.isfinite(o) for o in self.offsets):
            raise ValueError(f"stop calibration offsets must be a non-empty tuple of finite numbers, got "
                             f"{self.offsets!r}")
        if self.threshold is None:
            raise ValueError("a stop calibration needs its threshold")
        check_stop_threshold(self.threshold)

    def offset(self, answered: int) -> float:
        return self.offsets[min(max(answered, 1), len(self.offsets)) - 1]

    def log_odds(self, stop_probability: float, answered: int) -> float:
        """logit(P') at the answer's sentence `answered`: +-inf where P(stop) is 1 or 0."""
        return self.scale * _logit(stop_probability) + self.offset(answered)

    def probability(self, stop_probability: float, answered: int) -> float:
        """P' (for people and benches; the rule itself compares log-odds)."""
        z = self.log_odds(stop_probability, answered)
        return 1.0 / (1.0 + math.exp(-z)) if z >= 0 else math.exp(z) / (1.0 + math.exp(z))


def stop_decision(stop_flag: bool, stop_probability: float, threshold: float | None,
                  calibration: StopCalibration | None = None, answered: int = 0) -> bool:
    """End the answer here, after `answered` sentences? With a threshold: P(stop) >= threshold (the bundle's,
    chosen on validation; a user's override), P(stop) calibrated at this answer position when a calibration
    is given; without a threshold: the termination head's argmax flag.

    The edge's loop and the cloud's speculation both decide here, on the same numbers: P(stop) is a
    float32 on the wire, and so is the threshold, which is rounded to float32 here on both sides."""
    if threshold is None:
        return stop_flag
    threshold = _float32(threshold)
    if calibration is None:
        return stop_probability >= threshold
    return calibration.log_odds(stop_probability, answered) >= _logit(threshold)


def with_bundle_stop(options: AnswerOptions, bundle_threshold: float | None,
                     bundle_calibration: StopCalibration | None) -> AnswerOptions:
    """`options` with the stop rule resolved against a bundle's: its calibration unless the options carry
    their own or say calibrate_stop=False, and its threshold (the calibration's, or the raw one) unless the
    user set stop_threshold."""
    calibration = (options.stop_calibration or bundle_calibration) if options.calibrate_stop else None
    threshold = options.stop_threshold
    if threshold is None:
        threshold = calibration.threshold if calibration is not None else bundle_threshold
    return replace(options, stop_threshold=threshold, stop_calibration=calibration)


def check_stop_threshold(threshold: float | None) -> None:
    if threshold is None:
        return
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 <= threshold <= 1:
        raise ValueError(f"stop_threshold must be a number in [0, 1] (or unset: the bundle's), got {threshold!r}")


def _logit(p: float) -> float:
    if p <= 0:
        return -math.inf
    if p >= 1:
        return math.inf
    return math.log(p) - math.log1p(-p)


def _float32(x: float) -> float:
    return struct.unpack("f", struct.pack("f", x))[0]
