"""The model side: one forward pass over the pending steps of many sessions.

Each session keeps its KV cache as one tensor [layers, 2 (key, value), heads, P, head_dim].
A batch of sessions with past lengths P_i and new sentence counts T_i is laid out as

    attention mask row i:  [0]*(Pmax-P_i) [1]*P_i | [0]*(Tmax-T_i) [1]*T_i
    cache row i:           zeros, then session i's P_i cached positions   (left padding)
    input row i:           zeros, then session i's T_i new vectors        (left padding)

GraftedOPT counts positions over real sentences only (cumsum of the mask) and the causal
mask hides every padded key, so row i computes exactly what session i alone would (up to
float rounding of the batched matmuls). Afterwards each session gets back its own new
keys/values (the last T_i positions of its row) appended to its cache, and the hidden
state + stop logits of its last sentence.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from transformers.cache_utils import DynamicCache

from modeling.opt_graft import STOP, GraftedOPT

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class StepOutput:
    hidden: np.ndarray  # [d] float32: h of the last new sentence
    stop_logits: np.ndarray  # [2] float32
    kv: torch.Tensor | None  # the session's whole cache after this step; None when not finite
    finite: bool

    @property
    def stop(self) -> bool:
        return int(np.argmax(self.stop_logits)) == STOP

    @property
    def stop_probability(self) -> float:
        z = self.stop_logits - self.stop_logits.max()
        p = np.exp(z) / np.exp(z).sum()
        return float(p[STOP])


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


class Engine:
    def __init__(self, model: GraftedOPT, device: torch.device | str = "cpu", dtype: str = "float32"):
        self.device = torch.device(device)
        self.dtype = DTYPES[dtype]
        self.model = model.to(device=self.device, dtype=self.dtype).eval()
        cfg = model.config
        self.config = cfg
        self.d = cfg.hidden_size
        self.num_layers = len(model.layers)
        self.heads = cfg.num_attention_heads
        self.head_dim = self.d // self.heads
        self.max_positions = model.max_sentences
        elem = torch.tensor([], dtype=self.dtype).element_size()
        self.kv_bytes_per_sentence = 2 * self.num_layers * self.d * elem

    def kv_bytes(self, length: int) -> int:
        return length * self.kv_bytes_per_sentence

    @torch.inference_mode()
    def forward(self, pasts: list[torch.Tensor | None], news: list[np.ndarray]) -> list[StepOutput]:
        """pasts[i]: session i's cache [L, 2, H, P_i, hd] or None; news[i]: [T_i, d] float32."""
        B = len(news)
        P = [0 if p is None else p.shape[-2] for p in pasts]
        T = [n.shape[0] for n in news]
        Pm, Tm = max(P), max(T)
        dev, dt = self.device, self.dtype
        x = torch.zeros(B, Tm, self.d, dtype=dt, device=dev)
        mask = torch.zeros(B, Pm + Tm, dtype=torch.long, device=dev)
        for i in range(B):
            x[i, Tm - T[i]:] = torch.from_numpy(news[i]).to(device=dev, dtype=dt)
            mask[i, Pm - P[i]:Pm] = 1
            mask[i, Pm + Tm - T[i]:] = 1
        if Pm:
            kv = torch.zeros(self.num_layers, 2, B, self.heads, Pm, self.head_dim, dtype=dt, device=dev)
            for i, p in enumerate(pasts):
                if p is not None and P[i]:
                    kv[:, :, i, :, Pm - P[i]:] = p
            cache = DynamicCache(ddp_cache_data=[(kv[l, 0], kv[l, 1]) for l in range(self.num_layers)],
                                 config=self.config)
            del kv
        else:
            cache = self.model.new_cache()
        hidden, stop_logits = self.model(x, attention_mask=mask, past=cache)  # [B, Tm, d], [B, Tm, 2]
        h_last = hidden[:, -1].float().cpu().numpy()
        s_last = stop_logits[:, -1].float().cpu().numpy()
        outs = []
        for i in range(B):
            new = torch.stack([torch.stack([layer.keys[i, :, Pm + Tm - T[i]:], layer.values[i, :, Pm + Tm - T[i]:]])
                               for layer in cache.layers])  # [L, 2, H, T_i, hd]
            finite = bool(np.isfinite(h_last[i]).all() and np.isfinite(s_last[i]).all()
                          and torch.isfinite(new).all())
            kv_i = None
            if finite:
                kv_i = new if pasts[i] is None else torch.cat([pasts[i], new], dim=-2)
            outs.append(StepOutput(h_last[i].copy(), s_last[i].copy(), kv_i, finite))
        return outs
