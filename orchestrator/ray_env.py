"""Starting or joining Ray. A local instance listens on 127.0.0.1 only, with the dashboard off
unless asked for (SPEC §8 safety); inside a submitted job, ``RAY_ADDRESS`` points at the cluster."""

from __future__ import annotations

import logging
import os

import ray

#: Loggers that speak at every report or every second; errors still come through.
_CHATTY_LOGGERS = {
    "ray.train": logging.ERROR,  # per-report and per-checkpoint INFO lines
    # Without the dashboard there is no state API, and Ray Train's placement-group cleaner warns
    # about it once a second for the whole run (Ray 2.60).
    "ray.train.v2._internal.execution.controller.placement_group_cleaner": logging.ERROR,
    "faiss.loader": logging.WARNING,
}


def quiet_ray_train_logs() -> None:
    """Runs in every Ray worker process at start-up (``worker_process_setup_hook``)."""
    for name, level in _CHATTY_LOGGERS.items():
        logging.getLogger(name).setLevel(level)


def ensure_ray(dashboard: bool = False) -> None:
    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    # Workers' print() goes straight to the driver once; Ray Train's patch would echo it twice.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    runtime_env = {"worker_process_setup_hook": "orchestrator.ray_env.quiet_ray_train_logs"}
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], runtime_env=runtime_env)
    else:
        # address="local": always a fresh instance of our own, never one left behind by `ray start`.
        ray.init(address="local", include_dashboard=dashboard, _node_ip_address="127.0.0.1", dashboard_host="127.0.0.1",
                 runtime_env=runtime_env, logging_level="WARNING")
