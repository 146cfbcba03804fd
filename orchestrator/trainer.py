"""Driver side of one training run (SPEC §8): the tracking server reached and the run's workers and
data checked (:mod:`orchestrator.preflight`) before its MLflow run is made, so that a run that
cannot start stops before any training; then a Ray Train ``TorchTrainer`` with checkpointing and
automatic restarts, then plots and a summary read back from MLflow."""

from __future__ import annotations

import sys
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from orchestrator.config import ExperimentConfig, is_uri
from orchestrator.plots import accuracy_vs_curvature, correlations_over_epochs
from orchestrator.errors import UserError
from orchestrator.preflight import check_run_can_start, worker_resources
from orchestrator.ray_env import ensure_ray
from orchestrator.run_heartbeat import Heartbeat
from orchestrator.run_resume import STORAGE_TAG, check_checkpoints_found, claim, run_to_resume
from orchestrator.tracking import (RUN_KEY_TAG, check_reachable, client, find_run, finish_run, resolve_tracking_uri,
                                   start_run)
from orchestrator.train_loop import train_loop_per_worker


@dataclass
class TrainingOutcome:
    run_id: str
    tracking_uri: str
    checkpoint_path: str | None
    final_metrics: dict[str, float]
    trained: bool = True  # False: the run had already finished (a resumed sweep's done trial)


def run_storage(config: ExperimentConfig) -> str:
    """Where Ray Train keeps the run: a local folder made absolute, or a URI (s3://...) as given."""
    storage = config.checkpoint.storage_path or "curvlt_runs"
    return storage if is_uri(storage) else str(Path(storage).expanduser().resolve())


def train(config: ExperimentConfig, tags: dict[str, str] | None = None, run_key: str | None = None,
          callbacks: list | None = None, stopping: threading.Event | None = None,
          resume: str | None = None, data_checked: bool = False) -> TrainingOutcome:
    """Train one configuration end to end; the MLflow run ends FINISHED, FAILED or KILLED.

    ``run_key`` names a run that may already exist (a sweep trial being resumed): its MLflow run is
    reused — or, if it already FINISHED, returned without training — and its Ray Train run of the
    same name resumes from its latest checkpoint. ``resume`` (a run id, or
    :data:`~orchestrator.run_resume.LATEST`) does the same for a run started by ``curvlt train``
    (:func:`~orchestrator.run_resume.run_to_resume`). ``callbacks`` go to Ray Train (e.g. a sweep
    trial's relay). If the run fails once ``stopping`` is set (its sweep trial aborted it), or on
    Ctrl-C, it ends KILLED rather than FAILED: stopped, not broken, and resumable.
    ``data_checked``: the dataset and model were checked already (a sweep's driver checks them once
    for all its trials, :func:`~orchestrator.preflight.check_data_and_model`).
    """
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    uri = resolve_tracking_uri(config.mlflow.tracking_uri)
    check_reachable(uri)
    storage = run_storage(config)
    if resume is not None:
        existing = run_to_resume(uri, config, resume)
        if not config.checkpoint.storage_path:  # where the run kept its checkpoints, from any directory
            storage = existing.data.tags.get(STORAGE_TAG, storage)
        if not is_uri(storage):
            check_checkpoints_found(uri, existing, Path(storage) / f"curvlt-{existing.info.run_id}")
    else:
        existing = find_run(uri, config.mlflow.experiment, run_key) if run_key else None
    if existing is not None and existing.info.status == "FINISHED":
        return TrainingOutcome(existing.info.run_id, uri, existing.data.tags.get("curvlt.checkpoint"),
                               dict(existing.data.metrics), trained=False)
    ensure_ray()
    # Before a run is created or claimed: a run that cannot start leaves no trace.
    check_run_can_start(config, data_checked)
    if resume is not None:
        claim(uri, existing.info.run_id)
    if existing is not None:
        run_id = existing.info.run_id
        client(uri).update_run(run_id, status="RUNNING")
    else:
        run_id = start_run(uri, config, {**(tags or {}), STORAGE_TAG: storage,
                                         **({RUN_KEY_TAG: run_key} if run_key else {})})
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": config.to_dict(), "run_id": run_id, "tracking_uri": uri},
        scaling_config=ScalingConfig(num_workers=config.scaling.num_workers, use_gpu=config.scaling.use_gpu,
                                     resources_per_worker=worker_resources(config.scaling)),
        run_config=RunConfig(name=f"curvlt-{run_key or run_id}", storage_path=storage,
                             callbacks=callbacks or [],
                             failure_config=FailureConfig(max_failures=config.checkpoint.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=config.checkpoint.keep),
                             # Our own progress lines are enough; Ray Train's per-report INFO lines and
                             # its once-a-second warnings when the dashboard (state API) is off are not.
                             logging_config=LoggingConfig(log_level="ERROR")),
    )
    try:
        with Heartbeat(uri, run_id):  # so that --resume leaves this run alone while it trains
            result = trainer.fit()
    except BaseException:
        stopped = _interrupted() or (stopping is not None and stopping.is_set())
        status = "KILLED" if stopped else "FAILED"
        finish_run(uri, run_id, status, {})
        if run_key is None:
            print(f"[curvlt] run {run_id} ended {status}; the same command with --resume {run_id} continues it "
                  f"from its last checkpoint", file=sys.stderr, flush=True)
        _raise_user_error_of_workers(sys.exc_info()[1])
        if stopped and isinstance(sys.exc_info()[1], SystemExit):
            # Ray Train's SIGINT handler exits with status 1; a stopped run is curvlt's Ctrl-C (130)
            raise KeyboardInterrupt from None
        raise
    checkpoint_path = result.checkpoint.path if result.checkpoint else None
    log_plots(uri, run_id, config)
    finish_run(uri, run_id, "FINISHED", {"curvlt.checkpoint": checkpoint_path or "none"})
    return TrainingOutcome(run_id, uri, checkpoint_path, latest_metrics(uri, run_id))


def _raise_user_error_of_workers(error: BaseException | None) -> None:
    """A worker's :class:`UserError` (a dataset not found on a cluster's node) raised again here, so
    that the command line ends with its one line rather than Ray Train's report of every worker."""
    from ray.train import WorkerGroupError

    if isinstance(error, WorkerGroupError):
        for failure in error.worker_failures.values():
            if isinstance(failure, UserError):
                raise UserError(str(failure)) from None


def _interrupted() -> bool:
    """Ctrl-C: Python's KeyboardInterrupt, or the SystemExit that Ray Train's own SIGINT handler
    raises once it has aborted the run (``ray.train.v2``'s ``DataParallelTrainer``)."""
    return isinstance(sys.exc_info()[1], (KeyboardInterrupt, SystemExit))


def latest_metrics(uri: str, run_id: str) -> dict[str, float]:
    return dict(client(uri).get_run(run_id).data.metrics)


def metric_history(uri: str, run_id: str, keys: list[str]) -> pd.DataFrame:
    """Epoch-indexed frame of the given metrics."""
    mlflow_client = client(uri)
    columns = {key: pd.Series({m.step: m.value for m in mlflow_client.get_metric_history(run_id, key)}, dtype=float)
               for key in keys}
    return pd.DataFrame(columns).sort_index()


def last_geometry_table(uri: str, run_id: str) -> pd.DataFrame | None:
    import mlflow.artifacts

    files = sorted(a.path for a in client(uri).list_artifacts(run_id, "geometry"))
    if not files:
        return None
    with tempfile.TemporaryDirectory() as folder:
        local = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=files[-1], dst_path=folder,
                                                    tracking_uri=uri)
        return pd.read_csv(local, keep_default_na=True)


def log_plots(uri: str, run_id: str, config: ExperimentConfig) -> None:
    """Accuracy-vs-curvature scatter (last geometry epoch) and correlations over epochs."""
    table = last_geometry_table(uri, run_id)
    if table is None:
        return
    title = f"{config.dataset.name} / {config.loss.name} / CR weight {config.cr.weight}"
    history = metric_history(uri, run_id, ["geometry/corr_acc_curvature", "geometry/corr_acc_separation",
                                           "geometry/corr_acc_volume"])
    with tempfile.TemporaryDirectory() as folder:
        paths = [accuracy_vs_curvature(table, Path(folder) / "accuracy_vs_curvature.png", title),
                 correlations_over_epochs(history, Path(folder) / "correlations_over_epochs.png", title)]
        for path in paths:
            client(uri).log_artifact(run_id, str(path), "plots")


def summary_table(outcome: TrainingOutcome) -> str:
    """Headline metrics and the last per-class table, as text."""
    metrics = outcome.final_metrics
    keys = ["test/acc", "test/acc_many", "test/acc_medium", "test/acc_few", "train/loss", "train/base_loss",
            "train/cr_loss", "cr/tangent_dim", "geometry/curvature_mean", "geometry/curvature_imbalance",
            "geometry/corr_acc_curvature",
            "geometry/corr_acc_separation", "geometry/corr_acc_volume"]
    lines = [f"run {outcome.run_id}  (MLflow: {outcome.tracking_uri.split('@')[-1]})"]
    lines += [f"  {key:34s} {metrics[key]:.4f}" for key in keys if key in metrics]
    table = last_geometry_table(outcome.tracking_uri, outcome.run_id)
    if table is not None:
        columns = [c for c in ("label", "train_images", "accuracy", "train_mean_angle", "train_mean_kappa",
                               "train_separation", "train_volume", "true_curvature") if c in table]
        lines.append(table[columns].to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    lines.append(f"  checkpoint: {outcome.checkpoint_path}")
    if outcome.checkpoint_path and Path(outcome.checkpoint_path).is_dir():  # local, not cloud storage
        lines.append(f"  its model's class manifolds, measured again: "
                     f"curvlt measure --checkpoint {outcome.checkpoint_path}")
    return "\n".join(lines)
