"""Per-class feature queue and curvature regularization (SPEC §4)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from curvature import manifolds, tangent_rotation
from curvature.queue import ClassFeatureQueue
from curvature.regularizer import CurvatureRegularizer


def test_queue_is_fifo_per_class_with_wraparound():
    queue = ClassFeatureQueue(num_classes=2, feature_dim=1, queue_size=3)
    queue.enqueue(torch.tensor([[1.0], [2.0], [10.0]]), torch.tensor([0, 0, 1]))
    assert queue.count.tolist() == [2, 1] and queue.ptr.tolist() == [2, 1]
    queue.enqueue(torch.tensor([[3.0], [4.0], [5.0]]), torch.tensor([0, 0, 0]))  # class 0 wraps
    assert queue.queue[0, :, 0].tolist() == [4.0, 5.0, 3.0]  # 1 and 2 (oldest) overwritten
    assert queue.count.tolist() == [3, 1] and queue.ptr.tolist() == [2, 1]
    queue.enqueue(torch.arange(7.0)[:, None] + 100, torch.ones(7, dtype=torch.long))  # more than Q at once
    # the newest three, each in its FIFO slot: ptr (1 + 7) % 3 = 2 points at the oldest of them
    assert queue.queue[1, :, 0].tolist() == [105.0, 106.0, 104.0] and queue.ptr.tolist() == [2, 2]
    assert queue.filled().tolist() == [[True] * 3, [True] * 3]


def test_queue_survives_a_checkpoint_round_trip(tmp_path):
    cr = CurvatureRegularizer(3, 4, weight=1.0, queue_size=5)
    cr(torch.randn(12, 4), torch.tensor([0, 1, 2] * 4), epoch=0)
    torch.save(cr.state_dict(), tmp_path / "cr.pt")
    restored = CurvatureRegularizer(3, 4, weight=1.0, queue_size=5)
    restored.load_state_dict(torch.load(tmp_path / "cr.pt"))
    for name in ("queue.queue", "queue.ptr", "queue.count"):
        assert torch.equal(restored.state_dict()[name], cr.state_dict()[name])


def test_bad_labels_are_refused():
    queue = ClassFeatureQueue(2, 3, 4)
    for bad in (2, -1):
        with pytest.raises(ValueError, match=r"labels: must lie in \[0, 1\]"):
            queue.enqueue(torch.zeros(1, 3), torch.tensor([bad]))
        with pytest.raises(ValueError, match=r"labels: must lie in \[0, 1\]"):
            CurvatureRegularizer(2, 3, weight=1.0)(torch.zeros(1, 3), torch.tensor([bad]), epoch=0)


def test_loss_matches_its_definition(rng, device):
    """One class on a known sphere: L_CR = -log(1 - g + eps), g = a / (sqrt(d) pi/2)."""
    points = torch.tensor(manifolds.sphere(200, 2, 1.0, 6, rng), dtype=torch.float32)
    cr = CurvatureRegularizer(1, 6, weight=1.0, k=10, queue_size=8, tangent_dim=2).to(device)
    result = cr(points.to(device), torch.zeros(200, dtype=torch.long, device=device), epoch=0)
    expected_angle = float(tangent_rotation(points, k=10, tangent_dim=2).mean_angle)
    g = expected_angle / (math.sqrt(2) * math.pi / 2)
    assert float(result.class_curvature[0]) == pytest.approx(g, rel=1e-4)
    assert float(result.loss) == pytest.approx(-math.log(1 - g + 1e-6), rel=1e-4)


def test_balance_term_and_flatter_is_lower(rng):
    flat = manifolds.plane(150, 2, 6, rng)
    curved = manifolds.sphere(150, 2, 0.3, 6, rng)
    labels = torch.repeat_interleave(torch.arange(2), 150)
    features = torch.tensor(np.concatenate([flat, curved]), dtype=torch.float32)
    plain = CurvatureRegularizer(2, 6, weight=1.0, tangent_dim=2, queue_size=4)(features, labels, 0)
    balanced = CurvatureRegularizer(2, 6, weight=1.0, tangent_dim=2, queue_size=4,
                                    balance_weight=1.0)(features, labels, 0)
    g = plain.class_curvature
    assert float(g[0]) < float(g[1])
    assert float(balanced.loss) == pytest.approx(float(plain.loss) + float(g.std(unbiased=False)), rel=1e-5)


def test_finite_loss_and_gradients_with_tiny_and_degenerate_classes(device):
    torch.manual_seed(0)
    cr = CurvatureRegularizer(5, 8, weight=1.0, k=5, queue_size=16).to(device)
    for step in range(6):
        features = torch.randn(20, 8, device=device)
        features[:4] = features[0]  # duplicates
        features = features.requires_grad_(True)
        labels = torch.tensor([0] * 12 + [1] * 6 + [2] + [3], device=device)  # class 4 never appears, 2 and 3 tiny
        result = cr(features, labels, epoch=0)
        result.loss.backward()
        assert torch.isfinite(result.loss) and torch.isfinite(features.grad).all()
    assert result.measured.tolist() == [True, True, True, True, False]  # 2 and 3 filled up via the queue


def test_start_epoch_delays_loss_but_fills_queue():
    cr = CurvatureRegularizer(2, 4, weight=1.0, start_epoch=3, queue_size=8)
    features = torch.randn(16, 4, requires_grad=True)
    result = cr(features, torch.tensor([0, 1] * 8), epoch=2)
    assert float(result.loss.detach()) == 0.0 and result.tangent_dim == 0
    result.loss.backward()  # attached, so a lone backward works, with zero gradient
    assert float(features.grad.abs().sum()) == 0.0
    assert cr.queue.count.tolist() == [8, 8]


def test_lazy_cr_computes_every_nth_call_of_an_epoch_scaled():
    """``every = 3``: calls 0 and 3 of an epoch give 3x the loss of a module computing every call
    (same queues, since both enqueue every call), calls 1 and 2 a zero loss with zero gradient, and
    a new epoch starts counting again at its first call."""
    settings = {"weight": 1.0, "k": 5, "queue_size": 12, "tangent_dim": 2}
    lazy, every_call = CurvatureRegularizer(4, 6, every=3, **settings), CurvatureRegularizer(4, 6, **settings)
    generator = torch.Generator().manual_seed(0)
    for epoch, calls in ((0, 5), (1, 1)):
        for call in range(calls):
            features = torch.randn(24, 6, generator=generator, requires_grad=True)
            labels = torch.randint(0, 4, (24,), generator=generator)
            lazy_result, reference = lazy(features, labels, epoch), every_call(features, labels, epoch)
            lazy_result.loss.backward()
            if call % 3 == 0:
                assert float(reference.loss.detach()) > 0 and lazy_result.tangent_dim == 2
                assert torch.allclose(lazy_result.loss, 3 * reference.loss)
                assert torch.equal(lazy_result.class_curvature, reference.class_curvature)
            else:
                assert float(lazy_result.loss.detach()) == 0.0 and lazy_result.tangent_dim == 0
                assert float(features.grad.abs().sum()) == 0.0
    assert torch.equal(lazy.queue.queue, every_call.queue.queue)


def test_zero_weight_does_no_work(monkeypatch):
    import curvature.regularizer as module

    def forbidden(*args, **kwargs):
        raise AssertionError("curvature work at weight 0")

    monkeypatch.setattr(module, "_measure", forbidden)
    monkeypatch.setattr(module, "_class_clouds", forbidden)
    cr = CurvatureRegularizer(2, 4, weight=0.0)
    features = torch.randn(16, 4, requires_grad=True)
    result = cr(features, torch.tensor([0, 1] * 8), epoch=5)
    assert float(result.loss) == 0.0 and result.loss.grad_fn is None
    assert cr.queue.count.tolist() == [0, 0]


def _curved_batch(labels: torch.Tensor, noise: float, generator: torch.Generator) -> torch.Tensor:
    """Features of each class on its own curved 2-manifold in R^12, plus isotropic noise."""
    bases = torch.randn(8, 3, 12, generator=torch.Generator().manual_seed(7))
    angles = torch.rand(labels.numel(), 2, generator=generator) * 3
    on_sphere = torch.stack([angles[:, 0].cos() * angles[:, 1].sin(), angles[:, 0].sin() * angles[:, 1].sin(),
                             angles[:, 1].cos()], dim=1)
    return torch.einsum("nj,njd->nd", on_sphere, bases[labels]) + noise * torch.randn(labels.numel(), 12,
                                                                                      generator=generator)


@pytest.mark.parametrize("tangent_dim", ["auto", 2])
def test_kept_queue_curvatures_give_the_loss_of_measuring_every_class(monkeypatch, tangent_dim, device):
    """A class without batch features is measured once per change of its queue; loss, g_c, the
    tangent dimension and the gradient equal those of a copy that measures every class (loaded from
    the same state, so it keeps nothing), while the auto dimension moves as noise grows."""
    import curvature.regularizer as module

    clouds = {}  # clouds measured per step, by the module that keeps values and by the reference
    measure = module._measure

    def counting(features, labels, queue, k, selected):
        result = measure(features, labels, queue, k, selected)
        key = "kept" if queue is cr.queue else "reference"
        clouds[key][-1] += 0 if result is None else result.classes.numel()
        return result

    monkeypatch.setattr(module, "_measure", counting)
    settings = {"weight": 1.0, "balance_weight": 0.5, "k": 6, "queue_size": 12, "tangent_dim": tangent_dim,
                "cuda_graphs": False}  # the eager path keeps values; the graphed one measures every class
    cr = CurvatureRegularizer(8, 12, **settings).to(device)
    generator = torch.Generator().manual_seed(0)
    dims = set()
    clouds.update(kept=[], reference=[])
    for step in range(36):
        size = int(torch.randint(2, 30, (), generator=generator))
        classes = 8 if step % 3 == 0 else 2  # every class, or only classes 0 and 1
        labels = torch.randint(0, classes, (size,), generator=generator)
        features = _curved_batch(labels, noise=0.01 if step < 18 else 0.02 * (step - 17), generator=generator)
        features, labels = features.to(device), labels.to(device)
        reference = CurvatureRegularizer(8, 12, **settings).to(device)
        reference.load_state_dict(cr.state_dict())
        ours, theirs = features.clone().requires_grad_(), features.clone().requires_grad_()
        clouds["kept"].append(0)
        clouds["reference"].append(0)
        result = cr(ours, labels, epoch=0)
        expected = reference(theirs, labels, epoch=0)
        (result.loss + 0.1 * ours.sum()).backward()  # the extra term makes features without a CR gradient visible
        (expected.loss + 0.1 * theirs.sum()).backward()
        assert result.tangent_dim == expected.tangent_dim
        assert torch.equal(result.measured, expected.measured)
        torch.testing.assert_close(result.class_curvature, expected.class_curvature, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(result.loss, expected.loss, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ours.grad, theirs.grad, rtol=1e-4, atol=1e-6)
        dims.add(result.tangent_dim)
    if tangent_dim == "auto":
        assert len(dims) > 1, dims  # the re-measuring of kept classes at a new dimension was exercised
    fewer = [kept < every for kept, every in zip(clouds["kept"], clouds["reference"])]
    assert sum(fewer) >= 12, clouds  # most steps with two classes measured fewer clouds


def test_loading_a_state_forgets_kept_curvatures():
    settings = {"weight": 1.0, "k": 5, "queue_size": 10, "tangent_dim": 2}
    generator = torch.Generator().manual_seed(3)
    cr, other = CurvatureRegularizer(8, 12, **settings), CurvatureRegularizer(8, 12, **settings)
    for module in (cr, other):
        labels = torch.arange(8).repeat(11)
        module(_curved_batch(labels, 0.05, generator), labels, epoch=0)
        module(_curved_batch(labels[:4], 0.05, generator), labels[:4], epoch=0)  # classes 4-7 now kept
    cr.load_state_dict(other.state_dict())
    reference = CurvatureRegularizer(8, 12, **settings)
    reference.load_state_dict(other.state_dict())
    labels = torch.tensor([0, 1, 2])
    features = _curved_batch(labels, 0.05, generator)
    torch.testing.assert_close(cr(features, labels, epoch=0).class_curvature,
                               reference(features, labels, epoch=0).class_curvature)


@pytest.mark.parametrize("bad", [{"weight": -1.0}, {"k": 1}, {"tangent_dim": 0}, {"eps": 2.0}, {"every": 0}])
def test_bad_hyperparameters(bad):
    with pytest.raises(ValueError, match="cr\\."):
        CurvatureRegularizer(3, 4, **bad)


def _worker(rank: int, world: int, port: int, out: dict) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.manual_seed(100 + rank)  # different local batches on each worker
    cr = CurvatureRegularizer(4, 6, weight=1.0, k=5, queue_size=12)
    for step in range(5):
        size = 10 + rank * 3  # ragged batch sizes across workers
        features = torch.randn(size, 6, requires_grad=True)
        cr(features, torch.randint(0, 4, (size,)), epoch=0).loss.backward()
    out[rank] = {name: tensor.clone() for name, tensor in cr.state_dict().items()}
    dist.destroy_process_group()


def test_two_workers_hold_identical_queues():
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    manager = mp.Manager()
    out = manager.dict()
    mp.spawn(_worker, args=(2, port, out), nprocs=2, join=True)
    assert set(out.keys()) == {0, 1}
    for name, tensor in out[0].items():
        assert torch.equal(tensor, out[1][name]), name
    assert int(out[0]["queue.count"].sum()) == 4 * 12


def test_the_readme_loop_runs_as_written(tmp_path, monkeypatch):
    """The README's "CR in your own PyTorch loop" snippet, executed with a small model and data."""
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    section = readme.split("### CR in your own PyTorch loop", 1)[1]
    snippet = section.split("```python\n", 1)[1].split("```", 1)[0]
    torch.manual_seed(0)
    num_classes, feature_dim = 4, 8
    backbone, head = torch.nn.Linear(6, feature_dim), torch.nn.Linear(feature_dim, num_classes)
    images, labels = torch.randn(96, 6), torch.arange(96) % num_classes

    def model(batch):
        features = torch.tanh(backbone(batch))
        return features, head(features)

    model.state_dict = lambda: {**backbone.state_dict(), **head.state_dict()}  # type: ignore[attr-defined]
    parameters = [*backbone.parameters(), *head.parameters()]
    namespace = {"num_classes": num_classes, "feature_dim": feature_dim, "device": "cpu", "epochs": 4,
                 "model": model, "criterion": torch.nn.functional.cross_entropy,
                 "optimizer": torch.optim.SGD(parameters, lr=0.1),
                 "loader": [(images[i:i + 24], labels[i:i + 24]) for i in range(0, 96, 24)]}
    monkeypatch.chdir(tmp_path)
    before = [p.detach().clone() for p in parameters]
    exec(snippet, namespace)
    result, cr = namespace["result"], namespace["cr"]
    assert bool(result.measured.all()) and 0 < float(result.loss.detach()) < math.inf and result.tangent_dim >= 1
    assert all(not torch.equal(a, b) for a, b in zip(before, parameters))
    saved = torch.load(tmp_path / "checkpoint.pt")
    assert torch.equal(saved["cr"]["queue.queue"], cr.queue.queue)
    assert cr.queue.count.tolist() == [96] * 4  # 4 epochs x 24 per class
