"""Datasets (SPEC §5): registry, long-tailed protocol, loaders."""

from orchestrator.data import image_lists  # noqa: F401  (registers imagenet_lt, inat2018)
from orchestrator.data.datasets import DATASETS, DataBundle, build_dataset

__all__ = ["DATASETS", "DataBundle", "build_dataset"]
