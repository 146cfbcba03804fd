"""Reading feature files for ``curvlt measure``: ``.npz`` or ``.pt`` holding ``features`` (n x p)
and ``labels`` (n)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from orchestrator.errors import UserError

REQUIRED_KEYS = ("features", "labels")


def _load_mapping(path: Path) -> dict:
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    if path.suffix == ".npz":
        try:
            with np.load(path, allow_pickle=False) as archive:
                return {key: archive[key] for key in archive.files}
        except (OSError, ValueError) as exc:
            raise UserError(f"{path}: not a readable .npz archive ({exc})") from exc
    if path.suffix == ".pt":
        try:
            loaded = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises several unrelated types for a corrupt file
            raise UserError(f"{path}: not a readable .pt file ({exc})") from exc
        if not isinstance(loaded, dict):
            raise UserError(f"{path}: expected a dict with keys {REQUIRED_KEYS}, got {type(loaded).__name__}")
        return loaded
    raise UserError(f"{path}: unsupported file type {path.suffix!r}; use .npz or .pt")


def load_features(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(features, labels)`` as NumPy arrays, checking keys and shapes."""
    path = Path(path)
    mapping = _load_mapping(path)
    missing = [key for key in REQUIRED_KEYS if key not in mapping]
    if missing:
        raise UserError(f"{path}: missing key {missing[0]!r} (found {sorted(mapping)}); "
                        f"the file must hold 'features' (n x p) and 'labels' (n)")
    features = np.asarray(mapping["features"].cpu() if torch.is_tensor(mapping["features"]) else mapping["features"])
    labels = np.asarray(mapping["labels"].cpu() if torch.is_tensor(mapping["labels"]) else mapping["labels"])
    if features.ndim != 2:
        raise UserError(f"{path}: 'features' must be 2-d (n x p), got shape {features.shape}")
    if labels.ndim != 1 or labels.shape[0] != features.shape[0]:
        raise UserError(f"{path}: 'labels' must have shape ({features.shape[0]},) to match 'features', "
                        f"got {labels.shape}")
    if not np.issubdtype(features.dtype, np.number):
        raise UserError(f"{path}: 'features' must be numeric, got dtype {features.dtype}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise UserError(f"{path}: 'labels' must be integers, got dtype {labels.dtype}")
    _check_finite(path, features, labels)
    return features, labels


def _check_finite(path: Path, features: np.ndarray, labels: np.ndarray) -> None:
    """Name the first row that holds NaN or Inf, as a feature extractor that diverged leaves them.
    One float64 sum per row finds them (a NaN or Inf makes the sum one, finite floats cannot
    overflow it) without the n x p mask ``np.isfinite`` would make: 600 MB for ImageNet-LT."""
    bad = np.flatnonzero(~np.isfinite(features.sum(axis=1, dtype=np.float64)))
    if bad.size:
        raise UserError(f"{path}: 'features' row {bad[0]} (label {labels[bad[0]]}) holds NaN or Inf values "
                        f"(rows that do: {bad.size} of {features.shape[0]})")
