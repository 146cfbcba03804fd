"""Exact k-nearest neighbours on torch or FAISS (SPEC §3.5).

Indices are computed without gradient (they are constants of every estimator); the returned
distances are recomputed from the points so they carry gradient and full precision, whichever
backend found the neighbours.
"""

from __future__ import annotations

from typing import Literal

import torch

from curvature._chunks import chunk_ranges
from curvature._inputs import ArrayLike, as_points, centred, check_k

Backend = Literal["auto", "torch", "faiss"]

#: On CPU, clouds at least this large go to FAISS under ``backend="auto"`` (see choose_backend).
CPU_FAISS_MIN_POINTS = 2000


def faiss_available() -> bool:
    """True when the ``faiss`` module imports."""
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


def _faiss_gpu_count() -> int:
    import faiss

    return faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0


def choose_backend(n: int, p: int, device: torch.device) -> str:
    """The backend ``auto`` picks, from ``benchmarks/geometry.py``'s torch-vs-FAISS table.

    On the 2-core reference CPU torch's ``cdist`` + ``topk`` is as fast or faster below about 2,000
    points and faiss-cpu's flat index 1.2-3.6x faster from 2,000 on, for p from 16 to 512. On CUDA,
    torch stays on the device unless FAISS itself sees a GPU.
    """
    if not faiss_available():
        return "torch"
    if device.type == "cuda":
        return "faiss" if _faiss_gpu_count() > 0 else "torch"
    return "faiss" if n >= CPU_FAISS_MIN_POINTS else "torch"


def _torch_indices(points: torch.Tensor, k: int) -> torch.Tensor:
    """Chunked ``torch.cdist`` plus ``topk``; self excluded by index, not by distance."""
    n = points.shape[0]
    out = torch.empty(n, k, dtype=torch.int64, device=points.device)
    for rows in chunk_ranges(n, n):
        dist = torch.cdist(points[rows], points)
        dist.diagonal(offset=rows.start).fill_(float("inf"))
        out[rows] = dist.topk(k, dim=1, largest=False).indices
    return out


def _faiss_indices(points: torch.Tensor, k: int) -> torch.Tensor:
    """Flat L2 index (GPU when the data is on CUDA and FAISS sees one); drops self by index."""
    import faiss

    data = points.detach().to("cpu", torch.float32).contiguous().numpy()
    index = faiss.IndexFlatL2(data.shape[1])
    if points.device.type == "cuda" and _faiss_gpu_count() > 0:
        index = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), points.device.index or 0, index)
    index.add(data)
    _, found = index.search(data, k + 1)
    found_t = torch.from_numpy(found).to(points.device)
    return drop_self(found_t, k)


def drop_self(found: torch.Tensor, k: int) -> torch.Tensor:
    """From (n, k+1) candidate lists, remove each row's own index (or, among exact duplicates
    where self was ranked beyond k+1, the last candidate)."""
    n = found.shape[0]
    own = torch.arange(n, device=found.device)[:, None]
    keep = found != own
    no_self = keep.all(dim=1)
    keep[no_self, -1] = False
    return found[keep].reshape(n, k)


def gather_distances(points: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Euclidean distances ``|x_i - x_j|`` for ``j`` in ``indices[i]``, differentiable."""
    # vector_norm's backward is x/|x| (0 at x = 0): unlike sqrt(sum(x²)) it neither overflows
    # float32 for clouds at 1e-12 scale nor turns a duplicate point into a NaN gradient.
    return torch.cat([torch.linalg.vector_norm(points[indices[rows]] - points[rows, None, :], dim=-1)
                      for rows in chunk_ranges(points.shape[0], indices.shape[1] * points.shape[1])])


def knn_indices(points: torch.Tensor, k: int, backend: Backend = "auto") -> torch.Tensor:
    """(n, k) neighbour indices of a validated tensor, self excluded; no gradient."""
    n, p = points.shape
    chosen = choose_backend(n, p, points.device) if backend == "auto" else backend
    if chosen not in ("torch", "faiss"):
        raise ValueError(f"backend: must be 'auto', 'torch' or 'faiss', got {backend!r}")
    if chosen == "faiss" and not faiss_available():
        raise ValueError("backend: 'faiss' requested but the faiss module is not installed (pip install faiss-cpu)")
    with torch.no_grad():
        if chosen == "faiss":
            return _faiss_indices(points, k)
        return _torch_indices(points.detach(), k)


def knn(points: ArrayLike, k: int, backend: Backend = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """k nearest neighbours of every point among the others (SPEC §3.5).

    Returns ``(distances, indices)``, both (n, k), nearest first; the point itself is excluded even
    when it has exact duplicates. ``backend`` is ``"torch"`` (exact, chunked, any device),
    ``"faiss"`` (flat index; GPU index for CUDA data when FAISS sees a GPU) or ``"auto"``.
    """
    tensor = centred(as_points(points))
    check_k(k, tensor.shape[0])
    indices = knn_indices(tensor, k, backend)
    distances = gather_distances(tensor, indices)
    order = distances.detach().argsort(dim=1, stable=True)
    return distances.gather(1, order), indices.gather(1, order)
