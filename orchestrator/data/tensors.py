"""In-memory image datasets with optional tensor augmentation (CIFAR's pad-crop and flip)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.utils.data import Dataset


class TensorImages(Dataset):
    """``images`` (N, C, H, W) float, ``labels`` (N,) long; ``augment`` runs per sample with the
    DataLoader worker's own torch RNG."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor,
                 augment: Callable[[torch.Tensor], torch.Tensor] | None = None):
        self.images, self.labels, self.augment = images, labels, augment

    def __len__(self) -> int:
        return self.labels.shape[0]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = self.images[index]
        return (self.augment(image) if self.augment else image), self.labels[index]


def pad_crop_flip(padding: int = 4) -> Callable[[torch.Tensor], torch.Tensor]:
    """Standard CIFAR augmentation: zero-pad by ``padding``, random crop back, horizontal flip."""

    def augment(image: torch.Tensor) -> torch.Tensor:
        _, height, width = image.shape
        padded = torch.nn.functional.pad(image, (padding,) * 4)
        top, left = torch.randint(0, 2 * padding + 1, (2,)).tolist()
        crop = padded[:, top : top + height, left : left + width]
        return crop.flip(-1) if bool(torch.rand(()) < 0.5) else crop

    return augment
