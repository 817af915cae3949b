import gzip
import json
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sllm.sentences.limit import is_blank, split_to_token_limit, text_to_sentences
from sllm.sentences.tokenizer import SentenceTokenizer, TokenizerError, train_bpe

CORPUS = Path(__file__).resolve().parents[1] / "data" / "corpus"
MULTILINGUAL = "Привет, мир. 你好，世界。こんにちは。مرحبا بالعالم. Γειά σου κόσμε! 😀👍🏽 naïve café\n"


@pytest.fixture(scope="module")
def tok() -> SentenceTokenizer:
    # ~200 KB of the bundled corpus + a little non-Latin text: trains in well under a second
    with gzip.open(CORPUS / "austen.jsonl.gz", "rt", encoding="utf-8") as f:
        texts = [json.loads(line)["text"] for _, line in zip(range(15), f)]
    return train_bpe(texts + [MULTILINGUAL] * 20, vocab_size=500)


def test_special_ids_and_size(tok):
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
    assert tok.vocab_size == 500
    assert tok.encode("") == []
    # special-token strings in text are plain text, never the special ids
    assert not {tok.pad_id, tok.bos_id, tok.eos_id} & set(tok.encode("a <eos> b <bos><pad>"))


@settings(max_examples=200, deadline=None)
@given(text=st.text(st.characters(codec="utf-8")))  # any character incl. control chars, no lone surrogates
def test_round_trip_any_text(tok, text):
    ids = tok.encode(text)
    assert all(i not in (tok.pad_id, tok.bos_id, tok.eos_id) for i in ids)
    assert tok.decode(ids) == text


@pytest.mark.parametrize("text", [MULTILINGUAL, "\x00\x01\x1b[31m\r\n\t\x7f", "  leading and trailing  ", "<pad> is plain text"])
def test_round_trip_cases(tok, text):
    assert tok.decode(tok.encode(text)) == text


def test_decode_skips_specials(tok):
    ids = tok.encode("Hello there.")
    assert tok.decode([tok.bos_id, *ids, tok.eos_id, tok.pad_id, tok.pad_id]) == "Hello there."


def test_encode_batch_matches_encode(tok):
    texts = ["One.", " Two, three", "", "你好。"]
    assert tok.encode_batch(texts) == [tok.encode(t) for t in texts]


def test_lone_surrogate_is_a_clear_error(tok):
    with pytest.raises(TokenizerError):
        tok.encode("bad \ud800")


def test_vocab_too_small():
    with pytest.raises(ValueError, match="at least"):
        train_bpe(["abc"], vocab_size=100)


def test_save_and_load(tok, tmp_path):
    tok.save(tmp_path / "tk")
    assert {p.name for p in (tmp_path / "tk").iterdir()} == {"tokenizer.json", "tokenizer_meta.json"}
    for path in (tmp_path / "tk", tmp_path / "tk" / "tokenizer.json"):
        loaded = SentenceTokenizer.load(path)
        assert (loaded.pad_id, loaded.bos_id, loaded.eos_id, loaded.vocab_size) == (0, 1, 2, 500)
        assert loaded.to_json_str() == tok.to_json_str()
        assert loaded.encode(MULTILINGUAL) == tok.encode(MULTILINGUAL)


def _write_hf_dir(tok: SentenceTokenizer, d: Path) -> None:
    """An OPT-style checkpoint dir: vocab.json + merges.txt, <s>=0 <pad>=1 </s>=2 <unk>=3."""
    model = json.loads(tok.to_json_str())["model"]
    rest = sorted((i, t) for t, i in model["vocab"].items() if i > 2)  # drop our 3 specials
    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3} | {t: i + 1 for i, t in rest}
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    d.mkdir()
    (d / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (d / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")


@pytest.mark.parametrize("meta", ["special_tokens_map", "tokenizer_config", "config"])
def test_load_hf_vocab_merges_dir(tok, tmp_path, meta):
    d = tmp_path / "opt"
    _write_hf_dir(tok, d)
    if meta == "special_tokens_map":
        (d / "special_tokens_map.json").write_text(json.dumps(
            {"bos_token": "</s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "</s>"}))
    elif meta == "tokenizer_config":
        (d / "tokenizer_config.json").write_text(json.dumps(
            {"bos_token": {"content": "</s>", "special": True}, "eos_token": "</s>", "pad_token": "<pad>"}))
    else:
        (d / "config.json").write_text(json.dumps({"pad_token_id": 1, "bos_token_id": 2, "eos_token_id": 2}))
    opt = SentenceTokenizer.load(d)
    assert (opt.pad_id, opt.bos_id, opt.eos_id) == (1, 2, 2)
    assert opt.encode(MULTILINGUAL) == [i + 1 for i in tok.encode(MULTILINGUAL)]
    assert opt.decode([2, *opt.encode(MULTILINGUAL), 2, 1]) == MULTILINGUAL


@pytest.mark.parametrize("damage", ["missing", "empty_dir", "corrupt_json", "not_a_tokenizer", "bad_meta", "meta_out_of_range"])
def test_load_errors(tok, tmp_path, damage):
    d = tmp_path / "tk"
    if damage != "missing":
        d.mkdir()
    if damage in ("corrupt_json", "not_a_tokenizer"):
        (d / "tokenizer.json").write_text('{"version": "1.0", "model": ' if damage == "corrupt_json" else '{"a": 1}')
    if damage in ("bad_meta", "meta_out_of_range"):
        tok.save(d)
        meta = "{not json" if damage == "bad_meta" else json.dumps({"pad_id": 0, "bos_id": 1, "eos_id": 99999})
        (d / "tokenizer_meta.json").write_text(meta)
    with pytest.raises(TokenizerError):
        SentenceTokenizer.load(d)


def test_missing_special_tokens_is_an_error(tmp_path):
    bare = train_bpe(["plain text only"] * 10, vocab_size=300)
    data = json.loads(bare.to_json_str())
    data["added_tokens"] = []
    data["model"]["vocab"] = {t: i for t, i in data["model"]["vocab"].items() if not t.startswith("<")}
    (tmp_path / "tokenizer.json").write_text(json.dumps(data))
    with pytest.raises(TokenizerError, match="pad/bos/eos"):
        SentenceTokenizer.load(tmp_path / "tokenizer.json")


# ------------------------------------------------------------ token limit

@pytest.mark.parametrize("segment", ["a" * 10_000, "中文字符测试" * 1700, "😀👍🏽" * 3000, "x" * 3000 + " word" * 1500])
def test_split_long_segments_fast(tok, segment):
    t = time.perf_counter()
    pieces = split_to_token_limit(segment, tok, 64)
    assert time.perf_counter() - t < 1.0
    assert "".join(pieces) == segment
    assert len(pieces) > 1 and all(len(tok.encode(p)) <= 64 for p in pieces)


def test_split_prefers_word_boundaries(tok):
    segment = "the quick brown fox jumps over the lazy dog " * 40
    pieces = split_to_token_limit(segment, tok, 16)
    assert "".join(pieces) == segment
    assert all(p.startswith(" ") for p in pieces[1:])
    assert all(len(tok.encode(p)) <= 16 for p in pieces)


def test_split_short_and_edge_cases(tok):
    assert split_to_token_limit("Short one.", tok, 64) == ["Short one."]
    assert split_to_token_limit("", tok, 64) == []
    with pytest.raises(ValueError):
        split_to_token_limit("😀" * 10, tok, 1)  # one emoji needs several byte tokens
    with pytest.raises(ValueError):
        split_to_token_limit("abc", tok, 0)


@settings(max_examples=100, deadline=None)
@given(text=st.text(st.characters(codec="utf-8"), max_size=200), max_tokens=st.integers(4, 12))
def test_split_any_text(tok, text, max_tokens):
    pieces = split_to_token_limit(text, tok, max_tokens)
    assert "".join(pieces) == text
    assert all(len(tok.encode(p)) <= max_tokens for p in pieces)


def test_text_to_sentences(tok):
    text = "Short. " + "verylongword" * 200 + ", and more.\n\n   \nEnd"
    pieces = text_to_sentences(text, tok, max_tokens=32, split_on_comma=True)
    assert "".join(pieces) == text
    assert all(len(tok.encode(p)) <= 32 for p in pieces)
    assert pieces[0] == "Short." and pieces[-1] == "\n\n   \nEnd"
    assert text_to_sentences("  \n ", tok, 32) == ["  \n "]
    assert is_blank("  \n ") and is_blank("") and not is_blank(" x ")
