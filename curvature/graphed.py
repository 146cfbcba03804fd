"""Curvature regularization (SPEC §4) as CUDA graphs, for GPU steps bound by launching kernels.

Why: on a GPU, a small model's step (ResNet-32, batch 128) is spent in Python launching kernels,
not in the GPU running them. The eager CR of :mod:`curvature.regularizer` launches some 590 more
and waits on the GPU some 29 times, because its shapes depend on the data (which classes changed,
how many points each has, which neighbour pairs are distinct): it doubled that step. Here the same
computation is cut into two segments whose shapes depend only on (batch size, cloud width,
tangent dimension); each is captured once per shape as CUDA graphs, forward and backward
(:func:`captured`), and then replayed with one launch each way.

To fix the shapes, this path measures every class at every step, pads every class's cloud to the
same width ``Q + A`` (``A``: the most features one class gets in the batch, rounded up to a power of
two so that few widths are ever captured) and takes every directed neighbour pair (the eager path
computes a symmetric pair once: here twice the pair work, for no host synchronisation). Segment 1
builds every point's patch and decomposes it, segment 2 everything from there to the loss. The
eigen-problems inside them go to the Triton kernels of :mod:`curvature._jacobi_triton`, which
never wait on the host (cuSOLVER checks its error codes there, and cannot be captured), so the
patch size ``k + 1`` must be at most their 16. Between the segments, only the auto tangent
dimension: a number segment 2's shape depends on, and the one place the host waits on the GPU
after the cloud width (which it reads from the labels at the start). With a fixed dimension the
host launches the whole of CR and goes on, so the GPU's work on it can overlap the host's
launching of the model's backward pass.

What the previous arrangement bought, measured on H200s (ResNet-32, batch 128, CIFAR-100-shaped,
four runs of ``benchmarks/training.py``; ``benchmarks/HISTORY.md``, "Training step, GPU"): with
three segments and both eigen-decompositions (cuSOLVER for the patches) run eagerly between them,
the step's ratio to the base step fell from 1.93-2.06 to 1.56-1.77 at tangent dimension 2, from
2.07-2.16 to 1.73-1.92 at d = 4 and from 2.29-2.46 to 2.01-2.22 with the auto dimension (d = 8 on a
fresh model). The present arrangement has not run on a GPU yet. The fixed shapes about double CR's
GPU work. With 1,000 classes (ImageNet-LT) measuring every class costs far more than launches save
(4.68x against the eager path's 1.55x at batch 32), so the path is opt-in (``cuda_graphs``), and on
in the CIFAR configs.

The segments call the geometry engine's functions (no second implementation). Built with
``capture=False`` they run as plain functions on any device, which is how the tests check, on the
CPU, that this path gives the eager path's loss and gradients.
"""

from __future__ import annotations

import contextlib
import gc
import warnings
import weakref
from collections import OrderedDict
from collections.abc import Callable

import torch

from curvature._linalg import capture_obstacle, symmetric_eigh, symmetric_eigvals
from curvature.cr_loss import CRResult, curvature_loss, normalised_curvature
from curvature.gram_rotation import (GramPatches, angles_from_sin2, cloud_grams, descending, neighbours_from_grams,
                                     pair_residual_grams, patch_grams)
from curvature.local_pca import dim_from_histogram, explained_count_histograms
from curvature.queue import ClassFeatureQueue, class_counts, rank_within_class
from curvature.rotation import TangentDim


#: Captured segments kept per module. A step uses two (shapes: batch size, cloud width, tangent
#: dimension); a few widths and auto dimensions recur. Each keeps its inputs, outputs and saved
#: activations in GPU memory: at CIFAR-100 scale (100 classes, Q = 128, k = 10, d = 8) the largest,
#: segment 2, holds some 0.5-1 GB (its (C, W·d, W) float64 inner products are 118 MB, and several
#: tensors of the 136,000 neighbour pairs about as much), estimated from its tensors' sizes.
MAX_SEGMENTS = 8


class CaptureFailed(RuntimeError):
    """A segment could not be captured as a CUDA graph."""


def cloud_width(labels: torch.Tensor, num_classes: int, queue_size: int) -> int:
    """``Q + A``: room for every class's queue and its features in this batch, ``A`` the most one
    class gets rounded up to a power of two (one host synchronisation)."""
    most = int(class_counts(labels, num_classes).max())
    return queue_size + (1 << max(0, most - 1).bit_length())


def patch_segment(queue: ClassFeatureQueue, k: int, width: int) -> Callable[..., tuple[torch.Tensor, ...]]:
    """Segment 1, (features (B, D), labels (B,)) → every slot's patch: the eigenvalues (n, m),
    ascending, and eigenvectors (n, m, m) of its centred Gram matrix (n = C·W, every slot of every
    class); the classes' Gram matrices (C, W, W); each slot's class (n,), patch slots (n, m) and
    neighbours as flat slots (n, k); which slots are points of a measured class (n,), and which
    classes have k + 1 points (C,)."""

    def segment(features: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, ...]:
        num_classes, device = queue.num_classes, features.device
        ranks = rank_within_class(labels, num_classes)
        clouds, valid = queue.padded_clouds(None, features, labels, ranks, width)
        grams = cloud_grams(clouds, valid)
        offsets = (torch.arange(num_classes, device=device) * width)[:, None, None]
        neighbours = (neighbours_from_grams(grams, valid, k) + offsets).flatten(0, 1)
        blocks, patches, centred = patch_grams(grams, torch.arange(num_classes * width, device=device), neighbours)
        measured = valid.sum(dim=1) > k
        evals, evecs = symmetric_eigh(centred)
        return evals, evecs, grams, blocks, patches, neighbours, (valid & measured[:, None]).flatten(), measured

    return segment


def curvature_segment(num_classes: int, k: int, dim: int, eps: float, balance_weight: float,
                      angle_dtype: torch.dtype) -> Callable[..., tuple[torch.Tensor, torch.Tensor]]:
    """Segment 2, segment 1's outputs → (``L_CR``, detached ``g_c`` (C,)): the principal
    angles of every directed neighbour pair, from the eigenvalues of its ``R Rᵀ`` (n·k, d, d), in
    ``angle_dtype``, averaged over each class's measured points."""

    def segment(evals: torch.Tensor, evecs: torch.Tensor, grams: torch.Tensor, blocks: torch.Tensor,
                patches: torch.Tensor, neighbours: torch.Tensor, point_measured: torch.Tensor,
                measured: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        spectra = GramPatches(grams, blocks, patches, *descending(evals, evecs))
        residual = pair_residual_grams(spectra, neighbours, dim, distinct=False)[0].to(angle_dtype)
        angle = angles_from_sin2(symmetric_eigvals(residual), None, k).reshape(num_classes, -1)
        weights = point_measured.reshape(num_classes, -1).to(angle.dtype)
        curvature = normalised_curvature((angle * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1), dim)
        return curvature_loss(curvature, measured, eps, balance_weight), (curvature * measured).detach()

    return segment


def captured(segment: Callable[..., torch.Tensor | tuple[torch.Tensor, ...]], sample: tuple[torch.Tensor, ...],
             warmup: int = 3) -> Callable[..., torch.Tensor | tuple[torch.Tensor, ...]]:
    """``segment`` as a differentiable function whose forward and backward each replay one CUDA
    graph, captured on copies of ``sample``: what :func:`torch.cuda.make_graphed_callables` does for
    one function, with two differences. Warm-up and both captures run on one side stream (PyTorch
    before 2.13 warms up on another stream than it captures on), with garbage collection paused (a
    collection during capture can free tensors whose stream events a capture forbids). With
    ``make_graphed_callables`` (torch 2.11, H200), and with this function before the pause, some
    captures failed ("operation failed due to a previous error during capture"); with both, seven
    runs of the CUDA tests captured every segment. A capture is checked only against this thread's
    CUDA calls (``thread_local``): Ray Train and the data loader run other threads that use CUDA."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        inputs = tuple(a.detach().clone().requires_grad_(a.requires_grad) for a in sample)
        wanted = tuple(a for a in inputs if a.requires_grad)
        for _ in range(warmup):  # lazy initialisation (cuBLAS handles, workspaces) stays out of the graphs
            outputs = _as_tuple(segment(*inputs))
            torch.autograd.grad([o for o in outputs if o.requires_grad], wanted,
                                [torch.zeros_like(o) for o in outputs if o.requires_grad])
    pool = torch.cuda.graph_pool_handle()
    forward_graph, backward_graph = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
    collecting = gc.isenabled()
    gc.disable()  # a collection during capture could free tensors of other streams, whose events the capture forbids
    try:
        with torch.cuda.graph(forward_graph, pool=pool, stream=stream, capture_error_mode="thread_local"):
            outputs = _as_tuple(segment(*inputs))
        differentiable = [o for o in outputs if o.requires_grad]
        grad_outputs = [torch.empty_like(o) for o in differentiable]
        with torch.cuda.graph(backward_graph, pool=pool, stream=stream, capture_error_mode="thread_local"):
            grad_inputs = iter(torch.autograd.grad(differentiable, wanted, grad_outputs))
    except RuntimeError:
        _end_random_capture(stream)
        raise
    finally:
        if collecting:
            gc.enable()
    grads = tuple(next(grad_inputs) if a.requires_grad else None for a in inputs)

    class Replay(torch.autograd.Function):
        @staticmethod
        def forward(ctx, *args: torch.Tensor) -> tuple[torch.Tensor, ...]:  # type: ignore[override]
            for static, arg in zip(inputs, args):
                if static.data_ptr() != arg.data_ptr():
                    static.copy_(arg)
            forward_graph.replay()
            return tuple(o.detach() for o in outputs)

        @staticmethod
        @torch.autograd.function.once_differentiable
        def backward(ctx, *output_grads: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
            for static, grad in zip(grad_outputs, (g for g, o in zip(output_grads, outputs) if o.requires_grad)):
                static.copy_(grad)
            backward_graph.replay()
            return tuple(None if g is None else g.detach() for g in grads)

    def replay(*args: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        result = Replay.apply(*args)
        return result if len(outputs) > 1 else result[0]

    return replay


def _check_capturable(eigen_problems: dict[str, tuple[int, torch.dtype]], device: torch.device) -> None:
    """Raise RuntimeError where a segment's eigen-problems (what they are: (size, dtype)) cannot be
    solved inside a CUDA graph (:func:`curvature._linalg.capture_obstacle`)."""
    for what, (size, dtype) in eigen_problems.items():
        obstacle = capture_obstacle(size, dtype, device)
        if obstacle is not None:
            raise RuntimeError(f"CR's {what} eigen-problems cannot be solved inside CUDA graphs: {obstacle}")


def _end_random_capture(stream: torch.cuda.Stream) -> None:
    """Capture nothing, once, after a capture that failed. Each capture marks PyTorch's CUDA random
    generator as captured when it begins and unmarks it when it ends; a capture that fails stops
    before the unmarking, and every later random draw on the GPU (dropout, augmentation) then fails
    with "Offset increment outside graph capture" (seen on an H200 with PyTorch 2.11). An empty
    capture runs both steps and leaves the generator as it was. Should that fail too, the original
    error is the one worth reporting, so this one is dropped."""
    with contextlib.suppress(RuntimeError), torch.cuda.graph(torch.cuda.CUDAGraph(), stream=stream,
                                                               capture_error_mode="thread_local"):
        pass


def _as_tuple(outputs: torch.Tensor | tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    return outputs if isinstance(outputs, tuple) else (outputs,)


class GraphedCurvature:
    """CR's loss from this step's features and the queues, by the two segments above, each
    captured per shape the first time it is met (``capture``; else run as plain functions).

    A replay overwrites what the previous replay's backward reads, so while the autograd graph of
    the previous call is alive and its backward has not run, :meth:`ready` is False and the caller
    must take the eager path (calling twice before one backward stays correct, only slower).
    """

    def __init__(self, queue: ClassFeatureQueue, k: int, tangent_dim: TangentDim, eps: float, balance_weight: float,
                 capture: bool = True):
        self.queue, self.k, self.tangent_dim = queue, k, tangent_dim
        self.eps, self.balance_weight, self.capture = eps, balance_weight, capture
        self._segments: OrderedDict[tuple, Callable] = OrderedDict()  # least recently used first
        self._pending: weakref.ref | None = None  # the last call's first autograd node, until its backward ran
        self._made: set[tuple] = set()  # every key a segment was made for, kept or evicted since
        self._recaptured = False  # whether an evicted segment had to be captured again (warned once)
        self.failure: str | None = None  # why a capture failed; the graphs are then never used again

    def ready(self) -> bool:
        return self.failure is None and (self._pending is None or self._pending() is None)

    def __call__(self, features: torch.Tensor, labels: torch.Tensor) -> CRResult:
        """CR's step; where no class has k + 1 points, a loss of 0 (still attached to ``features``)
        and no class marked measured, found without the host asking the GPU."""
        queue, k = self.queue, self.k
        width = cloud_width(labels, queue.num_classes, queue.queue_size)
        # The graphs read the queue's buffers where they were at capture: a move makes new ones.
        shape = (features.shape[0], width, features.dtype, queue.queue.data_ptr(), queue.count.data_ptr())
        first = self._segment(("patch", *shape), lambda: patch_segment(queue, k, width),
                              {f"patch (cr.k + 1 = {k + 1})": (k + 1, torch.float64)}, features, labels)
        patch_stage = first(features, labels)
        evals, point_measured, measured = patch_stage[0], patch_stage[-2], patch_stage[-1]
        if self.capture:
            self._hold(evals.grad_fn)
        if self.tangent_dim == "auto":
            groups = (~point_measured).long()  # 0: the points of measured classes
            dim = dim_from_histogram(explained_count_histograms(evals.flip(-1), groups, 2)[0], k)
        else:
            dim = self.tangent_dim
        second = self._segment(("curvature", *shape, dim),
                               lambda: curvature_segment(queue.num_classes, k, dim, self.eps, self.balance_weight,
                                                         features.dtype),
                               # d x d with d <= 2: closed form in symmetric_eigvals, no solver
                               {f"pair (tangent dimension {dim})": (dim, features.dtype)} if dim > 2 else {},
                               *patch_stage)
        loss, curvature = second(*patch_stage)
        # Copies: the replays' outputs live in the graphs' memory, which the next step overwrites.
        return CRResult(loss.clone(), curvature.clone(), measured.clone(), dim)

    def _segment(self, key: tuple, make: Callable[[], Callable], eigen_problems: dict[str, tuple[int, torch.dtype]],
                 *sample: torch.Tensor) -> Callable:
        """The segment for ``key``, made (and captured, on copies of ``sample``) the first time. A
        capture that fails, or would (its ``eigen_problems``, (size, dtype) by what they are, have
        no solver that can run inside a graph), raises :class:`CaptureFailed` and turns the graphs
        off for good. Only the :data:`MAX_SEGMENTS` most recently used are kept: each holds its own
        GPU memory."""
        if key in self._segments:
            self._segments.move_to_end(key)
            return self._segments[key]
        segment = make()
        if self.capture and key in self._made and not self._recaptured:
            # evicted, now needed again: the shapes alternate among more than MAX_SEGMENTS, and each
            # capture costs several CR steps, a cost nothing else would show
            self._recaptured = True
            warnings.warn(f"curvature regularizer: a CUDA graph segment evicted earlier is captured again: the "
                          f"steps' shapes (batch size, cloud width, tangent dimension) alternate among more than the "
                          f"{MAX_SEGMENTS} segments kept, and each capture costs several CR steps (a fixed "
                          "cr.tangent_dim makes fewer shapes)", stacklevel=3)
        self._made.add(key)
        if self.capture:
            try:
                _check_capturable(eigen_problems, sample[0].device)
                segment = captured(segment, sample)
            except RuntimeError as error:
                self.failure = str(error).strip().splitlines()[0]
                warnings.warn(f"curvature regularizer: CUDA graph capture failed ({self.failure}); "
                              "the eager path is used from now on", stacklevel=2)
                raise CaptureFailed(self.failure) from error
        self._segments[key] = segment
        if len(self._segments) > MAX_SEGMENTS:
            self._segments.popitem(last=False)
        return segment

    def _hold(self, node: torch.autograd.graph.Node | None) -> None:
        """Mark the graphs busy until ``node`` (the first segment's backward, a Python autograd
        node, which can be referenced weakly) has run or is freed."""
        if node is None:  # no gradient recorded: nothing will read the replay's buffers later
            self._pending = None
            return
        pending = weakref.ref(node)
        self._pending = pending

        def released(grad_inputs: object, grad_outputs: object) -> None:
            if self._pending is pending:
                self._pending = None

        node.register_hook(released)
