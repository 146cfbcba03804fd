"""Learning-rate schedule as a pure function of (fractional) epoch, so resuming needs no state:
linear warm-up, then step decay at milestones, cosine to zero, or constant (SPEC §6 protocol)."""

from __future__ import annotations

import math

from orchestrator.config import TrainConfig


def learning_rate(train: TrainConfig, epoch: float) -> float:
    if train.warmup_epochs > 0 and epoch < train.warmup_epochs:
        return train.lr * (epoch + 1) / (train.warmup_epochs + 1)
    if train.schedule == "step":
        return train.lr * train.gamma ** sum(epoch >= milestone for milestone in train.milestones)
    if train.schedule == "cosine":
        span = max(train.epochs - train.warmup_epochs, 1)
        return 0.5 * train.lr * (1 + math.cos(math.pi * min((epoch - train.warmup_epochs) / span, 1.0)))
    return train.lr
