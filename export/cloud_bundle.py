"""The cloud bundle: the grafted OPT blocks + positions + final norm + termination head.

    cloud/
      cloud.safetensors   GraftedOPT state dict (no token embedding, no SentenceVAE)
      opt_config.json     the OPTConfig that rebuilds it
      manifest.json       kind "cloud", model id, d, max sentences, dtype, sha256 of each file
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import OPTConfig

from export.manifest import BundleError, read_manifest, write_manifest
from training import checkpoint as ckpt
from training.models.opt_graft import GraftedOPT

WEIGHTS = "cloud.safetensors"
OPT_CONFIG = "opt_config.json"


def model_id_for(checkpoint_dir: Path, weights: str = "ema") -> str:
    """A stable id for the exported model: both halves carry it, and check it at session start."""
    return "sllm-" + ckpt.sha256_file(Path(checkpoint_dir) / f"{weights}.safetensors")[:16]


def write_cloud_bundle(opt: GraftedOPT, out_dir: Path, model_id: str) -> dict:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ckpt.save_tensors(opt.state_dict(), out_dir / WEIGHTS)
    (out_dir / OPT_CONFIG).write_text(opt.config.to_json_string())
    fields = {"kind": "cloud", "model_id": model_id, "d_model": opt.hidden_size,
              "max_sentences": opt.max_sentences, "num_layers": len(opt.layers),
              "dtype": "float32"}
    return write_manifest(out_dir, fields, [WEIGHTS, OPT_CONFIG])


def load_cloud_bundle(bundle_dir: Path, device: str | torch.device = "cpu") -> tuple[GraftedOPT, dict]:
    """(GraftedOPT in eval mode, manifest); every file is checked against the manifest first."""
    bundle_dir = Path(bundle_dir)
    manifest = read_manifest(bundle_dir, kind="cloud")
    try:
        config = OPTConfig.from_dict(json.loads((bundle_dir / OPT_CONFIG).read_text()))
    except (OSError, ValueError) as e:
        raise BundleError(f"{bundle_dir}/{OPT_CONFIG} is corrupt ({e})") from None
    config._attn_implementation = "eager"
    if config.hidden_size != manifest.get("d_model"):
        raise BundleError(f"{bundle_dir}: opt_config hidden size {config.hidden_size} != manifest d "
                          f"{manifest.get('d_model')}")
    model = GraftedOPT(config)
    try:
        ckpt.load_state_into(model, ckpt.load_tensors(bundle_dir / WEIGHTS), str(bundle_dir))
    except ckpt.CheckpointError as e:
        raise BundleError(str(e)) from None
    return model.to(device).eval(), manifest
