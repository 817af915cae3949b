"""Sizing a run without a GPU: the paper's configs built on the meta device, their parameter counts
against OPT's published ones, the activation estimate against what autograd really keeps, the
FLOPs count, the GPU table and the `size` / `--dry-run` commands."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from helpers import ROOT

from sllm.training.cli import build_run_config
from sllm.training.config import BaselineRunConfig, RunConfig, load_run_config
from sllm.training.sizing import peak_bf16_flops, size_run

PAPER = ROOT / "configs" / "paper"


@pytest.mark.parametrize("size, params", [("125m", 125_239_296), ("350m", 331_196_416), ("1.3b", 1_315_758_080)])
def test_the_paper_baselines_have_opts_parameter_counts(size, params):
    """facebook/opt-125m, -350m, -1.3b as Hugging Face counts them (tied output embedding)."""
    assert size_run(load_run_config(PAPER / f"baseline-{size}.json")).params == params


def test_paper_configs_pair_up():
    for size, (d, heads) in {"125m": (768, 12), "350m": (1024, 16), "1.3b": (2048, 32)}.items():
        svae, sllm = load_run_config(PAPER / f"svae-{size}.json"), load_run_config(PAPER / f"sllm-{size}.json")
        assert svae.model == sllm.svae and (svae.model.d_model, svae.model.n_heads) == (d, heads)
        assert sllm.opt == load_run_config(PAPER / f"baseline-{size}.json").opt and sllm.opt.hidden_size == d
        assert sllm.sllm.svae_checkpoint == svae.train.out_dir and svae.model.vocab_size == 50272
        s = size_run(sllm)
        assert s.trainable == s.params > size_run(svae).params


def test_flops_per_token_is_6n_plus_attention_plus_logits():
    s = size_run(load_run_config(PAPER / "baseline-125m.json"))
    h, f, layers, seq, vocab = 768, 3072, 12, 1001, 50272
    linear = layers * (4 * h * h + 2 * h * f)
    assert s.flops_per_token() == pytest.approx(6 * linear + 12 * layers * h * seq + 6 * h * vocab)


def test_the_trainer_counts_flops_with_the_built_baselines_vocabulary():
    from types import SimpleNamespace

    from sllm.training.sizing import flops_per_token

    run = load_run_config(PAPER / "baseline-125m.json")
    small = SimpleNamespace(config=SimpleNamespace(vocab_size=4096))  # a tokenizer of 4096, not 50272
    assert flops_per_token(run) - flops_per_token(run, small) == pytest.approx(6 * 768 * (50272 - 4096))


def test_freezing_the_svae_shrinks_the_optimizer_not_the_model():
    full = size_run(load_run_config(PAPER / "sllm-125m.json"))
    frozen = load_run_config(PAPER / "sllm-125m.json")
    frozen.sllm.freeze_svae = True
    f = size_run(frozen)
    assert f.params == full.params and f.trainable < full.trainable
    assert f.optimizer_bytes() == 8 * f.trainable and f.max_batch(80) >= full.max_batch(80)


def _saved_bytes(model, *inputs, loss_fn) -> int:
    """Bytes autograd keeps for the backward pass (each storage once; parameters left out)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
            torch.autocast("cpu", dtype=torch.bfloat16):
        loss_fn(model(*inputs))
    return sum(seen.values())


@pytest.mark.parametrize("kind", ["svae", "baseline"])
def test_the_activation_estimate_is_near_what_autograd_keeps(kind):
    """A small model in bf16 autocast on CPU: the analytic bytes a sample within 35% of the saved tensors."""
    from transformers import OPTForCausalLM

    from sllm.modeling.sentence_vae import SentenceVAE
    from sllm.training.sizing import _opt_config

    torch.manual_seed(0)
    batch = 4
    if kind == "svae":
        run = build_run_config(None, ["model.d_model=128", "model.n_heads=4", "model.ffn_dim=512",
                                      "model.encoder_layers=2", "model.decoder_layers=2", "model.vocab_size=2000",
                                      "data.vocab_size=2000",
                                      "model.max_sentence_tokens=48"], None, RunConfig)
        model = SentenceVAE(run.model)
        L = run.model.max_sentence_tokens
        inputs = (torch.randint(3, 2000, (batch, L)), torch.ones(batch, L, dtype=torch.bool))
    else:
        run = build_run_config(None, ["opt.hidden_size=128", "opt.num_hidden_layers=2", "opt.num_attention_heads=4",
                                      "opt.ffn_dim=512", "data.vocab_size=2000", "data.max_passage_tokens=255",
                                      "opt.max_position_embeddings=512"], None, BaselineRunConfig)
        model = OPTForCausalLM(_opt_config(run.opt, 2000))
        inputs = (torch.randint(3, 2000, (batch, 256)),)
    model.train()
    out_logits = (lambda o: o) if kind == "svae" else (lambda o: o.logits)
    measured = _saved_bytes(model, *inputs, loss_fn=lambda o: out_logits(o).float().log_softmax(-1).mean()) / batch
    estimated = size_run(run).activation_bytes()
    assert 0.65 < estimated / measured < 1.35, (estimated, measured)


def test_peak_flops_table():
    assert peak_bf16_flops("NVIDIA H100 80GB HBM3") == 989.4e12
    assert peak_bf16_flops("NVIDIA H100 PCIe") == 756e12
    assert peak_bf16_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert peak_bf16_flops("NVIDIA A10G") == 70e12 and peak_bf16_flops("NVIDIA A10") == 125e12
    assert peak_bf16_flops("NVIDIA L4") == 121e12 and peak_bf16_flops("NVIDIA L40S") == 362e12
    assert peak_bf16_flops("Some Future GPU") is None


def test_dry_run_and_size_print_without_training(tmp_path):
    cli = [sys.executable, "-m", "sllm.training.cli"]
    out = tmp_path / "run"
    proc = subprocess.run([*cli, "sllm", "--config", str(PAPER / "sllm-350m.json"), "--out", str(out), "--dry-run",
                           "train.batch_size=4"], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert "parameters" in proc.stdout and "80 GB:" in proc.stdout and not out.exists()
    proc = subprocess.run([*cli, "size", "--markdown", str(PAPER / "svae-125m.json"), str(PAPER / "baseline-125m.json")],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    rows = proc.stdout.strip().splitlines()
    assert rows[0].startswith("| config") and rows[3].startswith("| baseline-125m | 125.2 M")
