"""Free text round-trips through a trained SentenceVAE: split to the token limit, never
truncated, no tracebacks on bad input (function and `sllm-train reconstruct`)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import ROOT
from typer.testing import CliRunner

from sllm.sentences.limit import is_blank, text_to_sentences
from sllm.sentences.tokenizer import TokenizerError
from sllm.training.cli import EMPTY_TEXT, app
from sllm.training.evaluate import reconstruct_text, reconstruct_texts
from sllm.training.load import load_stage1

WORDS = " ".join(f"word{i % 97}" for i in range(2000))[:10_000]  # no punctuation at all
ONE_LETTER = "a" * 10_000
NON_LATIN = [
    "今天是星期五。我很高兴，你呢？天气很好，我们去公园吧。",
    "Привет, как дела? Сегодня пятница.",
    "مرحبا، كيف حالك؟ اليوم هو الجمعة.",
    "Hello 👋🏽 world 🌍! 👨‍👩‍👧‍👦 family. 🎉🎉🎉",
]
CONTROL = [
    "null\x00byte in the middle.",
    "bell\x07 rings. escape \x1b[31mred\x1b[0m text.",
    "zero\u200bwidth\u200bspace, here.",
    "windows\r\nline\r\nbreaks.\r\n",
    "\x00\x07\x1b\u200b",
]


@pytest.fixture(scope="module")
def checkpoint(tiny_svae_run) -> Path:
    return tiny_svae_run


@pytest.fixture(scope="module")
def trained(checkpoint):
    return load_stage1(checkpoint)


def _kept(trained, text: str) -> str:
    """`text` without the blank pieces reconstruct_text skips."""
    tok, limit = trained.tokenizer, trained.model.cfg.max_sentence_tokens
    pieces = text_to_sentences(text, tok, limit, split_on_comma=trained.run.data.split_on_comma)
    return "".join(p for p in pieces if not is_blank(p))


def _check_pieces(trained, text: str, pieces: list[dict]) -> None:
    limit = trained.model.cfg.max_sentence_tokens
    assert "".join(p["input"] for p in pieces) == _kept(trained, text)
    for p in pieces:
        assert set(p) == {"input", "tokens", "output", "exact"}
        assert not is_blank(p["input"])
        assert p["tokens"] == len(trained.tokenizer.encode(p["input"])) <= limit
        assert isinstance(p["output"], str) and isinstance(p["exact"], bool)


def _cli(args: list[str], stdin: str | None = None):
    return CliRunner().invoke(app, args, input=stdin)


# ---------------------------------------------------------------- the function


@pytest.mark.parametrize("text", ["", "   \n\t ", "\r\n\r\n", "\u3000 \u2028"])
def test_empty_or_whitespace_text_gives_no_pieces(trained, text):
    assert reconstruct_text(trained, text) == []


@pytest.mark.parametrize("text", [WORDS, ONE_LETTER], ids=["words", "one-letter"])
def test_10k_chars_without_punctuation_are_split_not_truncated(trained, text):
    assert len(text) == 10_000
    pieces = reconstruct_text(trained, text)
    limit = trained.model.cfg.max_sentence_tokens
    assert len(pieces) >= len(trained.tokenizer.encode(text)) // limit > 1
    assert "".join(p["input"] for p in pieces) == text  # lossless: no blank piece here
    _check_pieces(trained, text, pieces)


@pytest.mark.parametrize("text", NON_LATIN, ids=["chinese", "russian", "arabic", "emoji"])
def test_non_latin_text_round_trips_losslessly(trained, text):
    pieces = reconstruct_text(trained, text)
    assert pieces and "".join(p["input"] for p in pieces) == text
    _check_pieces(trained, text, pieces)


def test_chinese_is_cut_after_every_cjk_mark(trained):
    text = NON_LATIN[0]  # byte-level BPE: a CJK sentence may also be cut inside, at the limit
    pieces = reconstruct_text(trained, text)
    cuts = {len("".join(p["input"] for p in pieces[:i])) for i in range(1, len(pieces) + 1)}
    marks = "。？" + ("，" if trained.run.data.split_on_comma else "")
    assert {i + 1 for i, ch in enumerate(text) if ch in marks} <= cuts


@pytest.mark.parametrize("text", CONTROL, ids=["nul", "bell-ansi", "zwsp", "crlf", "only-controls"])
def test_control_characters_do_not_break_anything(trained, text):
    pieces = reconstruct_text(trained, text)
    assert pieces and "".join(p["input"] for p in pieces) == text
    _check_pieces(trained, text, pieces)


def test_long_whitespace_run_is_skipped_not_reconstructed(trained):
    text = "First part." + " " * 300 + "Second part."
    pieces = reconstruct_text(trained, text)
    _check_pieces(trained, text, pieces)
    joined = "".join(p["input"] for p in pieces)
    assert joined.startswith("First part.") and joined.endswith("Second part.")
    assert joined.replace(" ", "") == text.replace(" ", "")


def test_lone_surrogate_is_a_tokenizer_error(trained):
    with pytest.raises(TokenizerError):
        reconstruct_text(trained, "broken \ud800 text")


def test_reconstruct_texts_splits_long_inputs_instead_of_truncating(trained):
    limit = trained.model.cfg.max_sentence_tokens
    texts = ["Hello,", WORDS[:400], ""]
    rows = reconstruct_texts(trained, texts)
    assert [r["input"] for r in rows] == texts
    assert rows[1]["tokens"] == len(trained.tokenizer.encode(WORDS[:400])) > limit
    pieces = reconstruct_text(trained, WORDS[:400])
    assert rows[1]["output"] == "".join(p["output"] for p in pieces)
    assert rows[1]["exact"] == all(p["exact"] for p in pieces)
    assert rows[0]["tokens"] == len(trained.tokenizer.encode("Hello,"))
    assert rows[2] == {"input": "", "tokens": 0, "output": "", "exact": True}


# ---------------------------------------------------------------- the CLI


@pytest.mark.parametrize("text", ["", "   \n\t "], ids=["empty", "whitespace"])
def test_cli_empty_text_says_so_and_exits_0(checkpoint, text):
    for args, stdin in (([text], None), ([], text)):  # argument, then stdin
        result = _cli(["reconstruct", str(checkpoint), *args], stdin)
        assert result.exit_code == 0, result.output
        assert EMPTY_TEXT in result.stderr and "Traceback" not in result.output
        assert "->" not in result.stdout and "0/0 pieces reconstructed exactly" in result.stdout
    result = _cli(["reconstruct", str(checkpoint), "--json", text])
    assert result.exit_code == 0 and json.loads(result.stdout) == []
    assert EMPTY_TEXT in result.stderr


def test_cli_prints_pieces_and_exact_count(trained, checkpoint):
    text = "Hello, my dear friend. " + WORDS[:300]
    result = _cli(["reconstruct", str(checkpoint), text])
    assert result.exit_code == 0, result.output
    pieces = reconstruct_text(trained, text)
    lines = result.stdout.splitlines()
    assert len(lines) == len(pieces) + 1 and all(" -> " in line for line in lines[:-1])
    assert lines[0].startswith(repr(pieces[0]["input"]))
    assert lines[-1] == f"{sum(p['exact'] for p in pieces)}/{len(pieces)} pieces reconstructed exactly"


@pytest.mark.parametrize("text", [ONE_LETTER, *NON_LATIN, *CONTROL], ids=lambda t: repr(t[:12]))
def test_cli_json_round_trips_bad_inputs(trained, checkpoint, text):
    result = _cli(["reconstruct", str(checkpoint), "--json", text])
    assert result.exit_code == 0, result.output
    pieces = json.loads(result.stdout)
    assert "".join(p["input"] for p in pieces) == text
    _check_pieces(trained, text, pieces)
    assert "pieces reconstructed exactly" in result.stderr


def test_cli_reads_stdin(trained, checkpoint):
    text = "Привет, мир! " + WORDS[:200] + "\n今天是星期五。\n"
    result = _cli(["reconstruct", str(checkpoint), "--json"], stdin=text)
    assert result.exit_code == 0, result.output
    assert "".join(p["input"] for p in json.loads(result.stdout)) == text


def test_cli_bad_text_is_a_user_error(checkpoint):
    result = _cli(["reconstruct", str(checkpoint), "broken \ud800 text"])
    assert result.exit_code == 2 and "error:" in result.stderr and "Traceback" not in result.output
    result = CliRunner().invoke(app, ["reconstruct", str(checkpoint)], input=b"not utf-8: \xff\xfe")
    assert result.exit_code == 2 and "not valid UTF-8" in result.stderr


def test_cli_corrupt_or_missing_checkpoint_exits_2(checkpoint, tmp_path):
    import shutil

    ckpt = tmp_path / "ckpt"
    shutil.copytree(checkpoint / (checkpoint / "latest").read_text().strip(), ckpt)
    weights = ckpt / "ema.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    garbage = tmp_path / "garbage"
    garbage.mkdir()
    (garbage / "latest").write_text("nowhere")
    for path in (ckpt, garbage, tmp_path / "missing"):
        result = _cli(["reconstruct", str(path), "Hello there."])
        assert result.exit_code == 2, (path, result.output)
        assert "error:" in result.stderr and "Traceback" not in result.output
        assert result.stdout == ""
    # a real process too: stderr is what a user sees
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "sllm.training.cli", "reconstruct", str(ckpt), "Hello there."],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "error:" in proc.stderr and "corrupt or truncated" in proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
