"""What every training task shares: epoch batching, and the module inside DDP / torch.compile."""
from __future__ import annotations

import numpy as np
from torch import nn

from sllm.training.config import TrainConfig
from sllm.training.data.sentence_data import epoch_batches


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
