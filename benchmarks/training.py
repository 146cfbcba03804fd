"""Training-step benchmark (issue "Curvature-regularized training"): base loss vs base + CR, same
model, batch and data, timed side by side in one process, plus the feature queue's memory.

    python benchmarks/training.py                 # CPU rows for the digits and Fashion-MNIST configs
    python benchmarks/training.py --steps 30      # more timed steps
    python benchmarks/training.py --gpu-only      # the GPU row alone (what benchmarks/gpu_check.sh runs)

CR switches on at ``cr.start_epoch`` (E0), so the rows marked "after E0" first train the model for
E0 epochs with the base loss alone: that is the model CR meets in training, and its features have
a lower intrinsic dimension (a smaller "auto" tangent dimension) than a freshly initialised one.

On a CUDA machine it adds the GPU row: ResNet-32, batch 128, CIFAR-100-shaped data, 100 classes,
Q = 128, k = 10.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import statistics
import time

import numpy as np
import torch

from _machine import describe
from curvature.regularizer import CurvatureRegularizer
from curvature.rotation import TangentDim
from orchestrator.config import CRConfig, load_config
from orchestrator.data import build_dataset
from orchestrator.losses import create_loss
from orchestrator.models import create_model


def timed_steps(model, loss_fn, cr, batches, weight: float, device: torch.device, amp: bool) -> list[float]:
    """Wall time of each optimizer step (forward, losses, backward, update)."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    times = []
    for images, labels in batches:
        images, labels = images.to(device), labels.to(device)
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=amp):
            features, logits = model(images)
            loss = loss_fn(logits, labels)
        if weight > 0:
            loss = loss + weight * cr(features, labels, epoch=10**6).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return times


def compare(name: str, state: str, model, loss_fn, cr_config: CRConfig, num_classes: int, batches, device,
            amp: bool) -> CurvatureRegularizer:
    cr = CurvatureRegularizer(num_classes, model.feature_dim, weight=1.0, k=cr_config.k,
                              queue_size=cr_config.queue_size, tangent_dim=cr_config.tangent_dim).to(device)
    # Fill every queue first, so the timed steps see full class clouds as in steady-state training.
    with torch.no_grad():
        while int(cr.queue.count.min()) < cr_config.queue_size:
            for images, labels in batches:
                cr.queue.enqueue(model(images.to(device))[0], labels.to(device))
    warmup = 3
    base, with_cr = [], []
    for _ in range(2):  # interleave so that drift in machine load hits both alike
        base += timed_steps(model, loss_fn, cr, batches, 0.0, device, amp)[warmup:]
        with_cr += timed_steps(model, loss_fn, cr, batches, 1.0, device, amp)[warmup:]
    t_base, t_cr = statistics.median(base), statistics.median(with_cr)
    queue_mb = cr.queue.queue.numel() * cr.queue.queue.element_size() / 2**20
    dim = cr(model(batches[0][0].to(device))[0], batches[0][1].to(device), epoch=10**6).tangent_dim
    print(f"| {name} | {state} | {device.type} | {num_classes} | {len(batches[0][1])} | {cr_config.queue_size} | {cr_config.k} | "
          f"{dim} | {t_base * 1e3:.1f} | {t_cr * 1e3:.1f} | {t_cr / t_base:.2f} | {queue_mb:.2f} |")
    return cr


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
        print(f"  (trained {config.model.name} epoch {epoch + 1}/{epochs} with the base loss: {time.perf_counter() - start:.0f} s)",
              flush=True)


def config_rows(config_name: str, steps: int, tangent_dims: tuple[TangentDim | None, ...] = (None,),
                after_start_epoch: bool = True) -> None:
    """Rows for a bundled config, one per entry of ``tangent_dims`` (``None``: the config's own CR
    tangent dimension, else a replacement), all timing the same model; ``after_start_epoch``: that
    model is trained ``cr.start_epoch`` epochs with the base loss first, once for all rows."""
    config = load_config(config_name)
    data = build_dataset(config.dataset, config.seed)
    torch.manual_seed(0)
    model = create_model(config.model.name, data.input_shape, data.num_classes)
    loss_fn = create_loss(config.loss, data.class_counts)
    loader = torch.utils.data.DataLoader(data.train, batch_size=config.train.batch_size, shuffle=True,
                                         generator=torch.Generator().manual_seed(0), drop_last=True)
    state = "init"
    if after_start_epoch and config.cr.start_epoch > 0:
        train_base(model, loss_fn, loader, config, config.cr.start_epoch)
        state = f"after E0 = {config.cr.start_epoch}"
    batches = [batch for _, batch in zip(range(steps), loader)]
    weights = copy.deepcopy(model.state_dict())  # the timed steps update the model: each row starts here
    for tangent_dim in tangent_dims:
        model.load_state_dict(weights)
        cr_config = config.cr if tangent_dim is None else dataclasses.replace(config.cr, tangent_dim=tangent_dim)
        compare(f"{config_name} ({config.model.name})", state, model, loss_fn, cr_config, data.num_classes, batches,
                torch.device("cpu"), amp=False)


def gpu_row(steps: int) -> None:
    if not torch.cuda.is_available():
        print("\nGPU row: not run, no CUDA device on this machine")
        return
    device = torch.device("cuda")
    torch.manual_seed(0)
    model = create_model("resnet32", (3, 32, 32), 100).to(device)
    counts = np.maximum((500 * 100.0 ** (-np.arange(100) / 99)).astype(int), 1)
    loss_fn = create_loss(load_config("cifar100_lt").loss, counts).to(device)
    generator = torch.Generator().manual_seed(0)
    batches = [(torch.randn(128, 3, 32, 32, generator=generator), torch.randint(0, 100, (128,), generator=generator))
               for _ in range(steps)]
    alone = {}
    for tangent_dim in ("auto", 2):
        cr_config = CRConfig(queue_size=128, k=10, tangent_dim=tangent_dim)
        cr = compare("resnet32, CIFAR-100-shaped", "init", model, loss_fn, cr_config, 100, batches, device, amp=True)
        with torch.autocast(device_type="cuda", dtype=torch.bfloat16):
            features = model(batches[0][0].to(device))[0]
        alone[tangent_dim] = host_bound(cr, features, batches[0][1].to(device))
    for tangent_dim, (wall, host) in alone.items():
        print(f"\nGPU, tangent dim {tangent_dim}: CR's forward and backward alone {wall * 1e3:.1f} ms, "
              f"of which the host returns after {host * 1e3:.1f} ms (launch-bound when these are close)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="timed steps per pass (two passes each)")
    parser.add_argument("--gpu-only", action="store_true", help="only the GPU row (benchmarks/gpu_check.sh)")
    args = parser.parse_args()
    print(describe())
    print("\n| config (model) | model | device | classes | batch | Q | k | tangent dim | base step (ms) | "
          "base + CR (ms) | ratio | queue (MiB) |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    if not args.gpu_only:
        config_rows("digits_lt", args.steps)
        config_rows("fashion_mnist_lt", args.steps, after_start_epoch=False)
        config_rows("fashion_mnist_lt", args.steps, tangent_dims=(None, 2))  # the per-pair eigen-problems grow with d
    gpu_row(args.steps)


if __name__ == "__main__":
    main()
