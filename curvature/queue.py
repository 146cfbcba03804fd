"""Per-class FIFO feature queue kept as module buffers (SPEC §4), after MoCo's queue.

``queue[C, Q, D]`` holds each class's ``Q`` most recent detached features, ``ptr[C]`` the next slot
to overwrite and ``count[C]`` how many slots are filled. As buffers they move with ``.to(device)``
and are saved by ``state_dict`` — so a resumed run continues with the same queues. ``version[C]``
(not saved) changes whenever a class's queue does, by an enqueue or a state-dict load, so that
results computed from a queue can be cached until it changes.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn

#: Gathers ``(features, labels)`` from every worker; the padding rows it may add carry label -1.
GatherFn = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def gather_from_all_workers(features: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """All-gather ragged per-worker batches; the identity outside ``torch.distributed``.

    Batches may differ in size (the last one of an epoch), so each worker pads to the largest and
    pads labels with -1, which serve as the validity mask and are dropped after the gather.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return features, labels
    world = dist.get_world_size()
    size = torch.tensor([features.shape[0]], device=features.device)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size)
    longest = int(torch.stack(sizes).max())
    padded_features = features.new_zeros(longest, features.shape[1])
    padded_features[: features.shape[0]] = features
    padded_labels = labels.new_full((longest,), -1)
    padded_labels[: labels.shape[0]] = labels
    all_features = [torch.empty_like(padded_features) for _ in range(world)]
    all_labels = [torch.empty_like(padded_labels) for _ in range(world)]
    dist.all_gather(all_features, padded_features)
    dist.all_gather(all_labels, padded_labels)
    gathered_features, gathered_labels = torch.cat(all_features), torch.cat(all_labels)
    valid = gathered_labels >= 0
    return gathered_features[valid], gathered_labels[valid]


def rank_within_class(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """For each sample, how many earlier samples in the batch share its label (0, 1, 2, ...).
    A running count over one-hot rows: no sort, and no ``bincount`` (which reads its input's
    maximum on the host), so it can run inside a CUDA graph."""
    one_hot = torch.nn.functional.one_hot(labels, num_classes)
    return one_hot.cumsum(dim=0).gather(1, labels[:, None])[:, 0] - 1


def class_counts(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(num_classes,) how many of ``labels`` each class has: ``bincount`` without its host reads
    (on CUDA it reads the labels' minimum and maximum back to size its output)."""
    return labels.new_zeros(num_classes).index_add_(0, labels, torch.ones_like(labels))


def check_labels(labels: torch.Tensor, num_classes: int) -> None:
    """Raise ValueError unless every label lies in [0, num_classes - 1] (one host read)."""
    if labels.numel() > 0 and not bool(((labels >= 0) & (labels < num_classes)).all()):
        raise ValueError(f"labels: must lie in [0, {num_classes - 1}]")


class ClassFeatureQueue(nn.Module):
    """FIFO ring of the ``queue_size`` most recent features of every class."""

    queue: torch.Tensor
    ptr: torch.Tensor
    count: torch.Tensor
    version: torch.Tensor

    def __init__(self, num_classes: int, feature_dim: int, queue_size: int, gather: GatherFn = gather_from_all_workers):
        super().__init__()
        for name, value in (("num_classes", num_classes), ("feature_dim", feature_dim), ("queue_size", queue_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: must be a positive integer, got {value!r}")
        self.num_classes, self.queue_size, self.gather = num_classes, queue_size, gather
        self.register_buffer("queue", torch.zeros(num_classes, queue_size, feature_dim))  # (C, Q, D)
        self.register_buffer("ptr", torch.zeros(num_classes, dtype=torch.long))  # (C,)
        self.register_buffer("count", torch.zeros(num_classes, dtype=torch.long))  # (C,)
        self.register_buffer("version", torch.zeros(num_classes, dtype=torch.long), persistent=False)  # (C,)
        self.register_load_state_dict_post_hook(ClassFeatureQueue._changed_by_load)

    @torch.no_grad()
    def enqueue(self, features: torch.Tensor, labels: torch.Tensor, *, labels_checked: bool = False) -> None:
        """Gather from all workers, then write each class's newest features over its oldest.
        ``labels_checked``: the caller has run :func:`check_labels` on this worker's labels, so
        the one host read that checking takes is not repeated; outside ``torch.distributed``
        nothing here then waits on the GPU."""
        if not labels_checked:
            check_labels(labels, self.num_classes)
        features, labels = self.gather(features.detach(), labels)
        if labels.numel() == 0:
            return
        size = self.queue_size
        arriving = class_counts(labels, self.num_classes)  # (C,)
        slots = labels * size + (self.ptr[labels] + rank_within_class(labels, self.num_classes)) % size
        # A class with more than Q arrivals keeps its newest Q: arrivals Q apart share a slot, and
        # each writes the features of the newest arrival for its slot (equal values, whatever the
        # order of the writes), which needs no selection of rows and so no host read.
        newest = self.ptr.new_full((self.num_classes * size,), -1).scatter_reduce(
            0, slots, torch.arange(labels.numel(), device=labels.device), "amax")
        self.queue.view(-1, self.queue.shape[-1]).index_copy_(0, slots, features[newest[slots]].to(self.queue.dtype))
        self.ptr.copy_((self.ptr + arriving) % size)
        self.count.copy_(torch.clamp(self.count + arriving, max=self.queue_size))
        self.version.add_(arriving > 0)

    @staticmethod
    def _changed_by_load(queue: ClassFeatureQueue, incompatible_keys: object) -> None:
        queue.version.add_(1)

    def filled(self) -> torch.Tensor:
        """(C, Q) mask of the slots that hold a feature."""
        return torch.arange(self.queue_size, device=self.count.device)[None, :] < self.count[:, None]

    def padded_clouds(self, classes: torch.Tensor | None, features: torch.Tensor, cloud_of: torch.Tensor,
                      ranks: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Each class's cloud as CR measures it: (C', W, D) its queue's slots, then the ``features``
        (b, D) that belong to it (``cloud_of`` (b,): the cloud, ``ranks`` (b,): the order within it)
        at slots Q + rank, zero after; and the (C', W) mask of the slots that hold a point.
        ``classes``: the classes, as ids (C',), or ``None`` for all. Differentiable in ``features``;
        no host synchronisation."""
        queued, filled = self.queue, self.filled()
        if classes is not None:
            queued, filled = queued[classes], filled[classes]
        slots = (cloud_of, self.queue_size + ranks)
        clouds = features.new_zeros(queued.shape[0], width, features.shape[1])
        clouds[:, :self.queue_size] = queued.to(features.dtype)
        valid = torch.zeros(clouds.shape[:2], dtype=torch.bool, device=features.device)
        valid[:, :self.queue_size] = filled
        valid = valid.index_put(slots, torch.ones_like(ranks, dtype=torch.bool))
        return clouds.index_put(slots, features), valid  # out of place: keeps the gradient
