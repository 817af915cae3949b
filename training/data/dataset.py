"""A prepared dataset, read through memory maps: nothing is loaded, a batch reads its own tokens.

    ds = PreparedDataset.open("data/prepared/bundled")
    ds.sentences("train").lengths(np.arange(4)), ds.passages("val").passage(0)

Items are numbered across shards (sentence 0 of shard 1 follows the last one of shard 0); a
lookup finds its shard by bisection over the per-shard counts (one small array per split).
Opening checks the manifest and every file's size; `sllm-train prepare` re-hashes them. Each
mapped array holds a file descriptor, so a view keeps only its most recently used shards mapped
(a corpus of thousands of shards stays under the process's open-file limit).
"""
from __future__ import annotations

import json
from collections import OrderedDict
from functools import cached_property
from pathlib import Path

import numpy as np

from sllm.sentences.tokenizer import SentenceTokenizer
from sllm.training.data.shards import FORMAT, MANIFEST, SHARDS_DIR, SPLITS, VERSION, DatasetError, array_file


class _Shard:
    """One shard's arrays of one split, each mapped when first used."""

    def __init__(self, folder: Path, split: str):
        self.folder, self.split = folder, split

    def __getattr__(self, name: str) -> np.ndarray:  # tokens, sentences, paragraphs, documents, passages
        if name.startswith("_") or name in ("folder", "split"):
            raise AttributeError(name)
        array = np.load(self.folder / array_file(self.split, name), mmap_mode="r")
        setattr(self, name, array)
        return array

    def unmap(self) -> None:
        """Drop the mapped arrays (each unmapped, and its descriptor closed, once no view of it is left)."""
        for name in [n for n in vars(self) if n not in ("folder", "split")]:
            delattr(self, name)


def _mapped_shards_limit() -> int:
    """Shards a view keeps mapped: at most 5 descriptors each, a few views at once, within the
    open-file limit (raised to its hard ceiling first, as data loaders do)."""
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if hard == resource.RLIM_INFINITY or soft < hard:
            want = 65536 if hard == resource.RLIM_INFINITY else min(hard, 65536)
            if want > soft:
                resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
                soft = want
    except (ImportError, ValueError, OSError):  # no resource module (Windows), or not allowed
        soft = 512
    return max(4, (soft - 256) // 20)


class _Items:
    """Items (sentences or passages) numbered across the shards of a split."""

    def __init__(self, shards: list[_Shard], counts: list[int]):
        self._shards = shards
        self.starts = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)])  # [n_shards + 1]
        self._mapped: OrderedDict[int, None] = OrderedDict()
        self._limit = _mapped_shards_limit()

    def shard(self, s: int) -> _Shard:
        """Shard number s, counted as used (the least recently used beyond the limit is unmapped)."""
        if s in self._mapped:
            self._mapped.move_to_end(s)
        else:
            self._mapped[s] = None
            if len(self._mapped) > self._limit:
                self._shards[self._mapped.popitem(last=False)[0]].unmap()
        return self._shards[s]

    @property
    def shards(self) -> list[_Shard]:
        return self._shards

    def __len__(self) -> int:
        return int(self.starts[-1])

    def _locate(self, i: int) -> tuple[_Shard, int]:
        if not 0 <= i < len(self):
            raise IndexError(f"item {i} of {len(self)}")
        s = int(np.searchsorted(self.starts, i, side="right")) - 1
        return self.shard(s), i - int(self.starts[s])

    def _per_shard(self, index: np.ndarray, fn) -> np.ndarray:
        """fn(shard, local indices) for each shard the (global) `index` touches, in index order."""
        index = np.asarray(index, dtype=np.int64)
        if len(index) and (index.min() < 0 or index.max() >= len(self)):
            raise IndexError(f"items outside 0..{len(self) - 1}")
        shard = np.searchsorted(self.starts, index, side="right") - 1
        out = np.empty(len(index), dtype=np.int64)
        for s in np.unique(shard):
            sel = shard == s
            out[sel] = fn(self.shard(int(s)), index[sel] - self.starts[s])
        return out


class Sentences(_Items):
    """The sentences of one split (stage 1's items)."""

    def lengths(self, index: np.ndarray) -> np.ndarray:
        """Tokens of each sentence of `index`, int64."""
        return self._per_shard(index, lambda sh, i: sh.sentences[i + 1] - sh.sentences[i])

    def tokens(self, i: int) -> np.ndarray:
        sh, j = self._locate(int(i))
        return sh.tokens[sh.sentences[j] : sh.sentences[j + 1]]

    def sentence(self, i: int) -> list[int]:
        return self.tokens(i).tolist()



class Passages(_Items):
    """The passages of one split (stage 2's and the baseline's items): runs of consecutive sentences
    of one document, each sentence flagged when it ends a paragraph."""

    def token_counts(self, index: np.ndarray) -> np.ndarray:
        def count(sh: _Shard, i: np.ndarray) -> np.ndarray:
            return sh.sentences[sh.passages[i + 1]] - sh.sentences[sh.passages[i]]
        return self._per_shard(index, count)

    def sentence_counts(self, index: np.ndarray) -> np.ndarray:
        return self._per_shard(index, lambda sh, i: sh.passages[i + 1] - sh.passages[i])

    def passage(self, p: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(tokens [N], sentence offsets into them [k + 1], ends-a-paragraph [k] bool) of passage p."""
        sh, j = self._locate(int(p))
        a, b = int(sh.passages[j]), int(sh.passages[j + 1])
        offsets = np.asarray(sh.sentences[a : b + 1], dtype=np.int64)
        tokens = sh.tokens[offsets[0] : offsets[-1]]
        # paragraph starts after a and up to b: the sentence before each ends a paragraph
        para = sh.paragraphs
        lo, hi = np.searchsorted(para, a + 1, side="left"), np.searchsorted(para, b, side="right")
        para_end = np.zeros(b - a, dtype=bool)
        para_end[np.asarray(para[lo:hi], dtype=np.int64) - 1 - a] = True
        return tokens, offsets - offsets[0], para_end


class PreparedDataset:
    def __init__(self, path: Path, manifest: dict):
        self.path, self.manifest = Path(path), manifest

    @classmethod
    def open(cls, path: str | Path) -> "PreparedDataset":
        path = Path(path)
        if not (path / MANIFEST).is_file():
            hint = " (a preparation that has not finished: run `sllm-train prepare` again to finish it)" \
                if path.is_dir() else ""
            raise DatasetError(f"{path} is not a prepared dataset: no {MANIFEST}{hint}")
        try:
            manifest = json.loads((path / MANIFEST).read_text())
        except (OSError, ValueError) as e:
            raise DatasetError(f"cannot read {path / MANIFEST}: {e}") from None
        if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
            raise DatasetError(f"{path} is not a prepared dataset of format {FORMAT} v{VERSION} "
                               f"(found {manifest.get('format')} v{manifest.get('version')}): prepare it again")
        for shard in manifest["shards"]:
            for name, info in shard["files"].items():
                f = path / SHARDS_DIR / shard["name"] / name
                if not f.is_file() or f.stat().st_size != info["bytes"]:
                    raise DatasetError(f"{f} is missing or has the wrong size: the dataset is damaged; prepare it "
                                       "again (sllm-train prepare re-checks and rewrites damaged shards)")
        return cls(path, manifest)

    @property
    def dataset_id(self) -> str:
        return self.manifest["dataset_id"]

    @property
    def settings(self) -> dict:
        return self.manifest["settings"]

    @cached_property
    def tokenizer(self) -> SentenceTokenizer:
        return SentenceTokenizer.load(self.path)

    def _shards(self, split: str) -> list[_Shard]:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        return [_Shard(self.path / SHARDS_DIR / s["name"], split) for s in self.manifest["shards"]]

    def sentences(self, split: str) -> Sentences:
        return Sentences(self._shards(split), [s["counts"][split]["sentences"] for s in self.manifest["shards"]])

    def passages(self, split: str) -> Passages:
        return Passages(self._shards(split), [s["counts"][split]["passages"] for s in self.manifest["shards"]])

    def longest_passage_tokens(self, split: str) -> int:
        return int(self.manifest["longest_tokens"][split]["passage"])

    def describe(self) -> str:
        c = self.manifest["counts"]
        return (f"{self.path}: train {c['train']['documents']} documents, {c['train']['sentences']} sentences, "
                f"{c['train']['passages']} passages, {c['train']['tokens']} tokens; validation "
                f"{c['val']['documents']} documents, {c['val']['sentences']} sentences, {c['val']['tokens']} tokens")
