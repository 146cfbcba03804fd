"""1,000 randomized degenerate inputs: every public function returns finite values or raises a
ValueError with a message; nothing else (SPEC §3.6)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import curvature

N_CASES = 1000


def degenerate_cloud(rng: np.random.Generator) -> np.ndarray:
    n, p = int(rng.integers(2, 40)), int(rng.integers(1, 20))
    kind = rng.integers(0, 7)
    if kind == 0:  # exact duplicates
        base = rng.normal(size=(max(1, n // int(rng.integers(2, 6))), p))
        points = base[rng.integers(0, len(base), size=n)]
    elif kind == 1:  # all zeros
        points = np.zeros((n, p))
    elif kind == 2:  # collinear
        points = rng.normal(size=(n, 1)) * rng.normal(size=(1, p)) + rng.normal(size=p)
    elif kind == 3:  # constant cloud away from the origin
        points = np.tile(rng.normal(size=p) * 1e3, (n, 1))
    elif kind == 4:  # a low-dimensional cloud with a few copies mixed in
        points = rng.normal(size=(n, min(p, 2))) @ rng.normal(size=(min(p, 2), p))
        points[: n // 3] = points[0]
    else:  # generic
        points = rng.normal(size=(n, p))
    scale = [1e-12, 1.0, 1e8][int(rng.integers(0, 3))]
    dtype = [np.float32, np.float64][int(rng.integers(0, 2))]
    return (points * scale).astype(dtype)


def assert_finite(*tensors) -> None:
    for tensor in tensors:
        if tensor is not None:
            assert torch.isfinite(torch.as_tensor(np.array(tensor) if isinstance(tensor, np.ndarray) else tensor)).all()


def test_randomized_degenerate_inputs():
    rng = np.random.default_rng(12345)
    errors = 0
    for case in range(N_CASES):
        points = degenerate_cloud(rng)
        n = points.shape[0]
        k = int(rng.integers(1, n + 2))
        labels = rng.integers(0, int(rng.integers(1, 4)), size=n)
        calls = {
            "knn": lambda: assert_finite(*curvature.knn(points, k)),
            "intrinsic_dim": lambda: curvature.intrinsic_dim(points, k),
            "volume": lambda: assert_finite(curvature.volume(points)),
            "separation": lambda: assert_finite(curvature.separation(points, labels).separation),
            "tangent_rotation": lambda: _tangent_rotation_with_gradient(points, k, grad=case % 4 == 0),
            "quadratic_curvature": lambda: _quadratic(points, k),
            "class_geometry": lambda: _class_geometry(points, labels, k),
        }
        for name, call in calls.items():
            try:
                call()
            except ValueError as exc:
                assert str(exc), f"{name}: ValueError without a message"
                errors += 1
            except AssertionError:
                pytest.fail(f"case {case}, {name}: non-finite output for a {points.shape} {points.dtype} cloud, k={k}")
    assert errors < N_CASES * 7  # the valid cases were really computed, not all refused


def _tangent_rotation_with_gradient(points: np.ndarray, k: int, grad: bool) -> None:
    tensor = torch.tensor(points, requires_grad=grad)
    result = curvature.tangent_rotation(tensor, k=k)
    assert_finite(result.angle, result.kappa, result.mean_kappa, result.mean_angle)
    if grad:
        (result.mean_kappa + result.mean_angle).backward()
        assert_finite(tensor.grad)


def _quadratic(points: np.ndarray, k: int) -> None:
    result = curvature.quadratic_curvature(points, k=k)
    assert_finite(result.mean, result.scalar, result.gaussian)


def _class_geometry(points: np.ndarray, labels: np.ndarray, k: int) -> None:
    table = curvature.class_geometry(points, labels, k=k)
    measured = table[table["skipped"] == ""]
    assert_finite(measured[["volume", "separation", "mean_angle", "mean_kappa"]].to_numpy(dtype=float))
    skipped = table[table["skipped"] != ""]
    assert skipped["mean_kappa"].isna().all() or (skipped["separation"].isna()).any()


@pytest.mark.parametrize("rows_per_chunk", [None, 2])
def test_nan_names_the_class(monkeypatch, rows_per_chunk):
    """Also when the rows are checked a chunk at a time and the bad one lies in a late chunk."""
    if rows_per_chunk:
        monkeypatch.setattr(curvature._chunks, "CHUNK_ELEMENTS", 3 * rows_per_chunk)
    features = np.random.default_rng(0).normal(size=(40, 3))
    features[35, 1] = np.nan
    with pytest.raises(ValueError, match="class 1"):
        curvature.class_geometry(features, np.repeat([0, 1], 20))
    with pytest.raises(ValueError, match="NaN"):
        curvature.tangent_rotation(features)


def test_too_few_points_is_a_clear_error():
    with pytest.raises(ValueError, match="k \\+ 1 = 11"):
        curvature.tangent_rotation(np.random.default_rng(0).normal(size=(8, 3)), k=10)
