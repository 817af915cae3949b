"""Stage 1: train a SentenceVAE to reconstruct single sentences (paper Eq. 1-5)."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from sentences.segment import SEGMENTATION_VERSION
from sentences.tokenizer import SentenceTokenizer
from training.config import RunConfig
from training.data.sentence_data import PreparedData, SentenceTokens, collate, prepare_data
from training.losses import token_loss, token_nll_sum
from training.models.sentence_vae import SentenceVAE
from training.tasks.common import EpochBatches, check_tokenizer_matches, load_weights, open_checkpoint, unwrap


class SentenceVAETask:
    def __init__(self, run: RunConfig, log=print):
        self.run = run
        self.data: PreparedData = prepare_data(run.data, run.model.max_sentence_tokens, log=log)
        tok = self.data.tokenizer
        # the tokenizer decides vocabulary and special ids; the saved config records them
        run.model.vocab_size = tok.vocab_size
        run.model.pad_id, run.model.bos_id, run.model.eos_id = tok.pad_id, tok.bos_id, tok.eos_id
        run.data.segmentation_version = SEGMENTATION_VERSION
        run.validate()
        self._batches = EpochBatches(self.data.train.lengths, run.train)

    def build_model(self) -> nn.Module:
        return SentenceVAE(self.run.model)

    def num_batches(self, epoch: int) -> int:
        return len(self._batches(epoch))

    def batch(self, epoch: int, index: int):
        ids, mask = collate(self.data.train, self._batches(epoch)[index], self.run.model.pad_id)
        return ids, mask

    def loss(self, model: nn.Module, batch) -> tuple[torch.Tensor, int]:
        device = next(model.parameters()).device
        ids, mask = (t.to(device) for t in batch)
        logits = model(ids, mask)
        _, targets = unwrap(model).teacher_forcing_targets(ids, mask)
        n_tokens = int((targets != -100).sum())
        return token_loss(logits, targets, self.run.train.loss, self.run.train.focal_gamma), n_tokens

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        n = min(len(self.data.val), self.run.train.eval_batches * self.run.train.batch_size)
        return validation_loss(model, self.data.val, n, self.run.train.batch_size)

    def save_files(self, directory: Path) -> None:
        self.data.tokenizer.save(directory)


@torch.no_grad()
def validation_loss(model: nn.Module, data: SentenceTokens, n: int, batch_size: int) -> dict[str, float]:
    """Cross-entropy per target token (sentence tokens + eos) and PPL (paper Eq. 10)."""
    model = unwrap(model).eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for start in range(0, n, batch_size):
        index = np.arange(start, min(n, start + batch_size))
        ids, mask = (t.to(device) for t in collate(data, index, model.cfg.pad_id))
        _, targets = model.teacher_forcing_targets(ids, mask)
        nll, k = token_nll_sum(model(ids, mask), targets)
        total, count = total + float(nll), count + int(k)
    loss = total / max(count, 1)
    return {"loss": loss, "ppl": float(np.exp(loss)), "tokens": float(count)}


# ---------------------------------------------------------------- loading a trained model

@dataclass
class TrainedSentenceVAE:
    model: SentenceVAE
    tokenizer: SentenceTokenizer
    run: RunConfig
    path: Path


def load_sentence_vae(path: str | Path, weights: str = "ema", device: str = "cpu") -> TrainedSentenceVAE:
    """Load a checkpoint (or a run dir's latest) with clear errors for anything that does not fit."""
    d, run, tok = open_checkpoint(path, "sentence_vae", "a SentenceVAE")
    m = run.model
    check_tokenizer_matches(d, tok, m.vocab_size, m.pad_id, m.bos_id, m.eos_id)
    model = SentenceVAE(m)
    load_weights(model, d, weights)
    return TrainedSentenceVAE(model.to(device).eval(), tok, run, d)


def trainer_state(path: Path) -> dict:
    return json.loads((Path(path) / "trainer_state.json").read_text())
