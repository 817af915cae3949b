"""Grafted OPT blocks equal Hugging Face's own OPT decoder on the same inputs_embeds."""
import pytest
import torch
from transformers import OPTForCausalLM

from sllm.modeling.config import ConfigError, OPTSpec
from sllm.modeling.opt_graft import GraftedOPT, load_opt, opt_config_from_spec


def _tiny_opt(**overrides) -> OPTForCausalLM:
    torch.manual_seed(0)
    cfg = opt_config_from_spec(OPTSpec(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, ffn_dim=64,
                                       max_position_embeddings=64), vocab_size=50)
    for k, v in overrides.items():
        setattr(cfg, k, v)
    cfg._attn_implementation = "eager"
    return OPTForCausalLM(cfg).eval()


def _hf_hidden(model: OPTForCausalLM, embeds: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    return model.model.decoder(inputs_embeds=embeds, attention_mask=mask).last_hidden_state


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_full_sequence_matches_hf(attn):
    model = _tiny_opt()
    model.config._attn_implementation = attn
    graft = GraftedOPT.from_causal_lm(model).eval()
    x = torch.randn(3, 7, 32)
    with torch.no_grad():
        ours, stop = graft(x)
        ref = _hf_hidden(model, x)
    assert stop.shape == (3, 7, 2)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)


def test_chunked_with_kv_cache_matches_full():
    model = _tiny_opt()
    graft = GraftedOPT.from_causal_lm(model).eval()
    x = torch.randn(2, 9, 32)
    with torch.no_grad():
        ref = _hf_hidden(model, x)
        slots, parts = [graft.new_slot() for _ in range(2)], []
        for a, b in [(0, 4), (4, 5), (5, 9)]:  # a prefill, one step, a chunk
            h, _ = graft.step([x[0, a:b], x[1, a:b]], slots)
            for s in slots:
                s.length += b - a
            parts.append(h.view(2, b - a, -1))  # rows of sequence 0, then of sequence 1
    torch.testing.assert_close(torch.cat(parts, dim=1), ref, atol=1e-5, rtol=0)
    assert [s.length for s in slots] == [9, 9] and slots[0].capacity >= 9


def test_causal_future_sentences_do_not_change_the_past():
    graft = GraftedOPT.from_causal_lm(_tiny_opt()).eval()
    x = torch.randn(1, 6, 32)
    y = x.clone()
    y[:, 4:] = torch.randn(1, 2, 32)
    with torch.no_grad():
        hx, _ = graft(x)
        hy, _ = graft(y)
    torch.testing.assert_close(hx[:, :4], hy[:, :4], atol=1e-6, rtol=0)
    assert not torch.allclose(hx[:, 4:], hy[:, 4:])


def test_padding_sentences_change_nothing():
    graft = GraftedOPT.from_causal_lm(_tiny_opt()).eval()
    a = torch.randn(1, 3, 32)
    batch = torch.cat([torch.cat([a, torch.randn(1, 2, 32)], dim=1), torch.randn(1, 5, 32)])  # a right-padded
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    with torch.no_grad():
        alone, stop_alone = graft(a)
        padded, stop_padded = graft(batch, attention_mask=mask)
        left = torch.cat([torch.randn(1, 2, 32), a], dim=1)  # left padding (the cloud batches this way)
        left_h, _ = graft(left, attention_mask=torch.tensor([[0, 0, 1, 1, 1]]))
    torch.testing.assert_close(padded[0, :3], alone[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(stop_padded[0, :3], stop_alone[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(left_h[0, 2:], alone[0], atol=1e-5, rtol=0)


def test_post_layernorm_opt_with_projection_grafts_without_projections():
    # OPT-350M's shape: post-LN blocks, no final LayerNorm, word_embed_proj_dim != hidden_size
    model = _tiny_opt()
    cfg = model.config
    cfg.do_layer_norm_before, cfg.word_embed_proj_dim = False, 16
    torch.manual_seed(1)
    model = OPTForCausalLM(cfg).eval()
    assert model.model.decoder.project_in is not None and model.model.decoder.final_layer_norm is None
    graft = GraftedOPT.from_causal_lm(model).eval()
    assert not any(k.startswith("project") for k in graft.state_dict())
    x = torch.randn(2, 5, 32)  # vectors at the hidden size, not at word_embed_proj_dim
    dec = model.model.decoder
    dec.project_in, dec.project_out = None, None  # the reference without the token-side projections
    with torch.no_grad():
        torch.testing.assert_close(graft(x)[0], _hf_hidden(model, x), atol=1e-5, rtol=0)


def test_saved_pretrained_opt_loads_and_grafts(tmp_path):
    model = _tiny_opt()
    model.save_pretrained(tmp_path / "opt")
    spec = OPTSpec(pretrained=str(tmp_path / "opt"))
    loaded = load_opt(spec, vocab_size=999)  # the checkpoint's own vocabulary wins
    assert loaded.config.vocab_size == 50
    graft = GraftedOPT.from_causal_lm(loaded).eval()
    x = torch.randn(1, 4, 32)
    with torch.no_grad():
        torch.testing.assert_close(graft(x)[0], _hf_hidden(model, x), atol=1e-5, rtol=0)


def test_bad_pretrained_paths_are_clear_errors(tmp_path):
    with pytest.raises(ConfigError, match="no config.json"):
        load_opt(OPTSpec(pretrained=str(tmp_path)), vocab_size=10)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="cannot load the OPT checkpoint"):
        load_opt(OPTSpec(pretrained=str(tmp_path)), vocab_size=10)
