"""CR's patch eigen-problems on the GPU: cuSOLVER against the round-robin Triton kernel, side by side.

    python benchmarks/patch_eigh.py          # on a CUDA machine (benchmarks/gpu_check.sh runs it)

Why: at ResNet-32 / CIFAR-100 shapes (100 classes, Q = 128, k = 10) CR decomposes 13,600 centred
11 x 11 patch Gram matrices per step. ``torch.linalg.eigh`` sends them to cuSOLVER (2.5-2.7 ms on an
H200) and then waits on the GPU to read its error codes, which rules the call out of CUDA graphs.
:func:`curvature._jacobi_triton.round_robin_eigh` is a candidate that does neither; this measures
it on the same matrices CR builds (random features, as in the GPU rows of
``benchmarks/training.py``), in float64 (what CR uses) and float32, and prints for each solver the
best time of one call with the GPU synchronised, the time the host takes to get the call back
(close to the first when the call waits on the GPU) and the largest eigenvalue difference from
float64 cuSOLVER, relative to each matrix's largest eigenvalue.
"""

from __future__ import annotations

import time

import torch

from _machine import best_time, describe
from curvature.gram_rotation import cloud_grams, neighbours_from_grams, patch_grams


def patch_matrices(device: torch.device, classes: int = 100, width: int = 136, dim: int = 64,
                   k: int = 10) -> torch.Tensor:
    """The centred patch Gram matrices (classes * width, k + 1, k + 1), float64, of random clouds,
    built as CR's CUDA-graph path builds them (every slot of every class measured)."""
    clouds = torch.randn(classes, width, dim, generator=torch.Generator().manual_seed(0)).to(device)
    valid = torch.ones(classes, width, dtype=torch.bool, device=device)
    grams = cloud_grams(clouds, valid)
    offsets = (torch.arange(classes, device=device) * width)[:, None, None]
    neighbours = (neighbours_from_grams(grams, valid, k) + offsets).flatten(0, 1)
    return patch_grams(grams, torch.arange(classes * width, device=device), neighbours)[2]


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


def main() -> None:
    print(describe())
    if not torch.cuda.is_available():
        print("no CUDA device: nothing timed (tests/test_jacobi_triton.py checks the kernel's arithmetic "
              "in Triton's interpreter)")
        return
    from curvature._jacobi_triton import round_robin_eigh

    reference = patch_matrices(torch.device("cuda"))
    expected = torch.linalg.eigvalsh(reference)
    scale = expected.abs().amax(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny)
    print(f"\n{reference.shape[0]:,} centred patch Gram matrices of {reference.shape[-1]} x {reference.shape[-1]}"
          " (ResNet-32 / CIFAR-100 shapes, random features)\n")
    print("| solver | dtype | best call, GPU synchronised (ms) | host gets the call back (ms) | "
          "max eigenvalue difference |")
    print("|---|---|---:|---:|---:|")
    for dtype in (torch.float64, torch.float32):
        matrices = reference.to(dtype)
        solvers = (("cuSOLVER (torch.linalg.eigh)", torch.linalg.eigh), ("round-robin Jacobi (Triton)", round_robin_eigh))
        for name, solve in solvers:
            evals = solve(matrices)[0]  # also compiles the kernel, outside the timing
            error = float(((evals.double() - expected).abs() / scale).max())
            best = best_time(lambda: solve(matrices), repeats=20, warmup=3)
            print(f"| {name} | {str(dtype).removeprefix('torch.')} | {best * 1e3:.3f} | "
                  f"{host_return(solve, matrices) * 1e3:.3f} | {error:.1e} |", flush=True)


if __name__ == "__main__":
    main()
