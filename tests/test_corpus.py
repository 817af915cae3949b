import gzip
import json
from collections import Counter
from pathlib import Path

import pytest

from sllm.training.data.corpus import BUNDLED_CORPUS_DIR, CorpusError, Document, load_documents, split_documents


def _jsonl(path, rows, gz=False):
    text = "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows)
    if gz:
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def test_bundled_corpus():
    assert BUNDLED_CORPUS_DIR.is_dir()
    docs = load_documents(None)
    assert load_documents([]) == docs
    counts = Counter(d.source for d in docs)
    assert set(counts) == TRAIN_REGISTERS and min(counts.values()) > 200
    train, val = split_documents(docs)
    assert {d.source for d in val} == set(counts)
    assert 0.01 < len(val) / len(docs) < 0.04


TRAIN_REGISTERS = {"austen", "sotu", "web_bible", "dialogue", "email", "glossary", "techdocs"}
HELDOUT_DIR = Path(__file__).resolve().parents[1] / "data" / "heldout"  # scripts/build_corpus.py, SOURCES.md


def test_the_held_out_register_is_apart_from_training():
    """data/heldout is the generalisation set: a whole register (encyclopedia) that the bundled
    corpus, which training reads by default, does not contain."""
    held = load_documents([str(HELDOUT_DIR)])
    assert {d.source for d in held} == {"encyclopedia"} and len(held) > 5000
    train = load_documents(None)
    assert not {d.source for d in train} & {"encyclopedia"}
    train_texts = {d.text for d in train}
    assert not any(d.text in train_texts for d in held)


def test_formats_and_defaults(tmp_path):
    a = _jsonl(tmp_path / "a.jsonl", [{"text": "One.", "source": "s", "doc": 7}, "", {"text": "Two."}])
    (tmp_path / "sub").mkdir()
    b = _jsonl(tmp_path / "sub" / "b.jsonl.gz", [{"text": "Three."}], gz=True)
    (tmp_path / "sub" / "c.txt").write_text("\ufeffFour.\nFive.", encoding="utf-8")
    (tmp_path / "sub" / "ignored.md").write_text("not a corpus file")
    (tmp_path / "blank.jsonl").write_text(json.dumps({"text": "   "}) + "\n")  # blank docs are left out
    assert load_documents([str(a)]) == [Document("s", "7", "One."), Document("a", "a-3", "Two.")]
    assert load_documents([str(b)]) == [Document("b", "b-1", "Three.")]
    docs = load_documents([str(tmp_path)])  # recursive, sorted by path
    assert [d.text for d in docs] == ["One.", "Two.", "Three.", "Four.\nFive."]
    assert docs[-1] == Document("c", "c", "Four.\nFive.")


@pytest.mark.parametrize(
    "rows, message",
    [
        ([{"text": "ok"}, "{not json"], r"bad\.jsonl:2: not valid JSON"),
        ([{"text": "ok"}, {"text": "ok"}, {"body": "no text"}], r"bad\.jsonl:3: .*'text'"),
        ([{"text": 5}], r"bad\.jsonl:1:"),
        (["[1, 2]"], r"bad\.jsonl:1:"),
    ],
)
def test_bad_jsonl(tmp_path, rows, message):
    path = _jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(CorpusError, match=message):
        load_documents([str(path)])


def test_bad_paths(tmp_path):
    with pytest.raises(CorpusError, match="not found"):
        load_documents([str(tmp_path / "nope.jsonl")])
    (tmp_path / "x.csv").write_text("a,b")
    with pytest.raises(CorpusError, match="unsupported"):
        load_documents([str(tmp_path / "x.csv")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(CorpusError, match="no .jsonl"):
        load_documents([str(tmp_path / "empty")])
    (tmp_path / "broken.jsonl.gz").write_bytes(b"not gzip at all")
    with pytest.raises(CorpusError, match="cannot read"):
        load_documents([str(tmp_path / "broken.jsonl.gz")])
    (tmp_path / "blank.txt").write_text(" \n")
    with pytest.raises(CorpusError, match="empty"):
        load_documents([str(tmp_path / "blank.txt")])


def _docs(sizes: dict[str, int]) -> list[Document]:
    return [Document(s, f"{s}-{i}", f"text {s} {i}") for s, n in sizes.items() for i in range(n)]


def test_split_is_deterministic_and_covers_sources():
    docs = _docs({"big": 300, "mid": 20, "two": 2, "one": 1})
    train, val = split_documents(docs, 0.02, seed=0)
    assert split_documents(docs, 0.02, seed=0) == (train, val)
    assert split_documents(list(reversed(docs)), 0.02, seed=0)[1] == list(reversed(val))  # by hash, not position
    assert split_documents(docs, 0.02, seed=1)[1] != val
    assert sorted(train + val, key=docs.index) == docs and not set(train) & set(val)
    per_source = Counter(d.source for d in val)
    assert per_source == {"big": 6, "mid": 1, "two": 1}  # round(2% of n), at least 1, never for a single doc
    assert all(d in train for d in docs if d.source == "one")


def test_split_edge_cases():
    docs = _docs({"a": 3, "b": 3})
    train, val = split_documents(docs, 0.9)
    assert Counter(d.source for d in train) == {"a": 1, "b": 1}  # every source keeps a training doc
    assert split_documents(docs, 0.0) == (docs, [])
    singles = _docs({"x": 1, "y": 1, "z": 1})  # e.g. a folder of .txt files: one source each
    train, val = split_documents(singles, 0.02)
    assert len(val) == 1 and len(train) == 2
    assert split_documents(docs, 1.0) == ([], docs)  # everything held out: text to evaluate on
    with pytest.raises(ValueError):
        split_documents(docs, 1.5)
