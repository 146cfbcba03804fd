"""What the driver checks before any Ray Train worker starts, so that a run that cannot start says
why in one line instead of after a timeout, a traceback per worker and a retry per
``checkpoint.max_failures``.

Why here and not in the workers: Ray Train waits 60 s for workers that the cluster cannot place
(``WorkerGroupStartupTimeoutError``: a bundled GPU config on a laptop), and a worker that raises
(a dataset not found) is restarted like one that crashed, ``checkpoint.max_failures`` times (a
sweep's trial, then, twice over). On a Ray that curvlt started on this machine nothing can add
nodes later, so a request larger than its nodes is an error; on a cluster that was joined, an
autoscaler may still add them, so it is only a warning.
"""

from __future__ import annotations

import math
import sys

import ray

from orchestrator.config import ExperimentConfig, ScalingConfig, check_feature_dim, config_from_dict
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


def check_run_can_start(config: ExperimentConfig, data_checked: bool = False) -> None:
    """Everything in this module for one run, on the Ray this process is connected to;
    ``data_checked``: :func:`check_data_and_model` has been run already (by a sweep's driver)."""
    check_workers_fit(config.scaling)
    if not data_checked:
        check_data_and_model(config)


def check_data_and_model(config: ExperimentConfig) -> None:
    """Build the run's dataset once, as its workers will, so that a missing dataset stops with its
    one-line message and a download happens once rather than in every worker at the same time;
    with the dataset's shape, build the model without memory (PyTorch's meta device) to check the
    tangent dimensions against its feature dimension.

    Where: on a Ray started here, in this process (its workers run on this machine and read the
    same files). On a joined cluster, where this machine may not hold the data, as a zero-CPU Ray
    task on each live node that can hold one of the run's workers; a node that an autoscaler adds
    later is checked by its workers."""
    if started_here():
        _build_data_and_model(config)
        return
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    per_worker = worker_resources(config.scaling)
    nodes = [node for node in ray.nodes() if node.get("Alive") and workers_that_fit([node["Resources"]], per_worker)]
    check = ray.remote(num_cpus=0)(_problem_on_this_node)
    problems = ray.get([check.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False))
                        .remote(config.to_dict()) for node in nodes])
    for node, problem in zip(nodes, problems):
        if problem is not None:
            raise UserError(f"{problem} (on node {node['NodeManagerAddress']})")


def _problem_on_this_node(config: dict) -> str | None:
    """:func:`_build_data_and_model` on the node this Ray task runs on: its one-line message, or None."""
    try:
        _build_data_and_model(config_from_dict(config))
    except UserError as problem:
        return str(problem)
    return None


def _build_data_and_model(config: ExperimentConfig) -> None:
    import torch

    from orchestrator.data.datasets import build_dataset
    from orchestrator.models import build_model

    data = build_dataset(config.dataset, config.seed)
    with torch.device("meta"):
        model = build_model(config, data.input_shape, data.num_classes)
    check_feature_dim(config, model.feature_dim)


def _number(value: float) -> str:
    return f"{value:g}"
