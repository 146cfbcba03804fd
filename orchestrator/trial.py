"""One sweep trial (SPEC §8): a Tune trainable that owns one Ray Train run of
:func:`orchestrator.trainer.train` and reports it to Tune epoch by epoch.

Why a class and not Tune's function API: when a scheduler such as ASHA stops a trial, Tune ends the
trial's actor, and the Ray Train controller it started dies with it. That controller's placement
group, though, belongs to the sweep's driver; Ray Train's own cleaner needs the dashboard's state API
(off by default here), so the group would keep its CPUs until the sweep ends and starve the next
trials. A class trainable is told before its actor ends (:meth:`SweepTrial.cleanup`) and aborts its
run there, which makes Ray Train release the workers and the placement group itself.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import ray
from ray import tune
from ray.train import UserCallback
from ray.util.queue import Empty, Queue

from orchestrator.search_space import SearchSpace, trial_config
from orchestrator.tracking import SWEEP_TAG, SWEPT_TAG, client
from orchestrator.trainer import TrainingOutcome, train

#: How long a stopping trial waits for its aborted run to wind down before its actor goes anyway.
ABORT_TIMEOUT_S = 60.0


class RelayToTrial(UserCallback):
    """Runs inside the Ray Train controller: sends the trial its controller's handle (once, so the
    trial can abort the run) and each epoch's rank-0 metrics."""

    def __init__(self, channel: Queue):
        self.channel = channel
        self.sent_handle = False

    def after_report(self, run_context, metrics: list[dict[str, Any]], checkpoint) -> None:
        if not self.sent_handle:
            self.channel.put(("controller", ray.get_runtime_context().current_actor))
            self.sent_handle = True
        self.channel.put(("metrics", dict(metrics[0])))


class SweepTrial(tune.Trainable):
    """Trains one trial's configuration in a background thread; each :meth:`step` returns one epoch."""

    def setup(self, config: dict[str, Any], space: SearchSpace, cli_overrides: list[str], sweep_id: str,
              swept: list[str]) -> None:
        """``swept``: the keys the sweep varies (:func:`~orchestrator.search_space.swept_keys`),
        found once by the driver, recorded in the run's tags for ``curvlt compare``."""
        values = {key: value for key, value in config.items() if key != "base"}
        self.experiment = trial_config(space, config["base"], values, cli_overrides)
        self.run_key = f"{sweep_id}/{self.trial_id}"
        self.tags = {SWEEP_TAG: sweep_id, "curvlt.trial": self.trial_id, "curvlt.space": space.name,
                     SWEPT_TAG: ",".join(swept)}
        self.metric = space.metric
        self.channel = Queue(actor_options={"num_cpus": 0})
        self.controller = None
        self.stopping = threading.Event()
        self.outcome: TrainingOutcome | None = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._train, name="curvlt-trial", daemon=True)
        self.thread.start()

    def _train(self) -> None:
        started = time.perf_counter()
        try:
            self.outcome = train(self.experiment, tags=self.tags, run_key=self.run_key,
                                 callbacks=[RelayToTrial(self.channel)], stopping=self.stopping,
                                 data_checked=True)
        except BaseException as error:  # handed to Tune by step()
            self.error = error
            return
        if self.outcome.trained:
            client(self.outcome.tracking_uri).log_metric(self.outcome.run_id, "time/trial_s",
                                                         time.perf_counter() - started)

    def step(self) -> dict[str, Any]:
        """The next epoch's metrics; the last epoch's (or, for a run that had already finished, its
        final metrics) come with ``done`` once the run has ended, so Tune counts one step per epoch."""
        while True:
            item = self._next_item()
            if item is None:
                return self._final_result()
            kind, value = item
            if kind == "controller":
                self.controller = value
            elif value["epoch"] == self.experiment.train.epochs - 1:
                return {**self._final_result(), **value}  # waits for the run to end
            else:
                return value

    def _next_item(self) -> tuple[str, Any] | None:
        """The next message from the controller, or None once the training thread has ended and
        every message has been read."""
        while True:
            try:
                return self.channel.get(timeout=1.0)
            except Empty:
                if not self.thread.is_alive():
                    try:
                        return self.channel.get_nowait()
                    except Empty:
                        return None

    def _final_result(self) -> dict[str, Any]:
        self.thread.join()
        if self.error is not None:
            raise self.error
        assert self.outcome is not None  # _train sets the outcome or the error
        if self.metric not in self.outcome.final_metrics:
            raise RuntimeError(f"trial {self.trial_id} finished without metric {self.metric!r}")
        return {**self.outcome.final_metrics, "done": True}

    def cleanup(self) -> None:
        """Tune is ending this trial (a scheduler stopped it, or the sweep was interrupted): abort a
        run still in progress so its workers and placement group are released now."""
        if self.thread.is_alive():
            self.stopping.set()
            self._abort_controller()
            self.thread.join(timeout=ABORT_TIMEOUT_S)
        self.channel.shutdown(force=True)

    def _abort_controller(self) -> None:
        while self.controller is None:
            try:
                kind, value = self.channel.get_nowait()
            except Empty:
                # Nothing reported yet, so no scheduler can have stopped this trial: the whole
                # sweep is ending, and its driver's exit releases the run with everything else.
                return
            if kind == "controller":
                self.controller = value
        try:
            # The same call Ray Train makes on Ctrl-C: it shuts the worker group (and its placement
            # group) down, then ends the controller.
            ray.get(self.controller.abort.remote(), timeout=ABORT_TIMEOUT_S)
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
            pass

