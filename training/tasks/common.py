"""What every training task shares: its epoch batches, and the module inside DDP / torch.compile."""
from __future__ import annotations

from collections.abc import Callable

import numpy as np
from torch import nn

from sllm.training.config import TrainConfig
from sllm.training.data.sampler import EpochBatches


def epoch_batches(n_items: int, lengths: Callable[[np.ndarray], np.ndarray], train: TrainConfig) -> EpochBatches:
    """The batches of a task's training items (sentences or passages) of lengths `lengths(ids)`."""
    return EpochBatches(n_items, lengths, train.batch_size, train.seed, train.bucket_by_length)


def unwrap(model: nn.Module) -> nn.Module:
    model = getattr(model, "_orig_mod", model)  # torch.compile
    return getattr(model, "module", model)  # DDP
