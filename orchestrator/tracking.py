"""MLflow tracking (SPEC §8): where runs go, one run per training run, metrics per epoch logged
exactly once even across restarts, artifacts. Secrets in tracking URIs are never logged or printed."""

from __future__ import annotations

import os
import re
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING, Any

from orchestrator.config import ExperimentConfig, flatten, model_head
from orchestrator.errors import UserError, make_folder

if TYPE_CHECKING:
    import pandas as pd

#: Tag holding the stable key of a run that may be resumed (a sweep trial: "<sweep>/<trial id>").
RUN_KEY_TAG = "curvlt.run_key"
#: Tag holding the sweep a trial's run belongs to.
SWEEP_TAG = "curvlt.sweep"
#: Tag holding the config keys a trial's sweep varies, comma-separated (how ``curvlt compare`` groups).
SWEPT_TAG = "curvlt.swept"
#: Metric whose history tells which epochs a run has already logged.
EPOCH_MARKER = "test/acc"
#: Runs asked of MLflow per search page (its server caps a page; SQLite stores answer any size).
RUNS_PER_PAGE = 1000
_SECRET_QUERY = re.compile(r"(?i)((?:token|key|secret|password|pwd|sig)[^=&]*=)[^&]*")


def redact(uri: str) -> str:
    """``https://user:tok@host/?token=x`` -> ``https://***@host/?token=***``."""
    uri = re.sub(r"//[^/@]+@", "//***@", uri)
    return _SECRET_QUERY.sub(r"\1***", uri)


def resolve_tracking_uri(configured: str) -> str:
    """``mlflow.tracking_uri``, else ``$MLFLOW_TRACKING_URI``, else ``sqlite:///<cwd>/mlflow.db``
    (made absolute so that Ray workers in other directories write to the same store)."""
    uri = configured or os.environ.get("MLFLOW_TRACKING_URI", "")
    if not uri:
        uri = f"sqlite:///{Path.cwd() / 'mlflow.db'}"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = f"sqlite:///{Path(uri[len('sqlite:///'):]).resolve()}"
    return uri


def sqlite_file(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI, else ``None``."""
    return Path(uri[len("sqlite:///"):]) if uri.startswith("sqlite:///") else None


def check_store_exists(uri: str) -> None:
    """For commands that only read runs: a SQLite store that is not there is a wrong folder or URI,
    not an empty store to create (opening one makes the file)."""
    database = sqlite_file(uri)
    if database is not None and not database.is_file():
        raise UserError(f"--tracking-uri: no MLflow store at {database}; run this where the runs' mlflow.db is, "
                        f"or pass --tracking-uri (or set MLFLOW_TRACKING_URI)")
    check_reachable(uri, "--tracking-uri")


def check_reachable(uri: str, option: str = "mlflow.tracking_uri", timeout_s: float = 5.0) -> None:
    """Stop before any work when the tracking store cannot be used: a server that does not answer
    (MLflow's client retries one for minutes), or a URI that MLflow refuses (an unknown scheme, a
    file store, which MLflow 3 no longer writes to, missing credentials), which it reports in a
    traceback of 40-odd lines. ``option``: where the URI was given."""
    database = sqlite_file(uri)
    if database is not None:
        make_folder(database.parent, f"{option}: cannot make the folder {database.parent} of {uri}")
    elif not uri.startswith(("http://", "https://")):
        try:
            client(uri).search_experiments(max_results=1)
        except Exception as exc:  # MLflow's own, and its stores' (drivers, credentials)
            raise UserError(f"{option}: MLflow cannot use {redact(uri)} "
                            f"({str(exc).strip().splitlines()[0]})") from None
    else:
        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout_s) as response:
                if response.status != 200:
                    raise UserError(f"{option}: {redact(uri)} answered HTTP {response.status} on /health")
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise UserError(f"{option}: cannot reach the MLflow server at {redact(uri)} ({reason}); "
                            f"start one with 'mlflow server --host 127.0.0.1 --port 5000' or fix the URI") from None


def client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def experiment_id(uri: str, name: str) -> str:
    """Get or create the experiment; a local SQLite store keeps artifacts in ``mlartifacts/`` next to it."""
    mlflow_client = client(uri)
    existing = mlflow_client.get_experiment_by_name(name)
    if existing is not None:
        return existing.experiment_id
    database = sqlite_file(uri)
    location = None if database is None else (database.parent / "mlartifacts").as_uri()
    return mlflow_client.create_experiment(name, artifact_location=location)


def public_params(config: ExperimentConfig) -> dict[str, str]:
    """Flattened config for MLflow params as they are logged: ``model.head`` as the run builds it
    ("auto" resolved, so a run's page says which classifier LDAM trained), the tracking URI redacted,
    each value cut to MLflow's 6,000-character limit."""
    params = flatten(config.to_dict())
    params["model.head"] = model_head(config)
    params["mlflow.tracking_uri"] = redact(params["mlflow.tracking_uri"])
    return {key: str(value)[:6000] for key, value in params.items()}


def start_run(uri: str, config: ExperimentConfig, tags: dict[str, str] | None = None) -> str:
    """Create the run for one training run and log its params; returns the run id."""
    from mlflow.entities import Param, RunTag

    mlflow_client = client(uri)
    run = mlflow_client.create_run(experiment_id(uri, config.mlflow.experiment),
                                   run_name=config.mlflow.run_name or None, tags=tags or {})
    params = [Param(key, value) for key, value in public_params(config).items()]
    for start in range(0, len(params), 100):
        mlflow_client.log_batch(run.info.run_id, params=params[start : start + 100],
                                tags=[RunTag("curvlt.dataset", config.dataset.name)] if start == 0 else [])
    return run.info.run_id


def experiment_runs(uri: str, experiment: str, filter_string: str, limit: int | None = None) -> list:
    """Runs of ``experiment`` that match ``filter_string``, newest first: all of them, or the newest
    ``limit``; none when the experiment does not exist. MLflow answers a search a page at a time,
    so the pages are followed: a single search would stop, silently, at its ``max_results``."""
    found = client(uri).get_experiment_by_name(experiment)
    if found is None:
        return []
    runs: list = []
    token = None
    while limit is None or len(runs) < limit:
        wanted = RUNS_PER_PAGE if limit is None else min(RUNS_PER_PAGE, limit - len(runs))
        page = client(uri).search_runs([found.experiment_id], filter_string=filter_string,
                                       order_by=["attributes.start_time DESC"], page_token=token, max_results=wanted)
        runs.extend(page)
        token = page.token
        if not token:
            break
    return runs


def experiment_names(uri: str) -> list[str]:
    """The names of (up to a page of) the store's experiments, sorted: what an error about a missing
    one can offer."""
    return sorted(found.name for found in client(uri).search_experiments(max_results=RUNS_PER_PAGE))


def find_run(uri: str, experiment: str, run_key: str):
    """The newest run of ``experiment`` tagged with ``run_key``, or None."""
    runs = experiment_runs(uri, experiment, f"tags.`{RUN_KEY_TAG}` = '{run_key}'", limit=1)
    return runs[0] if runs else None


def logged_epochs(uri: str, run_id: str) -> set[int]:
    return {metric.step for metric in client(uri).get_metric_history(run_id, EPOCH_MARKER)}


class RunLogger:
    """Logs one epoch's metrics in one batch, and only epochs the run does not have yet: after a
    restart from a checkpoint, re-run epochs are not logged twice."""

    def __init__(self, uri: str, run_id: str):
        self.run_id, self.client = run_id, client(uri)
        self.done = logged_epochs(uri, run_id)

    def log_epoch(self, epoch: int, metrics: dict[str, float]) -> bool:
        from mlflow.entities import Metric

        if epoch in self.done:
            return False
        now = int(time.time() * 1000)
        # The epoch marker goes last so that a crash mid-batch leaves the epoch "not logged".
        ordered = sorted(metrics.items(), key=lambda item: item[0] == EPOCH_MARKER)
        batch = [Metric(key, float(value), now, epoch) for key, value in ordered]
        for start in range(0, len(batch), 1000):
            self.client.log_batch(self.run_id, metrics=batch[start : start + 1000])
        self.done.add(epoch)
        return True

    def log_table(self, table: pd.DataFrame, artifact_path: str, filename: str) -> None:
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / filename
            table.to_csv(path, index=False)
            self.client.log_artifact(self.run_id, str(path), artifact_path)


def finish_run(uri: str, run_id: str, status: str, tags: dict[str, Any]) -> None:
    mlflow_client = client(uri)
    for key, value in tags.items():
        mlflow_client.set_tag(run_id, key, str(value))
    mlflow_client.set_terminated(run_id, status=status)
