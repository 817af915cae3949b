"""The cloud bundle: the grafted OPT blocks + positions + final norm + termination head.

    cloud/
      cloud.safetensors   GraftedOPT state dict (no token embedding, no SentenceVAE)
      opt_config.json     the OPTConfig that rebuilds it
      manifest.json       kind "cloud", model id, d, max sentences, dtype, sha256 of each file

The sha256 of cloud.safetensors (`sllm.runtime.manifest.cloud_weights_sha256(manifest)`) is the model's
identity: the edge bundle of the same export records it, the server reports it (ModelInfo.weights_sha256)
and the edge refuses a server whose weights have another one, whatever model id it claims.
"""
from __future__ import annotations

from pathlib import Path

import torch
from transformers import OPTForCausalLM

from sllm.modeling.config import ConfigError, OPTSpec
from sllm.modeling.opt_graft import GraftedOPT, opt_config_from_spec, read_opt_config
from sllm.modeling.weights import CheckpointError, load_state_into, load_tensors, save_tensors
from sllm.runtime.files import sha256_file
from sllm.runtime.manifest import CLOUD_WEIGHTS, BundleError, read_manifest, write_manifest

WEIGHTS = CLOUD_WEIGHTS
OPT_CONFIG = "opt_config.json"


def model_id_for(checkpoint_dir: Path, weights: str = "ema") -> str:
    """A stable id for the exported model: both halves carry it, and check it at session start."""
    return "sllm-" + sha256_file(Path(checkpoint_dir) / f"{weights}.safetensors")[:16]


def write_cloud_bundle(opt: GraftedOPT, out_dir: Path, model_id: str) -> dict:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_tensors(opt.state_dict(), out_dir / WEIGHTS)
    (out_dir / OPT_CONFIG).write_text(opt.config.to_json_string())
    fields = {"kind": "cloud", "model_id": model_id, "d_model": opt.hidden_size,
              "max_sentences": opt.max_sentences, "num_layers": len(opt.layers),
              "dtype": "float32"}
    return write_manifest(out_dir, fields, [WEIGHTS, OPT_CONFIG])


def load_cloud_bundle(bundle_dir: Path, device: str | torch.device = "cpu") -> tuple[GraftedOPT, dict]:
    """(GraftedOPT in eval mode, manifest); every file is checked against the manifest first (both
    files must be listed in it, under plain names inside the folder)."""
    bundle_dir = Path(bundle_dir)
    manifest = read_manifest(bundle_dir, kind="cloud", required=(WEIGHTS, OPT_CONFIG))
    try:
        config = read_opt_config(bundle_dir / OPT_CONFIG)
    except ConfigError as e:
        raise BundleError(str(e)) from None
    if config.hidden_size != manifest.get("d_model"):
        raise BundleError(f"{bundle_dir}: opt_config hidden size {config.hidden_size} != manifest d "
                          f"{manifest.get('d_model')}")
    model = GraftedOPT(config)
    try:
        load_state_into(model, load_tensors(bundle_dir / WEIGHTS), str(bundle_dir))
    except CheckpointError as e:
        raise BundleError(str(e)) from None
    return model.to(device).eval(), manifest


def random_grafted_opt(d: int = 32, layers: int = 2, heads: int = 4, ffn_dim: int | None = None,
                       max_sentences: int = 64, seed: int = 0) -> GraftedOPT:
    """Grafted OPT blocks with random weights: the wire, batching and limits do not care what the
    weights are (load tests, benchmarks, `sllm-cloud random-bundle`)."""
    torch.manual_seed(seed)
    cfg = opt_config_from_spec(OPTSpec(hidden_size=d, num_hidden_layers=layers, num_attention_heads=heads,
                                       ffn_dim=ffn_dim or 4 * d, max_position_embeddings=max_sentences),
                               vocab_size=16)
    cfg._attn_implementation = "eager"
    opt = GraftedOPT.from_causal_lm(OPTForCausalLM(cfg)).eval()
    with torch.no_grad():  # a stop head that says "stop" now and then, so both answers get exercised
        opt.stop_head.weight.normal_(0, 1.0 / d ** 0.5)
    return opt


def write_random_cloud_bundle(out_dir: str | Path, model_id: str = "sllm-test-model", **kwargs) -> dict:
    """A cloud bundle of `random_grafted_opt(**kwargs)`."""
    return write_cloud_bundle(random_grafted_opt(**kwargs), Path(out_dir), model_id)
