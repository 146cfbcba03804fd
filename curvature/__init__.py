"""curvlt's geometry engine: measures of class feature manifolds and the curvature regularizer.

Pure tensor code (no Ray, no MLflow, no file I/O). Modules are named for what they hold
(``neighbours``, ``rotation``, ``volumes``, ``per_class``) so that no module hides behind the
function of the same name that this package exports. Every function accepts NumPy arrays or torch
tensors on any device, in float32 or float64; see SPEC §3 for the definitions.
"""

from curvature._inputs import ArrayLike, as_points, centred, check_k
from curvature.cr_loss import CRResult
from curvature.local_pca import intrinsic_dim_from_neighbours
from curvature.neighbours import Backend, knn, knn_indices
from curvature.per_class import class_geometry
from curvature.quadratic import QuadraticCurvature, quadratic_curvature
from curvature.regularizer import CurvatureRegularizer
from curvature.rotation import TangentRotation, tangent_rotation
from curvature.volumes import Separation, separation, volume


def intrinsic_dim(points: ArrayLike, k: int = 10, backend: Backend = "auto") -> int:
    """Intrinsic dimension from local PCA explained variance, clipped to ``[1, k - 2]`` (SPEC §3.3)."""
    tensor = centred(as_points(points))
    check_k(k, tensor.shape[0])
    return intrinsic_dim_from_neighbours(tensor, knn_indices(tensor, k, backend))


__all__ = [
    "CRResult",
    "CurvatureRegularizer",
    "QuadraticCurvature",
    "Separation",
    "TangentRotation",
    "class_geometry",
    "intrinsic_dim",
    "knn",
    "quadratic_curvature",
    "separation",
    "tangent_rotation",
    "volume",
]
