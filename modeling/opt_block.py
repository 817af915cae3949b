"""One OPT decoder block as plain model code, and the preallocated KV cache it steps with.

The parameter names are Hugging Face's `OPTDecoderLayer`'s (self_attn.{q,k,v,out}_proj,
self_attn_layer_norm, fc1, fc2, final_layer_norm), so OPT checkpoints and our cloud bundles
load unchanged; tests/test_graft.py checks the outputs against Hugging Face's own layers.

Two ways through a block:
    forward(x [B, T, d], mask, extend=None)   a whole padded batch (training, evaluation); with
                                               `extend`, after cached positions the caller keeps
                                               (the ONNX baseline's past, a hand-stepped cache)
    step(x [N, d], spans, slots, layer, past)  cached inference over a ragged batch: N = sum of
                                               the new positions of every sequence, each with
                                               its own KVSlot; keys/values are written in place
                                               and attention reads a view of each slot's valid
                                               length (no padding, no copy of anyone's past);
                                               with `past` (PaddedPast: one new position each,
                                               short contexts), one padded copy of every slot's
                                               past per step, shared by all layers
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pad_sequence
from transformers.activations import ACT2FN


# extend(k, v) with the new positions' keys/values [B, H, T, hd] -> all of them [B, H, P+T, hd]
KVExtend = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


class KVSlot:
    """One sequence's keys and values for every layer: buf [layers, 2, heads, capacity, head_dim].

    Positions < `length` are valid. A step writes its new positions after `length` and the caller
    advances `length` when it keeps the step, so a failed or cancelled step leaves nothing behind.
    The buffer grows by half when full (amortised O(1) per position); `truncate` rolls back."""

    GROWTH = 1.5
    MIN_CAPACITY = 16

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
        """Bytes allocated (capacity, up to 1.5x the valid positions)."""
        return 0 if self.buf is None else self.buf.numel() * self.buf.element_size()

    @property
    def used_bytes(self) -> int:
        """Bytes of the valid positions (what the server's KV budget counts)."""
        return 0 if self.buf is None else self.nbytes // self.capacity * self.length

    def reserve(self, n: int) -> None:
        """Room for n positions after `length` (one copy when the buffer grows)."""
        need = self.length + n
        if need > self.max_length:
            raise ValueError(f"{need} positions exceed this model's {self.max_length}")
        if need <= self.capacity:
            return
        capacity = min(self.max_length, max(need, self.MIN_CAPACITY, int(self.capacity * self.GROWTH)))
        L, two, H, hd = self.shape
        buf = torch.empty(L, two, H, capacity, hd, dtype=self.dtype, device=self.device)
        if self.length:
            buf[:, :, :, :self.length] = self.buf[:, :, :, :self.length]
        self.buf = buf

    def truncate(self, n: int) -> None:
        """Keep the first n positions (a rollback; the memory stays for the positions to come)."""
        if not 0 <= n <= self.length:
            raise ValueError(f"cannot truncate {self.length} positions to {n}")
        self.length = n

    def shrink(self) -> None:
        """After a rollback: give back the memory beyond twice the valid positions (a slot keeps what
        its longest past needed otherwise, and many rolled-back slots hold far more than they use)."""
        keep = max(self.MIN_CAPACITY, 2 * self.length)
        if self.capacity <= keep:
            return
        L, two, H, hd = self.shape
        buf = torch.empty(L, two, H, keep, hd, dtype=self.dtype, device=self.device)
        buf[:, :, :, :self.length] = self.buf[:, :, :, :self.length]
        self.buf = buf

    def valid(self) -> torch.Tensor:
        """The cached positions: [layers, 2, heads, length, head_dim] (a view)."""
        L, two, H, hd = self.shape
        if self.buf is None:
            return torch.empty(L, two, H, 0, hd, dtype=self.dtype, device=self.device)
        return self.buf[:, :, :, :self.length]


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

    def step(self, x: torch.Tensor, spans: list[tuple[int, int]], slots: list[KVSlot], layer: int,
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


# One new position per sequence and short contexts: gathering every cache into one padded batch (a copy
# of B x P positions) and one attention call beats a call per sequence; past this length the copy costs
# more than the calls (measured on a CPU: 3x faster at P = 1, 3x slower at P = 256, for 64 sequences).
SHORT_CONTEXT = 64


class PaddedPast:
    """A step of one new position per slot over short contexts: every slot's cached keys/values, all
    layers, gathered into one padded batch once per step (not once per layer) and attended with a
    padding mask; the new positions' keys/values are kept per layer and written back in one call."""

    def __init__(self, slots: list[KVSlot]):
        self.slots = slots
        dev = slots[0].buf.device
        lengths = torch.tensor([s.length for s in slots], device=dev)
        past = pad_sequence([s.buf[:, :, :, :s.length].permute(3, 0, 1, 2, 4) for s in slots],
                            batch_first=True)  # [B, P, L, 2, H, hd]
        self.past = past.permute(2, 3, 0, 4, 1, 5)  # [L, 2, B, H, P, hd]
        valid = torch.arange(past.shape[1], device=dev) < lengths[:, None]  # [B, P]
        own = torch.ones(len(slots), 1, dtype=torch.bool, device=dev)  # each sees its own new position
        self.mask = torch.cat((valid, own), 1)[:, None, None, :]  # [B, 1, 1, P+1]
        self.new: list[torch.Tensor] = []  # per layer [2, H, B, hd]

    def attend(self, q: torch.Tensor, kv_new: torch.Tensor, layer: int) -> torch.Tensor:
        """q [H, B, hd], kv_new [2, H, B, hd] of `layer` (called for the layers in order) -> [H, B, hd]."""
        self.new.append(kv_new)
        kv = torch.cat((self.past[layer], kv_new.transpose(1, 2)[:, :, :, None]), dim=3)  # [2, B, H, P+1, hd]
        y = F.scaled_dot_product_attention(q.transpose(0, 1)[:, :, None], kv[0], kv[1],
                                           attn_mask=self.mask)  # [B, H, 1, hd]
        return y[:, :, 0].transpose(0, 1)

    def write_back(self) -> None:
        """The new positions' keys/values into their slots, every layer, in one call."""
        new = torch.stack(self.new)  # [L, 2, H, B, hd]
        torch._foreach_copy_([s.buf[:, :, :, s.length] for s in self.slots], list(new.unbind(3)))


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

    def step(self, x: torch.Tensor, spans: list[tuple[int, int]], slots: list[KVSlot], layer: int,
             past: PaddedPast | None = None) -> torch.Tensor:
        x = self._residual(x, lambda h: self.self_attn.step(h, spans, slots, layer, past), self.self_attn_layer_norm)
        return self._residual(x, self.mlp, self.final_layer_norm)
