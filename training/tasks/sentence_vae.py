"""Stage 1: train a SentenceVAE to reconstruct single sentences (paper Eq. 1-5)."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from sllm.modeling.losses import token_loss
from sllm.modeling.sentence_vae import SentenceVAE
from sllm.sentences.segment import SEGMENTATION_VERSION
from sllm.training.config import RunConfig
from sllm.training.data.sentence_data import PreparedData, collate, prepare_data
from sllm.training.evaluate import validation_loss
from sllm.training.pretrained_embeddings import copy_into, pretrained_token_embedding
from sllm.training.tasks.common import epoch_batches, unwrap


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
        self.init_embedding = (pretrained_token_embedding(run.init.embeddings_from, tok, run.model.d_model)
                               if run.init.embeddings_from else None)
        self._batches = epoch_batches(len(self.data.train), self.data.train.lengths, run.train)
        self.dataset_id = self.data.dataset.dataset_id  # recorded with checkpoints: a resume must read the same data

    def build_model(self) -> nn.Module:
        model = SentenceVAE(self.run.model)
        if self.init_embedding is not None:
            copy_into(model, self.init_embedding)
        return model

    def num_batches(self, epoch: int) -> int:
        return len(self._batches)

    def batch(self, epoch: int, index: int):
        ids, mask = collate(self.data.train, self._batches.batch(epoch, index), self.run.model.pad_id)
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
