"""Curvature regularization (CR) of class feature manifolds (SPEC §4).

``L_CR = mean_c[-log(1 - g_c + ε)] + β · std_c(g_c)`` with ``g_c = a_c / (sqrt(d) · π/2) ∈ [0, 1]``,
``a_c`` the dimensionless tangent-rotation angle curvature (SPEC §3.3) of the cloud
(this step's features of class c, with gradient) ∪ (queue of c, detached). The convex
``-log(1 - g)`` punishes the most curved manifolds most and, for a fixed mean, is smallest when all
``g_c`` are equal: flatter and balanced, the two goals of Ma et al. (CVPR 2023); ``β`` adds an
explicit balance term. This formulation is curvlt's; the paper's exact term was not published.

All classes go through the geometry engine in one batch: classes are padded to a common length,
their Gram matrices are formed once, and from them come both the neighbours within each class and
the per-point estimator over every point of every class, in its kernel form
(:func:`curvature.gram_rotation.gram_angle_curvature`), so that no per-neighbour tensor has the
feature dimension in it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from curvature.gram_rotation import cloud_grams, gram_angle_curvature, neighbours_from_grams
from curvature.queue import ClassFeatureQueue, GatherFn, gather_from_all_workers, rank_within_class
from curvature.rotation import TangentDim


@dataclass
class CRResult:
    """One step of :class:`CurvatureRegularizer`."""

    loss: torch.Tensor  # 0-d, carries gradient to this step's features
    class_curvature: torch.Tensor  # (C,) detached g_c; 0 where not measured
    measured: torch.Tensor  # (C,) bool: the class had at least k + 1 points
    tangent_dim: int  # 0 when nothing was measured


def _class_clouds(features: torch.Tensor, labels: torch.Tensor, queue: ClassFeatureQueue,
                  min_points: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Padded per-class clouds (C', M, D) = queue slots then this step's features, their validity
    mask (C', M), and the class ids (C',) of the classes with at least ``min_points`` points."""
    num_classes, queue_size = queue.num_classes, queue.queue_size
    ranks = rank_within_class(labels, num_classes)
    width = queue_size + int(torch.bincount(labels, minlength=num_classes).max()) if labels.numel() else queue_size
    padded = features.new_zeros(num_classes, width, features.shape[1])
    padded[:, :queue_size] = queue.queue.to(features.dtype)
    padded = padded.index_put((labels, queue_size + ranks), features)  # out of place: keeps the gradient
    valid = torch.zeros(num_classes, width, dtype=torch.bool, device=features.device)
    valid[:, :queue_size] = queue.filled()
    valid[labels, queue_size + ranks] = True
    eligible = torch.nonzero(valid.sum(dim=1) >= min_points).flatten()
    return padded[eligible], valid[eligible], eligible


class CurvatureRegularizer(nn.Module):
    """Curvature regularization term with its per-class feature queue (SPEC §4).

    Call once per training step with the penultimate features and labels of the local batch:
    ``result = cr(features, labels, epoch)``; add ``weight * result.loss`` to the base loss (the
    module does not apply ``weight`` itself, so the caller logs the raw ``L_CR``). It computes the
    loss from ``start_epoch`` on, then enqueues this step's features (gathered from all workers).
    With ``weight == 0`` it does no queue or curvature work at all.
    """

    def __init__(self, num_classes: int, feature_dim: int, *, weight: float = 0.0, balance_weight: float = 0.0,
                 k: int = 10, queue_size: int = 128, start_epoch: int = 0, tangent_dim: TangentDim = "auto",
                 eps: float = 1e-6, gather: GatherFn = gather_from_all_workers):
        super().__init__()
        checks = {"weight": weight >= 0, "balance_weight": balance_weight >= 0, "start_epoch": start_epoch >= 0,
                  "eps": 0 < eps < 1, "k": isinstance(k, int) and k >= 2}
        for name, ok in checks.items():
            if not ok:
                allowed = {"k": "an integer >= 2", "eps": "in (0, 1)"}.get(name, ">= 0")
                raise ValueError(f"cr.{name}: must be {allowed}, got {locals()[name]!r}")
        if tangent_dim != "auto" and (isinstance(tangent_dim, bool) or not isinstance(tangent_dim, int)
                                      or not 1 <= tangent_dim <= min(k, feature_dim)):
            raise ValueError(f"cr.tangent_dim: must be 'auto' or an integer in [1, {min(k, feature_dim)}], "
                             f"got {tangent_dim!r}")
        self.weight, self.balance_weight, self.k = weight, balance_weight, k
        self.start_epoch, self.tangent_dim, self.eps = start_epoch, tangent_dim, eps
        self.num_classes = num_classes
        self.queue = ClassFeatureQueue(num_classes, feature_dim, queue_size, gather)

    @property
    def active(self) -> bool:
        return self.weight > 0

    def forward(self, features: torch.Tensor, labels: torch.Tensor, epoch: int) -> CRResult:
        zeros = features.new_zeros(self.num_classes)
        result = CRResult(features.new_zeros(()), zeros, torch.zeros_like(zeros, dtype=torch.bool), 0)
        if not self.active:
            return result
        with torch.autocast(device_type=features.device.type, enabled=False):
            # Until a class has k + 1 points the loss is a zero that is still attached to the
            # features, so ``result.loss.backward()`` works on its own from the first step.
            result.loss = features.float().sum() * 0.0
            if epoch >= self.start_epoch:
                result = self._loss(features.float(), labels, result)
            self.queue.enqueue(features, labels)
        return result

    def _loss(self, features: torch.Tensor, labels: torch.Tensor, unmeasured: CRResult) -> CRResult:
        clouds, valid, classes = _class_clouds(features, labels, self.queue, self.k + 1)
        if classes.numel() == 0:
            return unmeasured
        measured = torch.zeros(self.num_classes, dtype=torch.bool, device=features.device)
        curvature = features.new_zeros(self.num_classes)
        width = clouds.shape[1]
        flat_valid = valid.flatten()
        members = torch.nonzero(flat_valid).flatten()  # flat slots of the valid points
        grams = cloud_grams(clouds, members)
        slots = neighbours_from_grams(grams, valid, self.k)  # (C', M, k)
        # Number the valid slots of all classes as one list; neighbours become rows of that list.
        row_of_slot = torch.cumsum(flat_valid, 0) - 1
        offsets = (torch.arange(clouds.shape[0], device=features.device) * width)[:, None, None]
        neighbours = row_of_slot[(slots + offsets).flatten(0, 1)[flat_valid]]
        owner = members // width
        angle, dim = gram_angle_curvature(grams, members, neighbours, self.tangent_dim, clouds.shape[2], features.dtype)
        class_angle = torch.zeros(classes.numel(), dtype=angle.dtype, device=angle.device).index_add(0, owner, angle)
        class_angle = class_angle / torch.bincount(owner, minlength=classes.numel())
        normalised = (class_angle / (math.sqrt(dim) * math.pi / 2)).clamp(0, 1)  # g_c
        loss = -torch.log1p(self.eps - normalised).mean()
        if self.balance_weight > 0 and normalised.numel() > 1:
            loss = loss + self.balance_weight * normalised.std(unbiased=False)
        measured[classes] = True
        curvature[classes] = normalised.detach()
        return CRResult(loss, curvature, measured, dim)
