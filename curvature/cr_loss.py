"""The curvature regularization loss of SPEC §4 from per-class mean angles, and what a step of it gives.

Both of CR's paths (:mod:`curvature.regularizer`'s, which measures the classes that changed, and
:mod:`curvature.graphed`'s fixed-shape one for CUDA graphs) end here, so the loss has one definition.
Classes are selected by a mask rather than by indexing, so the shapes do not depend on the data.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from curvature._linalg import safe_sqrt


@dataclass
class CRResult:
    """One step of :class:`curvature.regularizer.CurvatureRegularizer`, by either of its paths."""

    loss: torch.Tensor  # 0-d, carries gradient to this step's features
    class_curvature: torch.Tensor  # (C,) detached g_c; 0 where not measured
    measured: torch.Tensor  # (C,) bool: the class had at least k + 1 points
    tangent_dim: int  # 0 when not computed, or (eager path) nothing was measured


def normalised_curvature(mean_angle: torch.Tensor, dim: int) -> torch.Tensor:
    """``g_c = a_c / (sqrt(d) · π/2)`` clamped to [0, 1]: the largest mean angle between two
    d-dimensional tangent spaces is ``sqrt(d) · π/2`` (SPEC §4)."""
    return (mean_angle / (math.sqrt(dim) * math.pi / 2)).clamp(0, 1)


def curvature_loss(curvature: torch.Tensor, measured: torch.Tensor, eps: float, balance_weight: float) -> torch.Tensor:
    """``L_CR = mean_c[-log(1 - g_c + ε)] + β · std_c(g_c)`` over the ``measured`` classes ((C,)
    mask of ``curvature`` (C,)); the population standard deviation, with gradient 0 (not NaN) when
    it is 0. No class measured: 0."""
    weights = measured.to(curvature.dtype)
    count = weights.sum().clamp_min(1)
    loss = (-torch.log1p(eps - curvature) * weights).sum() / count
    if balance_weight > 0:
        mean = (curvature * weights).sum() / count
        loss = loss + balance_weight * safe_sqrt(((curvature - mean).pow(2) * weights).sum() / count)
    return loss
