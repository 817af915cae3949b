"""Token losses: cross-entropy, focal loss (paper Eq. 5), the NLL sum behind PPL (Eq. 10), and the
next-token targets of a causal LM.

All computed in float32 with autocast off, so they are safe under bf16 autocast.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

IGNORE_INDEX = -100


def _token_nll(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """logits [B, T, V], targets [B, T] -> -log p(target) [B*T] in float32, 0 where ignored."""
    V = logits.shape[-1]
    with torch.autocast(device_type=logits.device.type, enabled=False):
        return F.cross_entropy(logits.reshape(-1, V).float(), targets.reshape(-1),
                               ignore_index=ignore_index, reduction="none")


def token_loss(logits: torch.Tensor, targets: torch.Tensor, kind: str = "ce", gamma: float = 2.0,
               ignore_index: int = IGNORE_INDEX, class_weight: torch.Tensor | None = None) -> torch.Tensor:
    """Mean loss over non-ignored target tokens (0 when there are none).

    "ce": -log p.  "focal": -(1 - p)^gamma log p (Lin et al. 2017; gamma = 0 is CE).
    class_weight [V]: each target's loss times the weight of its class, and the mean is over the
    weights (as torch's weighted cross-entropy): a rare class counts as if it were seen more often.
    """
    total, count = token_loss_sum(logits, targets, kind, gamma, ignore_index, class_weight)
    return total / count.clamp(min=1e-12) if class_weight is not None else total / count.clamp(min=1)


def token_loss_sum(logits: torch.Tensor, targets: torch.Tensor, kind: str = "ce", gamma: float = 2.0,
                   ignore_index: int = IGNORE_INDEX,
                   class_weight: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed loss, number of non-ignored targets): for losses accumulated over chunks. With
    class_weight: (summed weighted loss, summed weights of the non-ignored targets)."""
    if kind not in ("ce", "focal"):
        raise ValueError(f"loss kind must be 'ce' or 'focal', got {kind!r}")
    if gamma < 0:
        raise ValueError(f"focal gamma must be >= 0, got {gamma}")
    nll = _token_nll(logits, targets, ignore_index)  # [N]
    flat = targets.reshape(-1)
    real = flat != ignore_index
    count = real.sum()
    if kind == "focal":
        # 1 - p = -expm1(-nll), exact near p = 1; the clamp keeps the gradient finite where p == 1
        one_minus_p = (-torch.expm1(-nll)).clamp(min=1e-12)
        nll = one_minus_p.pow(gamma) * nll
    if class_weight is not None:
        w = class_weight.to(device=nll.device, dtype=torch.float32)[flat.clamp(min=0)] * real  # [N], 0 where ignored
        return (w * nll).sum(), w.sum()
    return nll.sum(), count


def token_nll_sum(logits: torch.Tensor, targets: torch.Tensor,
                  ignore_index: int = IGNORE_INDEX) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of -log p over non-ignored targets as float32, their count as int64): PPL = exp(sum / count)."""
    nll = _token_nll(logits, targets, ignore_index)
    return nll.sum(), (targets != ignore_index).sum()


def next_token_logits(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor):
    """ids, mask [B, N] -> logits [B, N-1, V] predicting ids[:, 1:], targets [B, N-1] (-100 on padding)."""
    logits = model(input_ids=ids, attention_mask=mask.long()).logits[:, :-1]
    targets = ids[:, 1:].masked_fill(~mask[:, 1:], IGNORE_INDEX)
    return logits, targets
