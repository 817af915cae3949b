"""The SentenceVAE's torch weights in an export folder, read without the training code.

An export folder holds them in svae/ (written by `sllm-export`, or recovered from the edge graphs by
`sllm-train recover-svae`; `sllm.training.svae_folder` writes it): a stage-1 checkpoint in form, so
training reads it as one; the exporter checks what it wrote here, and benches load it. (The cloud's
speculation guesses with the edge bundle's ONNX graphs instead: sllm.cloud.guesses.)

    svae/
      ema.safetensors    SentenceVAE state dict (a tied output layer stored once)
      config.json        the run config; its "model" section is the SentenceVAEConfig
      source.json        the model id it belongs to, and how it was made/checked
      manifest.json      {"sha256": {file: hash}}, written last

The model id ties it to the cloud half: a SentenceVAE of another model is refused. torch only.
"""
from __future__ import annotations

import json
from pathlib import Path

from sllm.modeling.config import ConfigError, SentenceVAEConfig, from_dict
from sllm.modeling.sentence_vae import SentenceVAE
from sllm.modeling.weights import load_state_into, load_tensors, with_tied
from sllm.runtime.artifacts import MANIFEST, CheckpointError, verify_checkpoint_dir
from sllm.runtime.manifest import BundleError

FOLDER = "svae"  # beside edge/ and cloud/ in an export folder
WEIGHTS = "ema.safetensors"
CONFIG = "config.json"
SOURCE = "source.json"


def load_svae_folder(directory: Path, model_id: str | None = None) -> SentenceVAE:
    """The SentenceVAE in `directory` (eval, CPU, float32). BundleError when it is missing, corrupt (every
    file is checked against its manifest), or belongs to another model than `model_id`."""
    directory = Path(directory)
    for name in (WEIGHTS, CONFIG, MANIFEST):
        if not (directory / name).is_file():
            raise BundleError(f"{directory} is not a SentenceVAE folder (no {name}); write one with sllm-export, "
                              "or `sllm-train recover-svae` for an older export")
    try:
        verify_checkpoint_dir(directory)  # a stage-1 checkpoint in form: every file against its manifest
        source = json.loads((directory / SOURCE).read_text()) if (directory / SOURCE).is_file() else {}
        cfg = from_dict(SentenceVAEConfig, json.loads((directory / CONFIG).read_text())["model"])
        cfg.validate()
    except CheckpointError as e:
        raise BundleError(str(e)) from None
    except (OSError, ValueError, KeyError, TypeError, ConfigError) as e:
        raise BundleError(f"{directory}: source or config is missing or corrupt ({e})") from None
    if model_id is not None and source.get("model_id") != model_id:
        raise BundleError(f"{directory}: the SentenceVAE belongs to model {source.get('model_id')!r}, the cloud serves "
                          f"{model_id!r}; use the folders of one export")
    svae = SentenceVAE(cfg)
    try:
        load_state_into(svae, with_tied(svae, load_tensors(directory / WEIGHTS)), str(directory / WEIGHTS))
    except CheckpointError as e:
        raise BundleError(str(e)) from None
    return svae.float().eval()
