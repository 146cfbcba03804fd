"""Progress lines for long per-class work (measuring thousands of class manifolds), at most one
every ``every_s`` seconds, so that a job that ends quickly prints nothing and a long one is never
silent for long. ``curvature/`` does not print; its functions take a callback, and this is one."""

from __future__ import annotations

import sys
import time


class ProgressLine:
    """``progress(done, total)`` callback printing ``[curvlt] {what}: {done}/{total} classes``."""

    def __init__(self, what: str, every_s: float):
        self.what, self.every_s = what, every_s
        self.started = self.shown = time.perf_counter()

    def __call__(self, done: int, total: int) -> None:
        now = time.perf_counter()
        if self.every_s <= 0 or now - self.shown < self.every_s or done == total:
            return
        self.shown = now
        print(f"[curvlt] {self.what}: {done}/{total} classes ({now - self.started:.0f} s)", file=sys.stderr, flush=True)
