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
    def enqueue(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        """Gather from all workers, then write each class's newest features over its oldest."""
        features, labels = self.gather(features.detach(), labels)
        if labels.numel() == 0:
            return
        if bool(((labels < 0) | (labels >= self.num_classes)).any()):
            raise ValueError(f"labels: must lie in [0, {self.num_classes - 1}]")
        arriving = torch.bincount(labels, minlength=self.num_classes)  # (C,)
        ranks = rank_within_class(labels, self.num_classes)
        keep = ranks >= arriving[labels] - self.queue_size  # more than Q arrivals: only the newest Q
        slots = (self.ptr[labels] + ranks) % self.queue_size
        self.queue[labels[keep], slots[keep]] = features[keep].to(self.queue.dtype)
        self.ptr.copy_((self.ptr + arriving) % self.queue_size)
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
