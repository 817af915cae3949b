"""The token-level baseline OPT as one ONNX graph with its KV cache as input and output: the
export path of the edge graphs (`sllm.modeling.fused_onnx`: fused Q/K/V and attention, residual adds
fused with LayerNorm, no mask arithmetic), so the baseline gets the runtime the SLLM's edge gets.
`export_baseline_torch` keeps torch's own export (`OPTWithKV`, dynamo=True, opset 18) to compare with.

    baseline.onnx  ids int64 [B, T], past_kv float32 [n_layers, 2, B, n_heads, P, head_dim]
                   -> logits float32 [B, 1, V] (the last position's: all a generator reads, as
                      Hugging Face generate's logits_to_keep=1), present_kv float32 [.., P+T, head_dim]

Position of ids[:, t] is P + t (rows hold real tokens only, no padding); P + T <= the model's
max_position_embeddings. The first call feeds a past of length 0 (the prompt), later calls one
token each. The graph is `OPTWithKV`: Hugging Face's pre-LN OPT decoder with its blocks as the
project's own (`sllm.modeling.opt_block.OPTBlock`, the cloud engine's, same weights), checked against the
Hugging Face forward in ORT (`check_parity`).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from sllm.modeling import fused_onnx
from sllm.modeling.fused_onnx import check_supported  # noqa: F401 - the check lives with the graph builder
from sllm.export.onnx_export import _export
from sllm.export.verify import ATOL
from sllm.modeling.opt_block import OPTBlock

INPUTS = ("ids", "past_kv")
OUTPUTS = ("logits", "present_kv")


def causal_mask(past: int | torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """[T, P+T] bool: the query at position p sees keys 0..p."""
    key_pos = torch.arange(past + pos.shape[0], device=pos.device)
    return key_pos[None, :] <= pos[:, None]


class OPTWithKV(nn.Module):
    """An OPTForCausalLM's decoder with its cache as one tensor (the edge decoder's layout):
    forward(ids [B, T], past_kv [n_layers, 2, B, H, P, hd]) -> logits [B, 1, V] of the last position,
    present_kv [n_layers, 2, B, H, P+T, hd]."""

    def __init__(self, model):
        super().__init__()
        check_supported(model.config)
        self.decoder, self.lm_head = model.model.decoder, model.lm_head
        self.blocks = nn.ModuleList(OPTBlock.from_layer(model.config, layer) for layer in self.decoder.layers)

    def forward(self, ids: torch.Tensor, past_kv: torch.Tensor):
        dec = self.decoder
        T, P = ids.shape[1], past_kv.shape[4]
        pos = torch.arange(T, device=ids.device) + P  # [T]
        x = dec.embed_tokens(ids) + dec.embed_positions(None, P, position_ids=pos[None])  # [B, T, d]
        mask = causal_mask(P, pos)
        present = []
        for i, block in enumerate(self.blocks):
            def concat(k, v, i=i):
                kv = torch.stack((torch.cat((past_kv[i, 0], k), dim=2), torch.cat((past_kv[i, 1], v), dim=2)))
                present.append(kv)  # [2, B, H, P+T, hd]
                return kv[0], kv[1]
            x = block(x, mask, concat)
        x = x[:, -1:]  # [B, 1, d]: only the last position predicts the next token
        if dec.final_layer_norm is not None:
            x = dec.final_layer_norm(x)
        return self.lm_head(x), torch.stack(present)

    def empty_kv(self, batch: int) -> torch.Tensor:
        a = self.decoder.layers[0].self_attn
        return torch.zeros(len(self.decoder.layers), 2, batch, a.num_heads, 0, a.head_dim)


def export_baseline(model, path: Path) -> Path:
    """baseline.onnx of an OPTForCausalLM (eval, fp32), written with ONNX Runtime's fused operators
    (`sllm.modeling.fused_onnx.baseline_graph`): the treatment the edge graphs get."""
    model.eval()
    return fused_onnx.save(fused_onnx.baseline_graph(model), path)


def export_baseline_torch(model, path: Path) -> Path:
    """baseline.onnx through torch's exporter (`OPTWithKV`, unfused): the graph before the fused one."""
    wrapped = OPTWithKV(model).eval()
    cfg = model.config
    B, T, P = 2, 3, 4  # distinct sizes >= 2: none gets specialised or merged with another
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (B, T), generator=g)
    a = wrapped.decoder.layers[0].self_attn
    past = torch.randn(cfg.num_hidden_layers, 2, B, a.num_heads, P, a.head_dim, generator=g)
    n = cfg.max_position_embeddings
    dyn = {"ids": {0: torch.export.Dim("batch"), 1: torch.export.Dim("step", max=n)},
           "past_kv": {2: torch.export.Dim("batch"), 4: torch.export.Dim("past", max=n - 1)}}
    return _export(wrapped, (ids, past), path, INPUTS, OUTPUTS, dyn)


@torch.inference_mode()
def check_parity(model, session, prompt_len: int = 7) -> float:
    """ORT's logits for a prompt (past of length 0) and then one cached step against Hugging Face's
    forward without a cache (eval); raises unless max |ORT - torch| <= ATOL * max(1, max |torch|)
    (the exporter's rule). Returns the largest relative difference seen."""
    cfg = model.config
    g = torch.Generator().manual_seed(1)
    seq = torch.randint(3, cfg.vocab_size, (2, prompt_len + 1), generator=g)
    full = model(input_ids=seq).logits.numpy()  # [2, prompt_len + 1, V]: no cache, every position
    empty = OPTWithKV(model).empty_kv(2).numpy()
    logits, present = session.run(list(OUTPUTS), {"ids": seq[:, :prompt_len].numpy(), "past_kv": empty})
    step, _ = session.run(list(OUTPUTS), {"ids": seq[:, prompt_len:].numpy(), "past_kv": present})
    worst = 0.0
    for ref, got in ((full[:, prompt_len - 1 : prompt_len], logits), (full[:, prompt_len:], step)):
        if ref.shape != got.shape:
            raise ValueError(f"baseline.onnx logits shape {got.shape}, torch {ref.shape}")
        worst = max(worst, float(np.abs(ref - got).max()) / max(1.0, float(np.abs(ref).max())))
    if worst > ATOL:
        raise ValueError(f"baseline.onnx differs from the torch baseline: max relative logit diff {worst:.2e} "
                         f"> {ATOL:g}")
    return worst
