"""CR's fixed-shape path for CUDA graphs (curvature.graphed) gives the eager path's loss, class
curvatures and gradients: uncaptured on every device, captured and replayed on CUDA."""

from __future__ import annotations

import warnings

import pytest
import torch

from curvature.graphed import GraphedCurvature, cloud_width
from curvature.regularizer import CurvatureRegularizer

NUM_CLASSES, FEATURE_DIM, K = 6, 12, 5


def batches(device: str, steps: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Long-tailed batches: class 0 has most points, class 4 few (under k + 1 at first), class 5
    none; one batch repeats a point (degenerate patches) and one is larger (another cloud width)."""
    generator = torch.Generator().manual_seed(seed)
    out = []
    for step in range(steps):
        labels = torch.tensor([0] * (14 + 10 * (step == 2)) + [1] * 5 + [2] * 4 + [3] * 3 + [4] * (step % 2))
        features = torch.randn(len(labels), FEATURE_DIM, generator=generator) * 2 + torch.arange(FEATURE_DIM) * 0.1
        if step == 1:
            features[:4] = features[0]
        out.append((features.to(device), labels.to(device)))
    return out


def assert_close_gradients(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Equal to float32 precision of the pair stage: the eager path computes each symmetric pair
    once as (i, j) or (j, i), this path both ways; their float32 eigenvalues differ in rounding,
    which near-zero angles magnify in the gradient (module doc of curvature.gram_rotation). Seen:
    at most 0.16% of the largest gradient entry."""
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-2 * float(expected.abs().max()))


def leaf(features: torch.Tensor) -> torch.Tensor:
    return features.clone().requires_grad_(True)


@pytest.mark.parametrize("inner_products", ["inner_products_by_point", "inner_products_by_cloud"])
@pytest.mark.parametrize("tangent_dim", ["auto", 2, 3])
def test_fixed_shape_path_equals_the_eager_path(tangent_dim, inner_products, device, monkeypatch):
    """Either form of the inner products (the CPU's per point, CUDA's per cloud) on either device;
    on the CPU the eager path's pair stage is the compiled kernels', which use neither."""
    import curvature.gram_rotation as gram_rotation

    monkeypatch.setattr(gram_rotation, "inner_products", getattr(gram_rotation, inner_products))
    cr = CurvatureRegularizer(NUM_CLASSES, FEATURE_DIM, weight=1.0, k=K, queue_size=12, tangent_dim=tangent_dim,
                              balance_weight=0.5, cuda_graphs=False).to(device)
    graphed = GraphedCurvature(cr.queue, K, tangent_dim, cr.eps, cr.balance_weight, capture=device == "cuda")
    for features, labels in batches(device, 6):
        ours, theirs = leaf(features), leaf(features)
        step = graphed(ours, labels)  # before cr(), which enqueues the batch after measuring
        expected = cr(theirs, labels, epoch=0)
        assert step.tangent_dim == expected.tangent_dim
        assert torch.equal(step.measured, expected.measured)
        torch.testing.assert_close(step.class_curvature, expected.class_curvature, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(step.loss, expected.loss, rtol=1e-5, atol=1e-6)
        step.loss.backward()
        expected.loss.backward()
        assert_close_gradients(ours.grad, theirs.grad)


@pytest.mark.parametrize("tangent_dim", ["auto", 2])
def test_no_class_with_k_plus_one_points_gives_a_zero_loss_without_asking_the_gpu(tangent_dim, device):
    """The eager path returns early when no class has k + 1 points, which reads a value on the host;
    this path computes through instead: a loss of 0 attached to the features, a zero (finite)
    gradient, no class marked measured."""
    graphed = GraphedCurvature(CurvatureRegularizer(NUM_CLASSES, FEATURE_DIM, k=K, queue_size=12).queue.to(device),
                               K, tangent_dim, 1e-6, 0.5, capture=device == "cuda")
    features, labels = batches(device, 1)[0]
    few = torch.cat([torch.nonzero(labels == c).flatten()[:K] for c in range(NUM_CLASSES)])  # at most k per class
    ours = leaf(features[few])
    step = graphed(ours, labels[few])
    step.loss.backward()
    assert float(step.loss.detach()) == 0.0 and not bool(step.measured.any()) and not bool(step.class_curvature.any())
    assert torch.equal(ours.grad, torch.zeros_like(ours))


def test_patches_too_large_for_the_triton_solver_are_not_captured():
    """Inside the graphs the patch eigen-problems ((k + 1) x (k + 1)) go to the Triton kernel, which
    takes sizes up to 16: with a larger k the graphs are given up, with a warning naming cr.k,
    before anything is captured (here on the CPU, where nothing could be)."""
    pytest.importorskip("triton", reason="Triton ships with PyTorch on Linux; without it the message names Triton")
    from curvature.graphed import CaptureFailed

    k = 16
    cr = CurvatureRegularizer(2, FEATURE_DIM, weight=1.0, k=k, queue_size=20)
    graphed = GraphedCurvature(cr.queue, k, 2, cr.eps, cr.balance_weight, capture=True)
    features = torch.randn(40, FEATURE_DIM, generator=torch.Generator().manual_seed(0))
    with pytest.warns(UserWarning, match=r"cr\.k \+ 1 = 17"), pytest.raises(CaptureFailed):
        graphed(leaf(features), torch.arange(40) % 2)
    assert not graphed.ready()


def test_a_given_up_triton_solver_stops_the_capture_before_it_starts(monkeypatch):
    """Where the Triton solver of the patch eigen-problems has failed here (say, its first-use
    check against cuSOLVER), a capture could only fail, with CUDA's words: it is not attempted, and
    the warning says why in CR's."""
    pytest.importorskip("triton", reason="Triton ships with PyTorch on Linux; without it the message names Triton")
    import curvature._linalg as linalg
    from curvature.graphed import CaptureFailed

    monkeypatch.setattr(linalg, "_jacobi_failures", {"round_robin_eigh": "RuntimeError: its eigenvalues differ"})
    k = 10
    cr = CurvatureRegularizer(2, FEATURE_DIM, weight=1.0, k=k, queue_size=20)
    graphed = GraphedCurvature(cr.queue, k, 2, cr.eps, cr.balance_weight, capture=True)
    features = torch.randn(40, FEATURE_DIM, generator=torch.Generator().manual_seed(0))
    with pytest.warns(UserWarning, match=r"patch \(cr\.k \+ 1 = 11\).*round_robin_eigh cannot run here "
                                         r"\(RuntimeError: its eigenvalues differ\)"), pytest.raises(CaptureFailed):
        graphed(leaf(features), torch.arange(40) % 2)
    assert not graphed.ready()


def test_a_segment_captured_again_after_its_eviction_is_warned_about_once(monkeypatch):
    """Only MAX_SEGMENTS captured segments are kept; a run whose shapes alternate among more pays a
    new capture each time an evicted one comes back, which nothing else would show: the first
    such capture warns. (Captures stood in for by the plain segments, on the CPU.)"""
    import curvature.graphed as graphed_module

    monkeypatch.setattr(graphed_module, "MAX_SEGMENTS", 2)
    monkeypatch.setattr(graphed_module, "captured", lambda segment, sample: segment)
    monkeypatch.setattr(graphed_module, "_check_capturable", lambda eigen_problems, device: None)
    cr = CurvatureRegularizer(NUM_CLASSES, FEATURE_DIM, weight=1.0, k=K, queue_size=12)
    graphed = GraphedCurvature(cr.queue, K, 2, cr.eps, cr.balance_weight, capture=True)
    features, labels = batches("cpu", 1)[0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        graphed(features, labels)  # two segments: both kept
        graphed(features[:-1], labels[:-1])  # another batch size: two more, which evict the first two
        graphed(features[:-1], labels[:-1])  # kept: nothing made
    with pytest.warns(UserWarning, match="evicted earlier is captured again.*more than the 2 segments kept"):
        graphed(features, labels)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        graphed(features[:-1], labels[:-1])  # captured again too, but said once is enough


def test_cloud_width_rounds_the_most_arrivals_up_to_a_power_of_two():
    labels = torch.tensor([0, 0, 0, 1, 2, 2])
    assert cloud_width(labels, 4, 16) == 16 + 4
    assert cloud_width(torch.tensor([3]), 4, 16) == 16 + 1


def test_regularizer_replays_graphs_on_cuda_only_and_stays_correct_when_called_twice(device):
    """On CUDA the module takes the graphed path; a second call before the first one's backward
    would overwrite what that backward reads, so it runs eagerly; the gradients are those of the
    eager module either way. On the CPU the option changes nothing."""
    modules = [CurvatureRegularizer(NUM_CLASSES, FEATURE_DIM, weight=1.0, k=K, queue_size=12, cuda_graphs=graphs)
               .to(device) for graphs in (True, False)]
    data = batches(device, 6, seed=1)
    for index, (features, labels) in enumerate(data):
        twice = index == 4
        grads = []
        for cr in modules:
            first = leaf(features)
            loss = cr(first, labels, epoch=0).loss
            if twice:
                second = leaf(data[5][0])
                loss = loss + cr(second, data[5][1], epoch=0).loss
            loss.backward()
            grads.append(torch.cat([first.grad] + ([second.grad] if twice else [])))
        assert_close_gradients(grads[0], grads[1])
    assert modules[0].graphed.failure is None
    assert bool(modules[0].graphed._segments) == (device == "cuda")


def test_a_segment_that_cannot_be_captured_turns_the_graphs_off_with_a_warning(monkeypatch, device):
    """A segment that waits on the GPU (here: reads a value on the host) cannot be captured; the
    module warns once and gives the eager path's result, now and later. On the CPU nothing is captured."""
    import curvature.graphed as graphed_module

    capturable = graphed_module.patch_segment

    def waits_on_the_gpu(queue, k, width):
        segment = capturable(queue, k, width)
        return lambda features, labels: segment(features * float(features.abs().max() > 0), labels)

    monkeypatch.setattr(graphed_module, "patch_segment", waits_on_the_gpu)
    modules = [CurvatureRegularizer(NUM_CLASSES, FEATURE_DIM, weight=1.0, k=K, queue_size=12, cuda_graphs=graphs)
               .to(device) for graphs in (True, False)]
    for features, labels in batches(device, 4, seed=2):
        grads = []
        for cr in modules:
            ours = leaf(features)
            if device == "cuda" and cr.graphed is not None and cr.graphed.failure is None:
                with pytest.warns(UserWarning, match="CUDA graph capture failed"):
                    cr(ours, labels, epoch=0).loss.backward()
            else:
                cr(ours, labels, epoch=0).loss.backward()
            grads.append(ours.grad)
        assert_close_gradients(grads[0], grads[1])
    assert (modules[0].graphed.failure is not None) == (device == "cuda")
    torch.randn(4, device=device)  # the failed capture left the GPU's random generator usable


def test_only_the_most_recently_used_segments_are_kept(monkeypatch):
    """Every shape met makes segments; past MAX_SEGMENTS the least recently used one is dropped."""
    import curvature.graphed as graphed_module

    monkeypatch.setattr(graphed_module, "MAX_SEGMENTS", 4)
    cr = CurvatureRegularizer(NUM_CLASSES, FEATURE_DIM, weight=1.0, k=K, queue_size=12, tangent_dim=2)
    graphed = GraphedCurvature(cr.queue, K, 2, cr.eps, cr.balance_weight, capture=False)
    for features, labels in batches("cpu", 4):
        cr.queue.enqueue(features, labels)
    for size in (20, 21, 20, 22):  # three batch sizes: three shapes of each segment
        features, labels = batches("cpu", 1)[0]
        graphed(leaf(features[:size]), labels[:size])
    # Least recently used first: batch 20's two segments (used again before batch 22 came) and
    # batch 22's; batch 21's were the least recently used when batch 22's were made.
    assert [key[:2] for key in graphed._segments] == [("patch", 20), ("curvature", 20), ("patch", 22),
                                                      ("curvature", 22)]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_step_at_a_fixed_dimension_waits_on_the_gpu_only_at_its_start(monkeypatch):
    """Once its graphs are captured, a CR step at a fixed tangent dimension reads nothing back from
    the GPU after the labels' check and the cloud width (both stood in for here, as they read the
    labels): forward, enqueue and backward run under PyTorch's sync debug mode set to raise on any
    synchronising call (an ``eigh`` by cuSOLVER, a ``nonzero``, a boolean mask, an ``item()``)."""
    import curvature.graphed as graphed_module
    import curvature.regularizer as regularizer_module

    cr = CurvatureRegularizer(NUM_CLASSES, FEATURE_DIM, weight=1.0, k=K, queue_size=12, tangent_dim=3,
                              cuda_graphs=True).cuda()
    features, labels = batches("cuda", 1)[0]
    for _ in range(3):  # fill the queues, capture both segments at this batch's shapes
        cr(leaf(features), labels, epoch=0).loss.backward()
    assert cr.graphed.failure is None and len(cr.graphed._segments) == 2
    width = graphed_module.cloud_width(labels, NUM_CLASSES, 12)
    monkeypatch.setattr(graphed_module, "cloud_width", lambda *args: width)
    monkeypatch.setattr(regularizer_module, "check_labels", lambda *args: None)
    ours = leaf(torch.randn_like(features))
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        result = cr(ours, labels, epoch=0)
        result.loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert len(cr.graphed._segments) == 2  # replayed, not captured again
    assert bool(result.measured.any()) and bool(torch.isfinite(ours.grad).all())
