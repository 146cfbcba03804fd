"""Geometry engine benchmark (issue "Geometry engine", SPEC §3).

Side by side, in one run, on one cloud:
  * ``curvature.tangent_rotation`` (batched torch),
  * a per-point loop with the public reference's structure (per point a fresh neighbour query and
    SVD; per neighbour another query and SVD, in NumPy) — angles taken from sines so that both
    compute the same quantity,
  * the floor: brute-force distance product plus top-k on the same cloud.
Then ``class_geometry`` on 10 classes x 1,000 points, ``separation`` against its definition, the
noise each estimator tolerates, the peak memory of ``tangent_rotation`` at n = 50,000, p = 512,
k = 20 and of ``separation`` at 2,000 classes x 50 points in p = 2,048 (each in a child process), a
torch-vs-FAISS kNN table, and a CUDA row when a GPU is present.

    python benchmarks/geometry.py            # everything (about 8 minutes on 2 cores)
    python benchmarks/geometry.py --quick    # skip the memory and large kNN runs
    python benchmarks/geometry.py --cuda-only  # the CUDA row alone (what benchmarks/gpu_check.sh runs)
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

import numpy as np
import torch

from _machine import best_time, describe
from curvature import class_geometry, manifolds, quadratic_curvature, separation, tangent_rotation
from curvature.neighbours import _faiss_indices, _torch_indices, choose_backend, knn_indices
from curvature.local_pca import local_spectra, tangent_bases
from curvature.per_class import span_coordinates
from curvature.rotation import grassmann_distances
from curvature.volumes import volume_bits


def sphere_cloud(n: int, p: int, dim: int = 2, seed: int = 0) -> np.ndarray:
    return manifolds.sphere(n, dim, 1.0, p, np.random.default_rng(seed)).astype(np.float32)


def reference_loop(points: np.ndarray, k: int, dim: int) -> float:
    """Mean κ with the structure of the public per-point snippet (NumPy, one point at a time)."""

    def query(i: int) -> np.ndarray:
        dist = np.linalg.norm(points - points[i], axis=1)
        dist[i] = np.inf
        return np.argsort(dist)[:k]

    def tangent(i: int, neighbours: np.ndarray) -> np.ndarray:
        patch = np.vstack([points[i : i + 1], points[neighbours]])
        _, _, vt = np.linalg.svd(patch - patch.mean(0), full_matrices=False)
        return vt[:dim].T

    kappas = []
    for i in range(len(points)):
        neighbours = query(i)
        own = tangent(i, neighbours)
        total = 0.0
        for j in neighbours:
            other = tangent(j, query(j))
            sines = np.linalg.svd(other - own @ (own.T @ other), compute_uv=False)
            theta = np.sqrt((np.arcsin(np.clip(sines, 0, 1)) ** 2).sum())
            total += theta / np.linalg.norm(points[i] - points[j])
        kappas.append(total / k)
    return float(np.mean(kappas))


def floor(points: torch.Tensor, k: int) -> None:
    torch.cdist(points, points).topk(k + 1, largest=False)


def speed_section(n: int, p: int, k: int) -> None:
    cloud = sphere_cloud(n, p)
    tensor = torch.from_numpy(cloud)
    ours = tangent_rotation(tensor, k=k)
    t_ours = best_time(lambda: tangent_rotation(tensor, k=k), repeats=7)
    t_floor = best_time(lambda: floor(tensor, k), repeats=7)
    start = time.perf_counter()
    ref_kappa = reference_loop(cloud, k, ours.tangent_dim)
    t_ref = time.perf_counter() - start
    ours_kappa = float(ours.mean_kappa)
    print(f"\n## tangent_rotation, S^2 (r=1) in R^{p}, n={n}, k={k}, float32, tangent_dim={ours.tangent_dim}")
    print("| what | time (ms) | ratio |")
    print("|---|---:|---:|")
    print(f"| reference-structured loop (NumPy) | {t_ref * 1e3:.0f} | {t_ref / t_ours:.0f}x slower than ours |")
    print(f"| curvature.tangent_rotation | {t_ours * 1e3:.1f} | 1 |")
    print(f"| floor: cdist + top-k | {t_floor * 1e3:.1f} | ours = {t_ours / t_floor:.1f}x the floor |")
    print(f"mean_kappa: ours {ours_kappa:.6f}, reference {ref_kappa:.6f}, "
          f"relative difference {abs(ours_kappa - ref_kappa) / ref_kappa:.2e}")
    indices = knn_indices(tensor, k)
    spectra = local_spectra(tensor, indices)
    bases = tangent_bases(tensor, indices, spectra, ours.tangent_dim)
    stages = {
        f"kNN ({choose_backend(n, p, tensor.device)})": lambda: knn_indices(tensor, k),
        "local PCA (batched eigh of (k+1)^2 Gram)": lambda: local_spectra(tensor, indices),
        "tangent bases": lambda: tangent_bases(tensor, indices, spectra, ours.tangent_dim),
        "principal angles": lambda: grassmann_distances(bases, indices),
    }
    print("where the time goes:", ", ".join(f"{name} {best_time(fn) * 1e3:.1f} ms" for name, fn in stages.items()))


def class_geometry_section() -> None:
    rng = np.random.default_rng(1)
    radii = np.linspace(0.5, 4.0, 10)
    features = np.concatenate([manifolds.sphere(1000, 2, r, 64, rng) for r in radii]).astype(np.float32)
    labels = np.repeat(np.arange(10), 1000)
    elapsed = best_time(lambda: class_geometry(features, labels), repeats=3)
    print(f"\n## class_geometry, 10 classes x 1,000 points, p=64, k=10: {elapsed:.2f} s (target < 2 s)")
    centres = rng.standard_normal((100, 2048), dtype=np.float32)
    clouds = [torch.from_numpy(rng.standard_normal((50, 2048), dtype=np.float32) + centre) for centre in centres]
    with torch.no_grad():
        ambient = best_time(lambda: [tangent_rotation(cloud, k=10) for cloud in clouds], repeats=1)
        in_span = best_time(lambda: [tangent_rotation(span_coordinates(cloud), k=10) for cloud in clouds], repeats=1)
    print(f"tangent_rotation of 100 Gaussian classes x 50 points, p=2,048: {ambient:.2f} s in the ambient "
          f"coordinates, {in_span:.2f} s in each class's span as class_geometry measures it "
          f"({ambient / in_span:.1f}x)")


def separation_by_definition(points: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """SPEC §3.2 as written, the way curvlt computed it before: every class's rest re-read from
    its points (O(C·n·p²)), in float64."""
    total = volume_bits(points)
    return torch.stack([(total - volume_bits(points[labels != c])) / volume_bits(points[labels == c])
                        for c in torch.unique(labels).tolist()])


def separation_section(quick: bool) -> None:
    """``curvature.separation`` (downdated scatter, determinant lemma) against the definition."""
    print("\n## separation, Gaussian classes around random centres, float32: this version against the definition")
    print("| classes | points per class | p | definition (s) | curvature.separation (s) | speed-up "
          "| max relative difference |")
    print("|---:|---|---:|---:|---:|---:|---:|")
    rng = np.random.default_rng(2)
    long_tail = np.maximum(5, (200 * 0.01 ** (np.arange(300) / 299)).astype(int))  # 200 down to 5 (IF = 40)
    cases = [(np.full(300, 100), 128, "100"), (long_tail, 128, "200 to 5"), (np.full(100, 50), 512, "50")]
    if not quick:
        cases.append((np.full(1000, 100), 128, "100"))
    for sizes, p, described in cases:
        centres = rng.normal(size=(len(sizes), p))
        points = torch.from_numpy(np.concatenate([rng.normal(size=(m, p)) + c for m, c in zip(sizes, centres)])
                                  .astype(np.float32))
        labels = torch.from_numpy(np.repeat(np.arange(len(sizes)), sizes))
        start = time.perf_counter()
        expected = separation_by_definition(points, labels)
        t_definition = time.perf_counter() - start
        start = time.perf_counter()
        measured = separation(points, labels).separation.double()
        t_ours = time.perf_counter() - start
        difference = float(((measured - expected).abs() / expected.abs()).max())
        print(f"| {len(sizes)} | {described} | {p} | {t_definition:.2f} | {t_ours:.2f} | {t_definition / t_ours:.0f}x "
              f"| {difference:.1e} |")


MEMORY_CHILD = """
import resource, sys, time, numpy as np, torch
from curvature import tangent_rotation
rng = np.random.default_rng(0)
n, p, k, kind = 50_000, 512, 20, sys.argv[1]
if kind == "sphere":
    from curvature import manifolds
    points = manifolds.sphere(n, 3, 1.0, p, rng).astype(np.float32)
else:
    points = rng.normal(size=(n, p)).astype(np.float32)
points = torch.from_numpy(points)
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.perf_counter()
with torch.no_grad():
    result = tangent_rotation(points, k=k)
print(result.tangent_dim, time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
      base / 2**20)
"""

SEPARATION_CHILD = """
import resource, time, numpy as np, torch
from curvature import separation
rng = np.random.default_rng(3)
classes, m, p = 2000, 50, 2048
points = torch.from_numpy(rng.standard_normal((classes * m, p), dtype=np.float32))
points += torch.from_numpy(np.repeat(rng.standard_normal((classes, p), dtype=np.float32), m, axis=0))
labels = torch.from_numpy(np.repeat(np.arange(classes), m))
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.perf_counter()
separation(points, labels)
print(time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, base / 2**20)
"""


def memory_section() -> None:
    print("\n## peak memory, tangent_rotation n=50,000, p=512, k=20 float32 (no_grad; child process peak RSS)")
    print("| cloud | tangent_dim | time (s) | peak RSS (GB) | of which input + libraries (GB) |")
    print("|---|---:|---:|---:|---:|")
    for kind in ("sphere", "gaussian"):
        out = subprocess.run([sys.executable, "-c", MEMORY_CHILD, kind], capture_output=True, text=True, check=True)
        dim, seconds, peak, base = out.stdout.split()
        label = "S^3 in R^512" if kind == "sphere" else "isotropic Gaussian (worst case: d = k-2)"
        print(f"| {label} | {dim} | {float(seconds):.1f} | {float(peak):.2f} | {float(base):.2f} |")
    out = subprocess.run([sys.executable, "-c", SEPARATION_CHILD], capture_output=True, text=True, check=True)
    seconds, peak, base = out.stdout.split()
    print(f"\n## peak memory, separation of 2,000 Gaussian classes x 50 points, p=2,048 float32 (ImageNet-LT-like "
          f"features; child process): {float(seconds):.1f} s, peak RSS {float(peak):.2f} GB, of which input + "
          f"libraries {float(base):.2f} GB")


def noise_section() -> None:
    """How much isotropic ambient noise each estimator tolerates (SPEC §3.3: measure, don't hide)."""
    print("\n## noise tolerance: S^2 (r=1), 2,000 points in R^64, isotropic Gaussian noise of std sigma per axis")
    print("| sigma | sigma*sqrt(p) | auto d | tangent rotation kappa*r (auto, k=15) | (d=2, k=15) "
          "| quadratic Gaussian*r^2 (d=2, k=30) |")
    print("|---:|---:|---:|---:|---:|---:|")
    rng = np.random.default_rng(3)
    clean = manifolds.sphere(2000, 2, 1.0, 64, rng)
    for sigma in (0.0, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1):
        noisy = torch.from_numpy((clean + sigma * rng.normal(size=clean.shape)).astype(np.float32))
        auto = tangent_rotation(noisy, k=15)
        fixed = tangent_rotation(noisy, k=15, tangent_dim=2)
        gaussian = quadratic_curvature(noisy, k=30, tangent_dim=2).gaussian.mean()
        print(f"| {sigma:g} | {sigma * 8:.3f} | {auto.tangent_dim} | {float(auto.mean_kappa):.3f} | "
              f"{float(fixed.mean_kappa):.3f} | {float(gaussian):.3f} |")


def knn_section(sizes: list[int]) -> None:
    print("\n## kNN, k=10, float32: torch (cdist + topk, chunked) vs faiss-cpu (IndexFlatL2), ms")
    print("| p | n | torch | faiss | faiss speed-up | auto picks |")
    print("|---:|---:|---:|---:|---:|---|")
    for p in (16, 64, 512):
        for n in sizes:
            points = torch.randn(n, p, generator=torch.Generator().manual_seed(n + p))
            t_torch = best_time(lambda: _torch_indices(points, 10), repeats=3)
            t_faiss = best_time(lambda: _faiss_indices(points, 10), repeats=3)
            print(f"| {p} | {n} | {t_torch * 1e3:.1f} | {t_faiss * 1e3:.1f} | {t_torch / t_faiss:.2f} | "
                  f"{choose_backend(n, p, points.device)} |")


def cuda_section() -> None:
    if not torch.cuda.is_available():
        print("\n## CUDA row: not run, no CUDA device on this machine")
        return
    points = torch.from_numpy(sphere_cloud(50_000, 64)).cuda()
    with torch.no_grad():
        elapsed = best_time(lambda: tangent_rotation(points, k=20), repeats=3)
        t_floor = best_time(lambda: knn_indices(points, 20, "torch"), repeats=3)
    torch.cuda.reset_peak_memory_stats()
    with torch.no_grad():
        result = tangent_rotation(points, k=20)
    print(f"\n## CUDA ({torch.cuda.get_device_name(0)}): tangent_rotation n=50,000, p=64, k=20: "
          f"{elapsed * 1e3:.0f} ms (kNN alone {t_floor * 1e3:.0f} ms), mean_kappa {float(result.mean_kappa):.4f}, "
          f"peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="skip the 50,000-point memory run and large kNN sizes")
    parser.add_argument("--cuda-only", action="store_true", help="only the CUDA row (benchmarks/gpu_check.sh)")
    args = parser.parse_args()
    print(describe())
    if args.cuda_only:
        cuda_section()
        return
    speed_section(1500, 64, 15)
    class_geometry_section()
    separation_section(args.quick)
    noise_section()
    if not args.quick:
        memory_section()
    knn_section([500, 1000, 2000, 4000] if args.quick else [500, 1000, 2000, 4000, 8000, 16000])
    cuda_section()


if __name__ == "__main__":
    main()
