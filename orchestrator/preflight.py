"""What the driver checks before any Ray Train worker starts, so that a run that cannot start says
why in one line instead of after a timeout, a traceback per worker and a retry per
``checkpoint.max_failures``.

Why here and not in the workers: Ray Train waits 60 s for workers that the cluster cannot place
(``WorkerGroupStartupTimeoutError``: a bundled GPU config on a laptop), and a worker that raises
(a dataset not found) is restarted like one that crashed. On a Ray that curvlt started on this
machine nothing can add nodes later, so a request larger than its nodes is an error; on a cluster
that was joined, an autoscaler may still add them, so it is only a warning.
"""

from __future__ import annotations

import math
import sys

import ray

from orchestrator.config import ExperimentConfig, ScalingConfig, check_feature_dim
from orchestrator.errors import UserError
from orchestrator.ray_env import started_here


def worker_resources(scaling: ScalingConfig) -> dict[str, float]:
    """What each Ray Train worker asks of its node."""
    return {"CPU": scaling.cpus_per_worker, **({"GPU": scaling.gpus_per_worker} if scaling.use_gpu else {})}


def workers_that_fit(nodes: list[dict[str, float]], per_worker: dict[str, float]) -> int:
    """How many workers the nodes (each node's total resources) hold at once; a worker lies on one
    node."""
    def on(node: dict[str, float]) -> int:
        # a hair of slack: Ray stores resources in units of 1e-4
        return min((math.floor(node.get(name, 0.0) / need + 1e-6) for name, need in per_worker.items() if need > 0),
                   default=0)

    return sum(on(node) for node in nodes)


def _live_nodes() -> list[dict[str, float]]:
    """Each live node's total resources."""
    return [node["Resources"] for node in ray.nodes() if node.get("Alive")]


def runs_that_fit(scaling: ScalingConfig) -> int:
    """How many Ray Train runs of ``scaling`` the cluster's live nodes hold side by side."""
    return workers_that_fit(_live_nodes(), worker_resources(scaling)) // scaling.num_workers


def check_workers_fit(scaling: ScalingConfig) -> None:
    """Stop (on a Ray started here, whose nodes are all there will be) or warn when
    ``scaling.num_workers`` workers of :func:`worker_resources` do not fit the cluster's live nodes."""
    if runs_that_fit(scaling) >= 1:
        return
    nodes, per_worker = _live_nodes(), worker_resources(scaling)
    asked = " and ".join(f"{_number(need)} {name}" for name, need in per_worker.items())
    cpus = sum(node.get("CPU", 0.0) for node in nodes)
    gpus = sum(node.get("GPU", 0.0) for node in nodes)
    have = f"{len(nodes)} node(s) with {_number(cpus)} CPU(s) and {_number(gpus)} GPU(s) in all"
    message = (f"scaling: {scaling.num_workers} worker(s) of {asked} each do not fit this Ray cluster ({have}); "
               f"lower scaling.num_workers or scaling.cpus_per_worker"
               + (", or set scaling.use_gpu=false" if scaling.use_gpu else ""))
    if started_here():
        raise UserError(message)
    print(f"[curvlt] {message}. Ray Train waits for the cluster to grow (an autoscaler adding nodes).",
          file=sys.stderr, flush=True)


def check_run_can_start(config: ExperimentConfig) -> None:
    """Everything above for one run, on the Ray this process is connected to. On a Ray started here
    the driver also builds the run's dataset once, as its workers (on this machine, reading the
    same files) will: a missing dataset stops here with its one-line message, and a download
    happens once rather than in every worker at the same time. With the dataset's shape it builds
    the model without memory (PyTorch's meta device) to check the tangent dimensions against the
    model's feature dimension. On a joined cluster each worker makes the same checks."""
    check_workers_fit(config.scaling)
    if started_here():
        import torch

        from orchestrator.data.datasets import build_dataset
        from orchestrator.models import create_model

        data = build_dataset(config.dataset, config.seed)
        with torch.device("meta"):
            model = create_model(config.model.name, data.input_shape, data.num_classes)
        check_feature_dim(config, model.feature_dim)


def _number(value: float) -> str:
    return f"{value:g}"
