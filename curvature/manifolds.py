"""Point clouds sampled from manifolds whose curvature is known in closed form.

They validate the estimators (tests, benchmarks) and generate the ``synthetic_manifolds`` dataset,
where every class's true curvature is known. All samplers take a ``numpy.random.Generator`` so
results are reproducible without touching global random state.
"""

from __future__ import annotations

import numpy as np


def random_rotation(ambient: int, rng: np.random.Generator) -> np.ndarray:
    """A Haar-random orthogonal matrix (QR of a Gaussian matrix with sign correction)."""
    q, r = np.linalg.qr(rng.normal(size=(ambient, ambient)))
    return q * np.sign(np.diag(r))


def embed(coords: np.ndarray, ambient: int, rng: np.random.Generator) -> np.ndarray:
    """Zero-pad ``coords`` (n, q) to ``ambient`` dimensions and rotate randomly."""
    n, q = coords.shape
    if ambient < q:
        raise ValueError(f"ambient: must be at least {q} for this manifold, got {ambient}")
    padded = np.zeros((n, ambient))
    padded[:, :q] = coords
    return padded @ random_rotation(ambient, rng)


def sphere(n: int, dim: int, radius: float, ambient: int, rng: np.random.Generator) -> np.ndarray:
    """Uniform sample of the round sphere S^dim(radius), rotated into ``ambient`` dimensions.
    Sectional curvature 1/r², mean-curvature norm 1/r, scalar curvature dim(dim-1)/r²."""
    coords = rng.normal(size=(n, dim + 1))
    coords *= radius / np.linalg.norm(coords, axis=1, keepdims=True)
    return embed(coords, ambient, rng)


def plane(n: int, dim: int, ambient: int, rng: np.random.Generator, extent: float = 1.0) -> np.ndarray:
    """Uniform sample of a flat ``dim``-cube of side ``2·extent``: every curvature is 0."""
    return embed(rng.uniform(-extent, extent, size=(n, dim)), ambient, rng)


def cylinder(n: int, radius: float, height: float, ambient: int, rng: np.random.Generator) -> np.ndarray:
    """Uniform sample of a circular cylinder: Gaussian curvature 0, mean-curvature norm 1/(2r)."""
    angle = rng.uniform(0, 2 * np.pi, size=n)
    coords = np.stack([radius * np.cos(angle), radius * np.sin(angle), rng.uniform(-height / 2, height / 2, size=n)], 1)
    return embed(coords, ambient, rng)


def saddle(n: int, extent: float, ambient: int, rng: np.random.Generator) -> np.ndarray:
    """The graph ``z = (x² - y²)/2`` over ``[-extent, extent]²``, its first point at the origin
    (Gaussian curvature -1 and mean curvature 0 there)."""
    xy = rng.uniform(-extent, extent, size=(n, 2))
    xy[0] = 0.0
    coords = np.column_stack([xy, 0.5 * (xy[:, 0] ** 2 - xy[:, 1] ** 2)])
    return embed(coords, ambient, rng)
