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


class PadCropFlip:
    """Standard CIFAR augmentation: pad by ``padding``, random crop back, horizontal flip. ``fill``
    (C,) is the padding's value per channel: for normalised images, where black pixels went, as
    torchvision's ``RandomCrop(32, padding=4)`` pads the raw image with black before ``Normalize``
    (the protocol of Cao et al.'s LDAM-DRW code); zeros when not given. The crop is cut without
    building the padded image: a copy of the fill, and the part of the image the crop window covers.
    A class rather than a closure, so that DataLoader processes started by spawn (macOS) can take it."""

    def __init__(self, padding: int = 4, fill: torch.Tensor | None = None):
        self.padding, self.fill = padding, fill
        self._blank: torch.Tensor | None = None  # the fill at the images' shape, made at the first image

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        channels, height, width = image.shape
        if self._blank is None or self._blank.shape != image.shape or self._blank.dtype != image.dtype:
            fill = image.new_zeros(channels) if self.fill is None else self.fill.to(image.dtype)
            self._blank = fill[:, None, None].repeat(1, height, width)
        down, right = (offset - self.padding for offset in torch.randint(0, 2 * self.padding + 1, (2,)).tolist())
        crop = self._blank.clone()
        crop[:, max(0, -down) : height - max(0, down), max(0, -right) : width - max(0, right)] = \
            image[:, max(0, down) : height + min(0, down), max(0, right) : width + min(0, right)]
        return crop.flip(-1) if bool(torch.rand(()) < 0.5) else crop
