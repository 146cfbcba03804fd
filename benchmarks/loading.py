"""Data-loading benchmark: how long a training step waits for its batch, with the batches read in
the training process (``scaling.loader_workers: 0``) and with DataLoader processes reading ahead.

    python benchmarks/loading.py              # CIFAR-100-LT-shaped images, the cifar100_lt config
    python benchmarks/loading.py --steps 40   # fewer steps per epoch

The data are CIFAR-100-LT-shaped random images (IF 100: 10,847 training images) with the config's
augmentation (pad-crop and flip, per image), read through the training loop's own loader
(``orchestrator.train_loop.training_loader``). The step itself is stood in for by a sleep: a GPU
step leaves the host's CPU idle while the GPU computes, which is when loader processes can read
ahead. Each row is one epoch; "first batch" includes starting the loader processes, which the loop
does at every epoch (so that a resumed run draws the same crops, see ``training_loader``).
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from _machine import describe
from orchestrator.config import load_config
from orchestrator.data import DataBundle
from orchestrator.data.long_tail import long_tail_counts
from orchestrator.data.datasets import cifar_augmentation
from orchestrator.data.tensors import TensorImages
from orchestrator.train_loop import epoch_seed, training_loader


def cifar100_lt_shaped() -> DataBundle:
    """Random images with CIFAR-100-LT's (IF 100) class counts and the CIFAR augmentation."""
    labels = torch.as_tensor(np.repeat(np.arange(100), long_tail_counts(500, 100, 100)))
    images = torch.randn(len(labels), 3, 32, 32, generator=torch.Generator().manual_seed(0))
    plain = TensorImages(images, labels)
    return DataBundle(train=TensorImages(images, labels, cifar_augmentation()), train_plain=plain, test=plain,
                      train_labels=labels.numpy(), num_classes=100, input_shape=(3, 32, 32))


def one_epoch(data: DataBundle, processes: int, step_s: float, steps: int) -> tuple[float, list[float], float]:
    """First batch's wait, the later batches' waits, and the epoch's wall time (seconds)."""
    config = load_config("cifar100_lt", [f"scaling.loader_workers={processes}"])
    loader, sampler = training_loader(data, config, world_size=1, rank=0)
    sampler.set_epoch(0)
    torch.manual_seed(epoch_seed(config.seed, 0, 0))
    waits = []
    started = time.perf_counter()
    batches = iter(loader)
    for _ in range(steps):
        clock = time.perf_counter()
        next(batches)
        waits.append(time.perf_counter() - clock)
        time.sleep(step_s)
    del batches  # its loader processes stop here, as they do when the epoch's iterator ends
    return waits[0], waits[1:], time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=80, help="batches per epoch (an epoch has 85)")
    parser.add_argument("--step-ms", type=float, nargs="+", default=[0.0, 15.0],
                        help="the stand-in step's duration(s); 15 ms is a ResNet-32 step on an H200")
    args = parser.parse_args()
    print(describe())
    data = cifar100_lt_shaped()
    print(f"\nCIFAR-100-LT-shaped (IF 100), {len(data.train_labels)} training images, batch 128, pad-crop and flip "
          f"per image; {args.steps} steps per epoch\n")
    print("| step (ms) | loader processes | wait per step, median (ms) | mean (ms) | first batch (ms) | epoch (s) |")
    print("|---:|---:|---:|---:|---:|---:|")
    ratios = []
    for step_ms in args.step_ms:
        walls = []
        for processes in (0, 1, 2):
            first, waits, wall = one_epoch(data, processes, step_ms / 1e3, args.steps)
            walls.append(wall)
            print(f"| {step_ms:.0f} | {processes} | {statistics.median(waits) * 1e3:.2f} | "
                  f"{statistics.mean(waits) * 1e3:.2f} | {first * 1e3:.0f} | {wall:.2f} |", flush=True)
        ratios.append(f"step {step_ms:.0f} ms: {walls[1] / walls[0]:.2f}x with 1, {walls[2] / walls[0]:.2f}x with 2")
    print("\nepoch time with loader processes / without (same run): " + "; ".join(ratios))


if __name__ == "__main__":
    main()
