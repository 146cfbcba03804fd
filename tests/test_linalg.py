"""Batched eigen-decomposition (curvature/_linalg.py) on batches of the sizes CR passes it."""

from __future__ import annotations

import torch

from curvature._linalg import symmetric_eigh


def test_eigh_of_more_matrices_than_one_cusolver_call_takes(device):
    # CR's pair stage on ResNet-32 / CIFAR-100 (100 classes, Q = 128, k = 10) solves ~96,000 small
    # eigen-problems per step; cuSOLVER's batched solver fails from 65,536 matrices on.
    generator = torch.Generator().manual_seed(0)
    factors = torch.randn(70_000, 4, 4, generator=generator).to(device)
    matrices = factors @ factors.mT
    evals, evecs = symmetric_eigh(matrices)
    rebuilt = evecs @ torch.diag_embed(evals) @ evecs.mT
    assert torch.allclose(rebuilt, matrices, atol=1e-3 * float(matrices.abs().max()))
    assert bool((evals[:, 1:] >= evals[:, :-1]).all())
