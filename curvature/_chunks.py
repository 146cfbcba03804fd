"""Chunking of per-point work so that memory stays bounded for large clouds (SPEC §3.6)."""

from __future__ import annotations

import torch

#: Elements of the largest temporary one chunk may allocate: 64 MiB of float32. Deliberately above
#: glibc's largest dynamic mmap threshold (32 MiB), so chunk-sized temporaries are mmapped and go
#: back to the OS when freed. With 16 MiB chunks the heap fragmented and tangent_rotation at
#: n = 50,000, p = 512, d = 18 peaked at 17 GB RSS instead of 3.2 GB (benchmarks/geometry.py).
CHUNK_ELEMENTS = 2**24


def chunk_ranges(n: int, per_item: int) -> list[slice]:
    """Slices of ``range(n)`` holding at most ``CHUNK_ELEMENTS // per_item`` items each."""
    size = max(1, CHUNK_ELEMENTS // max(1, per_item))
    return [slice(start, min(start + size, n)) for start in range(0, n, size)]


def float64_sums(points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The sum (p,) of the rows of ``points`` (n, p) and the sum () of their squared entries, in
    float64 a chunk of rows at a time (a whole float64 copy of 300,000 x 2,048 features would take
    5 GB): the mean and spread that centring and scatter matrices start from."""
    total = torch.zeros(points.shape[1], dtype=torch.float64, device=points.device)
    square = torch.zeros((), dtype=torch.float64, device=points.device)
    for part in chunk_ranges(points.shape[0], points.shape[1]):
        rows = points[part].to(torch.float64)
        total, square = total + rows.sum(dim=0), square + rows.pow(2).sum()
    return total, square
