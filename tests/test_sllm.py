"""Stage 2: SLLM training (torchrun DDP), the token-level baseline, comparable PPL, generation."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import OPT_TINY, QUIET, ROOT, data_overrides, sllm_overrides, train_run
from safetensors.torch import load_file
from transformers import OPTForCausalLM

from sllm.modeling.config import OPTSpec
from sllm.modeling.generate import SamplingConfig, decode_sentences
from sllm.modeling.opt_graft import opt_config_from_spec
from sllm.modeling.sllm_generate import SLLMGenerator
from sllm.training.checkpoint import CheckpointError
from sllm.training.cli import build_run_config
from sllm.training.config import BaselineRunConfig, SLLMRunConfig
from sllm.training.data.passage_data import collate_passages
from sllm.training.evaluate_lm import baseline_token_nll, sllm_token_nll
from sllm.training.load import load_baseline, load_sllm, load_stage1
from sllm.training.tasks.opt_baseline import OPTBaselineTask
from sllm.training.tasks.sllm import SLLMTask

TORCHRUN = str(Path(sys.executable).parent / "torchrun")


def _losses(run_dir: Path) -> list[float]:
    rows = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r and "val_loss" not in r]


def test_torchrun_ddp_sllm_trains_and_loss_falls(tiny_corpus, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = sllm_overrides(tiny_corpus, tmp_path / "cache") + ["train.max_steps=16", "train.lr=0.01",
                                                               "train.save_every=100"]
    cmd = [TORCHRUN, "--standalone", "--nproc_per_node=2", "-m", "sllm.training.cli", "sllm", "--out",
           str(tmp_path / "run"), *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "2 process(es)" in proc.stderr
    losses = _losses(tmp_path / "run")
    assert len(losses) == 16
    assert np.mean(losses[-3:]) < np.mean(losses[:3]) * 0.9
    trained = load_sllm(tmp_path / "run")
    assert trained.model.opt.hidden_size == 32 and (trained.path / "opt_config.json").is_file()


def test_sllm_from_stage1_keeps_its_tokenizer_and_segmentation(sllm_run, stage1):
    trained, s1 = load_sllm(sllm_run), load_stage1(stage1)
    assert trained.tokenizer.to_json_str() == s1.tokenizer.to_json_str()
    assert trained.run.svae == s1.model.cfg
    assert trained.run.data.split_on_comma == s1.run.data.split_on_comma


def test_padding_sentences_and_padding_passages_change_nothing(sllm_run):
    trained = load_sllm(sllm_run)
    task_data = _val_passages(trained)
    lengths = task_data.sentence_counts(np.arange(len(task_data)))
    short, long_ = int(np.argmin(lengths)), int(np.argmax(lengths))
    assert lengths[short] < lengths[long_]
    alone = sllm_token_nll(trained.model, task_data, np.array([short]), batch_size=1)
    together = sllm_token_nll(trained.model, task_data, np.array([short, long_]), batch_size=2)
    other = sllm_token_nll(trained.model, task_data, np.array([long_]), batch_size=1)
    nll = lambda r: r["loss"] * r["tokens"]
    assert together["tokens"] == alone["tokens"] + other["tokens"]
    assert nll(together) == pytest.approx(nll(alone) + nll(other), rel=1e-5)
    # and the hidden states of the short passage do not see the padding
    pad = trained.model.svae.cfg.pad_id
    b1 = collate_passages(task_data, np.array([short]), pad)
    b2 = collate_passages(task_data, np.array([short, long_]), pad)
    with torch.no_grad():
        h1, s1 = trained.model(b1.ids, b1.token_mask, b1.sentence_mask)
        h2, s2 = trained.model(b2.ids, b2.token_mask, b2.sentence_mask)
    n = int(lengths[short])
    torch.testing.assert_close(h2[0, :n], h1[0, :n], atol=1e-5, rtol=0)
    torch.testing.assert_close(s2[0, :n], s1[0, :n], atol=1e-5, rtol=0)


def _val_passages(trained):
    from sllm.training.data.passage_data import prepare_passages

    data_cfg = trained.run.data
    data_cfg.tokenizer = str(trained.path)
    return prepare_passages(data_cfg, trained.model.svae.cfg.max_sentence_tokens, **QUIET).val


def test_baseline_trains_and_ppl_counts_the_same_tokens(tiny_corpus, sllm_run, tmp_path):
    sllm = load_sllm(sllm_run)
    overrides = data_overrides(tiny_corpus, tmp_path / "cache") + OPT_TINY + [
        f"match_sllm={sllm_run}", "train.max_steps=12", "train.lr=0.01"]
    task = train_run(BaselineRunConfig, OPTBaselineTask, overrides, tmp_path / "run")
    losses = _losses(tmp_path / "run")
    assert np.mean(losses[-3:]) < np.mean(losses[:3])
    base = load_baseline(tmp_path / "run")
    val = task.data.val
    index = np.arange(len(val))
    tok = base.tokenizer
    b = baseline_token_nll(base.model, val, index, 4, tok.pad_id, tok.bos_id)
    s = sllm_token_nll(sllm.model, _val_passages(sllm), index, 4)
    assert b["tokens"] == s["tokens"] > 0  # exactly the same scored tokens
    first = sum(int(val.passage(i)[1][1]) for i in index)  # tokens of each passage's first sentence
    assert b["tokens"] == val.token_counts(index).sum() - first  # all but each passage's first sentence
    assert np.isfinite(b["ppl"]) and np.isfinite(s["ppl"])

    from typer.testing import CliRunner

    from sllm.training.cli import app

    report = tmp_path / "compare.md"
    res = CliRunner().invoke(app, ["compare", str(sllm_run), str(tmp_path / "run"), "--report", str(report)])
    assert res.exit_code == 0, res.output
    saved = json.loads(report.with_suffix(".json").read_text())
    assert saved["sllm"]["tokens"] == saved["baseline"]["tokens"] == s["tokens"]
    assert saved["baseline"]["ppl"] == pytest.approx(b["ppl"], rel=1e-6)
    res = CliRunner().invoke(app, ["compare", str(tmp_path / "run"), str(sllm_run)])  # swapped: refused
    assert res.exit_code == 2 and "not an SLLM" in res.output


def test_baseline_can_take_the_stage1_run_dir_as_its_tokenizer(tiny_corpus, stage1, tmp_path):
    """So the baseline can train beside stage 2: it needs only stage 1's tokenizer, not the SLLM."""
    overrides = data_overrides(tiny_corpus, tmp_path / "cache") + OPT_TINY + [f"data.tokenizer={stage1}"]
    task = OPTBaselineTask(build_run_config(None, overrides, str(tmp_path / "run"), BaselineRunConfig), **QUIET)
    assert task.data.tokenizer.to_json_str() == load_stage1(stage1).tokenizer.to_json_str()
    with pytest.raises(Exception, match="tokenizer not found"):  # a missing path is still an error
        OPTBaselineTask(build_run_config(None, overrides + [f"data.tokenizer={tmp_path / 'nope'}"],
                                         str(tmp_path / "run"), BaselineRunConfig), **QUIET)


def test_generation_streams_sentences_and_matches_full_recompute(sllm_run):
    trained = load_sllm(sllm_run)
    gen = SLLMGenerator(trained.model, trained.tokenizer, trained.run.data.split_on_comma)
    trained.model.opt.stop_head.bias.data = torch.tensor([10.0, -10.0])  # never stop: exercise the cap
    out = list(gen.generate("The king sees the river. My sister finds a letter,", max_sentences=4))
    assert 1 <= len(out) <= 4
    # replay without a cache: full forward over prompt + generated vectors decodes the same sentences
    prompt = gen.prompt_sentences("The king sees the river. My sister finds a letter,")
    ids_so_far = list(prompt)
    for sentence in out:
        vectors = gen.encode(ids_so_far)[None]
        with torch.no_grad():
            hidden, _ = trained.model.opt(vectors)
        assert decode_sentences(trained.model.svae.decoder, hidden[:, -1])[0] == sentence.ids
        ids_so_far.append(sentence.ids)
    trained.model.opt.stop_head.bias.data = torch.tensor([-10.0, 10.0])  # always stop
    assert list(gen.generate("The king sees the river.", max_sentences=4, min_sentences=0)) == []
    assert len(list(gen.generate("The king sees the river.", max_sentences=4))) == 1  # an answer says something


def test_generate_cli(sllm_run):
    from typer.testing import CliRunner

    from sllm.training.cli import app

    res = CliRunner().invoke(app, ["generate", str(sllm_run), "The king sees the river.", "--max-sentences", "2"])
    assert res.exit_code == 0, res.output
    res = CliRunner().invoke(app, ["generate", str(sllm_run), "   "])
    assert res.exit_code == 2 and "empty" in res.output and "Traceback" not in res.output


def test_generation_bad_prompts_are_clear_errors(sllm_run):
    trained = load_sllm(sllm_run)
    gen = SLLMGenerator(trained.model, trained.tokenizer)
    for prompt in ["", "   \n "]:
        with pytest.raises(ValueError, match="empty"):
            list(gen.generate(prompt))
    too_long = "Yes. " * (trained.model.opt.max_sentences + 1)
    with pytest.raises(ValueError, match="context holds"):
        list(gen.generate(too_long))
    sampled = list(gen.generate("The king sees the river.", max_sentences=2,
                                sampling=SamplingConfig(temperature=1.0, top_k=5, seed=3)))
    again = list(gen.generate("The king sees the river.", max_sentences=2,
                              sampling=SamplingConfig(temperature=1.0, top_k=5, seed=3)))
    assert [s.ids for s in sampled] == [s.ids for s in again]


def test_freeze_svae_and_finetune_last_layer(tiny_corpus, tmp_path):
    overrides = sllm_overrides(tiny_corpus, tmp_path / "cache") + [
        "train.max_steps=3", "sllm.freeze_svae=true", "sllm.finetune_layers=1", "sllm.finetune_from=last"]
    task = train_run(SLLMRunConfig, SLLMTask, overrides, tmp_path / "run")
    torch.manual_seed(task.run.train.seed)
    initial = task.build_model().state_dict()
    final = load_sllm(tmp_path / "run", weights="model").model.state_dict()
    changed = {k for k in initial if not torch.equal(initial[k], final[k])}
    assert changed, "nothing trained"
    assert not any(k.startswith("svae.") for k in changed)
    assert not any(k.startswith("opt.layers.0.") for k in changed)
    assert any(k.startswith("opt.layers.1.") for k in changed) and "opt.stop_head.weight" in changed


def test_pretrained_opt_dir_grafts_and_trains(tiny_corpus, tmp_path):
    cfg = opt_config_from_spec(OPTSpec(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, ffn_dim=64,
                                       max_position_embeddings=128), vocab_size=300)
    torch.manual_seed(0)
    OPTForCausalLM(cfg).save_pretrained(tmp_path / "opt")
    overrides = sllm_overrides(tiny_corpus, tmp_path / "cache") + [
        f"opt.pretrained={tmp_path / 'opt'}", "train.max_steps=2", "train.lr=1e-6",
        "sllm.init_embeddings_from_opt=true"]
    train_run(SLLMRunConfig, SLLMTask, overrides, tmp_path / "run")
    trained = load_sllm(tmp_path / "run")
    assert trained.model.opt.config.max_position_embeddings == 128  # the checkpoint's config, not the spec's
    hf = load_file(str(tmp_path / "opt" / "model.safetensors"))
    ours = load_file(str(trained.path / "model.safetensors"))
    # 2 steps of AdamW at lr 1e-6 move each weight by at most ~2e-6 from the pretrained one
    assert (ours["opt.layers.1.fc1.weight"] - hf["model.decoder.layers.1.fc1.weight"]).abs().max() < 1e-5
    assert (ours["svae.encoder.tok_emb.weight"] - hf["model.decoder.embed_tokens.weight"]).abs().max() < 1e-5


def test_width_mismatch_and_wrong_kind_are_refused(tiny_corpus, tmp_path, sllm_run, stage1):
    with pytest.raises(Exception, match="must equal OPT's hidden size"):
        train_run(SLLMRunConfig, SLLMTask, sllm_overrides(tiny_corpus, tmp_path / "cache") + ["svae.d_model=64"],
               tmp_path / "run")
    with pytest.raises(CheckpointError, match="not an SLLM"):
        load_sllm(stage1)
    with pytest.raises(CheckpointError, match="not a SentenceVAE"):
        load_stage1(sllm_run)


def test_reconstruction_loss_is_stage_one_loss_on_the_passage_sentences(sllm_run):
    """sllm.reconstruction_loss_weight adds weight * the SentenceVAE's own (stage-1) loss over the
    real sentences of the batch, padding sentences excluded."""
    from sllm.modeling.losses import token_loss
    from sllm.training.tasks.sllm import sllm_losses

    trained = load_sllm(sllm_run)
    data = _val_passages(trained)
    lengths = data.sentence_counts(np.arange(len(data)))
    batch = collate_passages(data, np.array([int(np.argmin(lengths)), int(np.argmax(lengths))]),
                             trained.model.svae.cfg.pad_id)
    assert not bool(batch.sentence_mask.all())  # the short passage is padded with empty sentences
    run = trained.run
    with torch.no_grad():
        run.sllm.reconstruction_loss_weight = 0.0
        plain, stop0, n0 = sllm_losses(trained.model, batch, run)
        run.sllm.reconstruction_loss_weight = 0.5
        mixed, stop1, n1 = sllm_losses(trained.model, batch, run)
        ids, mask = batch.ids[batch.sentence_mask], batch.token_mask[batch.sentence_mask]  # [N, L]
        L = int(mask.sum(dim=1).max())
        ids, mask = ids[:, :L], mask[:, :L]
        svae = trained.model.svae
        _, targets = svae.teacher_forcing_targets(ids, mask)
        stage1 = token_loss(svae(ids, mask), targets, "ce", 0.0)
    assert (n0, float(stop0)) == (n1, float(stop1))  # next-sentence targets and stop flags unchanged
    assert float(mixed - plain) == pytest.approx(0.5 * float(stage1), rel=1e-4)


def test_eval_reads_the_sentence_vae_inside_an_sllm_checkpoint(sllm_run, stage1):
    """`sllm-train eval` on an SLLM checkpoint scores its fine-tuned SentenceVAE (what its edge
    bundle decodes with), not the stage-1 one it started from."""
    from typer.testing import CliRunner

    from sllm.training.cli import app
    from sllm.training.load import load_sentence_vae

    inner = load_sentence_vae(sllm_run)
    sllm_svae = load_sllm(sllm_run).model.svae.state_dict()
    assert all(torch.equal(v, sllm_svae[k]) for k, v in inner.model.state_dict().items())
    stage1_svae = load_sentence_vae(stage1).model.state_dict()
    assert any(not torch.equal(v, sllm_svae[k]) for k, v in stage1_svae.items())  # stage 2 changed it
    res = CliRunner().invoke(app, ["eval", str(sllm_run), "--n-exact", "20", "--n-loss", "50"])
    assert res.exit_code == 0, res.output
    assert "exact" in res.output.lower() and str(inner.path) in res.output


def test_stop_loss_weights_the_rare_paragraph_ends(sllm_run, tmp_path):
    """sllm.stop_positive_weight: the stop flags' focal loss with the positive class ("the paragraph
    ends here") weighted, averaged over the weights; a typed field, saved with the run config."""
    from sllm.modeling.losses import token_loss
    from sllm.training.config import load_run_config
    from sllm.training.tasks.sllm import sllm_losses

    trained = load_sllm(sllm_run)
    assert "stop_positive_weight" in json.loads((trained.path / "config.json").read_text())["sllm"]
    data = _val_passages(trained)
    batch = collate_passages(data, np.arange(min(4, len(data))), trained.model.svae.cfg.pad_id)
    targets = batch.para_end[batch.sentence_mask]
    assert 0 < int(targets.sum()) < len(targets)  # both classes in the batch
    run = trained.run
    with torch.no_grad():
        _, stop_logits = trained.model(batch.ids, batch.token_mask, batch.sentence_mask)
        logits = stop_logits[batch.sentence_mask]  # [N, 2]
        p = logits.float().softmax(-1)[torch.arange(len(targets)), targets.long()]
        focal = -(1 - p) ** run.sllm.stop_focal_gamma * p.log()  # per sentence
        losses = {}
        for w in (1.0, 7.0):
            run.sllm.stop_positive_weight = w
            losses[w] = float(sllm_losses(trained.model, batch, run)[1])
            weights = torch.where(targets, w, 1.0)
            assert losses[w] == pytest.approx(float((weights * focal).sum() / weights.sum()), rel=1e-5)
    assert losses[1.0] == pytest.approx(float(token_loss(logits[None], targets.long()[None], "focal",
                                                         run.sllm.stop_focal_gamma)), rel=1e-5)
    assert losses[7.0] != pytest.approx(losses[1.0])
    cfg = json.loads((trained.path / "config.json").read_text())
    cfg["sllm"]["stop_positive_weight"] = 0
    (tmp_path / "bad.json").write_text(json.dumps(cfg))
    with pytest.raises(Exception, match="stop_positive_weight must be > 0"):
        load_run_config(tmp_path / "bad.json").validate()
