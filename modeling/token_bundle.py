"""A token-level model in the cloud engine: the baseline OPT's own decoder blocks, positions and
final LayerNorm as a cloud bundle, so `sllm-cloud serve --bundle DIR` steps it once per TOKEN,
batched across sessions exactly as it steps the SLLM once per sentence.

    cloud side (this bundle):  embedding rows [T, d] -> OPT blocks + final LN -> hidden [d]
    client side (bench/):      token ids -> embed_tokens rows;  hidden -> tied LM head -> next token

What crosses the wire is the embedding row of each token (OPT's embed_tokens, scale 1) and the
final hidden state, so only OPTs whose embeddings live at the hidden width qualify
(word_embed_proj_dim == hidden_size: no project_in / project_out). The stop head is new and
untrained: a token-level client ignores it (eos is a token).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from transformers import OPTForCausalLM

from sllm.modeling.cloud_bundle import write_cloud_bundle
from sllm.modeling.opt_graft import GraftedOPT
from sllm.runtime.files import sha256_file
from sllm.runtime.manifest import BundleError


def check_token_level(model: OPTForCausalLM) -> None:
    """Refuse an OPT whose token embeddings are not at the hidden width (they would need project_in
    on the way in and project_out on the way out, which neither side of the split runs)."""
    cfg = model.config
    if cfg.word_embed_proj_dim != cfg.hidden_size:
        raise BundleError(f"word_embed_proj_dim {cfg.word_embed_proj_dim} != hidden_size {cfg.hidden_size}: the "
                          "token-level split sends embedding rows straight into the blocks (no project_in/out)")


def token_model_id(baseline_dir: Path) -> str:
    """The served model's id: from the baseline's weights, so the two halves of one baseline match."""
    return "token-" + sha256_file(Path(baseline_dir) / "model.safetensors")[:16]


def write_token_bundle(model: OPTForCausalLM, out_dir: Path, model_id: str) -> dict:
    """`model`'s decoder blocks + positions + final LayerNorm as a cloud bundle in `out_dir`."""
    check_token_level(model)
    return write_cloud_bundle(GraftedOPT.from_causal_lm(model).eval(), Path(out_dir), model_id)


def token_tables(model: OPTForCausalLM) -> tuple[np.ndarray, np.ndarray]:
    """What the client of the split holds: (embed_tokens [V, d], LM head [V, d]) float32 numpy. OPT's
    LM head has no bias; with tied embeddings the two are the same matrix."""
    check_token_level(model)
    embed = model.get_input_embeddings().weight.detach().float().cpu().numpy()
    head = model.get_output_embeddings().weight.detach().float().cpu().numpy()
    return embed, head
