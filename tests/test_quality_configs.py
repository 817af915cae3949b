"""configs/quality, the chain scripts/train_quality.sh runs: the paper's recipe (a SentenceVAE and a
stage 2 that start from a pretrained token-level OPT) against the OPT trained on and an SLLM from
scratch, wired to each other and at equal total tokens."""
from __future__ import annotations

import subprocess
from dataclasses import asdict

import pytest
from helpers import ROOT, prepared_token_means

from sllm.training.config import load_run_config

QUALITY = ROOT / "configs" / "quality"
HF = "runs/quality/baseline-pretrain-hf/baseline"  # what `sllm-export runs/quality/baseline-pretrain` writes
DATA = ROOT / "runs" / "quality" / "data"
# target tokens per training item of runs/quality/data (vocab 4,096, comma split, passages of <= 32
# sentences / 512 tokens): a sentence + eos (stage 1), a passage's tokens (baseline), its sentences
# 2..n + an eos each (stage 2); from the dataset's arrays (checked below where it is present)
PER_SENTENCE, PER_PASSAGE, PER_PASSAGE_STAGE2 = 13.8765, 307.239, 314.492


def _runs():
    return {p.stem: load_run_config(p) for p in sorted(QUALITY.glob("*.json"))}


def test_the_chain_is_wired_together():
    runs = _runs()
    assert set(runs) == {"baseline-pretrain", "svae-init", "sllm-pretrained", "baseline-continued", "svae-scratch",
                         "sllm-scratch", "sllm-heldout", "baseline-heldout"}
    for name, run in runs.items():
        run.validate()
        data = "runs/quality/heldout-data" if name.endswith("-heldout") else "runs/quality/data"
        assert run.train.out_dir == f"runs/quality/{name}" and run.data.dataset == data
    assert runs["svae-init"].init.embeddings_from == runs["sllm-pretrained"].opt.pretrained == \
        runs["baseline-continued"].opt.pretrained == runs["sllm-heldout"].opt.pretrained == \
        runs["baseline-heldout"].opt.pretrained == HF
    # the paper's protocol: the recipe's stage 2 and the OPT, the same steps on the held-out register
    a, b = (asdict(runs[n]) for n in ("sllm-heldout", "sllm-pretrained"))
    assert a["sllm"] == b["sllm"] and a["opt"] == b["opt"]
    assert runs["sllm-heldout"].train.max_steps == runs["baseline-heldout"].train.max_steps
    assert runs["sllm-heldout"].train.batch_size == runs["baseline-heldout"].train.batch_size
    assert runs["sllm-pretrained"].sllm.svae_checkpoint == runs["svae-init"].train.out_dir
    assert runs["sllm-scratch"].sllm.svae_checkpoint == runs["svae-scratch"].train.out_dir
    assert not runs["svae-scratch"].init.embeddings_from and not runs["sllm-scratch"].opt.pretrained
    # the scratch OPT has the pretrained one's shape; the two stage 2s differ only in where they start
    assert asdict(runs["sllm-scratch"].opt) == {**asdict(runs["baseline-pretrain"].opt), "pretrained": ""}
    a, b = (asdict(runs[n]) for n in ("sllm-pretrained", "sllm-scratch"))
    for d in (a, b):
        d.pop("opt"), d["sllm"].pop("svae_checkpoint"), d["train"].pop("out_dir")
    assert a == b
    a, b = (asdict(runs[n]) for n in ("svae-init", "svae-scratch"))
    assert a["model"] == b["model"] and a["data"] == b["data"]


def test_every_model_trains_on_the_same_total_tokens():
    r = {name: run.train for name, run in _runs().items() if not name.endswith("-heldout")}
    steps = {name: t.max_steps * t.batch_size for name, t in r.items()}
    pretrain = steps["baseline-pretrain"] * PER_PASSAGE
    stage2 = steps["sllm-pretrained"] * PER_PASSAGE_STAGE2
    totals = {
        "recipe": pretrain + steps["svae-init"] * PER_SENTENCE + stage2,
        "baseline": pretrain + steps["baseline-continued"] * PER_PASSAGE,
        "scratch": steps["svae-scratch"] * PER_SENTENCE + steps["sllm-scratch"] * PER_PASSAGE_STAGE2,
    }
    assert max(totals.values()) / min(totals.values()) < 1.001, totals
    assert 25e6 < totals["recipe"] < 26e6 and 4.5e6 < stage2 < 4.7e6  # the shipped stage 2's budget


@pytest.mark.skipif(not (DATA / "manifest.json").is_file(), reason="runs/quality/data is prepared by the long runs")
def test_the_token_means_are_the_datasets():
    per_piece, per_passage, per_passage_stage2 = prepared_token_means(DATA)
    assert per_piece == pytest.approx(PER_SENTENCE, rel=1e-5)
    assert per_passage == pytest.approx(PER_PASSAGE, rel=1e-5)
    assert per_passage_stage2 == pytest.approx(PER_PASSAGE_STAGE2, rel=1e-5)


def test_the_driver_script_parses():
    subprocess.run(["bash", "-n", str(ROOT / "scripts" / "train_quality.sh")], check=True)
