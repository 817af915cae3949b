"""Recover a torch SentenceVAE from an edge bundle's ONNX graphs (their initializers).

The exporter (torch.onnx, dynamo) records on every node the module it came from (metadata
`pkg.torch.onnx.name_scopes`, innermost module second to last). Each parameter is found where a
node reads it: a Linear's weight is the initializer its MatMul reads (stored transposed, [in, out]),
its bias the one the Add right after reads; a LayerNorm's are the scale and bias of its
LayerNormalization; an embedding's is the table its Gather reads. The optimizer may merge
initializers that hold equal values (a zero bias, an untouched LayerNorm) under one name, which is
why names alone do not say whose a tensor is; a graph without the metadata falls back to names
(and a Linear's weight to the named bias of the Add after it). A tied decoder keeps only
`lm_head.weight` (also its token embedding). The config comes from the tensor shapes and the edge
manifest.

`recover_sentence_vae(edge_dir)` -> (SentenceVAE in fp32, its config); the caller checks it
against the graphs (`sllm.training.svae_folder.compare_with_graphs`).
"""
from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import numpy_helper

from sllm.modeling.config import SentenceVAEConfig
from sllm.modeling.sentence_vae import SentenceVAE
from sllm.runtime.edge_bundle import load_edge_bundle
from sllm.runtime.manifest import listed_file

SCOPES = "pkg.torch.onnx.name_scopes"


class RecoveryError(ValueError):
    """The graphs do not map onto a SentenceVAE (an exporter this code does not know)."""


def _module(node) -> str | None:
    """The path of the module a node came from ("blocks.0.cross.proj"), from the exporter's metadata."""
    for prop in node.metadata_props:
        if prop.key == SCOPES:
            scopes = ast.literal_eval(prop.value)
            return scopes[-2] if len(scopes) >= 2 and scopes[-2] else None
    return None


def graph_parameters(path: Path) -> dict[str, np.ndarray]:
    """Parameter name -> array, for every parameter the graph at `path` holds."""
    graph = onnx.load(str(path)).graph
    inits = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    params: dict[str, np.ndarray] = {}
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    for node in graph.node:
        module = _module(node)
        held = [name if name in inits else None for name in node.input]
        if node.op_type == "MatMul" and len(held) == 2 and held[1]:
            adds = [a for a in consumers.get(node.output[0], []) if a.op_type == "Add"]
            biases = [i for a in adds for i in a.input if i in inits]
            if module is None:  # no metadata: the bias's name says whose weight this is
                named = [b for b in biases if b.endswith(".bias")]
                if len(named) != 1:
                    raise RecoveryError(f"{path.name}: cannot tell whose weight {held[1]} is")
                module = named[0][: -len(".bias")]
            params[f"{module}.weight"] = inits[held[1]].T.copy()  # [in, out] -> the Linear's [out, in]
            if len(biases) == 1:
                params[f"{module}.bias"] = inits[biases[0]]
        elif node.op_type == "LayerNormalization" and module is not None:
            for suffix, name in zip(("weight", "bias"), held[1:3]):
                if name:
                    params[f"{module}.{suffix}"] = inits[name]
        elif node.op_type == "Gather" and held and held[0] and module is not None:
            params[f"{module}.weight"] = inits[held[0]]
    for name, value in inits.items():  # parameters kept under their own names that no rule above reached
        if not name.startswith("val_"):
            params.setdefault(name, value)
    return params


def _count_blocks(params: dict[str, np.ndarray]) -> int:
    return len({k.split(".")[1] for k in params if k.startswith("blocks.")})


def recover_sentence_vae(edge_dir: str | Path) -> tuple[SentenceVAE, SentenceVAEConfig]:
    """The torch SentenceVAE whose exported graphs the edge bundle holds (fp32, eval)."""
    edge_dir = Path(edge_dir)
    bundle = load_edge_bundle(edge_dir)  # every file checked against the manifest first
    m = bundle.manifest
    if m.get("quantization", {}).get("encoder", "fp32") != "fp32" or m.get("quantization", {}).get(
            "decoder", "fp32") != "fp32":
        raise RecoveryError(f"{edge_dir}: an int8 bundle holds rounded weights; recover from an fp32 export")
    enc = graph_parameters(listed_file(edge_dir, m, "encoder_file"))
    dec = graph_parameters(listed_file(edge_dir, m, "decoder_file"))
    if "tok_emb.weight" not in dec and "lm_head.weight" in dec:  # a tied table kept under the output layer's name
        dec["tok_emb.weight"] = dec["lm_head.weight"]
    tied = "lm_head.weight" in dec and np.array_equal(dec["tok_emb.weight"], dec["lm_head.weight"])
    d = int(m["d_model"])
    cfg = SentenceVAEConfig(
        vocab_size=int(m["vocab_size"]), d_model=d, n_heads=int(m["n_heads"]),
        ffn_dim=int(enc["blocks.0.mlp.fc.bias"].shape[0]), encoder_layers=_count_blocks(enc),
        decoder_layers=_count_blocks(dec), max_sentence_tokens=int(m["max_sentence_tokens"]),
        fusion="weighted" if "score.bias" in enc else "sum", tie_embeddings=tied,
        pad_id=int(m["pad_id"]), bos_id=int(m["bos_id"]), eos_id=int(m["eos_id"]))
    model = SentenceVAE(cfg)
    state = {f"encoder.{k}": v for k, v in enc.items()} | {f"decoder.{k}": v for k, v in dec.items()}
    own = model.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    wrong = [k for k in own if k in state and tuple(own[k].shape) != state[k].shape]
    if missing or unexpected or wrong:
        raise RecoveryError(f"{edge_dir}: the graphs do not map onto a SentenceVAE (missing {missing[:4]}, "
                            f"unexpected {unexpected[:4]}, shapes differ {wrong[:4]})")
    model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in state.items()})
    return model.float().eval(), cfg
