"""The long-tailed protocol of Cao et al. (LDAM-DRW, NeurIPS 2019) and shot groups (SPEC §5).

Sorted classes ``c = 0..C-1`` keep ``n_c = floor(n_max · IF^(-c/(C-1)))`` training images, chosen with
a fixed seed through a local ``numpy.random.Generator`` (never the global RNG); test sets stay
balanced; ``IF = 1`` is the balanced dataset.
"""

from __future__ import annotations

import numpy as np

from orchestrator.errors import UserError


def long_tail_counts(n_max: int, num_classes: int, imbalance_factor: float) -> np.ndarray:
    """Per-class training counts of the exponential profile; at least 1 image per class."""
    if imbalance_factor < 1:
        raise UserError(f"dataset.imbalance_factor: must be >= 1, got {imbalance_factor}")
    exponents = np.arange(num_classes) / max(num_classes - 1, 1)
    return np.maximum(np.floor(n_max * imbalance_factor ** (-exponents) + 1e-9).astype(int), 1)


def long_tail_indices(labels: np.ndarray, num_classes: int, imbalance_factor: float, seed: int) -> np.ndarray:
    """Indices of a long-tailed subset of ``labels``; ``n_max`` is the smallest class's size so that
    every class can supply its quota."""
    available = np.bincount(labels, minlength=num_classes)
    counts = long_tail_counts(int(available.min()), num_classes, imbalance_factor)
    rng = np.random.default_rng(seed)
    chosen = [rng.choice(np.flatnonzero(labels == c), size=counts[c], replace=False) for c in range(num_classes)]
    return np.sort(np.concatenate(chosen))


def shot_groups(train_counts: np.ndarray, many_threshold: int, few_threshold: int) -> np.ndarray:
    """Per class: 0 = Many (> many_threshold images), 1 = Medium, 2 = Few (< few_threshold)."""
    groups = np.ones(len(train_counts), dtype=int)
    groups[train_counts > many_threshold] = 0
    groups[train_counts < few_threshold] = 2
    return groups


def per_class_subsample(labels: np.ndarray, max_per_class: int, seed: int) -> np.ndarray:
    """A fixed subsample of at most ``max_per_class`` indices per class (for geometry). Each class's
    indices come from one stable sort, in increasing order as ``np.flatnonzero(labels == c)`` gave
    them (the same draws, so the same points as before), without one pass over all labels per
    class (8,142 passes over 437,513 labels for iNaturalist)."""
    rng = np.random.default_rng(seed)
    order = np.argsort(labels, kind="stable")
    starts = np.unique(labels[order], return_index=True)[1]
    picks = [members if len(members) <= max_per_class else rng.choice(members, max_per_class, replace=False)
             for members in np.split(order, starts[1:])]
    return np.sort(np.concatenate(picks))
