"""Curvature regularization (CR) of class feature manifolds (SPEC §4).

``L_CR = mean_c[-log(1 - g_c + ε)] + β · std_c(g_c)`` with ``g_c = a_c / (sqrt(d) · π/2) ∈ [0, 1]``,
``a_c`` the dimensionless tangent-rotation angle curvature (SPEC §3.3) of the cloud
(this step's features of class c, with gradient) ∪ (queue of c, detached). The convex
``-log(1 - g)`` punishes the most curved manifolds most and, for a fixed mean, is smallest when all
``g_c`` are equal: flatter and balanced, the two goals of Ma et al. (CVPR 2023); ``β`` adds an
explicit balance term. This formulation is curvlt's; the paper's exact term was not published.

All classes measured in a step go through the geometry engine in one batch: classes are padded to
a common length, their Gram matrices are formed once, and from them come both the neighbours within
each class and the per-point estimator over every point of every class, in its kernel form
(:mod:`curvature.gram_rotation`), so that no per-neighbour tensor has the feature dimension in it.

A class without features in this step's batch has the cloud of its queue alone: its ``g_c`` enters
the loss as a constant, and it stays the same until that queue changes. So ``g_c`` of such a class
is kept (with the histogram that the "auto" tangent dimension is the median of) and reused while
``queue.version`` is unchanged, and each step measures only the classes in its batch and those
whose queue changed since they were last measured. With many classes and small batches (ImageNet-LT:
1,000 classes, 32 images per GPU) that is a few dozen clouds instead of every class, every step;
the loss and its gradient are the same as measuring every class (tested). When the auto dimension
changes, the kept values, normalised with the old one, are measured again.

``every`` > 1 makes CR lazy, as StyleGAN2 does with its R1 penalty (Karras et al., "Analyzing and
Improving the Image Quality of StyleGAN", CVPR 2020, §3.1 "lazy regularization"): the loss is
computed on one step in ``every`` and multiplied by ``every``, so that its gradient has about the
weight it would have every step, while the queues still take every step's features. It trades
CR's cost per step (on a GPU, 1.6-2.2x a ResNet-32 step; README, "Training step") for a departure
from SPEC §4's loss at every step; the default, 1, is SPEC §4 exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from curvature.cr_loss import CRResult, curvature_loss, normalised_curvature
from curvature.graphed import CaptureFailed, GraphedCurvature
from curvature.gram_rotation import GramPatches, cloud_grams, gram_angles, gram_patches, neighbours_from_grams
from curvature.local_pca import dim_from_histogram, explained_count_histograms
from curvature.queue import (ClassFeatureQueue, GatherFn, check_labels, class_counts, gather_from_all_workers,
                             rank_within_class)
from curvature.rotation import TangentDim


def _class_clouds(features: torch.Tensor, labels: torch.Tensor, queue: ClassFeatureQueue, min_points: int,
                  selected: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """Padded clouds (C', M, D) (:meth:`ClassFeatureQueue.padded_clouds`) of the ``selected``
    classes ((C,) mask) that have at least ``min_points`` points, their validity mask (C', M), and
    their class ids (C',); ``None`` when no class has."""
    arriving = class_counts(labels, queue.num_classes)
    classes = torch.nonzero(selected & (queue.count + arriving >= min_points)).flatten()
    if classes.numel() == 0:
        return None
    position = torch.full_like(arriving, -1).index_put((classes,), torch.arange(classes.numel(), device=labels.device))
    of_measured = position[labels] >= 0
    features, labels = features[of_measured], position[labels[of_measured]]  # labels now number the measured classes
    width = queue.queue_size + int(arriving[classes].max())
    clouds, valid = queue.padded_clouds(classes, features, labels, rank_within_class(labels, classes.numel()), width)
    return clouds, valid, classes


@dataclass
class _Measured:
    """The patch stage of one batch of class clouds."""

    classes: torch.Tensor  # (C',) class ids
    owner: torch.Tensor  # (n,) position in ``classes`` of each measured point
    neighbours: torch.Tensor  # (n, k) rows of the measured points
    patches: GramPatches

    def count_histograms(self, num_classes: int) -> torch.Tensor:
        """(num_classes, m + 1): each class's histogram that the auto dimension is the median of
        (:func:`curvature.local_pca.dim_from_histogram`)."""
        return explained_count_histograms(self.patches.evals, self.classes[self.owner], num_classes)

    def class_curvature(self, dim: int, dtype: torch.dtype) -> torch.Tensor:
        """(C',) ``g_c``: the mean angle curvature of each class normalised to [0, 1] (SPEC §4)."""
        angle = gram_angles(self.patches, self.neighbours, dim, dtype)
        total = torch.zeros(self.classes.numel(), dtype=angle.dtype, device=angle.device)
        total = total.index_add(0, self.owner, angle)
        return normalised_curvature(total / class_counts(self.owner, self.classes.numel()), dim)


def _measure(features: torch.Tensor, labels: torch.Tensor, queue: ClassFeatureQueue, k: int,
             selected: torch.Tensor) -> _Measured | None:
    """Neighbours and patch spectra of every point of the ``selected`` classes that have k + 1
    points; ``None`` when none has."""
    found = _class_clouds(features, labels, queue, k + 1, selected)
    if found is None:
        return None
    clouds, valid, classes = found
    width = clouds.shape[1]
    flat_valid = valid.flatten()
    members = torch.nonzero(flat_valid).flatten()  # flat slots of the valid points
    grams = cloud_grams(clouds, valid)
    slots = neighbours_from_grams(grams, valid, k)  # (C', M, k)
    # Number the valid slots of all classes as one list; neighbours become rows of that list.
    row_of_slot = torch.cumsum(flat_valid, 0) - 1
    offsets = (torch.arange(classes.numel(), device=features.device) * width)[:, None, None]
    neighbours = row_of_slot[(slots + offsets).flatten(0, 1)[flat_valid]]
    return _Measured(classes, members // width, neighbours, gram_patches(grams, members, neighbours))


class CurvatureRegularizer(nn.Module):
    """Curvature regularization term with its per-class feature queue (SPEC §4).

    Call once per training step with the penultimate features and labels of the local batch:
    ``result = cr(features, labels, epoch)``; add ``weight * result.loss`` to the base loss (the
    module does not apply ``weight`` itself, so the caller logs the raw ``L_CR``). It computes the
    loss from ``start_epoch`` on, then enqueues this step's features (gathered from all workers).
    With ``weight == 0`` it does no queue or curvature work at all. ``cuda_graphs``: on a CUDA
    device, compute the loss by :class:`curvature.graphed.GraphedCurvature` (fixed shapes replayed
    as CUDA graphs; faster for a few hundred classes or fewer, see that module), falling back to the
    eager path when the graphs are busy or cannot be captured. ``every``: compute the loss on the
    first call of each epoch and every ``every``-th call after it, multiplied by ``every`` (lazy CR,
    see the module's docstring); the calls between return a zero loss and only enqueue. Counting
    from each epoch's first call makes the steps a run resumed at an epoch's end computes the same as
    those of the run it continues.
    """

    def __init__(self, num_classes: int, feature_dim: int, *, weight: float = 0.0, balance_weight: float = 0.0,
                 k: int = 10, queue_size: int = 128, start_epoch: int = 0, tangent_dim: TangentDim = "auto",
                 eps: float = 1e-6, gather: GatherFn = gather_from_all_workers, cuda_graphs: bool = False,
                 every: int = 1):
        super().__init__()
        checks = {"weight": weight >= 0, "balance_weight": balance_weight >= 0, "start_epoch": start_epoch >= 0,
                  "eps": 0 < eps < 1, "k": isinstance(k, int) and k >= 2,
                  "every": isinstance(every, int) and not isinstance(every, bool) and every >= 1}
        for name, ok in checks.items():
            if not ok:
                allowed = {"k": "an integer >= 2", "eps": "in (0, 1)", "every": "an integer >= 1"}.get(name, ">= 0")
                raise ValueError(f"cr.{name}: must be {allowed}, got {locals()[name]!r}")
        if tangent_dim != "auto" and (isinstance(tangent_dim, bool) or not isinstance(tangent_dim, int)
                                      or not 1 <= tangent_dim <= min(k, feature_dim)):
            raise ValueError(f"cr.tangent_dim: must be 'auto' or an integer in [1, {min(k, feature_dim)}], "
                             f"got {tangent_dim!r}")
        self.weight, self.balance_weight, self.k = weight, balance_weight, k
        self.start_epoch, self.tangent_dim, self.eps, self.every = start_epoch, tangent_dim, eps, every
        self.num_classes = num_classes
        self._epoch, self._calls_in_epoch = -1, 0  # which calls of an epoch compute the loss (``every``)
        self.queue = ClassFeatureQueue(num_classes, feature_dim, queue_size, gather)
        self.queue_curvature = QueueCurvature(num_classes, k)
        self.graphed = GraphedCurvature(self.queue, k, tangent_dim, eps, balance_weight) if cuda_graphs else None

    @property
    def active(self) -> bool:
        return self.weight > 0

    def forward(self, features: torch.Tensor, labels: torch.Tensor, epoch: int) -> CRResult:
        zeros = features.new_zeros(self.num_classes)
        result = CRResult(features.new_zeros(()), zeros, torch.zeros_like(zeros, dtype=torch.bool), 0)
        if not self.active:
            return result
        check_labels(labels, self.num_classes)  # here, before the GPU has CR's work to finish
        with torch.autocast(device_type=features.device.type, enabled=False):
            # Until a class has k + 1 points the loss is a zero that is still attached to the
            # features, so ``result.loss.backward()`` works on its own from the first step.
            result.loss = features.float().sum() * 0.0
            if epoch >= self.start_epoch and self._due(epoch):
                result = self._loss(features.float(), labels, result)
                result.loss = result.loss * self.every if self.every > 1 else result.loss
            self.queue.enqueue(features, labels, labels_checked=True)
        return result

    def _due(self, epoch: int) -> bool:
        """Whether this call computes the loss: the first of its epoch, then every ``every``-th."""
        if epoch != self._epoch:
            self._epoch, self._calls_in_epoch = epoch, 0
        self._calls_in_epoch += 1
        return (self._calls_in_epoch - 1) % self.every == 0

    def _loss(self, features: torch.Tensor, labels: torch.Tensor, unmeasured: CRResult) -> CRResult:
        """On CUDA with a gradient to compute, :class:`GraphedCurvature` when its graphs are free;
        else :meth:`_eager_loss`."""
        graphed = self.graphed
        if (graphed is not None and features.is_cuda and features.requires_grad and torch.is_grad_enabled()
                and labels.numel() > 0 and graphed.ready()):
            try:
                return graphed(features, labels)
            except CaptureFailed:  # warned once; from now on graphed.ready() is False
                pass
        return self._eager_loss(features, labels, unmeasured)

    def _eager_loss(self, features: torch.Tensor, labels: torch.Tensor, unmeasured: CRResult) -> CRResult:
        """Measure the classes in the batch and those whose queue changed; take the rest's ``g_c``
        (and, for the auto dimension, their count histograms) from :class:`QueueCurvature`."""
        cache = self.queue_curvature
        in_batch = class_counts(labels, self.num_classes) > 0
        kept = (cache.version == self.queue.version) & ~in_batch  # classes whose kept g_c is this step's
        fresh = _measure(features, labels, self.queue, self.k, ~kept)
        histogram = cache.histogram * kept[:, None]  # only the auto dimension reads these
        if self.tangent_dim == "auto":
            if fresh is not None:
                counted = fresh.count_histograms(self.num_classes)[fresh.classes]
                histogram = histogram.index_put((fresh.classes,), counted)
            dim = dim_from_histogram(histogram.sum(dim=0), self.k)
        else:
            dim = self.tangent_dim
        if dim != cache.dim:  # the kept values are normalised with another dimension: measure them again
            with torch.no_grad():
                again = _measure(features[:0], labels[:0], self.queue, self.k, kept)
                if again is not None:
                    cache.curvature[again.classes] = again.class_curvature(dim, cache.curvature.dtype)
        measured = kept & cache.measured
        curvature = torch.where(measured, cache.curvature.to(features.dtype), 0.0)
        if fresh is not None:
            curvature = curvature.index_put((fresh.classes,), fresh.class_curvature(dim, features.dtype))
            measured = measured.index_put((fresh.classes,), torch.ones_like(fresh.classes, dtype=torch.bool))
        alone = ~kept & ~in_batch  # queue alone, measured now for the first time since it changed
        cache.remember(alone, self.queue.version, histogram, curvature, measured, dim)
        if not bool(measured.any()):
            return unmeasured
        loss = curvature_loss(curvature, measured, self.eps, self.balance_weight)
        return CRResult(loss, curvature.detach() * measured, measured, dim)


class QueueCurvature(nn.Module):
    """What :class:`CurvatureRegularizer` keeps of the classes it measured on their queue alone:
    ``g_c`` (at tangent dimension ``dim``), whether the class had k + 1 points, the histogram the
    auto dimension is found from, and the queue ``version`` all three belong to (-1: none). Not
    saved with the module: after a load the queue versions change and everything is measured again."""

    version: torch.Tensor
    curvature: torch.Tensor
    measured: torch.Tensor
    histogram: torch.Tensor

    def __init__(self, num_classes: int, k: int):
        super().__init__()
        self.register_buffer("version", torch.full((num_classes,), -1, dtype=torch.long), persistent=False)
        self.register_buffer("curvature", torch.zeros(num_classes), persistent=False)
        self.register_buffer("measured", torch.zeros(num_classes, dtype=torch.bool), persistent=False)
        self.register_buffer("histogram", torch.zeros(num_classes, k + 2, dtype=torch.long), persistent=False)
        self.dim = 0

    @torch.no_grad()
    def remember(self, classes: torch.Tensor, version: torch.Tensor, histogram: torch.Tensor,
                 curvature: torch.Tensor, measured: torch.Tensor, dim: int) -> None:
        """Keep, for the ``classes`` mask (C,), what was measured on their queues at ``version``:
        their count ``histogram`` rows, ``curvature`` (``g_c``, C,) and ``measured`` (C,, whether
        they had k + 1 points); ``dim``: the tangent dimension of every kept ``g_c``."""
        self.version.copy_(torch.where(classes, version, self.version))
        self.histogram.copy_(torch.where(classes[:, None], histogram, self.histogram))
        self.curvature.copy_(torch.where(classes, curvature.to(self.curvature.dtype), self.curvature))
        self.measured.copy_(torch.where(classes, measured, self.measured))
        self.dim = dim

    def forget(self) -> None:
        """Keep nothing: the next step measures every class."""
        self.version.fill_(-1)
