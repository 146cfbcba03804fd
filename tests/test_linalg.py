"""Batched eigen-decomposition (curvature/_linalg.py) on batches of the sizes CR passes it."""

from __future__ import annotations

import pytest
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


def test_float32_batch_that_does_not_converge_is_solved_in_float64(monkeypatch, device):
    """cuSOLVER can report a float32 batch as not converging; it is then solved in float64."""
    import curvature._linalg as linalg

    solve = torch.linalg.eigh

    def refuses_float32(matrices):
        if matrices.dtype == torch.float32:
            raise torch.linalg.LinAlgError("linalg.eigh: The algorithm failed to converge")
        return solve(matrices)

    monkeypatch.setattr(linalg.torch.linalg, "eigh", refuses_float32)
    matrices = torch.randn(6, 4, 4, device=device)
    matrices = matrices @ matrices.mT
    evals, evecs = linalg._cuda_eigh(matrices)
    assert evals.dtype == torch.float32 and evecs.dtype == torch.float32
    torch.testing.assert_close(evecs @ torch.diag_embed(evals) @ evecs.mT, matrices, rtol=1e-5, atol=1e-5)
    with pytest.raises(torch.linalg.LinAlgError):  # a float64 batch has nothing more precise to fall back on
        monkeypatch.setattr(linalg.torch.linalg, "eigh", lambda matrices: refuses_float32(matrices.float()))
        linalg._cuda_eigh(matrices.double())
