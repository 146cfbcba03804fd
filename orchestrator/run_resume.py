"""Which MLflow run ``curvlt train CONFIG --resume [RUN_ID]`` continues, and whether it may.

Why: a worker that dies is restarted by Ray Train inside the run (``FailureConfig``), but a driver
that stops (Ctrl-C, a closed terminal, a preempted job) ends the run. Its checkpoints stay in its
Ray Train folder and its epochs in MLflow, so the same command with ``--resume`` continues that run
in its own MLflow run from its latest checkpoint instead of training again from epoch 0.

A run whose driver is still training is not continued (:mod:`orchestrator.run_heartbeat`), and of
two drivers resuming one run at the same moment only one goes on (:func:`claim`). Only
a run trained with the same config is continued: a run resumed with another learning rate or
loss would be neither of the two experiments. Keys that change where or how fast a run trains, not
what it trains, may differ (:data:`~orchestrator.config.NOT_COMPUTED`).
"""

from __future__ import annotations

import os
import socket
import time
import uuid
from pathlib import Path

from orchestrator.config import NOT_COMPUTED, ExperimentConfig
from orchestrator.errors import UserError
from orchestrator.run_heartbeat import (HEARTBEAT_TAG, INTERVAL_S, STALE_AFTER_S, looks_alive, now_stamp,
                                        seconds_since_heartbeat)
from orchestrator.tracking import RUN_KEY_TAG, client, experiment_runs, logged_epochs, public_params

#: ``--resume`` without a run id: the newest unfinished run of the config's experiment with this config.
LATEST = "latest"
#: Tag with the folder (or URI) holding a run's Ray Train checkpoints, so that it is found again
#: from any working directory.
STORAGE_TAG = "curvlt.storage"
#: Tag a resuming driver writes its token into before it trains (:func:`claim`).
CLAIM_TAG = "curvlt.resumed_by"
#: Seconds a resuming driver waits between writing its claim and reading it back: far longer than a
#: tracking-store round trip, so that a driver that checked the run at the same moment has written.
CLAIM_SETTLE_S = 2.0


def config_differences(params: dict[str, str], config: ExperimentConfig) -> list[str]:
    """The keys whose value in ``config`` differs from the run's logged ``params``, as
    ``key: <run's value> in the run, <value> here``; keys in
    :data:`~orchestrator.config.NOT_COMPUTED` are left out, and so are keys the run did not record
    that are at their default here: a key added to curvlt after the run started defaults to the
    behaviour the run trained with."""
    defaults = public_params(ExperimentConfig())
    differences = []
    for key, value in public_params(config).items():
        if key.startswith(NOT_COMPUTED):
            continue
        logged = params.get(key)
        if logged is None and value == defaults.get(key):
            continue
        if logged != value:
            differences.append(f"{key}: {'not recorded' if logged is None else logged} in the run, {value} here")
    return differences


def run_to_resume(uri: str, config: ExperimentConfig, run_id: str):
    """The MLflow run to continue: ``run_id``, or with :data:`LATEST` the newest run of
    ``config.mlflow.experiment`` that did not finish, was trained with this config and whose driver
    is gone. Stops with one line when there is none, when the run finished, is still training,
    belongs to a sweep, or had another config."""
    if run_id == LATEST:
        runs = experiment_runs(uri, config.mlflow.experiment, "attributes.status != 'FINISHED'")
        runs = [run for run in runs if RUN_KEY_TAG not in run.data.tags]
        matching = [run for run in runs if not config_differences(run.data.params, config)]
        stopped = [run for run in matching if not looks_alive(run)]
        if matching and not stopped:
            raise UserError(still_training(matching[0]))
        if not stopped:
            other = f" ({len(runs)} with another config; pass one's id to see how it differs)" if runs else ""
            raise UserError(f"--resume: no unfinished run of experiment {config.mlflow.experiment!r} with this "
                            f"config{other}")
        return stopped[0]
    try:
        run = client(uri).get_run(run_id)
    except Exception as exc:  # MlflowException: RESOURCE_DOES_NOT_EXIST, or a malformed id
        raise UserError(f"--resume: no run {run_id!r} in the tracking store ({exc.__class__.__name__})") from None
    if run.info.status == "FINISHED":
        raise UserError(f"--resume: run {run_id} already finished; nothing to resume")
    if RUN_KEY_TAG in run.data.tags:
        raise UserError(f"--resume: run {run_id} is a sweep trial; resume its sweep with 'curvlt tune NAME --resume'")
    if looks_alive(run):
        raise UserError(still_training(run))
    differences = config_differences(run.data.params, config)
    if differences:
        more = f" (and {len(differences) - 1} more)" if len(differences) > 1 else ""
        raise UserError(f"--resume: run {run_id} was trained with another config: {differences[0]}{more}")
    return run


def claim(uri: str, run_id: str, settle_s: float = CLAIM_SETTLE_S) -> None:
    """Take ``run_id`` for this driver, or stop with one line when another driver that resumed it
    at the same moment took it. Two drivers both see a run's heartbeat as stale if they check it
    before either has stamped it; MLflow has no compare-and-set, so each writes a unique token and
    a heartbeat, waits ``settle_s`` and reads the token back: the last writer's stays, and every
    other driver stops before it trains. A driver that checks after that sees the fresh heartbeat."""
    token = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
    store = client(uri)
    _set_tag(store, run_id, CLAIM_TAG, token)
    _set_tag(store, run_id, HEARTBEAT_TAG, now_stamp())
    time.sleep(settle_s)
    holder = store.get_run(run_id).data.tags.get(CLAIM_TAG)
    if holder != token:
        raise UserError(f"--resume: run {run_id} is being resumed by another driver ({holder}), which started at "
                        "the same moment; leave it to that one")


def _set_tag(store, run_id: str, key: str, value: str) -> None:
    """``set_tag``, tried once more when it fails: two drivers that insert a new tag at the same
    moment collide on an SQL store's unique key, and the second try updates the row the first made."""
    try:
        store.set_tag(run_id, key, value)
    except Exception:  # noqa: BLE001 - MlflowException wrapping the store's IntegrityError
        time.sleep(0.1)
        store.set_tag(run_id, key, value)


def still_training(run) -> str:
    """The refusal for a run whose driver stamped it within :data:`STALE_AFTER_S`."""
    age = seconds_since_heartbeat(run) or 0.0  # stamped: a number
    return (f"--resume: run {run.info.run_id} is still training: its driver's last heartbeat was {age:.0f} s ago "
            f"(one every {INTERVAL_S:.0f} s); stop that driver first, or, if it was killed, try again in "
            f"{STALE_AFTER_S - age:.0f} s")


def check_checkpoints_found(uri: str, run, folder: Path) -> None:
    """Stop when a run that logged epochs has no Ray Train ``folder`` (local) where its checkpoints
    should be: resuming would silently train from epoch 0 again."""
    epochs = logged_epochs(uri, run.info.run_id)
    if epochs and not folder.is_dir():
        raise UserError(f"--resume: run {run.info.run_id} logged {len(epochs)} epochs but {folder} does not exist; "
                        f"set checkpoint.storage_path to the folder that holds {folder.name}")
