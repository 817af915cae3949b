"""configs/ablations, the runs scripts/train_ablations.sh makes: SentenceVAEs of 1, 2 and 4 blocks at the
shipped width, and at three granularities, each grafted on the quality chain's pretrained OPT, every row
on the same target tokens."""
from __future__ import annotations

import importlib.util
import json
import subprocess
from dataclasses import asdict

import pytest
from helpers import ROOT, prepared_token_means

from sllm.training.config import apply_overrides, load_run_config
from sllm.training.sizing import size_run

ABLATIONS = ROOT / "configs" / "ablations"
HF = "runs/quality/baseline-pretrain-hf/baseline"  # what train_quality.sh exports from baseline-pretrain
ROWS = ("h1", "h2", "h4", "nocomma", "max8")
DATASETS = {"h1": "runs/quality/data", "h2": "runs/quality/data", "h4": "runs/quality/data",
            "nocomma": "runs/ablations/data-nocomma", "max8": "runs/ablations/data-max8"}
# target tokens per training item of each dataset (vocab 4,096, passages of <= 32 sentences / 512 tokens):
# a piece + eos (stage 1), a passage's pieces 2..n + an eos each (stage 2); checked below where present
PER_PIECE = {"runs/quality/data": 13.87654, "runs/ablations/data-nocomma": 21.55275,
             "runs/ablations/data-max8": 7.164878}
PER_PASSAGE_STAGE2 = {"runs/quality/data": 314.4923, "runs/ablations/data-nocomma": 333.7460,
                      "runs/ablations/data-max8": 198.4072}


def _runs():
    return {p.stem: load_run_config(p) for p in sorted(ABLATIONS.glob("*.json"))}


def test_the_rows_are_wired_together():
    runs = _runs()
    assert set(runs) == {f"{kind}-{row}" for kind in ("svae", "sllm") for row in ROWS}
    quality = load_run_config(ROOT / "configs" / "quality" / "svae-init.json")
    for row in ROWS:
        svae, sllm = runs[f"svae-{row}"], runs[f"sllm-{row}"]
        svae.validate(), sllm.validate()
        assert svae.train.out_dir == f"runs/ablations/svae-{row}" and sllm.train.out_dir == f"runs/ablations/sllm-{row}"
        assert sllm.sllm.svae_checkpoint == svae.train.out_dir
        assert svae.init.embeddings_from == sllm.opt.pretrained == HF
        assert svae.data == sllm.data and svae.data.dataset == DATASETS[row]
        # stage 2 as the quality chain's recipe runs it
        assert asdict(sllm.sllm) == {**asdict(load_run_config(ROOT / "configs/quality/sllm-pretrained.json").sllm),
                                     "svae_checkpoint": svae.train.out_dir}
        # one granularity changes only what it names; the rest is the quality chain's dataset
        changed = {"nocomma": {"split_on_comma": False}}.get(row, {})
        assert asdict(svae.data) == {**asdict(quality.data), "dataset": DATASETS[row], **changed}
    # the shipped SentenceVAE's width and shape; depth changes only the blocks, granularity the piece limit
    shipped = json.loads((ROOT / "models" / "default" / "svae" / "config.json").read_text())["model"]
    for row, blocks, limit in (("h1", 1, 64), ("h2", 2, 64), ("h4", 4, 64), ("nocomma", 1, 64), ("max8", 1, 8)):
        model = asdict(runs[f"svae-{row}"].model)
        assert model["encoder_layers"] == model["decoder_layers"] == blocks and model["max_sentence_tokens"] == limit
        for key in ("d_model", "n_heads", "ffn_dim", "fusion", "tie_embeddings"):
            assert model[key] == shipped[key], key


def test_every_row_trains_on_the_same_target_tokens():
    runs = _runs()
    for kind, per_item in (("svae", PER_PIECE), ("sllm", PER_PASSAGE_STAGE2)):
        t = {row: runs[f"{kind}-{row}"].train for row in ROWS}
        per_step = {row: t[row].batch_size * per_item[DATASETS[row]] for row in ROWS}
        assert max(per_step.values()) / min(per_step.values()) < 1.015, per_step
        assert len({x.max_steps for x in t.values()}) == 1 and len({x.warmup_steps for x in t.values()}) == 1
    assert 3.9e6 < runs["svae-h1"].train.max_steps * 256 * PER_PIECE["runs/quality/data"] < 4.1e6
    assert 1.4e6 < runs["sllm-h1"].train.max_steps * 16 * PER_PASSAGE_STAGE2["runs/quality/data"] < 1.6e6


@pytest.mark.parametrize("dataset", sorted(PER_PIECE))
def test_the_token_means_are_the_datasets(dataset):
    data = ROOT / dataset
    if not (data / "manifest.json").is_file():
        pytest.skip(f"{dataset} is prepared by the long runs")
    per_piece, _, per_passage_stage2 = prepared_token_means(data)
    assert per_piece == pytest.approx(PER_PIECE[dataset], rel=1e-5)
    assert per_passage_stage2 == pytest.approx(PER_PASSAGE_STAGE2[dataset], rel=1e-5)


def test_the_models_build():
    """Each model built (on the meta device): the pretrained OPT the SLLMs graft on is baseline-pretrain's."""
    opt = asdict(load_run_config(ROOT / "configs" / "quality" / "baseline-pretrain.json").opt)
    params = {}
    for row in ROWS:
        svae = apply_overrides(load_run_config(ABLATIONS / f"svae-{row}.json"), ["model.vocab_size=4096"])
        sllm = apply_overrides(load_run_config(ABLATIONS / f"sllm-{row}.json"),
                               [f"opt.{k}={json.dumps(v)}" for k, v in opt.items()])
        sllm.svae = svae.model
        params[row] = size_run(svae).params, size_run(sllm).params
    assert params["h1"][0] == 3_974_400  # the shipped SentenceVAE's (models/default/svae)
    assert params["h1"][0] < params["h2"][0] < params["h4"][0]
    assert params["nocomma"] == params["h1"] and params["max8"][0] < params["h1"][0]  # fewer positions
    for svae, sllm in params.values():
        assert sllm > svae


def test_the_table_renders_before_any_run(tmp_path):
    spec = importlib.util.spec_from_file_location("ablation_table", ROOT / "scripts" / "ablation_table.py")
    table = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(table)
    text = table.render(tmp_path, table.collect(tmp_path, tmp_path, 0))
    assert "| svae-h4 | — |" in text and "(`max8`) | — / — / — |" in text


def test_the_driver_script_parses():
    subprocess.run(["bash", "-n", str(ROOT / "scripts" / "train_ablations.sh")], check=True)
