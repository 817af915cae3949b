"""Documents in, train/validation split out. No torch: the edge tools may read corpora too.

Inputs: JSON-lines files (plain or gzip'd; one document a line with a `text`
field, optional `source` and `doc`), .txt files (one document each), and
directories holding either. The split is by document and within each source,
so every register (speeches, novels, scripture) is seen in validation.
"""
from __future__ import annotations

import gzip
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

BUNDLED_CORPUS_DIR = Path(__file__).resolve().parents[2] / "data" / "corpus"


class CorpusError(ValueError):
    """A corpus that cannot be read: missing path, malformed line, or no text at all."""


@dataclass(frozen=True)
class Document:
    source: str
    doc_id: str
    text: str


def load_documents(paths: list[str] | None = None) -> list[Document]:
    """Documents from `paths` (files or directories); None or [] means the bundled corpus.

    Documents whose text is empty or only whitespace are left out."""
    if paths:
        files = [f for p in paths for f in _corpus_files(Path(p))]
    else:
        files = sorted(BUNDLED_CORPUS_DIR.glob("*.jsonl.gz"))
        if not files:
            raise CorpusError(f"the bundled corpus is missing: no *.jsonl.gz in {BUNDLED_CORPUS_DIR}")
    docs = [d for f in files for d in _read_file(f) if d.text.strip()]
    if not docs:
        raise CorpusError(f"the corpus is empty: no text in {', '.join(map(str, files))}")
    return docs


def split_documents(docs: list[Document], val_fraction: float = 0.02, seed: int = 0) -> tuple[list[Document], list[Document]]:
    """(train, val), deterministic for a seed: per source, the round(val_fraction * n)
    documents with the smallest sha256(seed, source, doc_id) go to validation, at
    least one and never all for a source of >= 2 documents. If no source has 2, one
    document is held out overall. val_fraction = 0 holds out nothing. Order is kept."""
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if val_fraction == 0:
        return list(docs), []

    def key(d: Document) -> bytes:
        # hashlib, not hash(): the same split in every process and every run
        return hashlib.sha256(f"{seed}\0{d.source}\0{d.doc_id}".encode("utf-8", "surrogatepass")).digest()

    by_source: dict[str, list[int]] = {}
    for i, d in enumerate(docs):
        by_source.setdefault(d.source, []).append(i)
    held: set[int] = set()
    for idx in by_source.values():
        if len(idx) < 2:
            continue
        k = min(max(1, round(val_fraction * len(idx))), len(idx) - 1)
        held.update(sorted(idx, key=lambda i: key(docs[i]))[:k])
    if not held and len(docs) >= 2:
        held.add(min(range(len(docs)), key=lambda i: key(docs[i])))
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


def _read_file(path: Path) -> list[Document]:
    if path.name.endswith(".txt"):
        try:
            text = path.read_text(encoding="utf-8-sig")  # -sig: drop a byte-order mark
        except (OSError, UnicodeDecodeError) as e:
            raise CorpusError(f"cannot read {path}: {e}") from e
        return [Document(source=path.stem, doc_id=path.stem, text=text)]
    return _read_jsonl(path)


def _read_jsonl(path: Path) -> list[Document]:
    stem = path.name.removesuffix(".gz").removesuffix(".jsonl")
    opener = gzip.open if path.name.endswith(".gz") else open
    docs = []
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            for n, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise CorpusError(f"{path}:{n}: not valid JSON ({e.msg})") from e
                if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                    raise CorpusError(f"{path}:{n}: expected a JSON object with a string field 'text'")
                source = str(row.get("source") or stem)
                docs.append(Document(source=source, doc_id=str(row.get("doc", f"{stem}-{n}")), text=row["text"]))
    except (OSError, EOFError, UnicodeDecodeError) as e:  # gzip.BadGzipFile is an OSError
        raise CorpusError(f"cannot read {path}: {e}") from e
    return docs
