"""Training-step benchmark (issue "Curvature-regularized training"): base loss vs base + CR, same
model, batch and data, timed side by side in one process, plus the feature queue's memory.

    python benchmarks/training.py                 # CPU rows for the digits and Fashion-MNIST configs
    python benchmarks/training.py --steps 30      # more timed steps
    python benchmarks/training.py --gpu-only      # the GPU rows alone (what benchmarks/gpu_check.sh runs)

CR switches on at ``cr.start_epoch`` (E0), so the rows marked "after E0" first train the model for
E0 epochs with the base loss alone: that is the model CR meets in training, and its features have
a lower intrinsic dimension (a smaller "auto" tangent dimension) than a freshly initialised one.

On a CUDA machine it adds the GPU rows: ResNet-32, batch 128, CIFAR-100-shaped data, 100 classes,
Q = 128, k = 10 (the training issue's target), and the bundled ImageNet-LT settings for scale, on one
GPU and as one of the config's 8 workers. Each GPU row has a twin timed in the same passes with CR
measuring every class every step, as it did before it kept the curvature of unchanged classes.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import itertools
import statistics
import time
from collections.abc import Callable, Iterable

import numpy as np
import torch

from _machine import describe
from curvature import _native
from curvature.queue import GatherFn
from curvature.regularizer import CurvatureRegularizer
from curvature.rotation import TangentDim
from orchestrator.config import CRConfig, load_config
from orchestrator.data import build_dataset
from orchestrator.data.long_tail import long_tail_counts
from orchestrator.losses import create_loss
from orchestrator.models import build_model, create_model

#: Most input values in one forward pass that fills the GPU rows' queues (512 MiB of float32 images),
#: which bounds its memory: one image of each of 1,000 ImageNet-shaped classes goes in two passes.
FILL_VALUES = 2**27

#: The benchmark's table header (Markdown, as the README shows it).
TABLE_HEADER = ("\n| config (model) | model | device | classes | batch | Q | k | tangent dim | base step (ms) | "
                "base + CR (ms) | ratio | queue (MiB) |\n|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")


@dataclasses.dataclass(frozen=True)
class StepKind:
    """One kind of timed training step: ``cr`` None is the base step; ``every_class``: CR forgets,
    before the step, the curvatures it keeps of classes measured on their queue alone, so that its
    eager path measures every class (how CR worked before it kept them); ``native``: on the CPU,
    whether CR runs its compiled kernels (:mod:`curvature._native`) or its tensor form."""

    label: str
    cr: CurvatureRegularizer | None = None
    every_class: bool = False
    native: bool = True


def interleaved_steps(model, loss_fn, batches, kinds: list[StepKind], device: torch.device, amp: bool,
                      passes: int = 2) -> list[list[float]]:
    """Wall time of each optimizer step (forward, losses, backward, update), per kind: on every batch
    each kind takes one step, in reversed order on every other batch, so that the load episodes of a
    shared machine (seconds long on the 2-core VM) fall on all kinds alike."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    times: list[list[float]] = [[] for _ in kinds]
    for step, (images, labels) in enumerate(batches * passes):
        images, labels = images.to(device), labels.to(device)
        for index in (range(len(kinds)) if step % 2 == 0 else reversed(range(len(kinds)))):
            kind = kinds[index]
            if kind.every_class:
                kind.cr.queue_curvature.forget()
            _native.enabled = kind.native
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=amp):
                features, logits = model(images)
                loss = loss_fn(logits, labels)
            if kind.cr is not None:
                loss = loss + kind.cr(features, labels, epoch=10**6).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times[index].append(time.perf_counter() - start)
    return times


def compare(name: str, state: str, model, loss_fn, cr_config: CRConfig, num_classes: int, batches, device,
            amp: bool, fill: Callable[[], Iterable[tuple[torch.Tensor, torch.Tensor]]],
            every_class_too: bool = False, gather: GatherFn | None = None) -> list[tuple[str, CurvatureRegularizer]]:
    """Print one table row per CR kind timed against the base step in the same passes: on CUDA,
    CR with its CUDA graphs (:mod:`curvature.graphed`) and its eager path, and with
    ``every_class_too`` the eager path measuring every class every step (:class:`StepKind`);
    ``gather`` replaces CR's all-gather once the queues are full. ``fill()``: one pass of (images,
    labels) whose features fill the queues, called again while a class is short. It should yield
    distinct examples: in training a queue holds features of different examples, or of one example
    at different steps, not exact copies, which would make degenerate patches and a lower auto
    tangent dimension. (Only a class with fewer than Q training examples, as in digits_lt's tail,
    still gets copies here.) Returns the (row label, CR module) of each CR kind. With
    ``cr_config.every`` > 1 (lazy CR) a CR step is either a full one or a cheap one, so the ratio
    is that of the summed times of whole cycles of ``every`` steps (:func:`step_ratio`)."""
    if cr_config.every > 1:
        name = f"{name}, CR every {cr_config.every} steps"

    def regularizer(cuda_graphs: bool) -> CurvatureRegularizer:
        return CurvatureRegularizer(num_classes, model.feature_dim, weight=1.0, k=cr_config.k,
                                    queue_size=cr_config.queue_size, tangent_dim=cr_config.tangent_dim,
                                    cuda_graphs=cuda_graphs, every=cr_config.every).to(device)

    cr = regularizer(device.type == "cuda")
    # Fill every queue first, so the timed steps see full class clouds as in steady-state training.
    with torch.no_grad():
        while int(cr.queue.count.min()) < cr_config.queue_size:
            for images, labels in fill():
                cr.queue.enqueue(model(images.to(device))[0], labels.to(device))
    kinds = [StepKind(name), StepKind(f"{name}, CUDA graphs" if device.type == "cuda" else name, cr)]
    if device.type == "cpu" and _native.library() is not None:
        kinds.append(StepKind(f"{name}, tensor form (no compiled kernels)", regularizer(False), native=False))
    if device.type == "cuda":
        kinds.append(StepKind(f"{name}, eager", regularizer(False)))
        if every_class_too:
            kinds.append(StepKind(f"{name}, eager, every class measured each step", regularizer(False),
                                  every_class=True))
    for kind in kinds[2:]:  # each kind its own module, so that no queue gets a batch twice (exact copies)
        kind.cr.load_state_dict(cr.state_dict())
    if gather is not None:
        for kind in kinds[1:]:
            kind.cr.queue.gather = gather
    warmup = 3
    base, *with_cr = (times[warmup:] for times in interleaved_steps(model, loss_fn, batches, kinds, device, amp))
    t_base = statistics.median(base)
    queue_mb = cr.queue.queue.numel() * cr.queue.queue.element_size() / 2**20
    for kind, times in zip(kinds[1:], with_cr):
        _native.enabled = kind.native
        # A new epoch's first call computes the loss, lazy or not.
        dim = kind.cr(model(batches[0][0].to(device))[0], batches[0][1].to(device), epoch=10**6 + 1).tangent_dim
        t_cr, ratio = step_ratio(times, base, cr_config.every, warmup)
        print(f"| {kind.label} | {state} | {device.type} | {num_classes} | {len(batches[0][1])} | "
              f"{cr_config.queue_size} | {cr_config.k} | {dim} | {t_base * 1e3:.1f} | {t_cr * 1e3:.1f} | "
              f"{ratio:.2f} | {queue_mb:.2f} |", flush=True)
    _native.enabled = True
    return [(kind.label, kind.cr) for kind in kinds[1:] if not kind.every_class]


def host_bound(cr: CurvatureRegularizer, features: torch.Tensor, labels: torch.Tensor,
               repeats: int = 15) -> tuple[float, float]:
    """Median wall time of CR's forward and backward alone on fixed features, and of the host's part
    of it (until Python returns, before waiting for the GPU): when the two are close, CR's time on
    the GPU is the time spent launching its kernels, not running them."""
    features = features.detach().float().requires_grad_()
    wall, host = [], []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        cr(features, labels, epoch=10**6).loss.backward()
        host.append(time.perf_counter() - start)
        torch.cuda.synchronize()
        wall.append(time.perf_counter() - start)
    return statistics.median(wall[3:]), statistics.median(host[3:])


def train_base(model, loss_fn, loader, config, epochs: int) -> None:
    """``epochs`` epochs of the base loss alone (the config's lr, momentum and weight decay)."""
    optimizer = torch.optim.SGD(model.parameters(), lr=config.train.lr, momentum=config.train.momentum,
                                weight_decay=config.train.weight_decay)
    for epoch in range(epochs):
        start = time.perf_counter()
        for images, labels in loader:
            loss = loss_fn(model(images)[1], labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        print(f"  (trained {config.model.name} epoch {epoch + 1}/{epochs} with the base loss: "
              f"{time.perf_counter() - start:.0f} s)", flush=True)


def step_ratio(times: list[float], base: list[float], every: int, skipped: int) -> tuple[float, float]:
    """(CR step time, CR step / base step). Every step: the median CR step, and the median over
    batches of (CR step / base step on the same batch, taken back to back), which cancels the
    machine's slow episodes better than a ratio of medians. Lazy CR (``every`` > 1, the first
    ``skipped`` steps of each list already dropped): the mean step and the ratio of summed times over
    the whole cycles of ``every`` steps, each cycle starting at a step that computed CR."""
    if every == 1:
        return statistics.median(times), statistics.median(cr / b for cr, b in zip(times, base))
    start = -skipped % every
    end = start + (len(times) - start) // every * every
    return statistics.fmean(times[start:end]), sum(times[start:end]) / sum(base[start:end])


def config_rows(config_name: str, steps: int, variants: tuple[dict[str, object], ...] = ({},),
                after_start_epoch: bool = True) -> None:
    """Rows for a bundled config, one per entry of ``variants`` (replacements of the config's CR
    keys, e.g. ``{"tangent_dim": 2}``), all timing the same model; ``after_start_epoch``: that
    model is trained ``cr.start_epoch`` epochs with the base loss first, once for all rows."""
    config = load_config(config_name)
    data = build_dataset(config.dataset, config.seed)
    torch.manual_seed(0)
    model = build_model(config, data.input_shape, data.num_classes)
    loss_fn = create_loss(config.loss, data.class_counts)
    loader = torch.utils.data.DataLoader(data.train, batch_size=config.train.batch_size, shuffle=True,
                                         generator=torch.Generator().manual_seed(0), drop_last=True)
    state = "init"
    if after_start_epoch and config.cr.start_epoch > 0:
        train_base(model, loss_fn, loader, config, config.cr.start_epoch)
        state = f"after E0 = {config.cr.start_epoch}"
    batches = [batch for _, batch in zip(range(steps), loader)]
    weights = copy.deepcopy(model.state_dict())  # the timed steps update the model: each row starts here
    for variant in variants:
        model.load_state_dict(weights)
        cr_config = dataclasses.replace(config.cr, **variant)
        compare(f"{config_name} ({config.model.name})", state, model, loss_fn, cr_config, data.num_classes, batches,
                torch.device("cpu"), amp=False, fill=lambda: loader)


def gpu_rows(name: str, model_name: str, config_name: str, input_shape: tuple[int, ...], counts: np.ndarray,
             batch_size: int, steps: int, tangent_dims: tuple[TangentDim, ...],
             queue_size: int | None = None, every_class_too: bool = False,
             other_workers: int = 0, every: int = 1) -> dict[str, tuple[float, float]]:
    """Rows for a fresh ``model_name`` on random data of ``input_shape`` (bfloat16 autocast), with the
    config's base loss and CR settings (``queue_size`` overrides Q), one per tangent dimension (and
    ``every_class_too``, see :func:`compare`); ``other_workers``: the step is one worker's of a
    data-parallel run with that many more, whose batches (features of new random images, made
    before timing) reach CR's queues as its all-gather would bring them; ``every``: lazy CR's
    ``cr.every``. Returns :func:`host_bound` of each row (none with lazy CR). The queues are filled
    with one new example of every class per pass, since random batches of ``batch_size`` need not
    hold every class."""
    device = torch.device("cuda")
    num_classes = len(counts)
    torch.manual_seed(0)
    model = create_model(model_name, input_shape, num_classes).to(device)
    config = load_config(config_name)
    loss_fn = create_loss(config.loss, counts).to(device)
    generator = torch.Generator().manual_seed(0)
    batches = [(torch.randn(batch_size, *input_shape, generator=generator),
                torch.randint(0, num_classes, (batch_size,), generator=generator)) for _ in range(steps)]
    chunks = torch.arange(num_classes, device=device).split(max(1, FILL_VALUES // int(np.prod(input_shape))))

    def fill() -> Iterable[tuple[torch.Tensor, torch.Tensor]]:  # new random images on every pass
        return ((torch.randn(len(chunk), *input_shape, device=device), chunk) for chunk in chunks)

    alone = {}
    for tangent_dim in tangent_dims:
        cr_config = dataclasses.replace(config.cr, tangent_dim=tangent_dim, every=every,
                                        queue_size=queue_size or config.cr.queue_size)
        modules = compare(name, "init", model, loss_fn, cr_config, num_classes, batches, device, amp=True, fill=fill,
                          every_class_too=every_class_too,
                          gather=other_workers_gather(model, input_shape, num_classes, batch_size, other_workers))
        if every > 1:
            continue
        with torch.autocast(device_type="cuda", dtype=torch.bfloat16):
            features = model(batches[0][0].to(device))[0]
        for label, cr in modules:
            alone[f"{label}, tangent dim {tangent_dim}"] = host_bound(cr, features, batches[0][1].to(device))
    return alone


def other_workers_gather(model, input_shape: tuple[int, ...], num_classes: int, batch_size: int,
                         workers: int, distinct: int = 16) -> GatherFn | None:
    """A stand-in for CR's all-gather in a run with ``workers`` more workers: it appends their
    batches, cycling through ``distinct`` sets of features made here (outside any timing); ``None``
    for no other workers. NCCL's transfer itself (a few MB) is not included."""
    if workers == 0:
        return None
    device = next(model.parameters()).device
    others = []
    with torch.no_grad(), torch.autocast(device_type=device.type, dtype=torch.bfloat16):
        for _ in range(distinct):
            labels = torch.randint(0, num_classes, (workers * batch_size,), device=device)
            features = torch.cat([model(torch.randn(batch_size, *input_shape, device=device))[0].float()
                                  for _ in range(workers)])
            others.append((features, labels))
    rounds = itertools.cycle(others)

    def gather(features: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        extra_features, extra_labels = next(rounds)
        return torch.cat([features, extra_features]), torch.cat([labels, extra_labels])

    return gather


def gpu_section(steps: int) -> None:
    """The issue's GPU row (ResNet-32, batch 128, CIFAR-100-shaped, Q = 128, k = 10), also with lazy
    CR (``cr.every`` = 4), and, for scale,
    the bundled ImageNet-LT settings (ResNeXt-50, 1,000 classes, Q = 64) at its per-GPU batch of 32
    (256 over 8 workers) and at 128, and at 32 as one of the config's 8 workers."""
    if not torch.cuda.is_available():
        print("\nGPU rows: not run, no CUDA device on this machine")
        return
    alone = gpu_rows("resnet32, CIFAR-100-shaped", "resnet32", "cifar100_lt", (3, 32, 32),
                     long_tail_counts(500, 100, 100), 128, steps, ("auto", 2, 4), queue_size=128, every_class_too=True)
    gpu_rows("resnet32, CIFAR-100-shaped", "resnet32", "cifar100_lt", (3, 32, 32), long_tail_counts(500, 100, 100),
             128, steps, ("auto", 2), queue_size=128, every=4)  # lazy CR: its cost paid on one step in 4
    print_host_bound(alone)  # before the ResNeXt rows, which take minutes, so that a time limit keeps these
    alone = {}
    print(TABLE_HEADER)
    for batch_size, workers in ((32, 1), (128, 1), (32, 8)):
        name = f"resnext50, ImageNet-LT-shaped, batch {batch_size}"
        name += f", 1 of {workers} workers" if workers > 1 else ""
        alone |= gpu_rows(name, "resnext50", "imagenet_lt", (3, 224, 224), long_tail_counts(1280, 1000, 256),
                          batch_size, steps, ("auto",), every_class_too=True, other_workers=workers - 1)
    print_host_bound(alone)


def print_host_bound(alone: dict[str, tuple[float, float]]) -> None:
    """One line per row of :func:`host_bound`'s two times."""
    for row, (wall, host) in alone.items():
        print(f"\nGPU, {row}: CR's forward and backward alone {wall * 1e3:.1f} ms, "
              f"of which the host returns after {host * 1e3:.1f} ms (launch-bound when these are close)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="timed steps per pass (two passes each)")
    parser.add_argument("--gpu-only", action="store_true", help="only the GPU rows (benchmarks/gpu_check.sh)")
    args = parser.parse_args()
    print(describe())
    print(TABLE_HEADER)
    if not args.gpu_only:
        config_rows("digits_lt", args.steps)
        config_rows("fashion_mnist_lt", args.steps, after_start_epoch=False)
        # the per-pair eigen-problems grow with d; lazy CR pays for CR on one step in 4
        config_rows("fashion_mnist_lt", args.steps, variants=({}, {"tangent_dim": 2}, {"every": 4}))
    gpu_section(args.steps)


if __name__ == "__main__":
    main()
