"""kNN backends against brute force (SPEC §3.5)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.spatial.distance import cdist

from curvature import knn
from curvature.neighbours import choose_backend, drop_self, faiss_available

BACKENDS = ["torch", "faiss", "auto"]


def brute_force(points: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    dist = cdist(points, points)  # the n x n distances alone: an n x n x p difference array took seconds
    np.fill_diagonal(dist, np.inf)
    order = np.argsort(dist, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(dist, order, axis=1), order


def test_faiss_is_installed():
    assert faiss_available(), "faiss-cpu is a dependency; the FAISS backend must be tested for real"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n,p,k", [(50, 3, 5), (700, 32, 10), (3000, 8, 20)])
def test_matches_brute_force(backend, n, p, k, rng, device):
    points = rng.normal(size=(n, p))
    expected_dist, expected_idx = brute_force(points, k)
    dist, idx = knn(torch.tensor(points, device=device), k, backend=backend)
    assert idx.shape == (n, k) and dist.shape == (n, k)
    assert (idx.cpu().numpy() == expected_idx).mean() > 0.999  # ties aside
    np.testing.assert_allclose(dist.cpu().numpy(), expected_dist, rtol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_self_excluded_among_duplicates(backend, rng):
    base = rng.normal(size=(10, 4))
    points = np.concatenate([base] * 4)  # every point has three exact copies
    _, idx = knn(points, 5, backend=backend)
    assert not (idx.numpy() == np.arange(40)[:, None]).any()


def test_drop_self_when_self_ranked_last():
    found = torch.tensor([[1, 2, 3], [0, 2, 1]])  # row 0 lacks itself; row 1 has it
    assert drop_self(found, 2).tolist() == [[1, 2], [0, 2]]


@pytest.mark.parametrize("k", [0, 10, -1])
def test_bad_k(k):
    with pytest.raises(ValueError, match="k"):
        knn(np.zeros((10, 2)), k)


def test_unknown_backend():
    with pytest.raises(ValueError, match="backend"):
        knn(np.random.default_rng(0).normal(size=(10, 2)), 3, backend="annoy")


def test_auto_choice_follows_measured_table():
    assert choose_backend(1000, 64, torch.device("cpu")) == "torch"
    assert choose_backend(50_000, 64, torch.device("cpu")) == "faiss"
