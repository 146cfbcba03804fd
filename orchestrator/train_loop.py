"""The per-worker training function run by Ray Train (SPEC §4, §7, §8). Read top to bottom:
build data, model, losses and CR; resume from the latest checkpoint; then per epoch train, evaluate,
measure geometry, log to MLflow (rank 0) and report/checkpoint to Ray Train."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler

from curvature.regularizer import CurvatureRegularizer
from orchestrator.checkpoint_features import CHECKPOINT_FILE, load_state
from orchestrator.config import ExperimentConfig, check_feature_dim, config_from_dict, loader_workers
from orchestrator.data import DataBundle, build_dataset
from orchestrator.data.long_tail import shot_groups
from orchestrator.evaluation import (GEOMETRY_PREFIXES, accuracy_metrics, class_accuracy, correlation_metrics,
                                     evaluation_loaders, geometry_table, predict, split_geometry)
from orchestrator.losses import create_loss
from orchestrator.models import build_model
from orchestrator.schedule import learning_rate
from orchestrator.tracking import RunLogger


def is_geometry_epoch(config: ExperimentConfig, epoch: int) -> bool:
    every = config.eval.geometry_every
    return every > 0 and ((epoch + 1) % every == 0 or epoch == config.train.epochs - 1)


def epoch_seed(seed: int, epoch: int, rank: int) -> int:
    """The seed of one worker's random draws in one epoch (data augmentation). Why: an epoch's data
    order (``DistributedSampler``: seed + epoch) and its augmentation then depend on the run's seed,
    the epoch and the worker alone, so a run resumed from a checkpoint at an epoch's end trains on
    exactly the batches the uninterrupted run would have, and workers do not draw the same crops."""
    return int(np.random.SeedSequence([seed, epoch, rank]).generate_state(1)[0])


def training_loader(data: DataBundle, config: ExperimentConfig, world_size: int, rank: int,
                    pin_memory: bool = False) -> tuple[DataLoader, DistributedSampler]:
    """This worker's share of the training set, ``train.batch_size // world_size`` per batch, and its
    sampler (``set_epoch`` before each epoch). The sampler is ours, also on one worker: Ray's would
    shuffle with seed 0 whatever ``config.seed`` says. The loader's processes
    (:func:`~orchestrator.config.loader_workers`) start afresh at each epoch, not persistent: each
    takes its torch seed from the draw the epoch's iterator makes after :func:`epoch_seed` seeded the
    worker, so a resumed run still augments as the uninterrupted one did."""
    sampler: DistributedSampler = DistributedSampler(data.train, num_replicas=world_size, rank=rank, shuffle=True,
                                                     seed=config.seed)
    loader = DataLoader(data.train, batch_size=max(1, config.train.batch_size // world_size), sampler=sampler,
                        num_workers=loader_workers(config.scaling), pin_memory=pin_memory)
    return loader, sampler


def _mean_across_workers(values: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(values)
        values /= dist.get_world_size()
    return values


def train_loop_per_worker(payload: dict[str, Any]) -> None:
    started = time.perf_counter()
    seconds = {"setup": 0.0, "train": 0.0, "eval": 0.0, "logging": 0.0, "checkpoint": 0.0}  # benchmarks/sweep.py
    config = config_from_dict(payload["config"])
    context = ray.train.get_context()
    rank = context.get_world_rank()
    is_main = rank == 0
    world_size = context.get_world_size()
    device = ray.train.torch.get_device()
    torch.manual_seed(config.seed)  # identical initial weights on every worker

    data = build_dataset(config.dataset, config.seed)
    groups = shot_groups(data.class_counts, config.dataset.many_threshold, config.dataset.few_threshold)
    classifier = build_model(config, data.input_shape, data.num_classes)
    feature_dim = classifier.feature_dim
    check_feature_dim(config, feature_dim)  # a joined cluster's driver did not build the model
    # On the device, and in DistributedDataParallel with more than one worker, which trains
    # `classifier` itself: it is what is evaluated and checkpointed.
    model = ray.train.torch.prepare_model(classifier)
    base_loss = create_loss(config.loss, data.class_counts).to(device)
    cr = CurvatureRegularizer(data.num_classes, feature_dim, weight=config.cr.weight,
                              balance_weight=config.cr.balance_weight, k=config.cr.k, queue_size=config.cr.queue_size,
                              start_epoch=config.cr.start_epoch, tangent_dim=config.cr.tangent_dim,
                              cuda_graphs=config.cr.cuda_graphs, every=config.cr.every).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=config.train.lr, momentum=config.train.momentum,
                                weight_decay=config.train.weight_decay)
    loader, sampler = training_loader(data, config, world_size, rank, pin_memory=device.type == "cuda")
    train_loader = ray.train.torch.prepare_data_loader(loader, add_dist_sampler=False)
    test_loader, geometry_loader = evaluation_loaders(data, config)
    use_amp = config.train.amp and device.type == "cuda"

    start_epoch = 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            state = load_state(Path(folder), device)
        classifier.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        cr.load_state_dict(state["cr"])
        start_epoch = state["epoch"] + 1
        if is_main:
            print(f"[curvlt] resuming after epoch {start_epoch}/{config.train.epochs} from its checkpoint", flush=True)
    logger = RunLogger(payload["tracking_uri"], payload["run_id"]) if is_main else None

    seconds["setup"] = time.perf_counter() - started
    steps_per_epoch = len(train_loader)
    if config.train.max_steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, config.train.max_steps_per_epoch)
    progress_every = config.train.progress_every_s
    for epoch in range(start_epoch, config.train.epochs):
        base_loss.set_epoch(epoch)
        sampler.set_epoch(epoch)
        torch.manual_seed(epoch_seed(config.seed, epoch, rank))
        model.train()
        clock = time.perf_counter()
        sums = torch.zeros(4, device=device)  # total, base, cr, steps
        dims: list[int] = []  # the tangent dimension of each step whose CR loss was computed
        shown = clock
        for step, (images, labels) in enumerate(train_loader):
            if step >= steps_per_epoch:
                break
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(config.train, epoch + step / steps_per_epoch)
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use_amp):
                features, logits = model(images)
                loss_base = base_loss(logits, labels)
            cr_result = cr(features, labels, epoch)
            if cr_result.tangent_dim:
                dims.append(cr_result.tangent_dim)
            loss = loss_base + config.cr.weight * cr_result.loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            sums += torch.stack([loss.detach(), loss_base.detach(), cr_result.loss.detach(),
                                 torch.ones((), device=device)])
            if is_main and progress_every and time.perf_counter() - shown >= progress_every:
                shown = time.perf_counter()
                print(f"[curvlt] epoch {epoch + 1}/{config.train.epochs}  step {step + 1}/{steps_per_epoch}  "
                      f"loss {float(sums[0] / sums[3]):.4f}  {(step + 1) / (shown - clock):.1f} steps/s", flush=True)
        sums = _mean_across_workers(sums)
        seconds["train"] += time.perf_counter() - clock
        clock = time.perf_counter()
        metrics = {"epoch": epoch, "train/loss": float(sums[0] / sums[3]), "train/base_loss": float(sums[1] / sums[3]),
                   "train/cr_loss": float(sums[2] / sums[3]), "train/lr": learning_rate(config.train, epoch)}
        if dims:  # which dimension CR worked in (the "auto" one's choice): this worker's mean over the epoch
            metrics["cr/tangent_dim"] = sum(dims) / len(dims)

        if logger is not None:  # rank 0 evaluates and logs
            test = predict(classifier, test_loader, device)
            per_class = class_accuracy(test, data.num_classes)
            metrics.update(accuracy_metrics(per_class, groups))
            metrics.update({f"class_acc/{c:03d}": float(a) for c, a in enumerate(per_class)})
            measure_geometry = is_geometry_epoch(config, epoch) and epoch not in logger.done
            if measure_geometry:
                train = predict(classifier, geometry_loader, device)
                table = geometry_table(train, test, per_class, data.class_counts, config.eval.geometry_k,
                                       config.eval.geometry_tangent_dim, data.true_curvature, progress_every)
                for split, prefix in GEOMETRY_PREFIXES.items():
                    metrics.update(correlation_metrics(split_geometry(table, split), per_class, prefix))
            seconds["eval"] += time.perf_counter() - clock
            clock = time.perf_counter()
            if measure_geometry:
                logger.log_table(table, "geometry", f"epoch_{epoch:03d}.csv")
            if epoch == config.train.epochs - 1:
                metrics.update({f"time/{name}_s": value for name, value in seconds.items()})
            if logger.log_epoch(epoch, {k: v for k, v in metrics.items() if k != "epoch"}):
                shots = " ".join(f"{name} {100 * metrics[f'test/acc_{name}']:.1f}" for name in ("many", "medium", "few")
                                 if f"test/acc_{name}" in metrics)
                print(f"[curvlt] epoch {epoch + 1}/{config.train.epochs}  loss {metrics['train/loss']:.4f} "
                      f"(base {metrics['train/base_loss']:.4f}, cr {metrics['train/cr_loss']:.4f})  "
                      f"test acc {100 * metrics['test/acc']:.2f}%  [{shots}]", flush=True)

            seconds["logging"] += time.perf_counter() - clock
        clock = time.perf_counter()
        last = epoch == config.train.epochs - 1
        if (epoch + 1) % config.checkpoint.every == 0 or last:
            with tempfile.TemporaryDirectory() as folder:
                if is_main:
                    torch.save({"epoch": epoch, "model": classifier.state_dict(), "optimizer": optimizer.state_dict(),
                                "cr": cr.state_dict(), "config": config.to_dict()}, Path(folder) / CHECKPOINT_FILE)
                ray.train.report(_reportable(metrics),
                                 checkpoint=ray.train.Checkpoint.from_directory(folder) if is_main else None)
        else:
            ray.train.report(_reportable(metrics))
        seconds["checkpoint"] += time.perf_counter() - clock


def _reportable(metrics: dict[str, Any]) -> dict[str, Any]:
    """Ray Train/Tune metrics: the headline numbers, not the per-class ones."""
    return {k: v for k, v in metrics.items() if not k.startswith("class_acc/")}
