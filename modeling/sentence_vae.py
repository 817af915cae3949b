"""SentenceVAE (paper Eq. 1-5): a sentence encoder that fuses a sentence's tokens into one
vector, and a sentence decoder that rebuilds the tokens from that vector.

`SentenceEncoder.forward` and `SentenceDecoder.forward` are the graphs exported to ONNX:
tensors in, tensors out, no data-dependent Python control flow. Input checks live in
the non-exported wrapper `SentenceVAE.encode`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sllm.modeling.config import SentenceVAEConfig
from sllm.modeling.generate import decode_sentences
from sllm.modeling.layers import DecoderBlock, EncoderBlock, init_weights
from sllm.runtime.svae_onnx import pad_batch

IGNORE_INDEX = -100


class SentenceEncoder(nn.Module):
    """ids [B, L] + mask [B, L] (True = real token) -> one sentence vector [B, d] per row."""

    def __init__(self, cfg: SentenceVAEConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        d = cfg.d_model
        self.tok_emb = nn.Embedding(cfg.vocab_size, d)
        self.pos_emb = nn.Embedding(cfg.max_sentence_tokens, d)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(
            EncoderBlock(d, cfg.n_heads, cfg.ffn_dim, cfg.dropout) for _ in range(cfg.encoder_layers))
        self.score = nn.Linear(d, 1) if cfg.fusion == "weighted" else None  # learned fusion weights
        self.ln = nn.LayerNorm(d)  # Eq. 3: LayerNorm of the fused vector
        init_weights(self, cfg.encoder_layers)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        B, L = ids.shape
        mask = mask.to(torch.bool)  # [B, L]
        ids = ids.masked_fill(~mask, self.cfg.pad_id)  # whatever sits in padding stays in range
        pos = torch.arange(L, device=ids.device)  # [L]
        x = self.drop(self.tok_emb(ids) + self.pos_emb(pos))  # [B, L, d]
        # key padding mask; a row with no real token attends to everything (no NaN, result unused)
        keys = mask | ~mask.any(dim=1, keepdim=True)  # [B, L]
        attn_mask = keys[:, None, None, :]  # [B, 1, 1, L]
        for block in self.blocks:
            x = block(x, attn_mask)  # [B, L, d]
        m = mask.unsqueeze(-1).to(x.dtype)  # [B, L, 1]
        if self.score is None:  # "sum": Eq. 3, over real tokens only
            fused = (x * m).sum(dim=1)  # [B, d]
        else:  # "weighted": masked softmax of a learned per-token score
            s = self.score(x).squeeze(-1).float()  # [B, L]
            s = s.masked_fill(~mask, torch.finfo(s.dtype).min)
            w = F.softmax(s, dim=-1) * mask  # [B, L]; all-padding rows give 0, not NaN
            fused = (w.unsqueeze(-1).to(x.dtype) * x).sum(dim=1)  # [B, d]
        return self.ln(fused)  # [B, d]


class SentenceDecoder(nn.Module):
    """Causal token decoder conditioned on one sentence vector through cross-attention.

    forward(ids [B, T], memory [B, d], past_kv [n_layers, 2, B, H, P, hd] | None)
      -> logits [B, T, V], new_kv [n_layers, 2, B, H, P+T, hd]
    Position of ids[:, t] is P + t (position 0 is bos).
    """

    def __init__(self, cfg: SentenceVAEConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        d = cfg.d_model
        self.n_layers, self.n_heads, self.head_dim = cfg.decoder_layers, cfg.n_heads, d // cfg.n_heads
        self.tok_emb = nn.Embedding(cfg.vocab_size, d)
        self.pos_emb = nn.Embedding(cfg.max_sentence_tokens + 1, d)  # bos + up to max tokens
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(
            DecoderBlock(d, cfg.n_heads, cfg.ffn_dim, cfg.dropout) for _ in range(cfg.decoder_layers))
        self.ln_f = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, cfg.vocab_size, bias=False)
        init_weights(self, cfg.decoder_layers)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight

    def empty_kv(self, batch: int, dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None) -> torch.Tensor:
        """The P = 0 cache: [n_layers, 2, batch, H, 0, hd]."""
        w = self.tok_emb.weight
        return torch.zeros(self.n_layers, 2, batch, self.n_heads, 0, self.head_dim,
                           dtype=dtype or w.dtype, device=device or w.device)

    def forward(self, ids: torch.Tensor, memory: torch.Tensor, past_kv: torch.Tensor | None = None):
        B, T = ids.shape
        if past_kv is None:
            past_kv = self.empty_kv(B, memory.dtype, ids.device)
        P = past_kv.shape[4]
        pos = torch.arange(T, device=ids.device) + P  # [T] absolute positions
        x = self.drop(self.tok_emb(ids) + self.pos_emb(pos))  # [B, T, d]
        # causal mask over cache + new keys: query at position p sees keys 0..p
        key_pos = torch.arange(P + T, device=ids.device)  # [P+T]
        attn_mask = key_pos[None, :] <= pos[:, None]  # [T, P+T]
        mem = memory.unsqueeze(1)  # [B, 1, d]: a memory of length 1 (the sentence vector)
        new_kv = []
        for i, block in enumerate(self.blocks):
            x, k, v = block(x, mem, attn_mask, past_kv[i, 0], past_kv[i, 1])
            new_kv.append(torch.stack((k, v)))  # [2, B, H, P+T, hd]
        logits = self.lm_head(self.ln_f(x))  # [B, T, V]
        return logits, torch.stack(new_kv)  # [n_layers, 2, B, H, P+T, hd]


class SentenceVAE(nn.Module):
    def __init__(self, cfg: SentenceVAEConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.encoder = SentenceEncoder(cfg)
        self.decoder = SentenceDecoder(cfg)

    def teacher_forcing_targets(self, ids: torch.Tensor, mask: torch.Tensor):
        """Right-padded ids/mask [B, L] -> dec_in [B, L+1] = bos + tokens (pad after),
        targets [B, L+1] = tokens + eos at position len, -100 elsewhere."""
        B, L = ids.shape
        mask = mask.to(torch.bool)
        lengths = mask.sum(dim=1)  # [B]
        bos = torch.full((B, 1), self.cfg.bos_id, dtype=ids.dtype, device=ids.device)
        dec_in = torch.cat((bos, ids.masked_fill(~mask, self.cfg.pad_id)), dim=1)  # [B, L+1]
        targets = torch.cat((ids.masked_fill(~mask, IGNORE_INDEX),
                             torch.full((B, 1), IGNORE_INDEX, dtype=ids.dtype, device=ids.device)), dim=1)
        targets[torch.arange(B, device=ids.device), lengths] = self.cfg.eos_id  # [B, L+1]
        return dec_in, targets

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Teacher-forced reconstruction: ids, mask [B, L] -> logits [B, L+1, V]."""
        memory = self.encoder(ids, mask)  # [B, d]
        dec_in, _ = self.teacher_forcing_targets(ids, mask)
        logits, _ = self.decoder(dec_in, memory)
        return logits

    def check_batch(self, ids: torch.Tensor, mask: torch.Tensor) -> None:
        """Raise ValueError for a batch the encoder cannot take (shape, dtype, length, ids)."""
        if ids.dim() != 2 or mask.shape != ids.shape:
            raise ValueError(f"ids and mask must both be [batch, length]; got {tuple(ids.shape)} and {tuple(mask.shape)}")
        if ids.dtype.is_floating_point or ids.dtype == torch.bool or ids.is_complex():
            raise ValueError(f"ids must be an integer tensor, got {ids.dtype}")
        if mask.dtype != torch.bool:
            raise ValueError(f"mask must be a bool tensor (True = real token), got {mask.dtype}")
        if ids.shape[1] > self.cfg.max_sentence_tokens:
            raise ValueError(f"sentences of {ids.shape[1]} tokens exceed max_sentence_tokens="
                             f"{self.cfg.max_sentence_tokens}; truncate or split them first")
        real = ids[mask]
        if real.numel() and (int(real.min()) < 0 or int(real.max()) >= self.cfg.vocab_size):
            bad = real[(real < 0) | (real >= self.cfg.vocab_size)][0]
            raise ValueError(f"token id {int(bad)} is outside the vocabulary [0, {self.cfg.vocab_size})")

    def encode(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Checked encoder call: ids, mask [B, L] -> sentence vectors [B, d]."""
        self.check_batch(ids, mask)
        return self.encoder(ids, mask)

    @torch.inference_mode()
    def reconstruct(self, ids: torch.Tensor, mask: torch.Tensor, max_tokens: int | None = None,
                    sampling=None) -> list[list[int]]:
        """Encode then decode (greedy unless `sampling` says otherwise)."""
        was_training = self.training
        self.eval()
        try:
            memory = self.encode(ids, mask)
            limit = self.cfg.max_sentence_tokens if max_tokens is None else max_tokens
            return decode_sentences(self.decoder, memory, limit, sampling)
        finally:
            self.train(was_training)

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        """Unique parameters (a tied output layer counts once)."""
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            for emb in (self.encoder.tok_emb, self.encoder.pos_emb, self.decoder.tok_emb, self.decoder.pos_emb):
                n -= emb.weight.numel()
        return n


def pad_token_lists(token_lists: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token id lists -> ids [B, Lmax] right-padded with pad_id, mask bool [B, Lmax] (True = real token)."""
    ids, mask = pad_batch(token_lists, pad_id)
    return torch.from_numpy(ids), torch.from_numpy(mask)
