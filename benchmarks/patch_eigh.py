"""CR's eigen-problems on the GPU: cuSOLVER against the Triton kernels, side by side.

    python benchmarks/patch_eigh.py          # on a CUDA machine (benchmarks/gpu_check.sh runs it)

Why: at ResNet-32 / CIFAR-100 shapes (100 classes, Q = 128, k = 10) CR decomposes 13,600 centred
11 x 11 patch Gram matrices per step. ``torch.linalg.eigh`` sends them to cuSOLVER (2.5-2.7 ms on an
H200) and then waits on the GPU to read its error codes, which rules the call out of CUDA graphs.
:func:`curvature._jacobi_triton.round_robin_eigh` is a candidate that does neither; this measures
it on the same matrices CR builds (random features, as in the GPU rows of
``benchmarks/training.py``), in float64 (what CR uses) and float32. The same kernel takes the
pair stage's d x d problems for d = 5 to 8 (136,000 of them per step in CR's graphed path, which
takes every directed pair; d = 8 is the auto dimension of a fresh model), so those are timed too,
in float32 (what CR uses), built from the same clouds. For each solver it prints the best time of
one call with the GPU synchronised, the time the host takes to get the call back (close to the
first when the call waits on the GPU) and the largest eigenvalue difference from float64
cuSOLVER, relative to each matrix's largest eigenvalue.
"""

from __future__ import annotations

import time

import torch

from _machine import best_time, describe
from curvature._linalg import cusolver_eigh
from curvature.gram_rotation import (GramPatches, cloud_grams, descending, neighbours_from_grams, pair_residual_grams,
                                     patch_grams)


def cr_matrices(device: torch.device, pair_dims: tuple[int, ...], classes: int = 100, width: int = 136,
                features: int = 64, k: int = 10) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """CR's eigen-problems for random clouds, built as its CUDA-graph path builds them (every slot
    of every class measured, every directed pair): the centred patch Gram matrices (classes *
    width, k + 1, k + 1), float64, and for each d of ``pair_dims`` the pairs' ``R Rᵀ`` (classes *
    width * k, d, d), float32."""
    clouds = torch.randn(classes, width, features, generator=torch.Generator().manual_seed(0)).to(device)
    valid = torch.ones(classes, width, dtype=torch.bool, device=device)
    grams = cloud_grams(clouds, valid)
    offsets = (torch.arange(classes, device=device) * width)[:, None, None]
    neighbours = (neighbours_from_grams(grams, valid, k) + offsets).flatten(0, 1)
    blocks, patches, centred = patch_grams(grams, torch.arange(classes * width, device=device), neighbours)
    spectra = GramPatches(grams, blocks, patches, *descending(*cusolver_eigh(centred)))
    pairs = {dim: pair_residual_grams(spectra, neighbours, dim, distinct=False)[0].float() for dim in pair_dims}
    return centred, pairs


def host_return(solve, matrices: torch.Tensor, repeats: int = 10) -> float:
    """Median time until ``solve`` returns to Python, the GPU idle before each call."""
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        solve(matrices)
        times.append(time.perf_counter() - start)
        torch.cuda.synchronize()
    return sorted(times)[len(times) // 2]


def compare(title: str, reference: torch.Tensor, dtypes: tuple[torch.dtype, ...]) -> None:
    """One table: cuSOLVER against the round-robin kernel on ``reference`` in each of ``dtypes``."""
    from curvature._jacobi_triton import round_robin_eigh

    expected = cusolver_eigh(reference.double())[0]
    scale = expected.abs().amax(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny)
    print(f"\n{reference.shape[0]:,} {title} of {reference.shape[-1]} x {reference.shape[-1]}"
          " (ResNet-32 / CIFAR-100 shapes, random features)\n")
    print("| solver | dtype | best call, GPU synchronised (ms) | host gets the call back (ms) | "
          "max eigenvalue difference |")
    print("|---|---|---:|---:|---:|")
    for dtype in dtypes:
        matrices = reference.to(dtype)
        solvers = (("cuSOLVER (torch.linalg.eigh)", cusolver_eigh), ("round-robin Jacobi (Triton)", round_robin_eigh))
        for name, solve in solvers:
            evals = solve(matrices)[0]  # also compiles the kernel, outside the timing
            error = float(((evals.double() - expected).abs() / scale).max())
            best = best_time(lambda: solve(matrices), repeats=20, warmup=3)
            print(f"| {name} | {str(dtype).removeprefix('torch.')} | {best * 1e3:.3f} | "
                  f"{host_return(solve, matrices) * 1e3:.3f} | {error:.1e} |", flush=True)


def main() -> None:
    print(describe())
    if not torch.cuda.is_available():
        print("no CUDA device: nothing timed (tests/test_jacobi_triton.py checks the kernel's arithmetic "
              "in Triton's interpreter)")
        return
    patches, pairs = cr_matrices(torch.device("cuda"), pair_dims=(8, 5))
    compare("centred patch Gram matrices", patches, (torch.float64, torch.float32))
    for dim, residuals in pairs.items():
        compare(f"pair matrices R Rᵀ at tangent dimension {dim}", residuals, (torch.float32,))


if __name__ == "__main__":
    main()
