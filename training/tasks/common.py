"""What every training task shares: epoch batching and opening a saved checkpoint."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from torch import nn
from transformers import OPTConfig

from sentences.tokenizer import SentenceTokenizer, TokenizerError
from training import checkpoint as ckpt
from training.config import ConfigError, TrainConfig, load_run_config
from training.data.sentence_data import epoch_batches

OPT_CONFIG_FILE = "opt_config.json"


class EpochBatches:
    """The batches (index arrays) of one epoch, computed once per epoch and kept."""

    def __init__(self, lengths: np.ndarray, train: TrainConfig):
        self.lengths, self.train = lengths, train
        self._cache: tuple[int, list[np.ndarray]] | None = None

    def __call__(self, epoch: int) -> list[np.ndarray]:
        if self._cache is None or self._cache[0] != epoch:
            t = self.train
            self._cache = (epoch, epoch_batches(self.lengths, t.batch_size, t.seed, epoch, t.bucket_by_length))
        return self._cache[1]


def unwrap(model: nn.Module) -> nn.Module:
    model = getattr(model, "_orig_mod", model)  # torch.compile
    return getattr(model, "module", model)  # DDP


def open_checkpoint(path: str | Path, kind: str, what: str):
    """(checkpoint dir, run config, tokenizer) after checking hashes, config and kind."""
    d = ckpt.resolve_checkpoint(path)
    ckpt.verify_checkpoint_dir(d)
    try:
        run = load_run_config(d / "config.json")
        run.validate()
    except ConfigError as e:
        raise ckpt.CheckpointError(f"{d}/config.json: {e}") from None
    if run.kind != kind:
        raise ckpt.CheckpointError(f"{d} holds a {run.kind!r} checkpoint, not {what}")
    try:
        tok = SentenceTokenizer.load(d)
    except TokenizerError as e:
        raise ckpt.CheckpointError(f"{d}: {e}") from None
    return d, run, tok


def load_opt_config(d: Path) -> OPTConfig:
    try:
        config = OPTConfig.from_dict(json.loads((d / OPT_CONFIG_FILE).read_text()))
    except (OSError, ValueError) as e:
        raise ckpt.CheckpointError(f"{d}/{OPT_CONFIG_FILE} is missing or corrupt ({e})") from None
    config._attn_implementation = "eager"
    return config


def load_weights(model: nn.Module, d: Path, weights: str) -> None:
    if weights not in ("ema", "model"):
        raise ValueError("weights must be 'ema' or 'model'")
    ckpt.load_state_into(model, ckpt.load_tensors(d / f"{weights}.safetensors"), str(d))


def check_tokenizer_matches(d: Path, tok: SentenceTokenizer, vocab_size: int, pad: int, bos: int, eos: int) -> None:
    if (tok.vocab_size, tok.pad_id, tok.bos_id, tok.eos_id) != (vocab_size, pad, bos, eos):
        raise ckpt.CheckpointError(
            f"{d}: tokenizer (vocab {tok.vocab_size}, pad/bos/eos {tok.pad_id}/{tok.bos_id}/{tok.eos_id}) does not "
            f"match the model (vocab {vocab_size}, pad/bos/eos {pad}/{bos}/{eos})")

