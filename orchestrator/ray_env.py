"""Starting or joining Ray. A local instance listens on 127.0.0.1 only, with the dashboard off
unless asked for with ``CURVLT_RAY_DASHBOARD=1`` (SPEC §8 safety); inside a submitted job,
``RAY_ADDRESS`` points at the cluster."""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import ray

from orchestrator.errors import UserError

#: Loggers that speak at every report or every second; errors still come through.
_CHATTY_LOGGERS = {
    "ray.train": logging.ERROR,  # per-report and per-checkpoint INFO lines
    # Without the dashboard there is no state API: Ray Train's placement-group cleaner warns once a
    # second that it cannot ask whether its controller lives (Ray 2.60). Our sweep trials release
    # their runs' placement groups themselves (orchestrator.trial).
    "ray.train.v2._internal.execution.controller.placement_group_cleaner": logging.CRITICAL,
    "ray.train.v2._internal.callbacks.placement_group_callback": logging.CRITICAL,
    "faiss.loader": logging.WARNING,
    # Ray Train's "Reporting training result ..." INFO line, once per report; this logger is named
    # after its file, not its module.
    os.path.join(os.path.dirname(ray.__file__), "train", "v2", "_internal", "execution", "context.py"): logging.WARNING,
}

#: Set to 1 to start the local instance with its dashboard (on 127.0.0.1:8265).
DASHBOARD_ENV = "CURVLT_RAY_DASHBOARD"

#: How often Ray Train's controller polls its workers for reports (seconds), and curvlt's value for
#: a local instance (Ray's default is 2 s); a value already in the environment is kept.
TRAIN_POLL_ENV, LOCAL_TRAIN_POLL_S = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25"

#: Ray reads this once, on import, to decide whether a node may be part of a multi-machine cluster.
_CLUSTERS_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"

#: How long the head of the cluster named by ``RAY_ADDRESS`` has to accept a connection (seconds).
JOIN_TIMEOUT_S = 10.0

#: Set once this process has started its own local instance (see :func:`started_here`).
_started_here = False


def setup_worker_process() -> None:
    """Runs in every Ray worker process at start-up (``worker_process_setup_hook``): quiets the
    chatty loggers and tells the process its own cluster's address. Ray's state API, which Ray
    Train's cleaner calls, otherwise looks the address up in /tmp/ray and, finding a stale cluster
    there, waits 40 s on it before failing (so every controller shutdown waited 12 s for the
    cleaner); with the address it fails at once.
    """
    for name, level in _CHATTY_LOGGERS.items():
        logging.getLogger(name).setLevel(level)
    os.environ.setdefault("RAY_ADDRESS", ray.get_runtime_context().gcs_address)


@contextmanager
def _loopback_only() -> Iterator[None]:
    """Ray "resolves" a node address of 127.0.0.1 to the machine's reachable IP and binds its
    servers there, unless it believes multi-machine clusters are off (as on macOS). Say so while
    this process starts its own instance: its GCS, raylet and workers inherit the setting and
    listen on 127.0.0.1 only."""
    from ray._private import ray_constants

    saved_env, saved_flag = os.environ.get(_CLUSTERS_ENV), ray_constants.ENABLE_RAY_CLUSTER
    os.environ[_CLUSTERS_ENV], ray_constants.ENABLE_RAY_CLUSTER = "0", False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved_flag
        if saved_env is None:
            os.environ.pop(_CLUSTERS_ENV)
        else:
            os.environ[_CLUSTERS_ENV] = saved_env


def ensure_ray() -> None:
    """Start or join Ray once per process, keeping the caller's SIGTERM handler: ``ray.init``
    replaces it with ``sys.exit``, which takes a sweep down without Tune's graceful stop
    (``orchestrator.cli`` makes SIGTERM do what Ctrl-C does)."""
    if ray.is_initialized():
        return
    sigterm = signal.getsignal(signal.SIGTERM)
    try:
        _start_or_join()
    finally:
        if callable(sigterm) and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, sigterm)


def started_here() -> bool:
    """Whether this process started the Ray it is connected to (on this machine, with no autoscaler:
    its nodes are all there will be), rather than joining a cluster."""
    return _started_here


def _start_or_join() -> None:
    global _started_here
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    # Workers' print() goes straight to the driver once; Ray Train's patch would echo it twice.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    runtime_env = {"worker_process_setup_hook": "orchestrator.ray_env.setup_worker_process"}
    if os.environ.get("RAY_ADDRESS"):
        _join(os.environ["RAY_ADDRESS"], runtime_env)
        return
    # One machine: no node can be preempted, so no watcher actor per run (its start-up also logs
    # an internal error line from Ray 2.60's core worker).
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    # A worker's ray.train.report() waits until the controller has taken its previous result, and
    # the controller looks every 2 s (Ray 2.60), so an epoch shorter than that waited for the
    # poll. Polling a local worker group costs little; Ray Train passes this on to its controller.
    os.environ.setdefault(TRAIN_POLL_ENV, LOCAL_TRAIN_POLL_S)
    # address="local": always a fresh instance of our own, never one left behind by `ray start`.
    with _loopback_only():
        ray.init(address="local", include_dashboard=os.environ.get(DASHBOARD_ENV) == "1", _node_ip_address="127.0.0.1",
                 dashboard_host="127.0.0.1", runtime_env=runtime_env, logging_level=logging.WARNING)
    _started_here = True


def _join(address: str, runtime_env: dict) -> None:
    """Join the cluster at ``RAY_ADDRESS``. Ray itself retries an address where nothing answers for
    minutes, printing a warning every few seconds, and a cluster that refuses its token ends in a
    traceback that does not say why; both are one line here."""
    check_something_answers(address, "RAY_ADDRESS=")
    try:
        ray.init(address=address, runtime_env=runtime_env)
    except ConnectionError as exc:
        raise UserError(f"RAY_ADDRESS={address}: could not join the Ray cluster there ({exc}); a cluster with token "
                        f"authentication needs its token in RAY_AUTH_TOKEN (ray get-auth-token, on its head)") from None


def check_something_answers(address: str, name: str) -> None:
    """A ``host:port`` cluster address (not ``auto``, nor a ``ray://`` or ``http://`` one) must
    accept a connection within :data:`JOIN_TIMEOUT_S`; ``name`` says where it was given
    (``RAY_ADDRESS=``, ``--address ``)."""
    host, colon, port = address.rpartition(":")
    if not colon or "://" in address or not port.isdigit():
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=JOIN_TIMEOUT_S).close()  # [::1]:6379
    except OSError as exc:
        raise UserError(f"{name}{address}: no Ray cluster answers there ({exc.strerror or exc}); start one "
                        f"(ray start --head) or correct the address") from None
