"""One OPT decoder block as plain model code, and the paged KV cache it steps with.

The parameter names are Hugging Face's `OPTDecoderLayer`'s (self_attn.{q,k,v,out}_proj,
self_attn_layer_norm, fc1, fc2, final_layer_norm), so OPT checkpoints and our cloud bundles
load unchanged; tests/test_graft.py checks the outputs against Hugging Face's own layers.

Two ways through a block:
    forward(x [B, T, d], mask, extend=None)   a whole padded batch (training, evaluation); with
                                               `extend`, after cached positions the caller keeps
                                               (the ONNX baseline's past, a hand-stepped cache)
    step(x [N, d], spans, slots, layer, past)  cached inference over a ragged batch: N = sum of
                                               the new positions of every sequence, each with
                                               its own KVSlot (seen through a KVView); keys/values
                                               are written in place and attention reads a view
                                               of each slot's valid length (no padding, no copy);
                                               with `past` (PaddedPast: one new position each,
                                               short contexts), one padded copy of every slot's
                                               past per step, shared by all layers
"""
from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN


# extend(k, v) with the new positions' keys/values [B, H, T, hd] -> all of them [B, H, P+T, hd]
KVExtend = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


class KVSlot:
    """One sequence's keys and values for every layer: buf [layers, 2, heads, capacity, head_dim].

    Positions < `length` are valid. A step writes its new positions after `length` and the caller
    advances `length` when it keeps the step, so a failed or cancelled step leaves nothing behind.
    Memory comes in pages of PAGE positions and a slot holds only the pages its positions need: it
    grows by a page when full (a copy every PAGE positions) and `shrink` gives back the pages past
    `length` after a rollback, so what a server counts in sentences is what it holds, to a page."""

    PAGE = 16

    def __init__(self, layers: int, heads: int, head_dim: int, max_length: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        self.shape = (layers, 2, heads, head_dim)
        self.max_length = max_length
        self.dtype, self.device = dtype, torch.device(device)
        self.buf: torch.Tensor | None = None
        self.length = 0

    @property
    def capacity(self) -> int:
        return 0 if self.buf is None else self.buf.shape[3]

    @property
    def nbytes(self) -> int:
        """Bytes allocated: the pages held."""
        return 0 if self.buf is None else self.buf.numel() * self.buf.element_size()

    def pages(self, n: int) -> int:
        """The positions of the pages that n positions take (the last page cut at max_length)."""
        return min(self.max_length, -(-n // self.PAGE) * self.PAGE)

    def reserve(self, n: int) -> None:
        """Room for n positions after `length` (one copy when it takes a new page)."""
        need = self.length + n
        if need > self.max_length:
            raise ValueError(f"{need} positions exceed this model's {self.max_length}")
        if need > self.capacity:
            self._resize(self.pages(need))

    def truncate(self, n: int) -> None:
        """Keep the first n positions (a rollback; `shrink` gives the memory back when no step uses the slot)."""
        if not 0 <= n <= self.length:
            raise ValueError(f"cannot truncate {self.length} positions to {n}")
        self.length = n

    def shrink(self) -> None:
        """Give back the pages past `length` (after a rollback)."""
        keep = self.pages(self.length)
        if self.capacity > keep:
            self._resize(keep)

    def _resize(self, capacity: int) -> None:
        """A buffer of `capacity` positions with the valid ones copied over (None: no positions)."""
        if not capacity:
            self.buf = None
            return
        L, two, H, hd = self.shape
        buf = torch.empty(L, two, H, capacity, hd, dtype=self.dtype, device=self.device)
        if self.length:
            buf[:, :, :, :self.length] = self.buf[:, :, :, :self.length]
        self.buf = buf

    def view(self) -> KVView:
        """What a step reads and writes: the buffer and valid length now."""
        return KVView(self.buf, self.length)

    def valid(self) -> torch.Tensor:
        """The cached positions: [layers, 2, heads, length, head_dim] (a view)."""
        L, two, H, hd = self.shape
        if self.buf is None:
            return torch.empty(L, two, H, 0, hd, dtype=self.dtype, device=self.device)
        return self.buf[:, :, :, :self.length]


class KVView(NamedTuple):
    """A slot's buffer and valid length as a step found them. A step reads and writes these, so a slot
    that changes under it (the session of a cancelled step gives its pages back) changes nothing for it."""
    buf: torch.Tensor  # [layers, 2, heads, capacity, head_dim]
    length: int


class OPTAttention(nn.Module):
    def __init__(self, d: int, heads: int, bias: bool = True, dropout: float = 0.0):
        super().__init__()
        self.heads, self.head_dim, self.dropout = heads, d // heads, dropout
        self.q_proj = nn.Linear(d, d, bias=bias)
        self.k_proj = nn.Linear(d, d, bias=bias)
        self.v_proj = nn.Linear(d, d, bias=bias)
        self.out_proj = nn.Linear(d, d, bias=bias)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, extend: KVExtend | None = None) -> torch.Tensor:
        """x [B, T, d], mask bool [B, 1, T, P+T] or [T, P+T] (True = may attend; None: all) -> [B, T, d].
        extend: prepends the P cached positions to the new keys/values (none: P = 0)."""
        B, T, d = x.shape
        q, k, v = (p(x).view(B, T, self.heads, self.head_dim).transpose(1, 2)
                   for p in (self.q_proj, self.k_proj, self.v_proj))  # [B, H, T, hd]
        if extend is not None:
            k, v = extend(k, v)  # [B, H, P+T, hd]
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                           dropout_p=self.dropout if self.training else 0.0)  # [B, H, T, hd]
        return self.out_proj(y.transpose(1, 2).reshape(B, T, d))

    def step(self, x: torch.Tensor, spans: list[tuple[int, int]], slots: list[KVView], layer: int,
             past: "PaddedPast | None" = None) -> torch.Tensor:
        """x [N, d]: rows start..start+T of span i are the new positions of slots[i] -> [N, d].
        past: the short-context batch (one new position per slot, see PaddedPast), which keeps the new
        keys/values until it writes them back; None: each slot's are written and read here."""
        N, d = x.shape
        H, hd = self.heads, self.head_dim
        q = self.q_proj(x).view(N, H, hd).transpose(0, 1)  # [H, N, hd]
        kv_new = torch.stack((self.k_proj(x), self.v_proj(x))).view(2, N, H, hd).transpose(1, 2)  # [2, H, N, hd]
        if past is not None:
            return self.out_proj(past.attend(q, kv_new, layer).transpose(0, 1).reshape(N, d))
        torch._foreach_copy_([s.buf[layer, :, :, s.length:s.length + T] for (_, T), s in zip(spans, slots)],
                             [kv_new[:, :, start:start + T] for start, T in spans])  # written in place, one call
        y = torch.empty_like(q)
        for (start, T), slot in zip(spans, slots):
            P = slot.length
            k, v = slot.buf[layer, 0, :, :P + T], slot.buf[layer, 1, :, :P + T]  # [H, P+T, hd]: views, no copy
            # new position t sees the P cached ones and new ones up to itself (bottom-right causal)
            mask = None if T == 1 else torch.ones(T, P + T, dtype=torch.bool, device=x.device).tril(P)
            y[:, start:start + T] = F.scaled_dot_product_attention(q[:, start:start + T], k, v, attn_mask=mask)
        return self.out_proj(y.transpose(0, 1).reshape(N, d))


# One new position per sequence and short contexts: copying every cache into one padded batch (B x P
# positions) and one attention call beats a call per sequence; past this length the copy costs more
# than the calls (measured on a CPU, 1 thread, for 64 sequences: 0.85x the time at P = 128, even at 256).
SHORT_CONTEXT = 128


class PaddedPast:
    """A step of one new position per slot over short contexts. Every slot's cached keys/values, all
    layers, are copied once per step (not once per layer, one call) into a padded batch whose last
    column holds each layer's new keys/values in turn; every layer attends once for all slots, with a
    mask of each slot's valid columns and the last one. The new positions go back into their slots in
    one call. `scratch` holds the batch between steps (a fresh one costs page faults on every step)."""

    def __init__(self, slots: list[KVView], scratch: torch.Tensor):
        """scratch: at least size(slots) elements, any values (1-D)."""
        self.slots = slots
        (L, two, H, _, hd), B, P = slots[0].buf.shape, len(slots), max(s.length for s in slots)
        self.batch = scratch[:self.size(slots)].view(L, two, B, H, P + 1, hd)  # contiguous per layer
        rows = self.batch.unbind(2)
        torch._foreach_copy_([r.narrow(3, 0, s.length) for r, s in zip(rows, slots)],
                             [s.buf.narrow(3, 0, s.length) for s in slots])
        # padding stays finite (a masked key gets weight 0, and 0 x inf is NaN): zeros, whatever was there
        torch._foreach_zero_([r.narrow(3, s.length, P - s.length) for r, s in zip(rows, slots)])
        dev = scratch.device
        lengths = torch.tensor([s.length for s in slots], device=dev)
        column = torch.arange(P + 1, device=dev)
        self.mask = ((column < lengths[:, None]) | (column == P))[:, None, None, :]  # [B, 1, 1, P+1]
        self.new: list[torch.Tensor] = []  # per layer [2, H, B, hd]

    @staticmethod
    def size(slots: list[KVView]) -> int:
        """Elements of the padded batch of these slots."""
        L, two, H, _, hd = slots[0].buf.shape
        return L * two * len(slots) * H * (max(s.length for s in slots) + 1) * hd

    def attend(self, q: torch.Tensor, kv_new: torch.Tensor, layer: int) -> torch.Tensor:
        """q [H, B, hd], kv_new [2, H, B, hd] of `layer` (called for the layers in order) -> [H, B, hd]."""
        self.new.append(kv_new)
        kv = self.batch[layer]  # [2, B, H, P+1, hd]
        kv.select(3, -1).copy_(kv_new.transpose(1, 2))  # the new positions, last column
        y = F.scaled_dot_product_attention(q.transpose(0, 1)[:, :, None], kv[0], kv[1],
                                           attn_mask=self.mask)  # [B, H, 1, hd]
        return y[:, :, 0].transpose(0, 1)

    def write_back(self) -> None:
        """The new positions' keys/values into their slots, every layer, in one call."""
        new = torch.stack(self.new)  # [L, 2, H, B, hd]
        torch._foreach_copy_([s.buf.select(3, s.length) for s in self.slots], list(new.unbind(3)))


class OPTBlock(nn.Module):
    """Pre-LN (OPT-125M, 1.3B, ...) or post-LN (OPT-350M) decoder block."""

    def __init__(self, d: int, heads: int, ffn: int, pre_ln: bool = True, activation: str = "relu",
                 bias: bool = True, ln_affine: bool = True, dropout: float = 0.0, attention_dropout: float = 0.0):
        super().__init__()
        self.pre_ln, self.dropout = pre_ln, dropout
        self.self_attn = OPTAttention(d, heads, bias, attention_dropout)
        self.self_attn_layer_norm = nn.LayerNorm(d, elementwise_affine=ln_affine)
        self.fc1 = nn.Linear(d, ffn, bias=bias)
        self.fc2 = nn.Linear(ffn, d, bias=bias)
        self.final_layer_norm = nn.LayerNorm(d, elementwise_affine=ln_affine)
        self.act = ACT2FN[activation]

    @classmethod
    def from_layer(cls, config, layer: nn.Module) -> "OPTBlock":
        """A copy of a Hugging Face OPTDecoderLayer (same parameter names), in eval mode."""
        block = cls.from_config(config)
        block.load_state_dict(layer.state_dict())
        return block.eval()

    @classmethod
    def from_config(cls, config) -> "OPTBlock":
        """A block shaped like `config` (an OPTConfig)."""
        return cls(config.hidden_size, config.num_attention_heads, config.ffn_dim, config.do_layer_norm_before,
                   config.activation_function, config.enable_bias, config.layer_norm_elementwise_affine,
                   config.dropout, config.attention_dropout)

    def _residual(self, x: torch.Tensor, f, norm: nn.LayerNorm) -> torch.Tensor:
        if self.pre_ln:
            return x + F.dropout(f(norm(x)), self.dropout, self.training)
        return norm(x + F.dropout(f(x), self.dropout, self.training))

    def mlp(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, extend: KVExtend | None = None) -> torch.Tensor:
        x = self._residual(x, lambda h: self.self_attn(h, mask, extend), self.self_attn_layer_norm)
        return self._residual(x, self.mlp, self.final_layer_norm)

    def step(self, x: torch.Tensor, spans: list[tuple[int, int]], slots: list[KVView], layer: int,
             past: PaddedPast | None = None) -> torch.Tensor:
        x = self._residual(x, lambda h: self.self_attn.step(h, spans, slots, layer, past), self.self_attn_layer_norm)
        return self._residual(x, self.mlp, self.final_layer_norm)
