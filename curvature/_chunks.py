"""Chunking of per-point work so that memory stays bounded for large clouds (SPEC §3.6)."""

from __future__ import annotations

#: Elements of the largest temporary one chunk may allocate (16 MiB of float32).
CHUNK_ELEMENTS = 2**22


def chunk_ranges(n: int, per_item: int) -> list[slice]:
    """Slices of ``range(n)`` holding at most ``CHUNK_ELEMENTS // per_item`` items each."""
    size = max(1, CHUNK_ELEMENTS // max(1, per_item))
    return [slice(start, min(start + size, n)) for start in range(0, n, size)]
