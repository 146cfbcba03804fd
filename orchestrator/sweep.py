"""Sweeps on Ray Tune (SPEC §8): each trial (:class:`orchestrator.trial.SweepTrial`) is one Ray Train
run of :func:`orchestrator.trainer.train`, reported to Tune epoch by epoch (so ASHA can stop it
early), tracked as one MLflow run tagged with the sweep and trial ids. An interrupted sweep resumes
its unfinished trials: Tune restores the sweep, each restarted trial finds its MLflow run by key and
its Ray Train run resumes from its latest checkpoint — so the experiment ends with exactly one
finished run per trial."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from orchestrator.config import ExperimentConfig, is_uri
from orchestrator.errors import UserError
from orchestrator.preflight import check_data_and_model, check_workers_fit, runs_that_fit
from orchestrator.ray_env import ensure_ray
from orchestrator.search_space import SearchSpace, count_trials, swept_keys, trial_config, tune_param_space
from orchestrator.tracking import (SWEEP_TAG, check_reachable, experiment_id, experiment_runs, finish_run,
                                   resolve_tracking_uri)
from orchestrator.trainer import run_storage
from orchestrator.trial import SweepTrial

if TYPE_CHECKING:
    from ray.tune import Result
    from ray.tune.search.basic_variant import BasicVariantGenerator


def sweeps_root(storage: str) -> Path:
    """Tune's state of every sweep, next to the trials' Ray Train runs (``checkpoint.storage_path``,
    by default ./curvlt_runs): on a cluster, shared storage keeps ``--resume`` possible from any node.
    With a URI (s3://...) for the runs, sweep state stays in ./curvlt_runs, where ``--resume`` can
    find it."""
    return Path("curvlt_runs" if is_uri(storage) else storage).resolve() / "sweeps"


def _scheduler(space: SearchSpace, epochs: int):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    if space.scheduler.name == "asha":
        return ASHAScheduler(time_attr="training_iteration", max_t=space.scheduler.max_t or epochs,
                             grace_period=space.scheduler.grace_period,
                             reduction_factor=space.scheduler.reduction_factor)
    return FIFOScheduler()


def search_algorithm(space: SearchSpace, max_concurrent: int) -> BasicVariantGenerator:
    """Tune's variant generator, seeded with ``tune.seed`` so that a space's sampled values (choice,
    uniform, loguniform, randint) are the same in every sweep of it; it also keeps at most
    ``max_concurrent`` trials running (:func:`concurrent_trials`), since Tune ignores its own limit
    when given a generator."""
    from ray.tune.search.basic_variant import BasicVariantGenerator

    return BasicVariantGenerator(max_concurrent=max_concurrent, random_state=space.sample_seed)


def concurrent_trials(space: SearchSpace, configs: list[ExperimentConfig]) -> int:
    """``max_concurrent_trials``, or where it is 0 ("as many as resources allow"), as many trials as
    the cluster's live nodes hold at once, at least 1: the trial itself holds no CPU
    (:data:`TRIAL_DRIVER_RESOURCES`), so Tune alone would start every trial at once, and the Ray
    Train runs that found no room would wait, time out and fail."""
    if space.max_concurrent_trials:
        return space.max_concurrent_trials
    return max(1, min(runs_that_fit(config.scaling) for config in configs))


def latest_sweep(space: SearchSpace, root: Path) -> Path:
    candidates = sorted(root.glob(f"{space.name}-*"), key=lambda p: p.stat().st_mtime)
    if not candidates:
        raise UserError(f"--resume: no earlier sweep of {space.name!r} under {root}")
    return candidates[-1]


#: The trial itself only drives a Ray Train run whose workers hold the real resources. Tune refuses
#: an empty request, so it asks for one byte of memory: a token share of a CPU (it was 0.01) left a
#: node that share short of a trial whose workers need all of its CPUs, and such a run never
#: started (a 2-CPU worker on a 2-core machine: WorkerGroupStartupTimeoutError, again and again).
TRIAL_DRIVER_RESOURCES: dict[str, float] = {"memory": 1}


@dataclass
class SweepOutcome:
    experiment: str  # the MLflow experiment holding one run per trial
    failed: int  # trials that ended in an error
    ended: int  # trials that ended: finished, stopped by the scheduler, or failed
    trials: int  # the space's trials; more than ``ended`` when the sweep was interrupted (Ctrl-C, SIGTERM)

    @property
    def interrupted(self) -> bool:
        return self.ended < self.trials


def run_sweep(space: SearchSpace, cli_overrides: list[str], resume: bool) -> SweepOutcome:
    """Run (or resume) the sweep."""
    from ray import tune

    first = trial_config(space, space.base[0], {}, cli_overrides)
    uri = resolve_tracking_uri(first.mlflow.tracking_uri)
    check_reachable(uri)
    # Create the store and the experiment here: concurrent trials migrating a fresh SQLite file
    # at the same time race ("table _alembic_tmp_tags already exists").
    experiment_id(uri, first.mlflow.experiment)
    # Trials run in Tune's trial folders, so relative locations are resolved here, once.
    storage = run_storage(first)
    cli_overrides = [f"mlflow.tracking_uri={uri}", f"checkpoint.storage_path={storage}", *cli_overrides]
    root = sweeps_root(storage)
    folder = latest_sweep(space, root) if resume else root / f"{space.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    sweep_id = folder.name
    ensure_ray()
    bases = [trial_config(space, base, {}, cli_overrides) for base in space.base]
    for config in bases:  # a trial that cannot start would fail, be retried and fail again, in turn
        check_workers_fit(config.scaling)
        check_data_and_model(config)
    max_concurrent = concurrent_trials(space, bases)
    trainable = tune.with_resources(tune.with_parameters(SweepTrial, space=space, cli_overrides=cli_overrides,
                                                         sweep_id=sweep_id, swept=swept_keys(space, bases)),
                                    TRIAL_DRIVER_RESOURCES)
    if resume:
        if not tune.Tuner.can_restore(str(folder)):
            raise UserError(f"--resume: {folder} holds no restorable Tune state")
        tuner = tune.Tuner.restore(str(folder), trainable=trainable, resume_unfinished=True, resume_errored=True)
    else:
        tuner = tune.Tuner(
            trainable, param_space=tune_param_space(space),
            tune_config=tune.TuneConfig(metric=space.metric, mode=space.mode, num_samples=space.num_samples,
                                        search_alg=search_algorithm(space, max_concurrent),
                                        scheduler=_scheduler(space, first.train.epochs)),
            run_config=tune.RunConfig(name=sweep_id, storage_path=str(folder.parent), verbose=1,
                                      failure_config=tune.FailureConfig(max_failures=1),
                                      # A trial's state is its Ray Train checkpoint and MLflow run;
                                      # Tune has nothing of its own to save.
                                      checkpoint_config=tune.CheckpointConfig(checkpoint_at_end=False)))
    print(f"[curvlt] sweep {sweep_id}: MLflow experiment {first.mlflow.experiment!r}, up to {max_concurrent} "
          f"trial(s) at a time; resume after an interruption with: curvlt tune {space.name} --resume", flush=True)
    results = tuner.fit()
    errors = [str(result.error).splitlines()[0] for result in results if result.error]
    if errors:
        print(f"[curvlt] {len(errors)} trial(s) failed; first error: {errors[0]}")
    outcome = SweepOutcome(first.mlflow.experiment, len(errors), sum(_ended(result) for result in results),
                           count_trials(space))
    if outcome.interrupted:
        _mark_stopped_trials(uri, first.mlflow.experiment, sweep_id)
    return outcome


def _ended(result: Result) -> bool:
    """Whether a trial of ``tuner.fit()``'s results has ended: it failed, or its last result is
    ``done`` (it finished, or the scheduler stopped it). Not Tune's TERMINATED status: an
    interruption ends the trials it stops that way too, and those are resumed."""
    return result.error is not None or bool((result.metrics or {}).get("done"))


def _mark_stopped_trials(uri: str, experiment: str, sweep_id: str) -> None:
    """End ``KILLED`` the runs of this sweep still ``RUNNING`` in MLflow: Tune ended their trials'
    actors on the interruption before the trials could say so themselves. ``KILLED`` as for a
    stopped ``curvlt train`` run: stopped, not broken, and resumed by ``--resume``."""
    for run in experiment_runs(uri, experiment, f"tags.`{SWEEP_TAG}` = '{sweep_id}' and attributes.status = 'RUNNING'"):
        finish_run(uri, run.info.run_id, "KILLED", {})
