"""The bundled example for ``curvlt measure --example``: spheres of known radius, one per class.

``python -m orchestrator.measure_example`` regenerates ``manifolds.npz`` deterministically.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from curvature import manifolds

EXAMPLE_PATH = Path(__file__).parent / "examples" / "manifolds.npz"
#: (intrinsic dimension, radius) per class; the true curvature of class c is 1 / radius.
EXAMPLE_CLASSES = [(1, 0.5), (1, 2.0), (2, 0.5), (2, 1.0), (2, 2.0), (3, 1.0)]


def make_example(points_per_class: int = 400, ambient: int = 16, seed: int = 0) -> dict[str, np.ndarray]:
    """Features, labels and true radii of the example classes."""
    rng = np.random.default_rng(seed)
    clouds = [manifolds.sphere(points_per_class, dim, radius, ambient, rng) + rng.normal(scale=3.0, size=ambient)
              for dim, radius in EXAMPLE_CLASSES]
    return {"features": np.concatenate(clouds).astype(np.float32),
            "labels": np.repeat(np.arange(len(clouds)), points_per_class),
            "radius": np.array([radius for _, radius in EXAMPLE_CLASSES])}


if __name__ == "__main__":
    np.savez_compressed(EXAMPLE_PATH, **make_example())
    print(f"wrote {EXAMPLE_PATH}")
