"""A run that cannot start stops in the driver with one line, before any MLflow run or Ray Train
worker exists: workers the cluster cannot hold, a dataset not found or not downloadable, and on a
joined cluster a worker's own ``UserError`` (issue: training, "bad input gets a clear one-line
error")."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from torchvision.datasets import CIFAR10, FashionMNIST

from conftest import free_port
from orchestrator.config import DatasetConfig, check_feature_dim, load_config
from orchestrator.data import datasets
from orchestrator.errors import UserError
from orchestrator.preflight import workers_that_fit
from test_training import curvlt

ROOT = Path(__file__).resolve().parents[1]


def test_workers_that_fit_counts_whole_workers_per_node():
    assert workers_that_fit([{"CPU": 2.0}], {"CPU": 4.0}) == 0
    assert workers_that_fit([{"CPU": 2.0}], {"CPU": 1.0}) == 2
    assert workers_that_fit([{"CPU": 3.0}, {"CPU": 3.0}], {"CPU": 2.0}) == 2  # a worker lies on one node
    assert workers_that_fit([{"CPU": 16.0, "GPU": 1.0}], {"CPU": 4.0, "GPU": 1.0}) == 1
    assert workers_that_fit([{"CPU": 16.0, "GPU": 1.0}], {"CPU": 1.0, "GPU": 0.25}) == 4
    assert workers_that_fit([{"CPU": 16.0}], {"CPU": 1.0, "GPU": 1.0}) == 0
    assert workers_that_fit([{"CPU": 0.3}], {"CPU": 0.1}) == 3  # Ray's resource units are 1e-4


def runs_in(store: Path) -> int:
    if not store.exists():
        return 0
    client = MlflowClient(f"sqlite:///{store}")
    return sum(len(client.search_runs([experiment.experiment_id])) for experiment in client.search_experiments())


def test_workers_the_machine_cannot_hold_stop_at_once(tmp_path):
    """The bundled GPU config, with more workers than any test machine has: before this check Ray
    Train waited 60 s for the workers, printed its traceback and retried."""
    store = tmp_path / "mlflow.db"
    start = time.time()
    result = curvlt("train", "cifar10_lt", "--set", "scaling.num_workers=4096", "--set",
                    f"mlflow.tracking_uri=sqlite:///{store}", cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("curvlt: error: scaling: 4096 worker(s) of 4 CPU and 1 GPU each do not fit this Ray cluster")
    assert last.endswith("or set scaling.use_gpu=false")
    assert runs_in(store) == 0 and time.time() - start < 50


def test_missing_dataset_stops_in_the_driver(tmp_path):
    store = tmp_path / "mlflow.db"
    result = curvlt("train", "cifar10_lt", "--set", f"dataset.root={tmp_path / 'no-data'}", "--set",
                    "dataset.download=false", "--set", "scaling.use_gpu=false", "--set", "scaling.cpus_per_worker=1",
                    "--set", f"mlflow.tracking_uri=sqlite:///{store}", cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1].startswith("curvlt: error: dataset cifar10_lt: not found under")
    assert "Traceback" not in result.stderr and "RayTrainWorker" not in result.stderr  # no worker started
    assert runs_in(store) == 0


def test_tangent_dims_are_checked_against_the_models_feature_dim():
    config = load_config("digits_lt", ["cr.k=70", "eval.geometry_k=70", "cr.tangent_dim=64"])
    check_feature_dim(config, 64)  # equal is allowed; eval.geometry_tangent_dim is "auto"
    with pytest.raises(UserError, match=r"^cr.tangent_dim: must be 'auto' or at most model mlp's feature "
                                        r"dimension 63, got 64$"):
        check_feature_dim(config, 63)
    config = load_config("digits_lt", ["eval.geometry_k=70", "eval.geometry_tangent_dim=65"])
    with pytest.raises(UserError, match=r"^eval.geometry_tangent_dim: .* feature dimension 64, got 65$"):
        check_feature_dim(config, 64)


def test_a_tangent_dim_above_the_feature_dim_stops_in_the_driver(tmp_path):
    """Before this check the evaluation's dimension failed at the first geometry epoch, after
    training, and CR's in every worker, with a traceback each and a retry per
    ``checkpoint.max_failures``."""
    store = tmp_path / "mlflow.db"
    result = curvlt("train", "digits_lt", "--set", "eval.geometry_k=70", "--set", "eval.geometry_tangent_dim=65",
                    "--set", f"mlflow.tracking_uri=sqlite:///{store}", cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1] == ("curvlt: error: eval.geometry_tangent_dim: must be 'auto' or "
                                                      "at most model mlp's feature dimension 64, got 65")
    assert "Traceback" not in result.stderr and "RayTrainWorker" not in result.stderr
    assert runs_in(store) == 0


def test_failed_downloads_are_one_line(tmp_path, monkeypatch):
    """No network (here: a closed port on 127.0.0.1) gives one line naming the dataset and folder,
    for CIFAR and for Fashion-MNIST without the Debian package's files."""
    closed = f"http://127.0.0.1:{free_port()}/"
    monkeypatch.setattr(CIFAR10, "url", closed + "cifar-10-python.tar.gz")
    with pytest.raises(UserError, match=r"dataset cifar10_lt: could not download it to .*check the network"):
        datasets.build_dataset(DatasetConfig(name="cifar10_lt", root=str(tmp_path), download=True), 0)
    monkeypatch.setattr(datasets, "FASHION_MNIST_DEBIAN_DIR", tmp_path / "not-installed")
    monkeypatch.setattr(FashionMNIST, "mirrors", [closed])
    with pytest.raises(UserError, match=r"dataset fashion_mnist_lt: could not download it to "):
        datasets.build_dataset(DatasetConfig(name="fashion_mnist_lt", root=str(tmp_path), download=True), 0)


JOINED_DRIVER = """
from orchestrator import ray_env, trainer
from orchestrator.config import load_config
from orchestrator.errors import UserError
config = load_config("cifar10_lt", {overrides!r})
ray_env.ensure_ray()
ray_env._started_here = False  # as a driver that joined a cluster, whose machine may not hold the data
try:
    trainer.train(config, data_checked={data_checked})
except UserError as error:
    print("UserError:", error)
"""


@pytest.mark.parametrize("data_checked", [False, True])
def test_a_joined_clusters_missing_data_is_one_line(tmp_path, data_checked):
    """On a joined cluster the driver does not load the data itself (its machine may not hold it):
    a Ray task on each node that can hold a worker does, and the first node's ``UserError`` stops
    the run before it exists. A node added later (``data_checked``: as if all nodes had passed)
    has the worker that cannot find the data fail, and its ``UserError`` is what the driver raises.
    The driver runs in its own process, as ``curvlt train`` does: with the run inside the test
    process, a later test hung in one CI run, waiting on Ray's key-value store."""
    store = tmp_path / "mlflow.db"
    overrides = [f"dataset.root={tmp_path / 'no-data'}", "dataset.download=false", "scaling.use_gpu=false",
                 "scaling.cpus_per_worker=1", "checkpoint.max_failures=0",
                 f"checkpoint.storage_path={tmp_path / 'runs'}", f"mlflow.tracking_uri=sqlite:///{store}"]
    run = subprocess.run([sys.executable, "-c", JOINED_DRIVER.format(overrides=overrides, data_checked=data_checked)],
                         capture_output=True, text=True, timeout=300, cwd=tmp_path,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert run.returncode == 0, run.stderr[-3000:]
    last = run.stdout.strip().splitlines()[-1]
    assert last.startswith("UserError: dataset cifar10_lt: not found under")
    if not data_checked:
        assert last.endswith("(on node 127.0.0.1)") and runs_in(store) == 0


def test_a_sweep_with_missing_data_stops_before_its_trials(tmp_path):
    """Checked once by the sweep's driver: each trial's workers would fail, be restarted
    ``checkpoint.max_failures`` times, and Tune would retry the trial."""
    space = tmp_path / "space.yaml"
    space.write_text("base: cifar10_lt\nexperiment: missing\nparam_space:\n  cr.weight: {grid: [0.0, 0.5]}\n")
    store = tmp_path / "mlflow.db"
    overrides = [f"dataset.root={tmp_path / 'no-data'}", "dataset.download=false", "scaling.use_gpu=false",
                 "scaling.cpus_per_worker=1", f"mlflow.tracking_uri=sqlite:///{store}"]
    result = curvlt("tune", str(space), *(arg for value in overrides for arg in ("--set", value)), cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1].startswith("curvlt: error: dataset cifar10_lt: not found under")
    assert runs_in(store) == 0
