"""Base losses for long-tailed classification (SPEC §6), each combinable with CR.

Small modules whose class-dependent tensors (priors, margins, DRW weights) are buffers, so they
follow the model to its device. All support deferred re-weighting (DRW, Cao et al. 2019): from
``loss.drw_epoch`` on, samples are weighted by the inverse effective number of their class
(Cui et al., CVPR 2019, β = 0.9999), normalised to sum to C.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from orchestrator.config import LossConfig
from orchestrator.errors import UserError
from orchestrator.registry import Registry

DRW_BETA = 0.9999


class LongTailLoss(nn.Module):
    """Cross-entropy on ``adjust(logits)`` with optional DRW class weights."""

    log_prior: torch.Tensor  # buffers (C,), declared for type checkers
    drw_weight: torch.Tensor
    weight: torch.Tensor

    def __init__(self, class_counts: np.ndarray, drw_epoch: int = -1):
        super().__init__()
        counts = torch.as_tensor(np.asarray(class_counts), dtype=torch.float32)
        if bool((counts <= 0).any()):
            raise UserError("dataset: every class needs at least one training image")
        self.drw_epoch = drw_epoch
        effective = (1.0 - DRW_BETA ** counts) / (1.0 - DRW_BETA)
        drw = 1.0 / effective
        self.register_buffer("log_prior", torch.log(counts / counts.sum()))
        self.register_buffer("drw_weight", drw / drw.sum() * len(counts))
        self.register_buffer("weight", torch.ones_like(counts))

    def set_epoch(self, epoch: int) -> None:
        """Switch DRW weights on from ``drw_epoch`` (and off before it, for resumed runs)."""
        active = 0 <= self.drw_epoch <= epoch
        self.weight.copy_(self.drw_weight if active else torch.ones_like(self.weight))

    def adjust(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return logits

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.adjust(logits.float(), targets), targets, weight=self.weight)


LOSSES: Registry[LongTailLoss] = Registry("loss", "loss.name")


def create_loss(config: LossConfig, class_counts: np.ndarray) -> LongTailLoss:
    return LOSSES.create(config.name, config=config, class_counts=class_counts)


@LOSSES.register("ce")
class CrossEntropy(LongTailLoss):
    def __init__(self, config: LossConfig, class_counts: np.ndarray):
        super().__init__(class_counts, config.drw_epoch)


@LOSSES.register("focal")
class FocalLoss(LongTailLoss):
    """``mean_i w_yi (1 - p_i)^γ · (-log p_i)`` (Lin et al., ICCV 2017)."""

    def __init__(self, config: LossConfig, class_counts: np.ndarray):
        super().__init__(class_counts, config.drw_epoch)
        self.gamma = config.focal_gamma

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        log_p = F.log_softmax(logits.float(), dim=1).gather(1, targets[:, None]).squeeze(1)
        return (self.weight[targets] * (1.0 - log_p.exp()).pow(self.gamma) * -log_p).mean()


@LOSSES.register("ldam")
class LDAMLoss(LongTailLoss):
    """Label-distribution-aware margin: subtract ``m_y ∝ n_y^(-1/4)`` (largest = ``ldam_max_m``) from
    the true-class logit, scale by ``s`` (Cao et al., NeurIPS 2019); use with ``drw_epoch``. The
    logits are meant to be cosines (:class:`orchestrator.models.CosineHead`, which ``model.head:
    auto`` gives this loss): margins and ``s`` are in their units."""

    margins: torch.Tensor  # buffer (C,)

    def __init__(self, config: LossConfig, class_counts: np.ndarray):
        super().__init__(class_counts, config.drw_epoch)
        margins = 1.0 / np.power(np.asarray(class_counts, dtype=np.float64), 0.25)
        margins = margins * (config.ldam_max_m / margins.max())
        self.register_buffer("margins", torch.tensor(margins, dtype=torch.float32))
        self.scale = config.ldam_s

    def adjust(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        margin = F.one_hot(targets, logits.shape[1]) * self.margins[targets][:, None]
        return self.scale * (logits - margin)


@LOSSES.register("balanced_softmax")
class BalancedSoftmax(LongTailLoss):
    """Cross-entropy on ``logits + log prior`` (Ren et al., NeurIPS 2020)."""

    def __init__(self, config: LossConfig, class_counts: np.ndarray):
        super().__init__(class_counts, config.drw_epoch)

    def adjust(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return logits + self.log_prior


@LOSSES.register("logit_adjust")
class LogitAdjustedLoss(LongTailLoss):
    """Cross-entropy on ``logits + τ · log prior`` (Menon et al., ICLR 2021)."""

    def __init__(self, config: LossConfig, class_counts: np.ndarray):
        super().__init__(class_counts, config.drw_epoch)
        self.tau = config.la_tau

    def adjust(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return logits + self.tau * self.log_prior
