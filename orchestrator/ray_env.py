"""Starting or joining Ray. A local instance listens on 127.0.0.1 only, with the dashboard off
unless asked for (SPEC §8 safety); inside a submitted job, ``RAY_ADDRESS`` points at the cluster."""

from __future__ import annotations

import os

import ray


def ensure_ray(dashboard: bool = False) -> None:
    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=True)
    else:
        ray.init(include_dashboard=dashboard, _node_ip_address="127.0.0.1", dashboard_host="127.0.0.1",
                 log_to_driver=True, configure_logging=True, logging_level="WARNING")
