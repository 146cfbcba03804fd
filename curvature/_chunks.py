"""Chunking of per-point work so that memory stays bounded for large clouds (SPEC §3.6)."""

from __future__ import annotations

#: Elements of the largest temporary one chunk may allocate: 64 MiB of float32. Deliberately above
#: glibc's largest dynamic mmap threshold (32 MiB), so chunk-sized temporaries are mmapped and go
#: back to the OS when freed. With 16 MiB chunks the heap fragmented and tangent_rotation at
#: n = 50,000, p = 512, d = 18 peaked at 17 GB RSS instead of 3.2 GB (benchmarks/geometry.py).
CHUNK_ELEMENTS = 2**24


def chunk_ranges(n: int, per_item: int) -> list[slice]:
    """Slices of ``range(n)`` holding at most ``CHUNK_ELEMENTS // per_item`` items each."""
    size = max(1, CHUNK_ELEMENTS // max(1, per_item))
    return [slice(start, min(start + size, n)) for start in range(0, n, size)]
