"""OPT decoder blocks that read sentence vectors instead of token embeddings (paper Eq. 7),
with the termination head (Eq. 8).

OPT's token embedding is dropped. The sentence vectors enter the blocks at the hidden
size, so `project_in` / `project_out` (OPT-350M's word_embed_proj_dim != hidden_size)
are dropped with it: they only map token embeddings to and from the hidden width.
What is kept: learned positions, every decoder block, the final LayerNorm (None for the
post-LN OPT-350M), and a new 2-way linear head (0 = decode another sentence, 1 = stop).
The blocks are our own plain code (modeling.opt_block) under Hugging Face's parameter names:
an OPT checkpoint's weights load into them as they are, and tests/test_graft.py checks the
outputs against Hugging Face's own decoder.
"""
from __future__ import annotations

import json
from itertools import accumulate
from pathlib import Path

import torch
from torch import nn
from transformers import OPTConfig, OPTForCausalLM

from sllm.modeling.config import ConfigError, OPTSpec
from sllm.modeling.opt_block import SHORT_CONTEXT, KVSlot, KVView, OPTBlock, PaddedPast

STOP = 1  # termination head class that ends generation (Eq. 9: argmax 1); 0 = decode another sentence
POSITION_OFFSET = 2  # OPT's learned positions start at row 2 of the table (a quirk of its pretraining)


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

    `forward` takes a padded batch (training); `step` runs new sentences of many sequences on top
    of their KVSlots (inference: the cloud engine and the torch reference generator).
    """

    def __init__(self, config: OPTConfig, decoder: nn.Module | None = None):
        super().__init__()
        self.config = config
        self.hidden_size = d = config.hidden_size
        self.heads = config.num_attention_heads
        self.embed_positions = nn.Embedding(config.max_position_embeddings + POSITION_OFFSET, d)
        self.layers = nn.ModuleList(OPTBlock.from_config(config) for _ in range(config.num_hidden_layers))
        # OPT-350M is post-LN and has no final LayerNorm
        final_norm = config.do_layer_norm_before and not getattr(config, "_remove_final_layer_norm", False)
        self.final_layer_norm = nn.LayerNorm(d, elementwise_affine=config.layer_norm_elementwise_affine) \
            if final_norm else None
        self.stop_head = nn.Linear(d, 2)  # Eq. 8
        self.apply(lambda m: _init(m, config.init_std))
        nn.init.normal_(self.stop_head.weight, std=0.02)
        if decoder is not None:  # a Hugging Face OPTDecoder: same parameter names, so its weights load as they are
            own = {k: v for k, v in decoder.state_dict().items() if not k.startswith(("embed_tokens.", "project_"))}
            missing, unexpected = self.load_state_dict(own, strict=False)
            if unexpected or any(not k.startswith("stop_head.") for k in missing):
                raise ConfigError(f"this OPT decoder does not fit the graft (missing {missing}, unexpected {unexpected})")
        self.padded_scratch: torch.Tensor | None = None  # see _scratch

    @classmethod
    def from_causal_lm(cls, model: OPTForCausalLM) -> "GraftedOPT":
        return cls(model.config, model.model.decoder)

    @property
    def max_sentences(self) -> int:
        return self.config.max_position_embeddings

    def new_slot(self) -> KVSlot:
        p = self.stop_head.weight
        return KVSlot(len(self.layers), self.heads, self.hidden_size // self.heads, self.max_sentences,
                      p.dtype, p.device)

    def _out(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.final_layer_norm is not None:
            x = self.final_layer_norm(x)
        return x, self.stop_head(x)

    def forward(self, vectors: torch.Tensor, attention_mask: torch.Tensor | None = None):
        """vectors [B, T, d], attention_mask [B, T] (1 = real sentence, left or right padding)."""
        B, T, d = vectors.shape
        if attention_mask is None:
            attention_mask = torch.ones(B, T, dtype=torch.long, device=vectors.device)
        real = attention_mask.bool()  # [B, T]
        positions = (real.long().cumsum(dim=1) - 1).clamp(min=0)  # count real sentences only: padding moves nothing
        causal = torch.ones(T, T, dtype=torch.bool, device=vectors.device).tril()
        # a padded query may see itself, so its row stays finite (its output is never used)
        mask = (causal & real[:, None, None, :]) | torch.eye(T, dtype=torch.bool, device=vectors.device)  # [B,1,T,T]
        x = vectors + self.embed_positions(positions + POSITION_OFFSET).to(vectors.dtype)
        for layer in self.layers:
            x = layer(x, mask)  # [B, T, d]
        return self._out(x)  # [B, T, d], [B, T, 2]

    def step(self, news: list[torch.Tensor], slots: list[KVSlot]) -> tuple[torch.Tensor, torch.Tensor]:
        """news[i] [T_i, d]: the next sentences of sequence i, at positions slots[i].length onwards ->
        (hidden [N, d], stop logits [N, 2]): the rows of every sequence's new sentences in turn
        (N = sum T_i). Writes their keys/values into the slots; the caller advances `slot.length` by
        T_i when it keeps the step."""
        sizes = [len(v) for v in news]
        for slot, T in zip(slots, sizes):
            slot.reserve(T)
        spans = list(zip(accumulate(sizes, initial=0), sizes))  # (start row, T) per sequence
        x = torch.cat(news)  # [N, d]
        positions = torch.tensor([p for s, T in zip(slots, sizes) for p in range(s.length, s.length + T)],
                                 dtype=torch.long, device=x.device)  # [N]
        x = x + self.embed_positions(positions + POSITION_OFFSET).to(x.dtype)
        views = [s.view() for s in slots]
        short = len(x) == len(slots) and max(s.length for s in slots) < SHORT_CONTEXT
        past = PaddedPast(views, self._scratch(views)) if short else None
        for i, layer in enumerate(self.layers):
            x = layer.step(x, spans, views, i, past)  # [N, d]
        if past is not None:
            past.write_back()
        return self._out(x)  # [N, d], [N, 2]

    def _scratch(self, slots: list[KVView]) -> torch.Tensor:
        """Room for a PaddedPast of these slots (1-D), kept between steps and grown to the largest seen:
        at most max_batch x SHORT_CONTEXT positions of keys/values. One step at a time uses it (the cloud's
        model thread)."""
        buf, like, n = self.padded_scratch, slots[0].buf, PaddedPast.size(slots)
        if buf is None or len(buf) < n or buf.dtype != like.dtype or buf.device != like.device:
            buf = self.padded_scratch = torch.empty(n, dtype=like.dtype, device=like.device)
        return buf


def _init(module: nn.Module, std: float) -> None:
    """OPT's initialisation (a model trained from scratch starts where Hugging Face's would)."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, std=std)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)
