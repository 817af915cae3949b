"""OPT decoder blocks that read sentence vectors instead of token embeddings (paper Eq. 7),
with the termination head (Eq. 8).

OPT's token embedding is dropped. The sentence vectors enter the blocks at the hidden
size, so `project_in` / `project_out` (OPT-350M's word_embed_proj_dim != hidden_size)
are dropped with it: they only map token embeddings to and from the hidden width.
What is kept: learned positions, every decoder block, the final LayerNorm (None for the
post-LN OPT-350M), and a new 2-way linear head (0 = decode another sentence, 1 = stop).
"""
from __future__ import annotations

import inspect
import json
from pathlib import Path

import torch
from torch import nn
from transformers import OPTConfig, OPTForCausalLM
from transformers.cache_utils import DynamicCache
from transformers.masking_utils import create_causal_mask

from modeling.config import ConfigError, OPTSpec

STOP = 1  # termination head class that ends generation (Eq. 9: argmax 1); 0 = decode another sentence
# transformers 5.24 renamed the KV-cache argument and output field `past_key_values` -> `cache`;
# pass and read whichever this install uses (the old name warns, then goes away in 5.40)
CACHE_KWARG = "cache" if "cache" in inspect.signature(create_causal_mask).parameters else "past_key_values"


def output_cache(out):
    """The KV cache of a transformers model output, under either field name."""
    return getattr(out, CACHE_KWARG)


def opt_config_from_spec(spec: OPTSpec, vocab_size: int, pad_id: int = 1, bos_id: int = 2,
                         eos_id: int = 2) -> OPTConfig:
    """An OPTConfig for a model trained from scratch here."""
    return OPTConfig(
        vocab_size=vocab_size, hidden_size=spec.hidden_size, num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads, ffn_dim=spec.ffn_dim,
        max_position_embeddings=spec.max_position_embeddings,
        word_embed_proj_dim=spec.word_embed_proj_dim or spec.hidden_size,
        do_layer_norm_before=spec.do_layer_norm_before, dropout=spec.dropout, attention_dropout=spec.dropout,
        pad_token_id=pad_id, bos_token_id=bos_id, eos_token_id=eos_id, enable_bias=True,
    )


def read_opt_config(path: Path) -> OPTConfig:
    """An OPTConfig saved as JSON (beside a checkpoint or in a cloud bundle), set to eager attention."""
    try:
        config = OPTConfig.from_dict(json.loads(Path(path).read_text()))
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path} is missing or corrupt ({e})") from None
    config._attn_implementation = "eager"
    return config


def load_opt(spec: OPTSpec, vocab_size: int, pad_id: int = 1, bos_id: int = 2, eos_id: int = 2) -> OPTForCausalLM:
    """`spec.pretrained` through from_pretrained (local files only), else a fresh model."""
    if spec.pretrained:
        path = Path(spec.pretrained)
        if not (path / "config.json").is_file():
            raise ConfigError(f"opt.pretrained={spec.pretrained!r} is not a Hugging Face checkpoint directory "
                              "(no config.json)")
        try:
            model = OPTForCausalLM.from_pretrained(str(path), local_files_only=True, attn_implementation="eager")
        except (OSError, ValueError) as e:
            raise ConfigError(f"cannot load the OPT checkpoint in {path}: {e}") from None
        if model.config.model_type != "opt":
            raise ConfigError(f"{path} holds a {model.config.model_type!r} model, not OPT")
        return model.float()
    cfg = opt_config_from_spec(spec, vocab_size, pad_id, bos_id, eos_id)
    cfg._attn_implementation = "eager"
    return OPTForCausalLM(cfg)


class GraftedOPT(nn.Module):
    """Sentence vectors [B, T, d] -> hidden states [B, T, d] and stop logits [B, T, 2].

    With a cache: `past` holds the keys/values of the P sentences seen so far;
    `attention_mask` [B, P+T] marks real sentences (1) and padding (0) over past and new.
    """

    def __init__(self, config: OPTConfig, decoder: nn.Module | None = None):
        super().__init__()
        if decoder is None:
            decoder = OPTForCausalLM(config).model.decoder
        self.config = config
        self.hidden_size = config.hidden_size
        self.embed_positions = decoder.embed_positions  # learned, offset 2 (as in OPT)
        self.layers = decoder.layers
        self.final_layer_norm = decoder.final_layer_norm  # None for post-LN OPT (350M)
        self.stop_head = nn.Linear(config.hidden_size, 2)  # Eq. 8
        nn.init.normal_(self.stop_head.weight, std=0.02)
        nn.init.zeros_(self.stop_head.bias)

    @classmethod
    def from_causal_lm(cls, model: OPTForCausalLM) -> "GraftedOPT":
        return cls(model.config, model.model.decoder)

    @property
    def max_sentences(self) -> int:
        return self.config.max_position_embeddings

    def new_cache(self) -> DynamicCache:
        return DynamicCache(config=self.config)

    def forward(self, vectors: torch.Tensor, attention_mask: torch.Tensor | None = None,
                past: DynamicCache | None = None, position_ids: torch.Tensor | None = None):
        B, T, d = vectors.shape
        P = past.get_seq_length() if past is not None else 0
        if attention_mask is None:
            attention_mask = torch.ones(B, P + T, dtype=torch.long, device=vectors.device)
        attention_mask = attention_mask.long()  # [B, P+T]
        if position_ids is None:
            # count real sentences only, so left or right padding does not move positions
            position_ids = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)[:, P:]  # [B, T]
        # Always build the mask: with attention_mask=None, eager attention would drop causality.
        mask = create_causal_mask(config=self.config, inputs_embeds=vectors, attention_mask=attention_mask,
                                  position_ids=position_ids, allow_is_causal_skip=False, **{CACHE_KWARG: past})
        x = vectors + self.embed_positions(attention_mask, P, position_ids=position_ids).to(vectors.dtype)
        for layer in self.layers:
            x = layer(x, attention_mask=mask, use_cache=past is not None, position_ids=position_ids,
                      **{CACHE_KWARG: past})  # [B, T, d]
        if self.final_layer_norm is not None:
            x = self.final_layer_norm(x)
        return x, self.stop_head(x)  # [B, T, d], [B, T, 2]
