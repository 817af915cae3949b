"""The paper's recipe, code side: a token-level OPT baseline, exported as a Hugging Face folder
(`sllm-export` writes OUT/baseline), is what a SentenceVAE's token embeddings start from
(init.embeddings_from), what the continued baseline starts from (opt.pretrained, a fresh optimizer
and schedule) and what stage 2 grafts onto (its positions and blocks kept, its token embedding not)."""
from __future__ import annotations

import json

import pytest
import torch
from helpers import OPT_TINY, QUIET, data_overrides, tiny_overrides, train_run
from transformers import OPTForCausalLM

from sllm.export.baseline_bundle import export_baseline
from sllm.modeling.config import ConfigError
from sllm.training.cli import build_run_config
from sllm.training.config import BaselineRunConfig, RunConfig, SLLMRunConfig
from sllm.training.load import load_baseline, load_stage1
from sllm.training.tasks.opt_baseline import OPTBaselineTask
from sllm.training.tasks.sentence_vae import SentenceVAETask
from sllm.training.tasks.sllm import SLLMTask


@pytest.fixture(scope="module")
def pretrained(tiny_corpus, tmp_path_factory):
    """(baseline run dir, its Hugging Face folder): a tiny OPT pretrained for 4 steps, then exported."""
    out = tmp_path_factory.mktemp("pretrained")
    train_run(BaselineRunConfig, OPTBaselineTask,
              data_overrides(tiny_corpus, out / "cache") + OPT_TINY + ["train.max_steps=4"], out / "run")
    return out / "run", export_baseline(out / "run", out / "export").path


def _hf(folder) -> OPTForCausalLM:
    return OPTForCausalLM.from_pretrained(folder, local_files_only=True).float()


def _svae_overrides(tiny_corpus, tmp_path, run):
    # the baseline's tokenizer, the OPT's width
    return tiny_overrides(tiny_corpus, tmp_path / "cache") + [f"data.tokenizer={run}", "model.d_model=32",
                                                             "model.max_sentence_tokens=16"]


@pytest.mark.parametrize("source", ["hf", "run"])
def test_a_sentence_vae_starts_from_the_pretrained_token_embedding(pretrained, tiny_corpus, tmp_path, source):
    run, hf = pretrained
    overrides = _svae_overrides(tiny_corpus, tmp_path, run) + [
        f"init.embeddings_from={hf if source == 'hf' else run}", "train.max_steps=2", "train.lr=0"]
    train_run(RunConfig, SentenceVAETask, overrides, tmp_path / "svae")
    want = (_hf(hf) if source == "hf" else load_baseline(run).model).get_input_embeddings().weight
    svae = load_stage1(tmp_path / "svae", weights="model").model
    torch.testing.assert_close(svae.encoder.tok_emb.weight, want, atol=0, rtol=0)  # lr 0: still the copy
    torch.testing.assert_close(svae.decoder.tok_emb.weight, want, atol=0, rtol=0)
    assert svae.decoder.lm_head.weight.data_ptr() == svae.decoder.tok_emb.weight.data_ptr()  # tied output layer
    saved = json.loads((tmp_path / "svae" / "config.json").read_text())
    assert saved["init"]["embeddings_from"] == str(hf if source == "hf" else run)  # recorded with the run


def test_the_embedding_source_must_fit(pretrained, tiny_corpus, tmp_path):
    run, hf = pretrained
    base = _svae_overrides(tiny_corpus, tmp_path, run) + [f"init.embeddings_from={hf}"]

    def task(*extra):
        return SentenceVAETask(build_run_config(None, base + list(extra), str(tmp_path / "x"), RunConfig), **QUIET)

    with pytest.raises(ConfigError, match="is 32 wide, the SentenceVAE's d_model is 64"):
        task("model.d_model=64")
    with pytest.raises(ConfigError, match="another tokenizer"):  # a BPE trained here: other token ids
        task("data.tokenizer=", "data.vocab_size=280")
    with pytest.raises(ConfigError, match="neither a Hugging Face OPT folder"):
        task(f"init.embeddings_from={tmp_path}")


def test_the_baseline_continues_from_a_pretrained_opt_with_a_fresh_optimizer(pretrained, tiny_corpus, tmp_path):
    run, hf = pretrained
    overrides = data_overrides(tiny_corpus, tmp_path / "cache") + [
        f"opt.pretrained={hf}", f"data.tokenizer={run}", "train.max_steps=3", "train.warmup_steps=2"]
    task = train_run(BaselineRunConfig, OPTBaselineTask, overrides, tmp_path / "cont")
    start = _hf(hf).state_dict()
    assert all(torch.equal(v, start[k]) for k, v in task.initial_state.items())  # its weights, as loaded
    rows = [json.loads(line) for line in (tmp_path / "cont" / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["step"] == 1 and rows[0]["lr"] < 1e-3 * 0.6  # a fresh warm-up, from step 0
    ckpt = tmp_path / "cont" / (tmp_path / "cont" / "latest").read_text().strip()
    assert json.loads((ckpt / "trainer_state.json").read_text())["step"] == 3
    from safetensors import safe_open

    with safe_open(str(ckpt / "optimizer.safetensors"), "pt") as f:  # AdamW's own step count: 3, not 4 + 3
        steps = {float(f.get_tensor(k)) for k in f.keys() if k.endswith("step")}
    assert steps == {3.0}
    with pytest.raises(ConfigError, match="another tokenizer"):  # a dataset of other token ids is refused
        OPTBaselineTask(build_run_config(None, data_overrides(tiny_corpus, tmp_path / "c2") + [
            f"opt.pretrained={hf}", "data.vocab_size=280"], str(tmp_path / "y"), BaselineRunConfig), **QUIET)


def test_stage_2_keeps_the_pretrained_positions_and_blocks_and_drops_its_token_embedding(pretrained, stage1,
                                                                                        tiny_corpus, tmp_path):
    _, hf = pretrained
    overrides = data_overrides(tiny_corpus, tmp_path / "cache") + [
        f"opt.pretrained={hf}", f"sllm.svae_checkpoint={stage1}", "svae.d_model=32"]
    task = SLLMTask(build_run_config(None, overrides, str(tmp_path / "s"), SLLMRunConfig), **QUIET)
    graft = task.build_model().opt.state_dict()
    decoder = {k.removeprefix("model.decoder."): v for k, v in _hf(hf).state_dict().items()}
    kept = [k for k in graft if not k.startswith("stop_head.")]
    assert any(k.startswith("layers.") for k in kept) and "embed_positions.weight" in kept
    for k in kept:
        torch.testing.assert_close(graft[k], decoder[k], atol=0, rtol=0)
    assert not any("embed_tokens" in k or "lm_head" in k for k in graft)  # dropped
