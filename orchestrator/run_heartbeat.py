"""A training run's driver says it is alive, so that ``--resume`` does not take over a live run.

Why: a driver that is killed outright (SIGKILL, a lost machine) leaves its MLflow run ``RUNNING``,
just like a driver that is still training, and MLflow keeps no heartbeat of its own. Resuming a
live run would start a second trainer on the same MLflow run and the same checkpoint folder: two
writers of every epoch. So while ``trainer.fit()`` runs, a daemon thread of the driver stamps the
run's :data:`HEARTBEAT_TAG` with the time every :data:`INTERVAL_S`, and ``--resume`` refuses a
``RUNNING`` run whose stamp is younger than :data:`STALE_AFTER_S`. A run without the tag (from a
version before it) is taken as stopped, as before.
"""

from __future__ import annotations

import threading
import time
import warnings

from orchestrator.tracking import client

#: Tag holding the Unix time of the driver's latest heartbeat.
HEARTBEAT_TAG = "curvlt.heartbeat"
#: Seconds between heartbeats.
INTERVAL_S = 30.0
#: A heartbeat older than this means the driver is gone: three missed beats, which also absorbs a
#: slow tracking server and some clock difference between the driver's machine and this one.
STALE_AFTER_S = 3 * INTERVAL_S


class Heartbeat:
    """``with Heartbeat(uri, run_id): trainer.fit()``: stamps the run now and then every
    ``interval_s`` until the block ends. A failed stamp (the tracking server unreachable for a
    moment) is warned about once and does not stop training."""

    def __init__(self, uri: str, run_id: str, interval_s: float = INTERVAL_S):
        self.uri, self.run_id, self.interval_s = uri, run_id, interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name=f"curvlt-heartbeat-{run_id}", daemon=True)
        self._warned = False

    def __enter__(self) -> Heartbeat:
        self._stamp()
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5.0)  # a stamp stuck in MLflow's retries must not hold up the run's end

    def _beat(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._stamp()

    def _stamp(self) -> None:
        try:
            client(self.uri).set_tag(self.run_id, HEARTBEAT_TAG, now_stamp())
        except Exception as exc:  # any MLflow or network error: training goes on
            if not self._warned:
                self._warned = True
                warnings.warn(f"curvlt: could not record run {self.run_id}'s heartbeat ({exc.__class__.__name__}); "
                              f"--resume cannot tell whether this run is alive", stacklevel=2)


def now_stamp() -> str:
    """The value of :data:`HEARTBEAT_TAG` for a heartbeat now: Unix time in seconds."""
    return f"{time.time():.3f}"


def seconds_since_heartbeat(run) -> float | None:
    """Age of a ``RUNNING`` run's latest heartbeat; ``None`` for a run that is not ``RUNNING`` or
    has no readable one (never recorded, or a tag edited by hand)."""
    try:
        stamp = float(run.data.tags[HEARTBEAT_TAG])
    except (KeyError, ValueError):
        return None
    return max(0.0, time.time() - stamp) if run.info.status == "RUNNING" else None


def looks_alive(run) -> bool:
    """Whether the run's driver stamped it within :data:`STALE_AFTER_S`."""
    age = seconds_since_heartbeat(run)
    return age is not None and age < STALE_AFTER_S
