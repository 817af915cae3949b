"""Any text as evaluation text: `sllm-train compare|eval --text FILE` (and --heldout), `reconstruct
--file`. The text is prepared on the fly with the model's own tokenizer and segmentation, every
document held out (val_fraction 1), and both models are scored on exactly the same tokens."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import QUIET, ROOT
from typer.testing import CliRunner

from sllm.sentences.limit import model_sentences
from sllm.sentences.tokenizer import SentenceTokenizer
from sllm.training.cli import app
from sllm.training.data.prepare import PrepareConfig, prepare_dataset
from sllm.training.data.shards import DatasetError
from sllm.training.text_data import heldout_register

MODEL = ROOT / "models" / "default"
TEXT = ("The river rose in the night, and by morning the lower streets were under water. People carried what "
        "they could to the church on the hill.\n\nNobody had seen a flood like it in forty years. The mayor said "
        "the town would rebuild, and the council met that evening to plan the work.\n")
runner = CliRunner()


def test_compare_scores_two_shipped_models_on_a_text_file(tmp_path):
    """The command a user runs in a fresh clone, as a process: both PPLs over the same tokens, and
    those are all of the file's tokens but the first sentence's (the file is one passage here)."""
    (tmp_path / "flood.txt").write_text(TEXT)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    cli = Path(sys.executable).parent / "sllm-train"
    proc = subprocess.run([str(cli), "compare", str(MODEL), str(MODEL / "baseline"), "--text", "flood.txt",
                           "--report", "out/flood.md"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "out" / "flood.json").read_text())
    tok = SentenceTokenizer.load(MODEL / "svae")
    sentences = [tok.encode(s) for s in model_sentences(TEXT, tok, 64, True)]
    assert result["sllm"]["tokens"] == result["baseline"]["tokens"] == sum(map(len, sentences[1:]))
    assert 1 < result["sllm"]["ppl"] < 1e4 and 1 < result["baseline"]["ppl"] < 1e4
    assert result["text"] == "text flood.txt" and "| SLLM |" in proc.stdout and "| baseline OPT |" in proc.stdout


def test_text_that_cannot_be_compared_is_refused_clearly(tmp_path, sllm_run):
    (tmp_path / "empty.txt").write_text("  \n\n")
    (tmp_path / "one.txt").write_text("Only one sentence here.")
    (tmp_path / "flood.txt").write_text(TEXT)
    cases = {
        "the corpus is empty": ["compare", str(MODEL), "--text", str(tmp_path / "empty.txt")],
        "nothing to score": ["compare", str(MODEL), "--text", str(tmp_path / "one.txt")],
        "corpus path not found": ["compare", str(MODEL), "--text", str(tmp_path / "nope.txt")],
        "give one": ["compare", str(MODEL), "--text", str(tmp_path / "flood.txt"), "--heldout"],
        "different tokenizers": ["compare", str(sllm_run), str(MODEL / "baseline"), "--text",
                                 str(tmp_path / "flood.txt")],
    }
    cwd = os.getcwd()
    os.chdir(tmp_path)  # the models' data cache (runs/cache) is relative
    try:
        for words, args in cases.items():
            res = runner.invoke(app, args)
            assert res.exit_code == 2 and words in res.output, (args, res.output)
    finally:
        os.chdir(cwd)


def test_eval_and_reconstruct_take_a_file(tmp_path):
    (tmp_path / "flood.jsonl").write_text(json.dumps({"text": TEXT}) + "\n" + json.dumps({"text": "Hello, my friend."})
                                          + "\n")
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        res = runner.invoke(app, ["eval", str(MODEL), "--text", "flood.jsonl", "--n-exact", "5",
                                  "--report", "eval.md"])
        assert res.exit_code == 0, res.output
        report = json.loads((tmp_path / "eval.json").read_text())
        tok = SentenceTokenizer.load(MODEL / "svae")
        pieces = model_sentences(TEXT, tok, 64, True) + model_sentences("Hello, my friend.", tok, 64, True)
        assert report["metrics"]["tokens"] == sum(len(tok.encode(p)) + 1 for p in pieces)  # + eos each
        res = runner.invoke(app, ["reconstruct", str(MODEL), "--file", "flood.jsonl", "--json"])
        assert res.exit_code == 0, res.output
        rows = json.loads(res.stdout)
        assert [r["input"] for r in rows] == [p for p in pieces if p.strip()]
    finally:
        os.chdir(cwd)


def test_a_corpus_can_be_prepared_as_evaluation_text_only(tiny_corpus, tmp_path):
    tok_dir = MODEL / "svae"
    cfg = PrepareConfig(corpus=[str(tiny_corpus)], tokenizer=str(tok_dir), val_fraction=1.0)
    out = prepare_dataset(cfg, tmp_path / "ds", workers=1, **QUIET)
    counts = json.loads((out / "manifest.json").read_text())["counts"]
    assert counts["train"]["documents"] == 0 and counts["val"]["documents"] == 24  # every document
    with pytest.raises(DatasetError, match="give the model's"):  # nothing to train a BPE on
        prepare_dataset(PrepareConfig(corpus=[str(tiny_corpus)], val_fraction=1.0), tmp_path / "ds2", **QUIET)


def test_the_held_out_register_is_found_like_the_corpus():
    source = heldout_register()
    assert [Path(p).name for p in source.paths] == ["heldout"]
    assert (Path(source.paths[0]) / "encyclopedia.jsonl.gz").is_file() and "encyclopedia" in source.label
