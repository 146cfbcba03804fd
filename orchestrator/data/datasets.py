"""Dataset registry (SPEC §5): every factory takes the dataset config and the run seed and
returns a :class:`DataBundle` whose training split is already long-tailed."""

from __future__ import annotations

import gzip
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from curvature import manifolds
from orchestrator.config import DatasetConfig
from orchestrator.data.long_tail import long_tail_indices
from orchestrator.data.tensors import PadCropFlip, TensorImages
from orchestrator.errors import UserError
from orchestrator.registry import Registry

FASHION_MNIST_DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")


@dataclass
class DataBundle:
    train: Dataset  # long-tailed, augmented where the protocol says so
    train_plain: Dataset  # the same images without augmentation (for geometry)
    test: Dataset  # balanced
    train_labels: np.ndarray
    num_classes: int
    input_shape: tuple[int, ...]
    true_curvature: np.ndarray | None = None  # per class, when known (synthetic manifolds)

    @property
    def class_counts(self) -> np.ndarray:
        return np.bincount(self.train_labels, minlength=self.num_classes)


DATASETS: Registry[DataBundle] = Registry("dataset", "dataset.name")


def build_dataset(config: DatasetConfig, seed: int) -> DataBundle:
    return DATASETS.create(config.name, config=config, seed=seed)


def _bundle(train_x: torch.Tensor, train_y: np.ndarray, test_x: torch.Tensor, test_y: np.ndarray, config: DatasetConfig,
            seed: int, num_classes: int, augment=None, true_curvature: np.ndarray | None = None) -> DataBundle:
    """Long-tail the training split and wrap both splits as tensor datasets."""
    keep = long_tail_indices(train_y, num_classes, config.imbalance_factor, seed)
    images, labels = train_x[keep], torch.as_tensor(train_y[keep], dtype=torch.long)
    return DataBundle(train=TensorImages(images, labels, augment), train_plain=TensorImages(images, labels),
                      test=TensorImages(test_x, torch.as_tensor(test_y, dtype=torch.long)),
                      train_labels=train_y[keep], num_classes=num_classes, input_shape=tuple(images.shape[1:]),
                      true_curvature=true_curvature)


@DATASETS.register("digits_lt")
def digits_lt(config: DatasetConfig, seed: int) -> DataBundle:
    """scikit-learn's bundled 8x8 digits: 50 test images per class, the rest long-tailed for training."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.tensor(digits.images / 16.0, dtype=torch.float32)[:, None]  # (1797, 1, 8, 8)
    labels = digits.target.astype(np.int64)
    rng = np.random.default_rng(0)  # the split is fixed for every run, whatever the seed
    test_idx = np.concatenate([rng.choice(np.flatnonzero(labels == c), 50, replace=False) for c in range(10)])
    train_idx = np.setdiff1d(np.arange(len(labels)), test_idx)
    return _bundle(images[train_idx], labels[train_idx], images[test_idx], labels[test_idx], config, seed, 10)


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as handle:
        data = handle.read()
    dims = data[3]
    shape = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(dims)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * dims).reshape(shape)


FASHION_FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
                 "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")


def _fashion_arrays(config: DatasetConfig) -> list[np.ndarray]:
    root = Path(config.root).expanduser()
    candidates = [FASHION_MNIST_DEBIAN_DIR, root / "fashion-mnist", root / "FashionMNIST" / "raw"]
    for folder in candidates:
        if all((folder / name).is_file() for name in FASHION_FILES):
            return [_read_idx(folder / name) for name in FASHION_FILES]
    if config.download:
        from torchvision.datasets import FashionMNIST

        try:
            FashionMNIST(str(root), train=True, download=True)
            FashionMNIST(str(root), train=False, download=True)
        except (OSError, RuntimeError) as exc:  # no network: URLError, an OSError; every mirror failed: RuntimeError
            raise _download_failed(config, root, exc) from None
        return [_read_idx(root / "FashionMNIST" / "raw" / name) for name in FASHION_FILES]
    raise UserError(f"dataset fashion_mnist_lt: IDX files not found in {', '.join(map(str, candidates))}; "
                    f"install them with 'apt-get install dataset-fashion-mnist' or set dataset.download=true")


def _download_failed(config: DatasetConfig, root: Path, exc: Exception) -> UserError:
    return UserError(f"dataset {config.name}: could not download it to {root} ({exc}); check the network, "
                     f"or put its files there and set dataset.download=false")


@DATASETS.register("fashion_mnist_lt")
def fashion_mnist_lt(config: DatasetConfig, seed: int) -> DataBundle:
    """Fashion-MNIST, from the Debian package's IDX files when present, else torchvision."""
    train_x, train_y, test_x, test_y = _fashion_arrays(config)

    def to_tensor(images: np.ndarray) -> torch.Tensor:
        return ((torch.tensor(images, dtype=torch.float32) / 255.0 - 0.2860) / 0.3530)[:, None]

    return _bundle(to_tensor(train_x), train_y.astype(np.int64), to_tensor(test_x), test_y.astype(np.int64),
                   config, seed, 10)


@DATASETS.register("synthetic_manifolds")
def synthetic_manifolds(config: DatasetConfig, seed: int) -> DataBundle:
    """Class c is a round ``manifold_dim``-sphere of radius r_c (geometric from radius_max down to
    radius_min, so the head class is the flattest), at a random centre, so every class's true
    curvature 1/r_c is known."""
    cfg = config.synthetic
    rng = np.random.default_rng(10_000 + seed)
    radii = np.geomspace(cfg.radius_max, cfg.radius_min, cfg.num_classes)
    centres = rng.normal(scale=2.0 * cfg.radius_max, size=(cfg.num_classes, cfg.ambient_dim))
    per_class = cfg.max_per_class + cfg.test_per_class
    clouds = [manifolds.sphere(per_class, cfg.manifold_dim, r, cfg.ambient_dim, rng) + centre
              for r, centre in zip(radii, centres)]
    points = np.concatenate(clouds) + cfg.noise * rng.normal(size=(per_class * cfg.num_classes, cfg.ambient_dim))
    labels = np.repeat(np.arange(cfg.num_classes), per_class)
    is_test = np.tile(np.arange(per_class) < cfg.test_per_class, cfg.num_classes)
    features = torch.tensor(points / (2.0 * cfg.radius_max), dtype=torch.float32)  # O(1) inputs
    return _bundle(features[~is_test], labels[~is_test], features[is_test], labels[is_test], config, seed,
                   cfg.num_classes, true_curvature=2.0 * cfg.radius_max / radii)


#: Per-channel mean and std of CIFAR's training images, which the images are normalised with.
CIFAR_MEAN, CIFAR_STD = torch.tensor([0.4914, 0.4822, 0.4465]), torch.tensor([0.2023, 0.1994, 0.2010])


def _cifar(config: DatasetConfig, seed: int, num_classes: int) -> DataBundle:
    from torchvision.datasets import CIFAR10, CIFAR100

    root = Path(config.root).expanduser()
    cls = CIFAR10 if num_classes == 10 else CIFAR100
    try:
        train, test = (cls(str(root), train=flag, download=config.download) for flag in (True, False))
    except (OSError, RuntimeError) as exc:  # not found: RuntimeError; no network: URLError, an OSError
        if config.download:
            raise _download_failed(config, root, exc) from None
        raise UserError(f"dataset {config.name}: not found under {root} ({exc}); "
                        f"set dataset.download=true or dataset.root to a folder holding it") from None
    mean, std = CIFAR_MEAN[:, None, None], CIFAR_STD[:, None, None]

    def to_tensor(images: np.ndarray) -> torch.Tensor:
        return (torch.tensor(images, dtype=torch.float32).permute(0, 3, 1, 2) / 255.0 - mean) / std

    return _bundle(to_tensor(train.data), np.asarray(train.targets, dtype=np.int64), to_tensor(test.data),
                   np.asarray(test.targets, dtype=np.int64), config, seed, num_classes, augment=cifar_augmentation())


def cifar_augmentation() -> Callable[[torch.Tensor], torch.Tensor]:
    """Pad-crop and flip of normalised CIFAR images, padding with black as the standard protocol does."""
    return PadCropFlip(fill=-CIFAR_MEAN / CIFAR_STD)


@DATASETS.register("cifar10_lt")
def cifar10_lt(config: DatasetConfig, seed: int) -> DataBundle:
    return _cifar(config, seed, 10)


@DATASETS.register("cifar100_lt")
def cifar100_lt(config: DatasetConfig, seed: int) -> DataBundle:
    return _cifar(config, seed, 100)
