"""The train/validation split of a corpus streamed from disk: `corpus.split_documents`'s rule with
memory bounded by the validation split, not the corpus.

Two passes over the documents: the first counts each source's documents (so each source's
held-out count is known), the second keeps, per source, only the candidates that can still be
among its held_out_count smallest document keys. What remains is a cut per source: a document is
held out when (key, position in the corpus) is at most its source's cut. `tests/test_prepare.py`
checks the plan against `split_documents` on the same documents.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from sllm.training.data.corpus import Document, document_key, held_out_count

_CHUNK = 65_536  # candidates gathered before a source's buffer is cut back to its held-out count


@dataclass
class SplitPlan:
    """Which documents go to validation. JSON-able (it is saved with a prepared dataset)."""

    val_fraction: float
    seed: int
    documents: int = 0  # non-blank documents in the corpus
    chars: int = 0  # their characters
    sources: dict[str, int] = field(default_factory=dict)  # documents per source
    # source -> [key hex, ordinal] of its last held-out document; "" -> the one document held out
    # overall when no source has two documents
    cuts: dict[str, list] = field(default_factory=dict)
    overall: list | None = None

    def is_val(self, doc: Document, ordinal: int) -> bool:
        """Whether `doc`, the corpus's document number `ordinal` (from 0), is a validation document."""
        if self.val_fraction >= 1:  # evaluation text: every document
            return True
        if self.overall is not None:
            return [document_key(self.seed, doc).hex(), ordinal] == self.overall
        cut = self.cuts.get(doc.source)
        return cut is not None and (document_key(self.seed, doc).hex(), ordinal) <= (cut[0], cut[1])

    def to_dict(self) -> dict:
        return {"val_fraction": self.val_fraction, "seed": self.seed, "documents": self.documents,
                "chars": self.chars, "sources": self.sources, "cuts": self.cuts, "overall": self.overall}

    @classmethod
    def from_dict(cls, d: dict) -> "SplitPlan":
        return cls(d["val_fraction"], d["seed"], d["documents"], d["chars"], dict(d["sources"]), dict(d["cuts"]),
                   d["overall"])


def plan_split(documents, val_fraction: float, seed: int) -> SplitPlan:
    """`documents()` -> a fresh iterable of the corpus's documents (it is called twice, once per pass)."""
    if not 0 <= val_fraction <= 1:
        raise ValueError(f"val_fraction must be in [0, 1], got {val_fraction}")
    counts: Counter[str] = Counter()
    n = chars = 0
    for doc in documents():
        counts[doc.source] += 1
        n += 1
        chars += len(doc.text)
    plan = SplitPlan(val_fraction, seed, n, chars, dict(counts))
    if val_fraction == 0 or val_fraction >= 1:  # nothing or everything held out: no cut to find
        return plan
    wanted = {s: held_out_count(c, val_fraction) for s, c in counts.items()}
    wanted = {s: k for s, k in wanted.items() if k > 0}
    if not wanted:
        if n >= 2:  # no source has two documents: hold out the one with the smallest key overall
            best = min(((document_key(seed, d), i) for i, d in enumerate(documents())))
            plan.overall = [best[0].hex(), best[1]]
        return plan
    selectors = {s: _Smallest(k) for s, k in wanted.items()}
    for i, doc in enumerate(documents()):
        sel = selectors.get(doc.source)
        if sel is not None:
            sel.add(document_key(seed, doc), i)
    plan.cuts = {s: sel.last() for s, sel in selectors.items()}
    return plan


class _Smallest:
    """The k smallest (key, ordinal) pairs seen, in O(k + _CHUNK) memory."""

    def __init__(self, k: int):
        self.k = k
        self.keys = np.zeros(0, dtype="S32")
        self.ordinals = np.zeros(0, dtype=np.int64)
        self._new_keys: list[bytes] = []
        self._new_ordinals: list[int] = []

    def add(self, key: bytes, ordinal: int) -> None:
        self._new_keys.append(key)
        self._new_ordinals.append(ordinal)
        if len(self._new_keys) >= _CHUNK:
            self._merge()

    def _merge(self) -> None:
        keys = np.concatenate([self.keys, np.array(self._new_keys, dtype="S32")])
        ordinals = np.concatenate([self.ordinals, np.array(self._new_ordinals, dtype=np.int64)])
        # numpy compares fixed-width bytes bytewise, as Python compares the digests
        order = np.lexsort((ordinals, keys))[: self.k]
        self.keys, self.ordinals = keys[order], ordinals[order]
        self._new_keys, self._new_ordinals = [], []

    def last(self) -> list:
        self._merge()
        return [bytes(self.keys[-1]).ljust(32, b"\0").hex(), int(self.ordinals[-1])]

