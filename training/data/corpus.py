"""Documents in, train/validation split out. No torch: the edge tools may read corpora too.

Inputs: JSON-lines files (plain or gzip'd; one document a line with a `text`
field, optional `source` and `doc`), .txt files (one document each), and
directories holding either. The split is by document and within each source,
so every register (speeches, novels, scripture) is seen in validation.

Documents stream (`iter_documents`): nothing here holds more than one document,
except `load_documents`, which lists them all for the small in-memory users
(export, bench). The bundled corpus ships inside the package (`sllm.data`), so
an installed sllm finds it without a checkout.
"""
from __future__ import annotations

import gzip
import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from sllm.training.bundled import bundled_dir


def bundled_corpus_dir() -> Path:
    """The bundled corpus: sllm/data/corpus in an installed sllm, data/corpus in a checkout."""
    return bundled_dir("data/corpus", "*.jsonl.gz")


BUNDLED_CORPUS_DIR = bundled_corpus_dir()


def heldout_dir() -> Path:
    """The bundled held-out register (a whole register training never reads: the generalisation set):
    sllm/data/heldout in an installed sllm, data/heldout in a checkout."""
    return bundled_dir("data/heldout", "*.jsonl.gz")


class CorpusError(ValueError):
    """A corpus that cannot be read: missing path, malformed line, or no text at all."""


@dataclass(frozen=True)
class Document:
    source: str
    doc_id: str
    text: str


@dataclass(frozen=True)
class Position:
    """A place in a corpus's stream of documents: `line` lines of file number `file` read."""

    file: int = 0
    line: int = 0


def corpus_files(paths: list[str] | None = None) -> list[Path]:
    """The files of a corpus, in reading order; None or [] means the bundled corpus."""
    if paths:
        return [f for p in paths for f in _corpus_files(Path(p))]
    files = sorted(bundled_corpus_dir().glob("*.jsonl.gz"))
    if not files:
        raise CorpusError(f"the bundled corpus is missing: no *.jsonl.gz in {bundled_corpus_dir()}")
    return files


def iter_documents(files: list[Path], start: Position = Position()) -> Iterator[tuple[Document, Position]]:
    """The documents of `files` from `start` on, each with the position just after it. Documents
    whose text is empty or only whitespace are left out."""
    for i in range(start.file, len(files)):
        skip = start.line if i == start.file else 0
        for doc, line in _read_file(files[i], skip):
            if doc.text.strip():
                yield doc, Position(i, line)


def load_documents(paths: list[str] | None = None) -> list[Document]:
    """Every document of `paths` (files or directories; None or [] means the bundled corpus), in memory."""
    files = corpus_files(paths)
    docs = [d for d, _ in iter_documents(files)]
    if not docs:
        raise CorpusError(f"the corpus is empty: no text in {', '.join(map(str, files))}")
    return docs


def document_key(seed: int, doc: Document) -> bytes:
    """What the split orders documents by (hashlib, not hash(): the same in every process and run)."""
    return hashlib.sha256(f"{seed}\0{doc.source}\0{doc.doc_id}".encode("utf-8", "surrogatepass")).digest()


def held_out_count(n: int, val_fraction: float) -> int:
    """Documents of a source of `n` that go to validation: round(val_fraction * n), at least one,
    never all; none of a source of one."""
    return 0 if n < 2 else min(max(1, round(val_fraction * n)), n - 1)


def split_documents(docs: list[Document], val_fraction: float = 0.02, seed: int = 0) -> tuple[list[Document], list[Document]]:
    """(train, val), deterministic for a seed: per source, the held_out_count(n) documents with the
    smallest document_key (ties: the earlier document) go to validation. If no source has 2
    documents, one document is held out overall. val_fraction = 0 holds out nothing, 1 everything
    (text to evaluate on). Order is kept. (`split.SplitPlan` applies the same rule to a corpus
    streamed from disk.)"""
    if not 0 <= val_fraction <= 1:
        raise ValueError(f"val_fraction must be in [0, 1], got {val_fraction}")
    if val_fraction == 0:
        return list(docs), []
    if val_fraction >= 1:
        return [], list(docs)
    by_source: dict[str, list[int]] = {}
    for i, d in enumerate(docs):
        by_source.setdefault(d.source, []).append(i)
    held: set[int] = set()
    for idx in by_source.values():
        k = held_out_count(len(idx), val_fraction)
        held.update(sorted(idx, key=lambda i: document_key(seed, docs[i]))[:k])
    if not held and len(docs) >= 2:
        held.add(min(range(len(docs)), key=lambda i: document_key(seed, docs[i])))
    train = [d for i, d in enumerate(docs) if i not in held]
    val = [d for i, d in enumerate(docs) if i in held]
    return train, val


def _corpus_files(p: Path) -> list[Path]:
    if not p.exists():
        raise CorpusError(f"corpus path not found: {p}")
    if p.is_file():
        if not _supported(p):
            raise CorpusError(f"unsupported corpus file {p}: expected .jsonl, .jsonl.gz or .txt")
        return [p]
    files = sorted(f for f in p.rglob("*") if f.is_file() and _supported(f))
    if not files:
        raise CorpusError(f"no .jsonl, .jsonl.gz or .txt files under {p}")
    return files


def _supported(p: Path) -> bool:
    return p.name.endswith((".jsonl", ".jsonl.gz", ".txt"))


def _read_file(path: Path, skip: int = 0) -> Iterator[tuple[Document, int]]:
    """(document, lines read so far) for each document of one file, after its first `skip` lines."""
    if path.name.endswith(".txt"):
        if skip:
            return
        try:
            text = path.read_text(encoding="utf-8-sig")  # -sig: drop a byte-order mark
        except (OSError, UnicodeDecodeError) as e:
            raise CorpusError(f"cannot read {path}: {e}") from e
        yield Document(source=path.stem, doc_id=path.stem, text=text), 1  # a .txt file is one document
        return
    yield from _read_jsonl(path, skip)


def _read_jsonl(path: Path, skip: int) -> Iterator[tuple[Document, int]]:
    stem = path.name.removesuffix(".gz").removesuffix(".jsonl")
    opener = gzip.open if path.name.endswith(".gz") else open
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            for n, line in enumerate(f, start=1):
                if n <= skip or not line.strip():  # lines already read are skipped unparsed
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise CorpusError(f"{path}:{n}: not valid JSON ({e.msg})") from e
                if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                    raise CorpusError(f"{path}:{n}: expected a JSON object with a string field 'text'")
                source = str(row.get("source") or stem)
                yield Document(source=source, doc_id=str(row.get("doc", f"{stem}-{n}")), text=row["text"]), n
    except (OSError, EOFError, UnicodeDecodeError) as e:  # gzip.BadGzipFile is an OSError
        raise CorpusError(f"cannot read {path}: {e}") from e
