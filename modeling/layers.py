"""Pre-LayerNorm transformer pieces for the SentenceVAE.

Plain Linear layers, reshapes and `F.scaled_dot_product_attention` only, so the
ONNX exporter sees dynamic batch / sequence lengths. No data-dependent Python
control flow in any forward.

Shapes: B batch, T query length, S key length, P cached length, d model width,
H heads, hd = d // H.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SelfAttention(nn.Module):
    """Multi-head self-attention; optionally appends to a KV cache and returns the full K, V."""

    def __init__(self, d_model: int, n_heads: int, dropout: float = 0.0):
        super().__init__()
        assert d_model % n_heads == 0
        self.n_heads, self.head_dim = n_heads, d_model // n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)  # residual projection (scaled init)
        self.dropout = dropout
        self.resid_drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None,
                past_k: torch.Tensor | None = None, past_v: torch.Tensor | None = None):
        # x [B, T, d]; attn_mask bool broadcastable to [B, H, T, S] (True = may attend)
        # past_k, past_v [B, H, P, hd] -> returns y [B, T, d], k, v [B, H, P+T, hd]
        B, T, d = x.shape
        q, k, v = self.qkv(x).split(d, dim=-1)
        q = q.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # [B, H, T, hd]
        k = k.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        v = v.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        if past_k is not None:
            k = torch.cat((past_k.to(k.dtype), k), dim=2)  # [B, H, P+T, hd]
            v = torch.cat((past_v.to(v.dtype), v), dim=2)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask,
                                           dropout_p=self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).reshape(B, T, d)  # [B, T, d]
        return self.resid_drop(self.proj(y)), k, v


class CrossAttention(nn.Module):
    """Multi-head attention from x to a memory (queries from x, keys and values from memory)."""

    def __init__(self, d_model: int, n_heads: int, dropout: float = 0.0):
        super().__init__()
        assert d_model % n_heads == 0
        self.n_heads, self.head_dim = n_heads, d_model // n_heads
        self.q = nn.Linear(d_model, d_model)
        self.kv = nn.Linear(d_model, 2 * d_model)
        self.proj = nn.Linear(d_model, d_model)  # residual projection (scaled init)
        self.dropout = dropout
        self.resid_drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        # x [B, T, d], memory [B, M, d] -> [B, T, d]
        B, T, d = x.shape
        M = memory.shape[1]
        q = self.q(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # [B, H, T, hd]
        k, v = self.kv(memory).split(d, dim=-1)
        k = k.view(B, M, self.n_heads, self.head_dim).transpose(1, 2)  # [B, H, M, hd]
        v = v.view(B, M, self.n_heads, self.head_dim).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).reshape(B, T, d)
        return self.resid_drop(self.proj(y))


class MLP(nn.Module):
    def __init__(self, d_model: int, ffn_dim: int, dropout: float = 0.0):
        super().__init__()
        self.fc = nn.Linear(d_model, ffn_dim)
        self.act = nn.GELU()
        self.proj = nn.Linear(ffn_dim, d_model)  # residual projection (scaled init)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.proj(self.act(self.fc(x))))  # [B, T, d]


class EncoderBlock(nn.Module):
    """Bidirectional self-attention (key padding mask) + MLP, pre-LayerNorm."""

    def __init__(self, d_model: int, n_heads: int, ffn_dim: int, dropout: float = 0.0):
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = SelfAttention(d_model, n_heads, dropout)
        self.ln2 = nn.LayerNorm(d_model)
        self.mlp = MLP(d_model, ffn_dim, dropout)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor) -> torch.Tensor:
        # x [B, L, d]; attn_mask bool [B, 1, 1, L] (True = real key)
        x = x + self.attn(self.ln1(x), attn_mask)[0]
        return x + self.mlp(self.ln2(x))


class DecoderBlock(nn.Module):
    """Causal self-attention with a KV cache, cross-attention to the memory, MLP; pre-LayerNorm."""

    def __init__(self, d_model: int, n_heads: int, ffn_dim: int, dropout: float = 0.0):
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = SelfAttention(d_model, n_heads, dropout)
        self.ln2 = nn.LayerNorm(d_model)
        self.cross = CrossAttention(d_model, n_heads, dropout)
        self.ln3 = nn.LayerNorm(d_model)
        self.mlp = MLP(d_model, ffn_dim, dropout)

    def forward(self, x: torch.Tensor, memory: torch.Tensor, attn_mask: torch.Tensor,
                past_k: torch.Tensor, past_v: torch.Tensor):
        # x [B, T, d]; memory [B, M, d]; attn_mask bool [T, P+T]; past_k, past_v [B, H, P, hd]
        a, k, v = self.attn(self.ln1(x), attn_mask, past_k, past_v)
        x = x + a
        x = x + self.cross(self.ln2(x), memory)
        x = x + self.mlp(self.ln3(x))
        return x, k, v  # [B, T, d], [B, H, P+T, hd] x2


def init_weights(module: nn.Module, n_layers: int) -> None:
    """GPT-2 init: N(0, 0.02) for Linear/Embedding, zero biases, residual projections
    scaled by 1/sqrt(2 * n_layers); LayerNorm stays at (1, 0)."""
    for name, m in module.named_modules():
        if isinstance(m, nn.Linear):
            std = 0.02 / (2 * n_layers) ** 0.5 if name.endswith(".proj") else 0.02
            nn.init.normal_(m.weight, mean=0.0, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)
