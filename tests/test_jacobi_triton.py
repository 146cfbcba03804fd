"""The Triton Jacobi eigen-solvers (curvature/_jacobi_triton.py) against ``torch.linalg.eigh``.

On CUDA the compiled kernel runs; on a machine without one, Triton's interpreter runs the same
kernel on the CPU (in a subprocess, since ``TRITON_INTERPRET`` is read when Triton is imported).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton", reason="Triton ships with PyTorch on Linux; the solver is for CUDA machines")

ROOT = Path(__file__).resolve().parents[1]


def hard_batch(n: int, dtype: torch.dtype) -> torch.Tensor:
    """Symmetric n x n matrices of the kinds CR meets: random positive semi-definite ones,
    centred patch Gram matrices of rank below n (repeated zero eigenvalues), a zero matrix, a
    multiple of the identity, a diagonal one (nothing to rotate), one with entries at 1e-30 and one
    at 1e30 (scale)."""
    generator = torch.Generator().manual_seed(n)
    factors = torch.randn(6, n, n, generator=generator, dtype=torch.float64)
    points = torch.randn(3, n, 3, generator=generator, dtype=torch.float64)
    centred = points - points.mean(dim=1, keepdim=True)
    special = torch.stack([torch.zeros(n, n), 2.5 * torch.eye(n), torch.diag(torch.arange(n, 0, -1.0))]).double()
    tiny_and_huge = torch.stack([factors[0] @ factors[0].mT * 1e-30, factors[1] @ factors[1].mT * 1e30])
    batch = torch.cat([factors @ factors.mT, centred @ centred.mT, special, factors[2:4] + factors[2:4].mT])
    if dtype == torch.float64:
        batch = torch.cat([batch, tiny_and_huge])
    return batch.to(dtype)


def check(matrices: torch.Tensor, evals: torch.Tensor, evecs: torch.Tensor) -> None:
    """Same eigenvalues as ``torch.linalg.eigh``, ascending; orthonormal vectors that rebuild the
    matrices, each to a few ulps of its matrix's largest eigenvalue."""
    eps = torch.finfo(matrices.dtype).eps
    n = matrices.shape[-1]
    scale = matrices.flatten(1).abs().amax(dim=1).clamp_min(torch.finfo(matrices.dtype).tiny)[:, None]
    expected = torch.linalg.eigvalsh(matrices.cpu()).to(evals.device)
    assert bool(((evals - expected).abs() <= 50 * n * eps * scale).all())
    assert bool((evals[:, 1:] >= evals[:, :-1]).all())
    identity = torch.eye(n, dtype=matrices.dtype, device=matrices.device)
    assert bool(((evecs.mT @ evecs - identity).abs() <= 50 * n * eps).all())
    rebuilt = evecs @ torch.diag_embed(evals) @ evecs.mT
    assert bool(((rebuilt - matrices).abs() <= 50 * n * eps * scale[:, :, None]).all())


INTERPRETED = """
import json, sys, torch
sys.path.insert(0, {tests!r})
from test_jacobi_triton import check, hard_batch
from curvature import _jacobi_triton
for solver, sizes in {cases}:
    for n in sizes:
        for dtype in (torch.float32, torch.float64):
            matrices = hard_batch(n, dtype)
            evals, evecs = getattr(_jacobi_triton, solver)(matrices)
            check(matrices, evals, evecs)
print(json.dumps("ok"))
"""


def test_jacobi_matches_torch_eigh_in_triton_interpreter_on_cpu():
    """Both kernels' arithmetic, run by Triton's interpreter. The thread-per-matrix kernel: sizes 1
    (no rotation), 2 (one), 3 and 4 (CR's pair matrices at tangent dimensions 3 and 4). The
    round-robin kernel: 1 (padded to 2, nothing to turn), 5 (padded to 8) and 16 (no padding; the
    size CR's patches at k = 10, 11 points, are padded to). The interpreter takes 10-20 s a size
    there, so 11 itself is left to the CUDA test below."""
    cases = (("jacobi_eigh", (1, 2, 3, 4)), ("round_robin_eigh", (1, 5, 16)))
    script = INTERPRETED.format(tests=str(ROOT / "tests"), cases=cases)
    environment = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=environment, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == "ok"


def solvers() -> list:
    """(solver, largest size) of each kernel, imported only where a test runs (Triton may be absent)."""
    from curvature._jacobi_triton import MAX_ROUND_ROBIN_SIZE, MAX_SIZE, jacobi_eigh, round_robin_eigh

    return [(jacobi_eigh, MAX_SIZE), (round_robin_eigh, MAX_ROUND_ROBIN_SIZE)]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_jacobi_matches_torch_eigh_cuda():
    """Every size each kernel takes, both dtypes, and more than one program."""
    for solve, largest in solvers():
        for n in range(1, largest + 1):
            for dtype in (torch.float32, torch.float64):
                matrices = hard_batch(n, dtype).cuda()
                matrices = torch.cat([matrices] * 5)  # 55-60 matrices: two programs, the second partly masked
                evals, evecs = solve(matrices)
                check(matrices, evals, evecs)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_jacobi_is_captured_in_a_cuda_graph_and_replays():
    """No host synchronisation inside either kernel: the call records into a CUDA graph, and a
    replay on new input gives that input's decomposition."""
    for solve, largest in solvers():
        matrices = hard_batch(largest, torch.float64).cuda()
        solve(matrices)  # compile outside the capture
        static = matrices.clone()
        graph = torch.cuda.CUDAGraph()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            solve(static)
            with torch.cuda.graph(graph, stream=stream):
                evals, evecs = solve(static)
        torch.cuda.current_stream().wait_stream(stream)
        other = hard_batch(largest, torch.float64).flip(0).cuda()
        static.copy_(other)
        graph.replay()
        torch.cuda.synchronize()
        check(other, evals, evecs)


def test_eigh_falls_back_to_cusolver_when_the_kernel_fails(monkeypatch, device):
    """Triton builds a launcher with the system's C compiler on first use; where it cannot, the
    kernel is given up with one warning and the decomposition comes from cuSOLVER (on CUDA: checked
    against torch's; on the CPU, where nothing goes to the kernel, the give-up step alone). The
    other kernel is still tried."""
    import curvature._jacobi_triton as jacobi
    import curvature._linalg as linalg

    def cannot_build(matrices):
        raise RuntimeError("Failed to find C compiler")

    monkeypatch.setattr(jacobi, "jacobi_eigh", cannot_build)
    monkeypatch.setattr(linalg, "_jacobi_failures", {})
    matrices = hard_batch(4, torch.float32).to(device)
    with pytest.warns(UserWarning, match="Failed to find C compiler"):
        assert linalg._jacobi_eigh(matrices) is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # given up: not tried, nor warned about, again
        assert linalg._jacobi_eigh(matrices) is None
        evals, evecs = linalg.symmetric_eigh(matrices)
    check(matrices, evals, evecs)
    monkeypatch.setattr(jacobi, "round_robin_eigh", torch.linalg.eigh)
    assert linalg._jacobi_eigh(hard_batch(5, torch.float32).to(device)) is not None


def test_a_kernel_whose_eigenvalues_are_wrong_is_given_up(monkeypatch, device):
    """The first time each size and dtype is met, a kernel's eigenvalues are checked against
    ``torch.linalg.eigvalsh``: one that is off (here, one eigenvalue of every matrix) is given up
    with a warning, and the batch goes to cuSOLVER."""
    import curvature._jacobi_triton as jacobi
    import curvature._linalg as linalg

    def slightly_wrong(matrices):
        evals, evecs = torch.linalg.eigh(matrices)
        return evals * torch.tensor([1.0] * (matrices.shape[-1] - 1) + [1.001], device=matrices.device), evecs

    monkeypatch.setattr(jacobi, "round_robin_eigh", slightly_wrong)
    monkeypatch.setattr(linalg, "_jacobi_failures", {})
    monkeypatch.setattr(linalg, "_jacobi_checked", set())
    with pytest.warns(UserWarning, match="slightly_wrong cannot run here.*differ from cuSOLVER's by 1.0e-03"):
        assert linalg._jacobi_eigh(hard_batch(11, torch.float64).to(device)) is None
    monkeypatch.setattr(jacobi, "round_robin_eigh", torch.linalg.eigh)
    assert linalg._jacobi_eigh(hard_batch(11, torch.float64).to(device)) is not None  # checked, then used
    assert ("linalg_eigh", 11, torch.float64) in linalg._jacobi_checked
