"""Small batched linear algebra with gradients that stay finite on degenerate input.

Why: ``torch.linalg.eigh``'s backward divides by eigenvalue gaps ``λ_j - λ_i``, which are exactly 0
for the repeated zero eigenvalues every centred neighbourhood has, and ``sqrt``/``asin`` have
infinite slopes at 0. The functions here give the same forward values and exact gradients where
those are defined, and bounded gradients where they are not.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import torch

from curvature import _native

#: Batches of fewer elements than this are decomposed on the calling thread. Splitting pays only when
#: each thread gets enough work: in a real workload the ATen ops just before leave OpenMP workers on
#: the same cores. Measured on the 2-core machine inside ``tangent_rotation``, the pool was 1.5x
#: faster at 1.2M elements, 10% at 363k and no faster at 121k. CR's batches in a Fashion-MNIST step
#: (~50k: 448 patch problems of 11 x 11, ~2,900 pair problems of 4 x 4) were slower with it: CR's
#: forward and backward 21.7 ms against 19.5 ms on the calling thread (means of eight alternated
#: pairs of processes).
_MIN_PARALLEL_ELEMENTS = 2**18
#: Elements per eigh call in a pool thread: below ATen's parallel grain (32,768) so the copies inside
#: ``eigh`` stay serial. A larger call opens an OpenMP team owned by the pool thread whose idle
#: workers then spin on the cores the training step needs (measured in a Fashion-MNIST training
#: step: CR's backward took 14.3 ms after two large calls, 6.4 ms after calls of this size).
_SERIAL_ELEMENTS = 16384
#: Largest batch one CUDA eigh call takes: cuSOLVER's batched solver (cusolverDnXsyevBatched) fails
#: with CUSOLVER_STATUS_INTERNAL_ERROR from 65,536 matrices on (seen for 3x3 to 11x11, float32 and
#: float64, on an H200 with PyTorch 2.11 + CUDA 13), and CR's pair stage on ResNet-32 / CIFAR-100 passes ~96,000.
_CUDA_MAX_BATCH = 65535
#: Largest matrices the compiled Jacobi kernel takes on the CPU. Its work grows as n³ per sweep, and
#: LAPACK's per-call overhead matters less as n grows. On the 2-core VM, float32 batches, both on two
#: threads: 448 of 11 x 11, 0.86 against 3.6 ms; 1,500 of 16 x 16, 10.4 against 10.9 ms; 1,500 of
#: 21 x 21, 24.1 against 22.7 ms (LAPACK split over the pool below).
_NATIVE_MAX_SIZE = 16
_POOL: ThreadPoolExecutor | None = None
#: A batched eigen-solver: (B, n, n) symmetric matrices → ascending eigenvalues (B, n), eigenvectors (B, n, n).
EighSolver = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
#: Why each Triton eigen-solver failed (by name, "import" for Triton itself), once it has: a failed
#: one is not tried again, and the other, which may still work, is.
_jacobi_failures: dict[str, str] = {}
#: (kernel, size, dtype) for which a Triton solver's eigenvalues were checked in this process.
_jacobi_checked: set[tuple[str, int, torch.dtype]] = set()


def _pool() -> ThreadPoolExecutor:
    global _POOL
    if _POOL is None:
        _POOL = ThreadPoolExecutor(max_workers=max(1, torch.get_num_threads()), thread_name_prefix="curvlt-eigh")
    return _POOL


def _eigh_forward(matrices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.linalg.eigh`` over a batch. On the CPU, matrices up to :data:`_NATIVE_MAX_SIZE` go to
    the compiled Jacobi kernel (:mod:`curvature._native`) where it can be built, the rest to LAPACK,
    a large batch split across threads, since LAPACK solves the small matrices one at a time on one
    core (see ``_MIN_PARALLEL_ELEMENTS``). On CUDA, matrices up to 16 x 16 go to the Triton Jacobi
    kernels (:mod:`curvature._jacobi_triton`), which do not wait on the GPU and so can be captured
    in CUDA graphs, and larger ones to cuSOLVER in batches it accepts."""
    flat = matrices.reshape(-1, *matrices.shape[-2:])
    solved = _jacobi_eigh(flat) if flat.device.type == "cuda" else None
    if solved is not None:
        return solved[0].reshape(matrices.shape[:-1]), solved[1].reshape(matrices.shape)
    if flat.device.type == "cuda":
        parts = [cusolver_eigh(flat)]
    elif flat.shape[-1] <= _NATIVE_MAX_SIZE and _native.available(flat.device, flat.shape[-1]):
        parts = [_native.eigh(flat)]
    elif flat.device.type == "cpu" and torch.get_num_threads() >= 2 and flat.numel() >= _MIN_PARALLEL_ELEMENTS:
        parts = list(_pool().map(torch.linalg.eigh, flat.split(max(1, _SERIAL_ELEMENTS // flat[0].numel()))))
    else:
        parts = [torch.linalg.eigh(flat)]
    evals, evecs = _joined(parts)
    failed = ~torch.isfinite(evals).all(dim=-1)
    if bool(failed.any()):
        # float32 syevd returns NaN on some exactly rank-deficient inputs (seen with quantised
        # duplicate patches); float64 solves them, so only those matrices are redone.
        redo_vals, redo_vecs = torch.linalg.eigh(flat[failed].to(torch.float64))
        evals[failed], evecs[failed] = redo_vals.to(evals.dtype), redo_vecs.to(evecs.dtype)
    return evals.reshape(matrices.shape[:-1]), evecs.reshape(matrices.shape)


def _jacobi_eigh(flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """A CUDA batch by :mod:`curvature._jacobi_triton` (:func:`_triton_solver`); ``None`` where
    no Triton solver can take it, and for a solver from its first failure on (warned once)."""
    solver = _triton_solver(flat.shape[-1], flat.dtype, flat.device)
    if isinstance(solver, str):
        return None
    try:
        return solver(flat)
    except Exception as error:  # noqa: BLE001 - any failure of the kernel leaves cuSOLVER, which gives the same result
        _give_up(solver.__name__, error)
        return None


def capture_obstacle(size: int, dtype: torch.dtype, device: torch.device) -> str | None:
    """Why CUDA eigen-problems of ``size`` x ``size`` in ``dtype`` cannot be solved inside a CUDA
    graph, or ``None`` when they can: only the Triton solvers can (cuSOLVER reads its error codes
    back on the host), so one must take the size and work here. Asked before a capture, so that a
    capture that could only fail is not attempted and the reason is said in words."""
    solver = _triton_solver(size, dtype, device)
    return solver if isinstance(solver, str) else None


def _triton_solver(size: int, dtype: torch.dtype, device: torch.device) -> EighSolver | str:
    """The Triton solver for ``size`` x ``size`` CUDA matrices in ``dtype``: up to ``MAX_SIZE`` the
    thread-per-matrix kernel, up to ``MAX_ROUND_ROBIN_SIZE`` (CR's 11 x 11 patch problems) the
    warp-per-matrix one, checked against cuSOLVER (:func:`_check_solver`) the first time a size
    and dtype are met. Or why there is none: a larger size, or Triton or that solver given up here
    (warned once): Triton may be missing, unable to build its launcher (it compiles one with the
    system's C compiler on first use), or, in another version than the one the kernels were
    checked with, unable to compile one or compiling it wrong."""
    if "import" not in _jacobi_failures:  # a failed import is not cached by Python: not tried again here
        try:
            from curvature import _jacobi_triton
        except Exception as error:  # noqa: BLE001 - any failure leaves cuSOLVER, which gives the same result
            _give_up("import", error)
    if "import" in _jacobi_failures:
        return f"Triton cannot be used here ({_jacobi_failures['import']})"
    if size <= _jacobi_triton.MAX_SIZE:
        solver = _jacobi_triton.jacobi_eigh
    elif size <= _jacobi_triton.MAX_ROUND_ROBIN_SIZE:
        solver = _jacobi_triton.round_robin_eigh
    else:
        largest = _jacobi_triton.MAX_ROUND_ROBIN_SIZE
        return f"no Triton eigen-solver takes {size} x {size} matrices (at most {largest} x {largest})"
    name, key = solver.__name__, (solver.__name__, size, dtype)
    if name not in _jacobi_failures and key not in _jacobi_checked:
        try:
            _check_solver(solver, size, dtype, device)
            _jacobi_checked.add(key)
        except Exception as error:  # noqa: BLE001 - as above
            _give_up(name, error)
    if name in _jacobi_failures:
        return f"the Triton eigen-solver {name} cannot run here ({_jacobi_failures[name]})"
    return solver


def _check_solver(solver: EighSolver, size: int, dtype: torch.dtype, device: torch.device) -> None:
    """Raise RuntimeError unless ``solver``'s eigenvalues of a few random positive semi-definite
    matrices (one of rank below n) match ``torch.linalg.eigvalsh``'s, to 100·n·eps of each
    matrix's largest. Why, once per size and dtype: the round-robin kernel was checked in Triton's
    interpreter only, and a compiler that lowers it differently on some GPU would otherwise give
    wrong curvatures without a word; this costs one cuSOLVER call the first time."""
    generator = torch.Generator().manual_seed(size)
    factors = torch.randn(8, size, size, generator=generator, dtype=torch.float64)
    factors[0, :, size // 2:] = 0
    matrices = (factors @ factors.mT).to(device=device, dtype=dtype)
    expected = torch.linalg.eigvalsh(matrices)
    scale = expected.abs().amax(dim=-1).clamp_min(torch.finfo(dtype).tiny)
    error = float(((solver(matrices)[0] - expected).abs().amax(dim=-1) / scale).max())
    if not error <= 100 * size * torch.finfo(dtype).eps:  # also catches NaN
        raise RuntimeError(f"its eigenvalues of {size} x {size} {dtype} test matrices differ from cuSOLVER's "
                           f"by {error:.1e} of the largest")


def _give_up(name: str, error: Exception) -> None:
    """Record (and warn once) that Triton eigen-solver ``name`` cannot run here."""
    if name not in _jacobi_failures:
        _jacobi_failures[name] = f"{type(error).__name__}: {error}".strip().splitlines()[0]
        warnings.warn(f"curvature: the Triton eigen-solver {name} cannot run here ({_jacobi_failures[name]}); "
                      "the CUDA eigen-problems it took go to cuSOLVER, which waits on the GPU", stacklevel=5)


def cusolver_eigh(matrices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.linalg.eigh`` of a CUDA batch (B, n, n) by cuSOLVER alone, in the batches it accepts
    (:data:`_CUDA_MAX_BATCH`), each by :func:`_cuda_eigh`."""
    return _joined([_cuda_eigh(part) for part in matrices.split(_CUDA_MAX_BATCH)])


def _joined(parts: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """The eigen-decompositions of consecutive slices of one batch, as the batch's."""
    if len(parts) == 1:
        return parts[0]
    return torch.cat([part[0] for part in parts]), torch.cat([part[1] for part in parts])


def _cuda_eigh(matrices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.linalg.eigh`` on CUDA; a float32 batch that cuSOLVER reports as not converging
    (seen once in 720,000 8 x 8 pair problems of CR at ImageNet-LT scale, H200) is solved again in
    float64, as NaN results are below."""
    try:
        return torch.linalg.eigh(matrices)
    except torch.linalg.LinAlgError:
        if matrices.dtype != torch.float32:
            raise
        evals, evecs = torch.linalg.eigh(matrices.double())
        return evals.float(), evecs.float()


class _SymmetricEigh(torch.autograd.Function):
    """Eigen-decomposition of symmetric matrices (ascending eigenvalues) whose backward clamps
    eigenvalue gaps at ``100·eps·|λ|_max`` instead of dividing by zero (cf. Wang et al.,
    "Backpropagation-friendly eigendecomposition", NeurIPS 2019)."""

    @staticmethod
    def forward(ctx, matrices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[override]
        evals, evecs = _eigh_forward(matrices)
        ctx.save_for_backward(evals, evecs)
        ctx.set_materialize_grads(False)  # eigenvalues alone: no eigenvector term to compute
        return evals, evecs

    @staticmethod
    def backward(ctx, grad_evals: torch.Tensor | None, grad_evecs: torch.Tensor | None):  # type: ignore[override]
        evals, evecs = ctx.saved_tensors
        if grad_evals is None and grad_evecs is None:
            return None
        if grad_evecs is None:  # a function of the eigenvalues alone: V diag(dλ) Vᵀ, symmetric already
            return (evecs * grad_evals[..., None, :]) @ evecs.mT
        # gap[..., i, j] = λ_j - λ_i; dV = V (F ∘ Vᵀ dA V) with F_ij = 1 / gap_ij (i ≠ j).
        # A zero matrix (a patch of identical points) has no eigenvector to move: gradient 0.
        evecs_t = evecs.mT
        gap = evals[..., None, :] - evals[..., :, None]
        magnitude = evals.abs().amax(-1, keepdim=True)[..., None]
        floor = torch.where(magnitude > 0, 100 * torch.finfo(evals.dtype).eps * magnitude, torch.ones_like(magnitude))
        gap = torch.where(gap.abs() < floor, torch.where(gap >= 0, floor, -floor), gap)
        inner = torch.where(magnitude > 0, (evecs_t @ grad_evecs) / gap, torch.zeros_like(gap))
        if grad_evals is None:
            inner.diagonal(dim1=-2, dim2=-1).zero_()
        else:
            inner.diagonal(dim1=-2, dim2=-1).copy_(grad_evals)
        grad = evecs @ inner @ evecs_t
        return 0.5 * (grad + grad.mT)


def symmetric_eigh(matrices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues (ascending) and eigenvectors of a batch of symmetric matrices, gradient-safe."""
    if matrices.shape[-1] == 1:
        return matrices[..., 0], torch.ones_like(matrices)
    return _SymmetricEigh.apply(matrices)


def symmetric_eigvals(matrices: torch.Tensor) -> torch.Tensor:
    """Ascending eigenvalues of symmetric matrices; closed form for 1x1 and 2x2, which are the
    hot path (tangent dimensions 1 and 2) and would otherwise cost one LAPACK call per matrix."""
    size = matrices.shape[-1]
    if size == 1:
        return matrices[..., 0]
    if size == 2:
        a, b, c = matrices[..., 0, 0], matrices[..., 0, 1], matrices[..., 1, 1]
        half_trace = 0.5 * (a + c)
        radius = safe_sqrt((0.5 * (a - c)).pow(2) + b.pow(2))
        return torch.stack([half_trace - radius, half_trace + radius], dim=-1)
    return symmetric_eigh(matrices)[0]


def safe_sqrt(values: torch.Tensor) -> torch.Tensor:
    """``sqrt`` of non-negative values, 0 (with gradient 0, not inf) below ``eps²`` of the dtype.

    The cut is at the dtype's noise level (1.2e-7 in float32, 2.2e-16 in float64), so nothing
    measurable is lost, and the slope ``1/(2·sqrt)`` stays below
    ``1/(2·eps)`` — small enough that chained through ``1/distance`` at 1e-12 scale it does not
    overflow float32.
    """
    threshold = torch.finfo(values.dtype).eps ** 2
    positive = values > threshold
    return torch.where(positive, torch.where(positive, values, threshold).sqrt(), torch.zeros_like(values))


def squared_angle_from_sin2(sin2: torch.Tensor) -> torch.Tensor:
    """``θ² = asin(sqrt(sin²θ))²`` computed as ``sin²θ · (asin(s)/s)²`` with a series near 0.

    Taking θ from its sine keeps small angles accurate; ``acos`` of a cosine clamped to 1 puts a
    floor of about ``sqrt(2·eps)`` (3.5e-4 rad in float32) under every angle. Squaring without an
    intermediate ``sqrt`` keeps the gradient finite (it is 1 at θ = 0). Angles within a few eps of
    π/2, where ``asin`` has an infinite slope, are returned as exactly π/2 with gradient 0.
    """
    sin2 = sin2.clamp(0.0, 1.0)
    small = sin2 < 1e-4
    near_right = sin2 > 1.0 - 4 * torch.finfo(sin2.dtype).eps
    middle = torch.where(small | near_right, torch.full_like(sin2, 0.25), sin2)
    root = middle.sqrt()
    ratio_sq = torch.where(small, 1.0 + sin2 / 3.0 + 8.0 * sin2**2 / 45.0, (torch.asin(root) / root) ** 2)
    return torch.where(near_right, torch.full_like(sin2, (math.pi / 2) ** 2), sin2 * ratio_sq)
