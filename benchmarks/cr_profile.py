"""Where CR's time goes: its forward and backward alone, on fixed features, under torch.profiler.

    python benchmarks/cr_profile.py          # CPU: Fashion-MNIST-shaped (10 classes, Q = 32, p = 128)
    python benchmarks/cr_profile.py --cuda   # GPU: ResNet-32 / CIFAR-100-shaped (100 classes, Q = 128, p = 64)
    python benchmarks/cr_profile.py --cuda --tangent-dim 4 --eager --rows 40
    python benchmarks/cr_profile.py --cuda --tangent-dim 2 --uncaptured   # the graphed path's kernels

Prints the best time of one CR step (forward and backward, the device synchronised) and the
profiler's table of the operators and kernels that took longest (self time on the device when it is
CUDA, else on the CPU). The features are random, so the "auto" tangent dimension is near its
ceiling k - 2; ``--tangent-dim`` fixes it. With CUDA graphs (the default on CUDA) the kernels run
inside replays, which the table shows as whole; ``--uncaptured`` runs the graphed path's two
segments (:mod:`curvature.graphed`) as plain functions, the same kernels on the same fixed shapes
launched one by one, so that the table shows where their GPU time goes (its step time then includes
the launches that the graphs save); ``--eager`` profiles the eager path's kernels.
"""

from __future__ import annotations

import argparse
import torch
from torch.profiler import ProfilerActivity, profile

from _machine import best_time, describe
from curvature.regularizer import CurvatureRegularizer


def shapes(cuda: bool) -> tuple[int, int, int, int]:
    """(classes, queue size, feature dimension, batch) of the issue's benchmark rows."""
    return (100, 128, 64, 128) if cuda else (10, 32, 128, 128)


def step(cr: CurvatureRegularizer, features: torch.Tensor, labels: torch.Tensor) -> None:
    """One CR forward and backward on a fresh leaf of ``features``."""
    leaf = features.detach().clone().requires_grad_()
    cr(leaf, labels, epoch=10**6).loss.backward()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cuda", action="store_true", help="profile on the GPU (ResNet-32 / CIFAR-100 shapes)")
    parser.add_argument("--eager", action="store_true", help="on CUDA, the eager path instead of CUDA graphs")
    parser.add_argument("--uncaptured", action="store_true",
                        help="on CUDA, the graphed path's segments run as plain functions (their kernels "
                             "profiled one by one)")
    parser.add_argument("--tangent-dim", default="auto", help="'auto' or an integer (default: auto)")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--steps", type=int, default=10, help="profiled steps (after as many warm-up steps)")
    parser.add_argument("--rows", type=int, default=25, help="rows of the profiler's table")
    args = parser.parse_args()
    if args.uncaptured and (args.eager or not args.cuda):
        parser.error("--uncaptured: profiles the graphed path on CUDA; it needs --cuda and not --eager")
    device = torch.device("cuda" if args.cuda else "cpu")
    tangent_dim = args.tangent_dim if args.tangent_dim == "auto" else int(args.tangent_dim)
    num_classes, queue_size, feature_dim, batch = shapes(args.cuda)
    generator = torch.Generator().manual_seed(0)
    cr = CurvatureRegularizer(num_classes, feature_dim, weight=1.0, k=args.k, queue_size=queue_size,
                              tangent_dim=tangent_dim, cuda_graphs=args.cuda and not args.eager).to(device)
    if args.uncaptured:
        cr.graphed.capture = False
    cr.queue.enqueue(torch.randn(num_classes * queue_size, feature_dim, generator=generator).to(device),
                     torch.arange(num_classes).repeat(queue_size).to(device))
    # From here on nothing is enqueued, so every step measures the same clouds: the classes of the
    # batch, as in training, where the other classes' queues are unchanged and their curvature kept.
    cr.queue.gather = lambda features, labels: (features[:0], labels[:0])
    features = torch.randn(batch, feature_dim, generator=generator).to(device)
    labels = torch.randint(0, num_classes, (batch,), generator=generator).to(device)
    with torch.no_grad():
        dim = cr(features, labels, epoch=10**6).tangent_dim
    best = best_time(lambda: step(cr, features, labels), repeats=args.steps, warmup=args.steps)
    print(describe())
    path = ("eager" if not args.cuda or args.eager
            else "CUDA graphs' segments, uncaptured" if args.uncaptured else "CUDA graphs")
    print(f"CR alone ({device.type}, {path}, {num_classes} classes, Q = {queue_size}, p = {feature_dim}, "
          f"batch {batch}, k = {args.k}, tangent dim {dim}): best of {args.steps} steps {best * 1e3:.2f} ms "
          f"per forward and backward")
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.cuda else [])
    with profile(activities=activities) as profiler:
        for _ in range(args.steps):
            step(cr, features, labels)
        if args.cuda:
            torch.cuda.synchronize()
    sort_by = "self_cuda_time_total" if args.cuda else "self_cpu_time_total"
    print(f"\nprofile of {args.steps} steps, by {sort_by}:")
    print(profiler.key_averages().table(sort_by=sort_by, row_limit=args.rows, max_name_column_width=60))


if __name__ == "__main__":
    main()
