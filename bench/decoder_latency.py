"""ORT vs torch sentence-decoder step at the bundle's shape (`bench/decoder_step.py` does the timing).

The edge bundle holds ONNX graphs only, so the torch side is a SentenceVAE decoder of the same
shape with random weights (step latency does not depend on the values); the shape comes from the
edge manifest and, for the FFN width it does not record, from the decoder graph's weights.
"""
from __future__ import annotations

from pathlib import Path

import torch

from bench import decoder_step
from sllm.modeling.config import SentenceVAEConfig
from sllm.modeling.sentence_vae import SentenceDecoder


def ffn_width(decoder_onnx: Path) -> int:
    import onnx

    graph = onnx.load(str(decoder_onnx), load_external_data=False).graph
    for init in graph.initializer:
        if init.name.endswith("mlp.fc.bias"):
            return int(init.dims[0])
    dims = {init.name: init.dims for init in graph.initializer}
    for node in graph.node:  # the fused graphs (modeling.fused_onnx): the bias BiasGelu adds
        if node.op_type == "BiasGelu" and node.input[1] in dims:
            return int(dims[node.input[1]][0])
    raise ValueError(f"{decoder_onnx}: no mlp.fc.bias weight to read the FFN width from")


def bundle_decoder_config(edge_dir: Path, manifest: dict) -> SentenceVAEConfig:
    return SentenceVAEConfig(
        vocab_size=int(manifest["vocab_size"]), d_model=int(manifest["d_model"]), n_heads=int(manifest["n_heads"]),
        ffn_dim=ffn_width(Path(edge_dir) / manifest["decoder_file"]), encoder_layers=1,
        decoder_layers=int(manifest["n_layers"]), max_sentence_tokens=int(manifest["max_sentence_tokens"]),
        pad_id=int(manifest["pad_id"]), bos_id=int(manifest["bos_id"]), eos_id=int(manifest["eos_id"]))


def measure_bundle_decoder(edge_dir: Path, manifest: dict, pasts: list[int], runs: int, threads: int) -> dict:
    cfg = bundle_decoder_config(edge_dir, manifest)
    pasts = sorted({min(max(1, p), cfg.max_sentence_tokens) for p in pasts})
    torch.manual_seed(0)
    rows = decoder_step.measure(SentenceDecoder(cfg), pasts, runs, max(5, runs // 10), threads)
    ref = rows[decoder_step.REFERENCE]
    return {"pasts": pasts, "ms": rows,
            "speedup_vs_torch": {name: [r / ms for ms, r in zip(times, ref)] for name, times in rows.items()},
            "shape": {"d": cfg.d_model, "layers": cfg.decoder_layers, "heads": cfg.n_heads, "ffn": cfg.ffn_dim,
                      "vocab": cfg.vocab_size}, "runs": runs}
