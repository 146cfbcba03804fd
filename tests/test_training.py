"""End-to-end training on a real local Ray, logging to a real MLflow server (issue: training)."""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import psutil
import pytest
from mlflow.tracking import MlflowClient

from conftest import free_port
from orchestrator.errors import UserError
from orchestrator.evaluation import EPOCH_METRICS, GEOMETRY_METRICS
from orchestrator.tracking import check_reachable, check_store_exists, redact

CURVLT = shutil.which("curvlt") or str(Path(sys.executable).with_name("curvlt"))
# What every epoch reports (sweeps pick their metric from these), and what geometry epochs add.
EXPECTED_METRICS = [*EPOCH_METRICS, *(name for name in GEOMETRY_METRICS if name.startswith("geometry/"))]


def curvlt(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([CURVLT, *args], capture_output=True, text=True, cwd=cwd, timeout=600)


def only_run(server: str, experiment: str):
    client = MlflowClient(server)
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    assert len(runs) == 1
    return client, runs[0]


def artifact_paths(client: MlflowClient, run_id: str, path: str | None = None) -> list[str]:
    found = []
    for entry in client.list_artifacts(run_id, path):
        found += artifact_paths(client, run_id, entry.path) if entry.is_dir else [entry.path]
    return found


def test_two_worker_digits_run_logs_everything(mlflow_server, tmp_path):
    result = curvlt("train", "digits_lt", "--set", "train.epochs=3", "--set", "cr.weight=0.5", "--set",
                    "cr.start_epoch=0", "--set", "scaling.num_workers=2", "--set", "eval.geometry_every=1",
                    "--set", f"mlflow.tracking_uri={mlflow_server}", "--set", "mlflow.experiment=two-workers",
                    cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "epoch 3/3" in result.stdout + result.stderr and "test/acc" in result.stdout
    assert "curvlt measure --checkpoint " in result.stdout  # the summary says how to measure the model again
    client, run = only_run(mlflow_server, "two-workers")
    assert run.info.status == "FINISHED"
    for key in EXPECTED_METRICS:
        assert [m.step for m in client.get_metric_history(run.info.run_id, key)] == [0, 1, 2], key
    assert run.data.params["cr.weight"] == "0.5" and run.data.params["scaling.num_workers"] == "2"
    assert float(run.data.metrics["train/cr_loss"]) > 0
    dims = [m.value for m in client.get_metric_history(run.info.run_id, "cr/tangent_dim")]
    assert len(dims) == 3 and all(1 <= d <= 8 for d in dims), dims  # the auto dimension, in [1, k - 2]
    paths = artifact_paths(client, run.info.run_id)
    assert {"geometry/epoch_000.csv", "geometry/epoch_001.csv", "geometry/epoch_002.csv",
            "plots/accuracy_vs_curvature.png", "plots/correlations_over_epochs.png"} <= set(paths)
    assert Path(run.data.tags["curvlt.checkpoint"]).is_dir()
    _measure_checkpoint_again(client, run, tmp_path)


def _measure_checkpoint_again(client: MlflowClient, run, tmp_path: Path) -> None:
    """``curvlt measure --checkpoint`` rebuilds the run's data and model (no Ray) and measures what
    its last geometry epoch measured: the same per-class table and metrics as logged."""
    table, features = tmp_path / "again.csv", tmp_path / "features.npz"
    result = curvlt("measure", "--checkpoint", run.data.tags["curvlt.checkpoint"], "--out", str(table),
                    "--save-features", str(features), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "after epoch 3/3; train features" in result.stdout
    logged = pd.read_csv(client.download_artifacts(run.info.run_id, "geometry/epoch_002.csv", str(tmp_path)))
    again = pd.read_csv(table)
    assert again["label"].tolist() == logged["label"].tolist() and (again["count"] == logged["train_count"]).all()
    assert np.allclose(again["test_accuracy"], logged["accuracy"])
    for column in ("volume", "separation", "mean_angle", "mean_kappa", "tangent_dim"):
        assert np.allclose(again[column], logged[f"train_{column}"], rtol=1e-4, atol=1e-6), column
    printed = dict(line.split() for line in result.stdout.splitlines() if line.startswith("  geometry/"))
    assert set(printed) == {name for name in run.data.metrics if name.startswith("geometry/")}
    for name, value in printed.items():
        assert float(value) == pytest.approx(run.data.metrics[name], rel=1e-3, abs=1e-4), name
    with np.load(features) as saved:  # what was measured, as a file `curvlt measure` reads
        assert saved["features"].shape[0] == again["count"].sum()
        assert saved["labels"].shape == saved["features"].shape[:1]


def test_stopped_run_continues_with_resume_from_another_directory(tmp_path):
    """SIGTERM (a preempted job) and then Ctrl-C end the run KILLED; ``--resume`` continues it from its
    checkpoint in the same MLflow run, found from another directory through the run's storage tag:
    first as the newest unfinished run with this config, then by its id. The worker reads its
    batches through a loader process, as GPU workers do by default."""
    epochs, started, elsewhere = 8, tmp_path / "started", tmp_path / "elsewhere"
    started.mkdir(), elsewhere.mkdir()
    store = f"sqlite:///{started / 'mlflow.db'}"
    args = [CURVLT, "train", "digits_lt", "--set", f"train.epochs={epochs}", "--set", "train.batch_size=8",
            "--set", "cr.weight=0.2", "--set", "cr.start_epoch=0", "--set", "checkpoint.every=1",
            "--set", "scaling.loader_workers=1", "--set", f"mlflow.tracking_uri={store}"]
    client = MlflowClient(store)
    output, status = _stop_after_epoch(args, started, 2, signal.SIGTERM)
    assert status == 130 and "curvlt: interrupted" in output, output[-3000:]
    _, run = only_run(store, "curvlt-digits")
    assert run.info.status == "KILLED", output[-3000:]
    assert f"--resume {run.info.run_id}" in output
    assert 2 <= len(client.get_metric_history(run.info.run_id, "test/acc")) < epochs

    output, status = _stop_after_epoch(args + ["--resume"], elsewhere, 5, signal.SIGINT)  # Ctrl-C
    assert status == 130, output[-3000:]
    assert int(re.search(rf"resuming after epoch (\d+)/{epochs}", output).group(1)) >= 1, output[-3000:]
    assert client.get_run(run.info.run_id).info.status == "KILLED", output[-3000:]

    resumed = subprocess.run(args + ["--resume", run.info.run_id], cwd=elsewhere, capture_output=True, text=True,
                             timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert int(re.search(rf"resuming after epoch (\d+)/{epochs}", resumed.stdout + resumed.stderr).group(1)) >= 4
    _, run = only_run(store, "curvlt-digits")
    assert run.info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "test/acc")]
    assert sorted(steps) == list(range(epochs)), steps  # every epoch once
    again = subprocess.run(args + ["--resume"], cwd=elsewhere, capture_output=True, text=True, timeout=120)
    assert again.returncode == 2 and "no unfinished run of experiment 'curvlt-digits'" in again.stderr


def _stop_after_epoch(args: list[str], cwd: Path, epoch: int, stop: signal.Signals) -> tuple[str, int]:
    """Run ``args`` until it prints that it finished ``epoch``, send it ``stop``; its output and exit status."""
    process = subprocess.Popen(args, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = []
    for line in process.stdout:
        output.append(line)
        if f"epoch {epoch}/" in line and "loss" in line:
            process.send_signal(stop)
    process.wait(timeout=120)
    return "".join(output), process.returncode


def test_unreachable_tracking_server_stops_before_training(tmp_path):
    start = time.time()
    result = curvlt("train", "digits_lt", "--set", f"mlflow.tracking_uri=http://user:secret@127.0.0.1:{free_port()}",
                    cwd=tmp_path)
    assert result.returncode == 2
    assert "cannot reach the MLflow server" in result.stderr and "secret" not in result.stderr
    assert "epoch" not in result.stdout and time.time() - start < 60


@pytest.mark.parametrize("uri,message", [
    ("foo://x", "mlflow.tracking_uri: MLflow cannot use foo://x (Model registry functionality is unavailable; "
                "got unsupported URI 'foo://x'"),
    ("{tmp}/mlruns", "mlflow.tracking_uri: MLflow cannot use {tmp}/mlruns (The filesystem tracking backend"),
    ("sqlite:///{tmp}/a-file/db/mlflow.db", "mlflow.tracking_uri: cannot make the folder {tmp}/a-file/db of "
                                            "sqlite:///{tmp}/a-file/db/mlflow.db (a file is in the way)"),
])
def test_a_tracking_uri_mlflow_refuses_is_one_line(tmp_path, uri, message):
    """MLflow's own refusals (40-odd lines of traceback each) as one line, before Ray starts."""
    (tmp_path / "a-file").touch()
    with pytest.raises(UserError) as info:
        check_reachable(uri.format(tmp=tmp_path))
    assert str(info.value).startswith(message.format(tmp=tmp_path)) and "\n" not in str(info.value)


def test_compare_names_its_own_option_for_a_store_it_cannot_use():
    """``curvlt compare --tracking-uri``: MLflow's client retried a server that does not answer for
    minutes."""
    with pytest.raises(UserError, match=r"^--tracking-uri: cannot reach the MLflow server at http://127.0.0.1:"):
        check_store_exists(f"http://127.0.0.1:{free_port()}")


def test_redact_hides_credentials():
    assert redact("https://alice:tok123@host:5000/x?token=abc&x=1") == "https://***@host:5000/x?token=***&x=1"


def _train_workers(root: psutil.Process) -> list[psutil.Process]:
    workers = []
    for child in root.children(recursive=True):
        try:
            command = child.cmdline()  # read once: a process that is exiting may answer [] the next time
        except psutil.Error:  # gone, or a zombie
            continue
        if command and command[0].startswith("ray::RayTrainWorker"):
            workers.append(child)
    return workers


def _history(client: MlflowClient, run_id: str, key: str) -> list[float]:
    return [m.value for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)]


def test_killed_worker_resumes_from_checkpoint_and_logs_each_epoch_once(mlflow_server, tmp_path):
    epochs = 8
    args = [CURVLT, "train", "digits_lt", "--set", f"train.epochs={epochs}", "--set", "train.batch_size=8",
            "--set", "cr.weight=0.2", "--set", "cr.start_epoch=0", "--set", "checkpoint.every=1",
            "--set", "eval.geometry_every=2", "--set", f"mlflow.tracking_uri={mlflow_server}"]
    process = subprocess.Popen(args + ["--set", "mlflow.experiment=kill-resume"],
                               cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    root = psutil.Process(process.pid)
    client = MlflowClient(mlflow_server)
    killed = None
    deadline = time.time() + 300
    while killed is None and time.time() < deadline and process.poll() is None:
        experiment = client.get_experiment_by_name("kill-resume")
        runs = client.search_runs([experiment.experiment_id]) if experiment else []
        done = len(client.get_metric_history(runs[0].info.run_id, "test/acc")) if runs else 0
        workers = _train_workers(root)
        if done >= 2 and workers:
            killed = workers[0].pid
            workers[0].kill()  # SIGKILL: the worker dies mid-epoch, no chance to clean up
        time.sleep(0.2)
    output, _ = process.communicate(timeout=600)
    assert killed is not None, "the run ended before a worker could be killed:\n" + output[-3000:]
    assert process.returncode == 0, output[-3000:]
    _, run = only_run(mlflow_server, "kill-resume")
    assert run.info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "test/acc")]
    assert sorted(steps) == list(range(epochs)), steps  # every epoch once: none lost, none repeated
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")] == steps

    # The same run, never interrupted: the resumed epochs trained on the same batches and draws. Not
    # to the bit: after the restart CR measures afresh the classes whose curvature it had kept, which
    # can differ in the last float32 bit (other batches give losses that differ by percents). It
    # also prints a progress line at each step (not a computed setting: the run is the same).
    reference = subprocess.run(args + ["--set", "mlflow.experiment=no-kill", "--set", "train.progress_every_s=0.001"],
                               cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert reference.returncode == 0, reference.stderr[-3000:]
    lines = re.findall(rf"epoch {epochs}/{epochs}  step (\d+)/(\d+)  loss \d+\.\d{{4}}  \d+\.\d steps/s",
                       reference.stdout + reference.stderr)
    assert len(lines) >= 2 and int(lines[-1][0]) > int(lines[0][0]), (reference.stdout + reference.stderr)[-3000:]
    _, uninterrupted = only_run(mlflow_server, "no-kill")
    for key, tolerance in (("train/loss", {"rel": 1e-4}), ("train/cr_loss", {"rel": 1e-4}),
                           ("test/acc", {"abs": 1.5 / 500})):  # one of digits' 500 test images
        expected = _history(client, uninterrupted.info.run_id, key)
        assert _history(client, run.info.run_id, key) == pytest.approx(expected, **tolerance), key
