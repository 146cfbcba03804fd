"""Each base loss against values computed by hand in NumPy (SPEC §6)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from orchestrator.config import LossConfig
from orchestrator.losses import LOSSES, create_loss

COUNTS = np.array([100, 20, 5])
LOGITS = np.array([[2.0, 0.5, -1.0], [0.1, 0.3, 0.2], [-0.5, 1.5, 0.7], [1.0, -2.0, 3.0]])
TARGETS = np.array([0, 1, 2, 2])


def log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def nll(z: np.ndarray, weights: np.ndarray | None = None) -> float:
    picked = -log_softmax(z)[np.arange(len(TARGETS)), TARGETS]
    w = np.ones(len(TARGETS)) if weights is None else weights[TARGETS]
    return float((w * picked).sum() / w.sum())


def compute(name: str, epoch: int = 0, **fields) -> float:
    loss = create_loss(LossConfig(name=name, **fields), COUNTS)
    loss.set_epoch(epoch)
    return float(loss(torch.tensor(LOGITS, dtype=torch.float32), torch.tensor(TARGETS)))


def test_every_registered_loss_is_covered():
    assert set(LOSSES.names()) == {"ce", "focal", "ldam", "balanced_softmax", "logit_adjust"}


def test_cross_entropy():
    assert compute("ce") == pytest.approx(nll(LOGITS), rel=1e-6)


def test_focal():
    log_p = log_softmax(LOGITS)[np.arange(4), TARGETS]
    expected = np.mean((1 - np.exp(log_p)) ** 2.0 * -log_p)
    assert compute("focal", focal_gamma=2.0) == pytest.approx(expected, rel=1e-6)
    assert compute("focal", focal_gamma=0.0) == pytest.approx(nll(LOGITS), rel=1e-6)


def test_ldam_margins_and_scale():
    margins = COUNTS ** -0.25
    margins = margins * 0.5 / margins.max()
    adjusted = LOGITS.copy()
    adjusted[np.arange(4), TARGETS] -= margins[TARGETS]
    assert compute("ldam", ldam_max_m=0.5, ldam_s=30.0) == pytest.approx(nll(30.0 * adjusted), rel=1e-5)


def test_drw_switches_weights_on_at_its_epoch():
    effective = (1 - 0.9999 ** COUNTS) / (1 - 0.9999)
    weights = (1 / effective) / (1 / effective).sum() * 3
    assert compute("ce", epoch=4, drw_epoch=5) == pytest.approx(nll(LOGITS), rel=1e-6)
    assert compute("ce", epoch=5, drw_epoch=5) == pytest.approx(nll(LOGITS, weights), rel=1e-5)


def test_balanced_softmax_and_logit_adjustment():
    log_prior = np.log(COUNTS / COUNTS.sum())
    assert compute("balanced_softmax") == pytest.approx(nll(LOGITS + log_prior), rel=1e-6)
    assert compute("logit_adjust", la_tau=1.5) == pytest.approx(nll(LOGITS + 1.5 * log_prior), rel=1e-6)


@pytest.mark.parametrize("name", sorted({"ce", "focal", "ldam", "balanced_softmax", "logit_adjust"}))
def test_tensors_are_buffers(name):
    loss = create_loss(LossConfig(name=name), COUNTS)
    assert "log_prior" in dict(loss.named_buffers())
    assert loss.to(torch.float64).log_prior.dtype == torch.float64
