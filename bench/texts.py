"""The text every figure is measured on: the validation documents, segmented and tokenized the
way the edge does it, so the SLLM and the baseline see exactly the same tokens.

The SLLM gets a prompt as its sentences' token lists; the baseline gets bos + the same tokens
concatenated (how it was trained: bos + a passage's sentence tokens).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from sllm.sentences.limit import sentence_token_ids


@dataclass
class ValidationText:
    sentences: list[list[int]]  # token ids of consecutive sentences, document after document
    source: str  # where they came from, in words

    @property
    def mean_tokens_per_sentence(self) -> float:
        """L: the paper's compression factor (a sentence vector stands for L tokens on average)."""
        return float(np.mean([len(s) for s in self.sentences]))

    @property
    def tokens(self) -> int:
        return sum(len(s) for s in self.sentences)

    def run_from(self, start: int, min_tokens: int) -> list[list[int]]:
        """Consecutive whole sentences from `start` (wrapping around) until they hold >= min_tokens."""
        out, total, n = [], 0, len(self.sentences)
        for k in range(n):
            s = self.sentences[(start + k) % n]
            out.append(s)
            total += len(s)
            if total >= min_tokens:
                break
        return out

    def prompts(self, min_tokens: int, count: int) -> list[list[list[int]]]:
        """`count` prompts of >= min_tokens tokens each, starting at evenly spaced sentences, so
        repetitions read different parts of the text."""
        n = len(self.sentences)
        return [self.run_from(int((i + 0.5) * n / count), min_tokens) for i in range(count)]

    def prefix(self, max_tokens: int) -> list[list[int]]:
        """The longest run of whole sentences from the start holding <= max_tokens tokens."""
        out, total = [], 0
        for s in self.sentences:
            if total + len(s) > max_tokens:
                break
            out.append(s)
            total += len(s)
        return out


def flatten(sentences: list[list[int]]) -> list[int]:
    return [t for s in sentences for t in s]


def validation_text(tokenizer, max_sentence_tokens: int, split_on_comma: bool, corpus: list[str] | None = None,
                    val_fraction: float = 0.02, split_seed: int = 0) -> ValidationText:
    """The held-out documents of `corpus` (default: the bundled one, split as the training configs
    split it), cut into sentences with the shared segmenter and the bundle's settings."""
    from sllm.training.data.corpus import load_documents, split_documents

    docs = load_documents(corpus or None)
    _, val = split_documents(docs, val_fraction, split_seed)
    if not val:
        val = docs
    sentences: list[list[int]] = []
    for doc in val:
        sentences += sentence_token_ids(doc.text, tokenizer, max_sentence_tokens, split_on_comma)
    where = ", ".join(corpus) if corpus else "the bundled corpus (data/corpus)"
    return ValidationText(sentences, f"{len(val)} validation documents of {where}: {len(sentences)} sentences, "
                                     f"{sum(len(s) for s in sentences)} tokens")
