"""Compiled CPU kernels (:file:`_native.c`): small batched eigen-decompositions, and CR's patch
and pair stages with their backward passes.

Why: LAPACK solves a batch of small symmetric matrices one call per matrix, each with its own
checks and workspace: ``torch.linalg.eigh`` of CR's 448 patch matrices of 11 x 11 took 3.6 ms on
the 2-core VM, where the cyclic Jacobi method run on 8 matrices side by side in vector registers
takes 1.4 ms (3,000 matrices of 4 x 4: 0.47 against 2.9 ms). And in tensor form CR's patch and pair
stages (:mod:`curvature.gram_rotation`) are a few dozen small operators over a few hundred patches
and a few thousand neighbour pairs, each costing more in dispatch, allocation and passes over
memory than in arithmetic. At Fashion-MNIST sizes (10 classes, 448 points, ~3,000 pairs, d = 4)
CR's forward and backward took 19.8 ms that way and take 4.9 ms here, on PyTorch's OpenMP threads
(``benchmarks/cr_profile.py``); in a training step after E0, 1.22x the base step against 1.55x.

The library is built on first use with the system's C compiler (``$CC``, else ``cc``; under a second)
into ``$XDG_CACHE_HOME/curvlt`` (default ``~/.cache/curvlt``; a folder in the temporary directory
where that cannot be made), named by a hash of its source and
flags, so that processes share it and an edited source is rebuilt. Where it cannot be built or
loaded, or ``CURVLT_NATIVE=0`` is set, the tensor form runs instead (warned once), with the same
values and gradients (tested).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import subprocess
import tempfile
import warnings
from pathlib import Path

import torch

_SOURCE = Path(__file__).with_name("_native.c")
_FLAGS = ("-O3", "-fno-math-errno", "-fno-trapping-math", "-shared", "-fPIC")
#: Tried in order: with OpenMP threads, then (a compiler without OpenMP) serial, vectorised loops only.
_THREADING = (("-fopenmp",), ("-fopenmp-simd", "-Wno-unknown-pragmas"))
_FUNCTIONS = {
    "curvlt_pair_forward": [ctypes.c_int64, ctypes.c_int, ctypes.c_int, ctypes.c_int64] + [ctypes.c_void_p] * 6
                           + [ctypes.c_double] + [ctypes.c_void_p] * 2,
    "curvlt_pair_backward": [ctypes.c_int64, ctypes.c_int64, ctypes.c_int, ctypes.c_int, ctypes.c_int64]
                            + [ctypes.c_void_p] * 9,
    "curvlt_eigh": [ctypes.c_int64, ctypes.c_int] + [ctypes.c_void_p] * 3,
    "curvlt_patch_spectra": [ctypes.c_int64, ctypes.c_int, ctypes.c_int64] + [ctypes.c_void_p] * 5,
    "curvlt_patch_forward": [ctypes.c_int64, ctypes.c_int, ctypes.c_int, ctypes.c_int64] + [ctypes.c_void_p] * 8,
    "curvlt_patch_backward": [ctypes.c_int64, ctypes.c_int, ctypes.c_int, ctypes.c_int64] + [ctypes.c_void_p] * 9,
    "curvlt_undirected_edges": [ctypes.c_int64, ctypes.c_int] + [ctypes.c_void_p] * 5,
}

#: Whether the CPU work goes to the compiled kernels; ``CURVLT_NATIVE=0`` turns them off (benchmarks
#: flip it to compare both forms in one process).
enabled = os.environ.get("CURVLT_NATIVE", "1") != "0"
_library: ctypes.CDLL | None = None
_max_dim = 0  # the kernels' largest matrix size, asked once: available() runs several times a step
_failure: str | None = None


def _cache_dir() -> Path:
    """``$XDG_CACHE_HOME/curvlt`` (default ``~/.cache/curvlt``), or, where that cannot be made (a
    read-only home on a cluster node), a per-user folder in the temporary directory."""
    preferred = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "curvlt"
    try:
        preferred.mkdir(parents=True, exist_ok=True)
        return preferred
    except OSError:
        fallback = Path(tempfile.gettempdir()) / f"curvlt-{os.getuid()}"
        fallback.mkdir(mode=0o700, exist_ok=True)
        return fallback


def _build() -> ctypes.CDLL:
    """Compile (unless already cached) and load the library, with OpenMP where the compiler has
    it; raises the last failure when no way works."""
    compiler = os.environ.get("CC", "cc")
    for variant in _THREADING:
        try:
            library = ctypes.CDLL(str(_compiled(compiler, (*_FLAGS, *variant))))
            break
        except (OSError, RuntimeError):
            if variant == _THREADING[-1]:
                raise
    for name, arguments in _FUNCTIONS.items():
        getattr(library, name).argtypes = arguments
        getattr(library, name).restype = None
    library.curvlt_max_dim.restype = ctypes.c_int
    library.curvlt_undirected_edges.restype = ctypes.c_int64
    return library


def _compiled(compiler: str, flags: tuple[str, ...]) -> Path:
    """The shared library built from :data:`_SOURCE` with ``flags``, compiled unless cached."""
    source = _SOURCE.read_bytes()
    digest = hashlib.sha256(source + " ".join((compiler, *flags)).encode()).hexdigest()[:16]
    target = _cache_dir() / f"native-{digest}.so"
    if not target.exists():
        # Built under a temporary name and renamed, so processes building at once never load half a file.
        handle, partial = tempfile.mkstemp(suffix=".so", dir=target.parent)
        os.close(handle)
        try:
            subprocess.run([compiler, *flags, "-o", partial, str(_SOURCE), "-lm"], check=True,
                           capture_output=True, text=True, timeout=120)
            os.replace(partial, target)
        except subprocess.CalledProcessError as error:
            last_line = (error.stderr.strip().splitlines() or ["no message"])[-1]
            raise RuntimeError(f"{compiler} failed: {last_line}") from error
        finally:
            Path(partial).unlink(missing_ok=True)
    return target


def library() -> ctypes.CDLL | None:
    """The loaded kernel, or ``None`` when turned off or unavailable (the reason warned once)."""
    global _library, _max_dim, _failure
    if not enabled or _failure is not None:
        return None
    if _library is None:
        try:
            _library = _build()
            _max_dim = _library.curvlt_max_dim()
        except Exception as error:  # noqa: BLE001 - any failure leaves the tensor form, which gives the same result
            _failure = f"{type(error).__name__}: {error}".strip().splitlines()[0]
            warnings.warn(f"curvature: the compiled CPU kernels cannot be built here ({_failure}); eigen-problems "
                          "and CR's patch and pair stages run as PyTorch operators, which is slower", stacklevel=3)
            return None
    return _library


def available(device: torch.device, dim: int) -> bool:
    """Whether the kernels can take matrices of size ``dim`` (a tangent dimension, or the size of
    eigen-problems) on ``device`` here."""
    if device.type != "cpu":
        return False
    return library() is not None and dim <= _max_dim


def _kernel() -> ctypes.CDLL:
    """The loaded kernel, for the functions below, which callers reach only after :func:`available`."""
    kernel = library()
    if kernel is None:
        raise RuntimeError("curvature: the compiled CPU kernels are off or unavailable here; "
                           "check curvature._native.available() before calling them")
    return kernel


def pair_angles(coefficients: torch.Tensor, inner: torch.Tensor, slots: torch.Tensor, has_direction: torch.Tensor,
                own: torch.Tensor, other: torch.Tensor, eps: float) -> torch.Tensor:
    """Grassmann distance ``θ`` (E,) float64 of each edge (``own[e]``, ``other[e]``), differentiable
    with respect to ``coefficients`` (n, m, d) and ``inner`` (n, W, d), as
    :func:`curvature.gram_rotation.pair_residual_grams` followed by
    :func:`curvature.gram_rotation.angles_from_sin2` computes it; ``eps``: machine epsilon of the
    angle dtype, which sets the same cut-offs."""
    return _PairAngles.apply(coefficients, inner, slots, has_direction, own, other, eps)


def eigh(matrices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.linalg.eigh`` of a CPU batch (n, d, d) of symmetric matrices: eigenvalues ascending,
    eigenvectors as columns, in the input's dtype (computed in float64)."""
    work = matrices.detach().double().contiguous()
    evals = torch.empty(work.shape[:-1], dtype=torch.float64)
    evecs = torch.empty_like(work)
    _kernel().curvlt_eigh(work.shape[0], work.shape[-1], _pointer(work), _pointer(evals), _pointer(evecs))
    return evals.to(matrices.dtype), evecs.to(matrices.dtype)


def patch_spectra(grams: torch.Tensor, blocks: torch.Tensor,
                  patches: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Descending eigenvalues (n, m) and eigenvectors (n, m, m) of each patch's centred Gram matrix
    ``H K[P_i, P_i] H``, read from ``grams`` (B, W, W) float64 at cloud ``blocks[i]`` and slots
    ``patches[i]`` (n, m). Not differentiable: :func:`patch_coefficients` carries the gradient."""
    grams = grams.detach().double().contiguous()
    blocks, patches = blocks.long().contiguous(), patches.long().contiguous()
    n, m = patches.shape
    evals = torch.empty(n, m, dtype=torch.float64)
    evecs = torch.empty(n, m, m, dtype=torch.float64)
    _kernel().curvlt_patch_spectra(n, m, grams.shape[1], *map(_pointer, (grams, blocks, patches, evals, evecs)))
    return evals, evecs


def patch_coefficients(grams: torch.Tensor, blocks: torch.Tensor, patches: torch.Tensor, evals: torch.Tensor,
                       evecs: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What :func:`curvature.gram_rotation.pair_operands` computes from the patches: the
    coefficients ``A_i`` (n, m, d), the inner products ``S_i`` (n, W, d) and which directions have
    variance (n, d, bool), differentiable with respect to ``grams`` through the eigen-decomposition
    (``evals``, ``evecs`` from :func:`patch_spectra` of the same ``grams``)."""
    coefficients, inner, has_direction = _PatchCoefficients.apply(grams, blocks, patches, evals, evecs, dim)
    return coefficients, inner, has_direction > 0


def undirected_edges(indices: torch.Tensor, symmetric: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`curvature.gram_rotation._undirected_edges` (the same pairs, in order of first
    appearance), by one pass that looks each reverse edge up in the other point's k neighbours."""
    indices, symmetric = indices.long().contiguous(), symmetric.to(torch.uint8).contiguous()
    n, k = indices.shape
    own, other, which = (torch.empty(n * k, dtype=torch.long) for _ in range(3))
    count = _kernel().curvlt_undirected_edges(n, k, *map(_pointer, (indices, symmetric, own, other, which)))
    return own[:count], other[:count], which


def _pointer(tensor: torch.Tensor) -> ctypes.c_void_p:
    return ctypes.c_void_p(tensor.data_ptr())


class _PairAngles(torch.autograd.Function):
    @staticmethod
    def forward(ctx, coefficients: torch.Tensor, inner: torch.Tensor, slots: torch.Tensor,  # type: ignore[override]
                has_direction: torch.Tensor, own: torch.Tensor, other: torch.Tensor, eps: float) -> torch.Tensor:
        # Every tensor whose address goes to C is held by a name until the call returns.
        coefficients, inner = coefficients.detach().double().contiguous(), inner.detach().double().contiguous()
        slots, own, other = slots.long().contiguous(), own.long().contiguous(), other.long().contiguous()
        has_direction = has_direction.double().contiguous()
        dim, edges = coefficients.shape[2], own.numel()
        theta = torch.empty(edges, dtype=torch.float64)
        # What the backward pass reads per edge: M, the eigenvectors of G, and dθ/dλ.
        saved = torch.empty(edges, 2 * dim * dim + dim, dtype=torch.float64) if any(ctx.needs_input_grad) else None
        _kernel().curvlt_pair_forward(edges, *_shape(coefficients, inner), _pointer(coefficients), _pointer(inner),
                                      _pointer(slots), _pointer(has_direction), _pointer(own),
                                      _pointer(other), eps, _pointer(theta), None if saved is None else _pointer(saved))
        ctx.save_for_backward(coefficients, inner, slots, own, other, saved)
        return theta

    @staticmethod
    def backward(ctx, grad_theta: torch.Tensor):  # type: ignore[override]
        coefficients, inner, slots, own, other, saved = ctx.saved_tensors
        grad_coefficients, grad_inner = torch.zeros_like(coefficients), torch.zeros_like(inner)
        grad_theta = grad_theta.double().contiguous()
        operands = (coefficients, inner, slots, own, other, saved, grad_theta, grad_coefficients, grad_inner)
        _kernel().curvlt_pair_backward(own.numel(), coefficients.shape[0], *_shape(coefficients, inner),
                                       *map(_pointer, operands))
        return grad_coefficients, grad_inner, None, None, None, None, None


class _PatchCoefficients(torch.autograd.Function):
    @staticmethod
    def forward(ctx, grams: torch.Tensor, blocks: torch.Tensor, patches: torch.Tensor,  # type: ignore[override]
                evals: torch.Tensor, evecs: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        operands = (grams.detach().double().contiguous(), blocks.long().contiguous(), patches.long().contiguous(),
                    evals.double().contiguous(), evecs.double().contiguous())
        n, m = patches.shape
        coefficients = torch.empty(n, m, dim, dtype=torch.float64)
        inner = torch.empty(n, grams.shape[1], dim, dtype=torch.float64)
        has_direction = torch.empty(n, dim, dtype=torch.float64)
        _kernel().curvlt_patch_forward(n, m, dim, grams.shape[1], *map(_pointer, (*operands, coefficients, inner,
                                                                                  has_direction)))
        ctx.save_for_backward(*operands, coefficients)
        ctx.mark_non_differentiable(has_direction)
        return coefficients, inner, has_direction

    @staticmethod
    def backward(ctx, grad_coefficients: torch.Tensor | None, grad_inner: torch.Tensor | None,  # type: ignore[override]
                 _: torch.Tensor | None):
        grams, blocks, patches, evals, evecs, coefficients = ctx.saved_tensors
        n, m, dim = coefficients.shape
        grad_coefficients = (torch.zeros_like(coefficients) if grad_coefficients is None
                             else grad_coefficients.double().contiguous())
        grad_inner = (torch.zeros(n, grams.shape[1], dim, dtype=torch.float64) if grad_inner is None
                      else grad_inner.double().contiguous())
        grad_grams = torch.zeros_like(grams)
        operands = (grams, blocks, patches, evals, evecs, coefficients, grad_coefficients, grad_inner, grad_grams)
        _kernel().curvlt_patch_backward(n, m, dim, grams.shape[1], *map(_pointer, operands))
        return grad_grams, None, None, None, None, None


def _shape(coefficients: torch.Tensor, inner: torch.Tensor) -> tuple[int, int, int]:
    """(d, m, W) of coefficients (n, m, d) and inner (n, W, d)."""
    return coefficients.shape[2], coefficients.shape[1], inner.shape[1]
