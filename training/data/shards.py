"""The on-disk format of a prepared dataset: written by `prepare`, read by `dataset`. numpy only.

    DATASET/
      manifest.json        written last (the dataset is complete): format, settings, tokenizer
                           sha256, counts per split, every shard's file hashes, dataset_id
      prepare.json         settings, inputs (sha256) and split plan of the preparation; a resumed
                           preparation must match it
      tokenizer.json, tokenizer_meta.json
      shards/00000/        the documents of one stretch of the corpus (about shard_mb MB of text)
        shard.json         counts, the corpus positions it covers, sha256 and size of each file
        train.tokens.npy     uint16 (vocab <= 65536) or uint32 [T]: the sentences' tokens back to back
        train.sentences.npy  int64 [S+1]: sentence i is tokens[sentences[i]:sentences[i+1]]
        train.paragraphs.npy int64 [Q+1]: paragraph j is sentences paragraphs[j]:paragraphs[j+1]
        train.documents.npy  int64 [D+1]: document j is sentences documents[j]:documents[j+1]
        train.passages.npy   int64 [P+1]: passage j (stage 2's unit) is sentences passages[j]:passages[j+1]
        val.*                the same for that stretch's validation documents

Every array is a plain .npy file: `np.load(path, mmap_mode="r")` maps it without reading it.
A shard folder is written under a hidden name and renamed into place, so one that exists is whole.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sllm.runtime.files import atomic_write_text, fsync_dir, fsync_tree, sha256_file

FORMAT = "sllm-prepared-dataset"
VERSION = 1
MANIFEST = "manifest.json"
PREPARE_RECORD = "prepare.json"
SHARD_RECORD = "shard.json"
SHARDS_DIR = "shards"
SPLITS = ("train", "val")
INDEXES = ("sentences", "paragraphs", "documents", "passages")
ARRAYS = ("tokens", *INDEXES)
_HEADER_BYTES = 128  # a version-1.0 .npy header of a 1-d array fits this for any length (checked)


class DatasetError(ValueError):
    """A prepared dataset that cannot be used: incomplete, damaged, or prepared with other settings."""


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<u4")


def array_file(split: str, name: str) -> str:
    return f"{split}.{name}.npy"


def shard_name(index: int) -> str:
    return f"{index:05d}"


class NpyAppender:
    """A 1-d .npy file written piece by piece: a header for length 0 first, rewritten in place with
    the real length on close (the header's size does not depend on the length)."""

    def __init__(self, path: Path, dtype: np.dtype):
        self.path, self.dtype, self.length = Path(path), np.dtype(dtype), 0
        self._f = open(self.path, "wb")
        self._write_header()

    def _write_header(self) -> None:
        start = self._f.tell()
        np.lib.format.write_array_header_1_0(self._f, {"descr": np.lib.format.dtype_to_descr(self.dtype),
                                                       "fortran_order": False, "shape": (self.length,)})
        if self._f.tell() - start != _HEADER_BYTES:
            raise AssertionError(f"unexpected .npy header size for {self.path}")

    def append(self, a: np.ndarray) -> None:
        a = np.ascontiguousarray(a, dtype=self.dtype)
        self._f.write(a.tobytes())
        self.length += len(a)

    def close(self) -> None:
        self._f.seek(0)
        self._write_header()
        self._f.close()


@dataclass
class SplitPart:
    """One split's share of a run of consecutive documents, as a worker makes it."""

    tokens: np.ndarray  # token dtype [T]
    lengths: np.ndarray  # int64 [S] tokens per sentence
    para_end: np.ndarray  # bool [S] the sentence ends a paragraph
    doc_sizes: np.ndarray  # int64 [D] sentences per document
    passage_sizes: np.ndarray  # int64 [P] sentences per passage


class ShardWriter:
    """Appends SplitParts to one shard's arrays (in a hidden folder) and puts the folder in place."""

    def __init__(self, final: Path, dtype: np.dtype):
        self.final = Path(final)
        self.tmp = self.final.with_name(f".{self.final.name}.tmp-{os.getpid()}")
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.tmp.mkdir(parents=True)
        self.files = {(s, a): NpyAppender(self.tmp / array_file(s, a), dtype if a == "tokens" else np.int64)
                      for s in SPLITS for a in ARRAYS}
        for s in SPLITS:
            for a in INDEXES:
                self.files[s, a].append(np.zeros(1, np.int64))  # every offset index starts at 0
        self.totals = {s: {"tokens": 0, "sentences": 0} for s in SPLITS}
        self.longest = {s: {"sentence": 0, "passage": 0} for s in SPLITS}  # tokens

    def add(self, split: str, part: SplitPart) -> None:
        f, t = self.files, self.totals[split]
        f[split, "tokens"].append(part.tokens)
        f[split, "sentences"].append(t["tokens"] + np.cumsum(part.lengths, dtype=np.int64))
        f[split, "paragraphs"].append(t["sentences"] + 1 + np.flatnonzero(part.para_end))
        f[split, "documents"].append(t["sentences"] + np.cumsum(part.doc_sizes, dtype=np.int64))
        f[split, "passages"].append(t["sentences"] + np.cumsum(part.passage_sizes, dtype=np.int64))
        t["tokens"] += len(part.tokens)
        t["sentences"] += len(part.lengths)
        if len(part.lengths):
            ends = np.concatenate([[0], np.cumsum(part.lengths)])[np.cumsum(part.passage_sizes)]
            longest = self.longest[split]
            longest["sentence"] = max(longest["sentence"], int(part.lengths.max()))
            longest["passage"] = max(longest["passage"], int(np.diff(ends, prepend=0).max()))

    def finish(self, record: dict) -> dict:
        """Close the arrays, write shard.json (record + counts + hashes), fsync, rename into place."""
        for a in self.files.values():
            a.close()
        counts = {s: {a: self.files[s, a].length - (a != "tokens") for a in ARRAYS} for s in SPLITS}
        files = {p.name: {"sha256": sha256_file(p), "bytes": p.stat().st_size} for p in sorted(self.tmp.iterdir())}
        record = {**record, "counts": counts, "longest": self.longest, "files": files}
        (self.tmp / SHARD_RECORD).write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
        fsync_tree(self.tmp)
        if self.final.exists():
            shutil.rmtree(self.final)
        os.replace(self.tmp, self.final)
        fsync_dir(self.final.parent)
        return record

    def abandon(self) -> None:
        for a in self.files.values():
            if not a._f.closed:
                a._f.close()
        shutil.rmtree(self.tmp, ignore_errors=True)


def verify_shard(folder: Path, full: bool = True) -> dict | None:
    """The shard's record when every file it lists is there with its size (and, if `full`, its
    sha256); None otherwise."""
    try:
        record = json.loads((Path(folder) / SHARD_RECORD).read_text())
        for name, info in record["files"].items():
            path = Path(folder) / name
            if path.stat().st_size != info["bytes"] or (full and sha256_file(path) != info["sha256"]):
                return None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return record


def write_json(path: Path, data: dict) -> None:
    atomic_write_text(Path(path), json.dumps(data, indent=1, sort_keys=True) + "\n")
