"""SentenceVAE model, decoding and losses, on tiny models (d=32, vocab 50)."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from sllm.modeling.config import ConfigError, SentenceVAEConfig
from sllm.modeling.generate import SamplingConfig, decode_full_recompute, decode_sentences, pick_next
from sllm.modeling.losses import token_loss, token_nll_sum
from sllm.modeling.sentence_vae import SentenceDecoder, SentenceVAE

torch.set_num_threads(1)

V = 50


def tiny_cfg(**kw) -> SentenceVAEConfig:
    base = dict(vocab_size=V, d_model=32, n_heads=4, ffn_dim=64, encoder_layers=2, decoder_layers=2,
                max_sentence_tokens=12)
    base.update(kw)
    return SentenceVAEConfig(**base)


def random_model(seed: int = 0, jitter: float = 0.1, **kw) -> SentenceVAE:
    """A model with weights far enough from init that logits are not near-uniform."""
    torch.manual_seed(seed)
    model = SentenceVAE(tiny_cfg(**kw))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * jitter)
    return model.eval()


def batch(lengths: list[int], seed: int = 0, pad_id: int = 0):
    g = torch.Generator().manual_seed(seed)
    L = max(lengths)
    ids = torch.randint(3, V, (len(lengths), L), generator=g)
    mask = torch.arange(L)[None, :] < torch.tensor(lengths)[:, None]
    return ids.masked_fill(~mask, pad_id), mask


class NoEos(nn.Module):
    """Wraps a decoder so that it can never emit eos."""

    def __init__(self, decoder: SentenceDecoder):
        super().__init__()
        self.inner, self.cfg = decoder, decoder.cfg

    def empty_kv(self, *a, **kw):
        return self.inner.empty_kv(*a, **kw)

    def forward(self, ids, memory, past_kv=None):
        logits, kv = self.inner(ids, memory, past_kv)
        logits[..., self.cfg.eos_id] = float("-inf")
        return logits, kv


# ---------------------------------------------------------------- encoder


@pytest.mark.parametrize("fusion", ["sum", "weighted"])
def test_encoder_padding_invariance(fusion):
    model = random_model(fusion=fusion)
    ids, mask = batch([3, 7, 12, 1])
    with torch.no_grad():
        together = model.encoder(ids, mask)  # [4, d]
        for i, n in enumerate([3, 7, 12, 1]):
            alone = model.encoder(ids[i : i + 1, :n], mask[i : i + 1, :n])
            torch.testing.assert_close(alone[0], together[i], atol=1e-5, rtol=0)
            # garbage in the padding changes nothing
        garbage = ids.masked_fill(~mask, V - 1)
        torch.testing.assert_close(model.encoder(garbage, mask), together, atol=1e-6, rtol=0)
    assert together.shape == (4, 32)


@pytest.mark.parametrize("fusion", ["sum", "weighted"])
def test_encoder_no_nan_for_padding_and_empty_rows(fusion):
    model = random_model(fusion=fusion).train()  # gradients through padded rows too
    ids, mask = batch([4, 0, 9])
    out = model.encoder(ids, mask)
    assert torch.isfinite(out).all()
    out.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.encoder.parameters() if p.grad is not None)


def test_encode_rejects_bad_input():
    model = random_model()
    ids, mask = batch([3, 5])
    for bad in (V, -1):
        wrong = ids.clone()
        wrong[1, 2] = bad
        with pytest.raises(ValueError, match=f"token id {bad} is outside the vocabulary"):
            model.encode(wrong, mask)
    wrong = ids.clone()
    wrong[0, 4] = V + 7  # in the padding: ignored
    model.encode(wrong, mask)
    with pytest.raises(ValueError, match="max_sentence_tokens"):
        model.encode(*batch([13]))
    with pytest.raises(ValueError, match="bool"):
        model.encode(ids, mask.long())
    with pytest.raises(ValueError, match="integer"):
        model.encode(ids.float(), mask)


def test_bad_config_raises():
    with pytest.raises(ConfigError, match="divisible"):
        SentenceVAE(tiny_cfg(d_model=30, n_heads=4))
    with pytest.raises(ConfigError, match="fusion"):
        SentenceVAE(tiny_cfg(fusion="mean"))


# ---------------------------------------------------------------- teacher forcing


def test_teacher_forcing_layout():
    model = random_model()
    ids = torch.tensor([[5, 6, 7], [8, 0, 0]])
    mask = torch.tensor([[True, True, True], [True, False, False]])
    dec_in, targets = model.teacher_forcing_targets(ids, mask)
    bos, eos, pad = model.cfg.bos_id, model.cfg.eos_id, model.cfg.pad_id
    assert dec_in.tolist() == [[bos, 5, 6, 7], [bos, 8, pad, pad]]
    assert targets.tolist() == [[5, 6, 7, eos], [8, eos, -100, -100]]
    logits = model(ids, mask)
    assert logits.shape == (2, 4, V)


def test_tied_embeddings_and_param_count():
    model = SentenceVAE(tiny_cfg())
    assert model.decoder.lm_head.weight is model.decoder.tok_emb.weight
    untied = SentenceVAE(tiny_cfg(tie_embeddings=False))
    assert untied.num_parameters() - model.num_parameters() == V * 32


# ---------------------------------------------------------------- decoder cache


def test_cached_logits_match_full_forward_including_chunks():
    model = random_model()
    dec = model.decoder
    torch.manual_seed(1)
    B, T = 3, 9
    ids = torch.randint(0, V, (B, T))
    memory = torch.randn(B, 32)
    with torch.no_grad():
        full, kv_full = dec(ids, memory)
        assert kv_full.shape == (2, 2, B, 4, T, 8)
        parts, kv = [], dec.empty_kv(B)
        for lo, hi in [(0, 1), (1, 4), (4, 5), (5, 9)]:  # T>1 with P>0 included
            logits, kv = dec(ids[:, lo:hi], memory, kv)
            assert kv.shape == (2, 2, B, 4, hi, 8)
            parts.append(logits)
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-5, rtol=0)
    torch.testing.assert_close(kv, kv_full, atol=1e-5, rtol=0)


def test_cached_greedy_matches_full_recompute_and_single_rows():
    model = random_model()
    memory = model.encoder(*batch([4, 9, 2, 6], seed=3)).detach()
    cached = decode_sentences(model.decoder, memory, 12)
    assert cached == decode_full_recompute(model.decoder, memory, 12)
    assert sum(len(s) for s in cached) > 4  # not all empty: the test says something
    for i in range(4):  # batch-aware: finished rows leaving the batch change nothing for the rest
        assert decode_sentences(model.decoder, memory[i : i + 1], 12) == [cached[i]]
    assert all(model.cfg.eos_id not in s for s in cached)


def test_max_length_cap_stops():
    model = random_model()
    dec = NoEos(model.decoder)
    memory = torch.randn(3, 32)
    assert [len(s) for s in decode_sentences(dec, memory, 5)] == [5, 5, 5]
    # beyond max_sentence_tokens there are no positions left: the cap is max_sentence_tokens
    assert [len(s) for s in decode_sentences(dec, memory, 100)] == [12, 12, 12]
    assert [len(s) for s in decode_full_recompute(dec, memory, 100)] == [12, 12, 12]
    sampled = decode_sentences(dec, memory, 100, SamplingConfig(temperature=1.0, seed=0))
    assert [len(s) for s in sampled] == [12, 12, 12]
    assert decode_sentences(dec, memory, 0) == [[], [], []]
    with pytest.raises(ValueError):
        decode_sentences(dec, memory, -1)


# ---------------------------------------------------------------- sampling


def test_seeded_sampling_reproducible_and_seed_dependent():
    model = random_model()
    dec = NoEos(model.decoder)
    memory = torch.randn(4, 32)
    s = SamplingConfig(temperature=1.5, top_p=0.95, seed=123)
    a = decode_sentences(dec, memory, 10, s)
    assert a == decode_sentences(dec, memory, 10, s)
    assert a == decode_full_recompute(dec, memory, 10, s)  # same random draws, same logits
    assert a != decode_sentences(dec, memory, 10, SamplingConfig(temperature=1.5, top_p=0.95, seed=124))


def test_top_k_1_and_tiny_top_p_equal_greedy():
    model = random_model()
    memory = torch.randn(4, 32)
    greedy = decode_sentences(model.decoder, memory, 12)
    assert decode_sentences(model.decoder, memory, 12, SamplingConfig(temperature=2.0, top_k=1, seed=5)) == greedy
    assert decode_sentences(model.decoder, memory, 12, SamplingConfig(temperature=2.0, top_p=1e-6, seed=5)) == greedy


def test_pick_next_filters():
    logits = torch.tensor([[0.0, 3.0, 2.0, 1.0]]).repeat(200, 1)
    g = torch.Generator().manual_seed(0)
    assert set(pick_next(logits, SamplingConfig(temperature=1.0, top_k=2), g).tolist()) == {1, 2}
    # probs ~ [.03, .64, .24, .09]: top_p=0.8 keeps {1, 2}
    assert set(pick_next(logits, SamplingConfig(temperature=1.0, top_p=0.8), g).tolist()) == {1, 2}
    assert pick_next(logits, SamplingConfig(), g).tolist() == [1] * 200


@pytest.mark.parametrize("kw", [dict(temperature=-0.1), dict(temperature=float("nan")), dict(top_p=0.0),
                                dict(top_p=1.5), dict(top_k=-1), dict(top_k=2.5), dict(seed=-3), dict(seed="x")])
def test_sampling_config_validation(kw):
    with pytest.raises(ValueError):
        SamplingConfig(**kw)


# ---------------------------------------------------------------- losses


def test_focal_loss():
    torch.manual_seed(0)
    logits = torch.randn(3, 5, V) * 3
    targets = torch.randint(0, V, (3, 5))
    targets[0, 3:] = -100
    ce = token_loss(logits, targets, "ce")
    ref = nn.functional.cross_entropy(logits.reshape(-1, V), targets.reshape(-1), ignore_index=-100)
    torch.testing.assert_close(ce, ref)
    torch.testing.assert_close(token_loss(logits, targets, "focal", gamma=0.0), ce)
    assert token_loss(logits, targets, "focal", gamma=2.0) < ce
    nll, count = token_nll_sum(logits, targets)
    assert int(count) == 13
    torch.testing.assert_close(nll / count, ce)
    # all ignored: 0, not NaN; focal gradient finite even where p == 1
    assert token_loss(logits, torch.full_like(targets, -100), "focal").item() == 0.0
    sure = torch.full((1, 2, V), -1e4)
    sure[..., 7] = 1e4
    sure.requires_grad_(True)
    token_loss(sure, torch.tensor([[7, -100]]), "focal", gamma=2.0).backward()
    assert torch.isfinite(sure.grad).all()
    with pytest.raises(ValueError):
        token_loss(logits, targets, "mse")


def test_loss_under_bf16_autocast():
    model = random_model()
    ids, mask = batch([3, 6])
    _, targets = model.teacher_forcing_targets(ids, mask)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(ids, mask)
        loss = token_loss(logits, targets, "focal")
    assert logits.dtype == torch.bfloat16 and loss.dtype == torch.float32 and math.isfinite(loss.item())
    loss.backward()


# ---------------------------------------------------------------- learning


@pytest.mark.parametrize("fusion", ["sum", "weighted"])
def test_tiny_model_overfits_four_sentences(fusion):
    torch.manual_seed(0)
    cfg = tiny_cfg(encoder_layers=1, decoder_layers=1, fusion=fusion)
    model = SentenceVAE(cfg)
    sentences = [[5, 9, 13], [20, 21, 22, 23, 24, 25], [7, 7, 30, 31, 7], [40, 3, 44, 12, 49, 18, 33]]
    lengths = [len(s) for s in sentences]
    ids = torch.zeros(4, max(lengths), dtype=torch.long)
    for i, s in enumerate(sentences):
        ids[i, : len(s)] = torch.tensor(s)
    mask = torch.arange(ids.shape[1])[None, :] < torch.tensor(lengths)[:, None]
    _, targets = model.teacher_forcing_targets(ids, mask)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step in range(400):
        loss = token_loss(model(ids, mask), targets)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 50 == 49 and loss.item() < 0.01:
            break
    assert model.reconstruct(ids, mask) == sentences
    assert model.training  # reconstruct restores the mode

