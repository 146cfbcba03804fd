"""Sweeps on a real local Ray + Tune, compared from MLflow; resume after Ctrl-C; and submission
to a Ray head started by the test through the Ray Jobs API (issue: sweeps)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from contextlib import closing
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from conftest import free_port
from orchestrator.cli import build_parser
from orchestrator.errors import UserError

CURVLT = shutil.which("curvlt") or str(Path(sys.executable).with_name("curvlt"))
SPACES = Path(__file__).parent / "spaces"
GROUP_KEYS = {"dataset", "loss", "cr_weight", "n_runs", "acc_mean", "acc_std", "acc_many_mean", "acc_medium_mean",
              "acc_few_mean", "curvature_mean", "curvature_imbalance_mean", "corr_acc_curvature_mean",
              "delta_acc_vs_no_cr"}


def curvlt(*args: str, cwd: Path, env: dict | None = None, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run([CURVLT, *args], capture_output=True, text=True, cwd=cwd, timeout=timeout,
                          env={**os.environ, **(env or {})})


def sweep_runs(db: Path, experiment: str) -> list:
    client = MlflowClient(f"sqlite:///{db}")
    found = client.get_experiment_by_name(experiment)
    return [run for run in client.search_runs([found.experiment_id]) if run.data.tags.get("curvlt.trial")]


def finished_trial_runs(db: Path) -> int:
    """FINISHED trial runs in a store that a running sweep may still be creating, read with SQLite
    alone (read-only): an MLflow client opening it then would set up MLflow's tables a second
    time, concurrently, and can break the sweep's own set-up."""
    try:
        with closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as store:
            return store.execute("SELECT COUNT(*) FROM runs JOIN tags ON tags.run_uuid = runs.run_uuid "
                                 "WHERE runs.status = 'FINISHED' AND tags.key = 'curvlt.trial'").fetchone()[0]
    except sqlite3.Error:  # no file yet, or its tables are not there yet
        return 0


def test_sweep_of_trials_that_need_every_cpu_then_compare_json(tmp_path):
    """The tiny sweep with a worker that asks for all of this machine's CPUs, and no concurrency
    limit given: each trial must find every CPU free (the trial itself holds none; with a 0.01-CPU
    token the worker never started) and curvlt, not Tune, must run them one at a time (Tune alone
    started both, and the second's workers timed out waiting). Its runs are then compared."""
    from ray._private.utils import get_num_cpus  # the CPU count Ray gives the node it starts here

    space = yaml.safe_load((SPACES / "tiny.yaml").read_text())
    space["tune"] = {"metric": "test/acc", "mode": "max", "resources_per_trial": {"cpu": get_num_cpus()}}
    (tmp_path / "whole_node.yaml").write_text(yaml.safe_dump(space))
    result = curvlt("tune", str(tmp_path / "whole_node.yaml"), "--set", "mlflow.experiment=X", cwd=tmp_path,
                    timeout=300)  # 83 s on 2 cores; with the old token it hung
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "up to 1 trial(s) at a time" in result.stdout
    assert "delta_acc_vs_no_cr" in result.stdout  # the comparison table ends the sweep
    runs = sweep_runs(tmp_path / "mlflow.db", "X")
    assert len(runs) == 2 and all(run.info.status == "FINISHED" for run in runs)
    assert len({run.data.tags["curvlt.trial"] for run in runs}) == 2
    compared = curvlt("compare", "--experiment", "X", "--format", "json", cwd=tmp_path)
    assert compared.returncode == 0, compared.stderr
    groups = json.loads(compared.stdout)
    assert [g["cr_weight"] for g in groups] == [0.0, 0.5] and {g["train.lr"] for g in groups} == {0.1}
    assert all(GROUP_KEYS <= set(g) for g in groups)
    assert groups[0]["delta_acc_vs_no_cr"] == 0.0 and groups[0]["n_runs"] == 1
    assert (tmp_path / "curvlt_compare" / "X" / "accuracy_vs_weight.png").is_file()


def test_asha_stops_trials_early_and_releases_their_workers(tmp_path):
    # Two CPUs, two concurrent one-CPU trials: had a stopped trial kept its Ray Train workers, the
    # later trials could never start (WorkerGroupStartupTimeoutError) and the sweep would fail.
    result = curvlt("tune", str(SPACES / "asha.yaml"), cwd=tmp_path, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "4 TERMINATED" in result.stdout
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    epochs: dict[str, list[int]] = {}
    for run in sweep_runs(tmp_path / "mlflow.db", "asha-sweep"):
        epochs.setdefault(run.info.status, []).append(len(client.get_metric_history(run.info.run_id, "test/acc")))
    assert set(epochs) == {"FINISHED", "KILLED"}, epochs  # stopped trials end KILLED, not FAILED
    assert sum(map(len, epochs.values())) == 4
    # A trial's run trains ahead of Tune's decisions (a digits epoch takes under a second), so one
    # stopped at the rung after epoch 4 may already have logged all 6; one stopped at epoch 1 has not.
    assert all(n == 6 for n in epochs["FINISHED"]) and min(epochs["KILLED"]) < 6, epochs


def test_interrupted_sweep_resumes_remaining_trials(tmp_path):
    process = subprocess.Popen([CURVLT, "tune", str(SPACES / "three.yaml")], cwd=tmp_path, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    db = tmp_path / "mlflow.db"
    deadline = time.time() + 400
    while time.time() < deadline and process.poll() is None and not finished_trial_runs(db):
        time.sleep(1)
    assert process.poll() is None, "the sweep ended before it could be interrupted:\n" + process.stdout.read()[-3000:]
    process.send_signal(signal.SIGTERM)  # a preempted driver: curvlt makes it do what Ctrl-C does
    output, _ = process.communicate(timeout=300)
    assert process.returncode == 130, output[-3000:]  # through Tune's graceful stop, not Ray's sys.exit
    assert "sweep interrupted after" in output and "three.yaml --resume" in output, output[-3000:]
    unfinished = [run for run in sweep_runs(db, "resume-sweep") if run.info.status != "FINISHED"]
    assert all(run.info.status == "KILLED" for run in unfinished), [run.info.status for run in unfinished]
    finished_before = [run for run in sweep_runs(db, "resume-sweep") if run.info.status == "FINISHED"]
    assert 1 <= len(finished_before) < 3, output[-3000:]
    # The trial the signal stopped is not counted as ended (it was, as Tune marks it TERMINATED); one
    # whose run finished just before the signal may not be either, if Tune had not taken its result.
    ended = int(output.split("sweep interrupted after ")[1].split(" of 3 trials")[0])
    assert len(finished_before) - 1 <= ended <= len(finished_before), output[-3000:]

    resumed = curvlt("tune", str(SPACES / "three.yaml"), "--resume", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    runs = sweep_runs(db, "resume-sweep")
    trials = [run.data.tags["curvlt.trial"] for run in runs]
    assert len(runs) == 3 and len(set(trials)) == 3, trials  # exactly one run per trial
    assert all(run.info.status == "FINISHED" for run in runs)
    assert {run.info.run_id for run in finished_before} <= {run.info.run_id for run in runs}
    for run in unfinished:  # an interrupted trial continued in its own run
        assert run.info.run_id in {r.info.run_id for r in runs}


def test_resume_without_an_earlier_sweep_is_a_clear_error(tmp_path):
    result = curvlt("tune", str(SPACES / "tiny.yaml"), "--resume", cwd=tmp_path)
    assert result.returncode == 2 and "no earlier sweep" in result.stderr


def test_compare_in_a_folder_without_a_store_says_so_and_makes_none(tmp_path):
    result = curvlt("compare", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        f"curvlt: error: --tracking-uri: no MLflow store at {tmp_path.resolve() / 'mlflow.db'}; run this where the "
        "runs' mlflow.db is, or pass --tracking-uri (or set MLFLOW_TRACKING_URI)")
    assert not (tmp_path / "mlflow.db").exists()


@pytest.fixture
def ray_head(tmp_path):
    """A Ray head on 127.0.0.1 with the Jobs API, run in the foreground (--block) in its own process
    group so that the test stops exactly the processes it started (not other Ray instances)."""
    import urllib.error
    import urllib.request

    import secrets

    port, dashboard = free_port(), free_port()
    ray = str(Path(sys.executable).with_name("ray"))
    auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16)}  # shared with the client
    loopback = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}  # else Ray binds the machine's external address
    # On SIGTERM, stop at once: a node that has run a job waited the whole 30 s default to drain.
    no_drain = {"RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}
    log = open(tmp_path / "ray-head.log", "w")
    head = subprocess.Popen([ray, "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={port}",
                             "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", "--include-dashboard=true",
                             "--num-cpus=2", "--disable-usage-stats"], stdout=log, stderr=subprocess.STDOUT,
                            cwd=tmp_path, start_new_session=True,
                            env={**os.environ, **auth, **loopback, **no_drain,  # as from an activated environment:
                                 "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"})
    address = f"http://127.0.0.1:{dashboard}"
    deadline = time.time() + 180
    while True:
        try:
            with urllib.request.urlopen(address + "/api/version", timeout=2):
                break
        except urllib.error.HTTPError:  # it answers (e.g. 401 before authentication): it is up
            break
        except OSError:
            if head.poll() is not None or time.time() > deadline:
                os.killpg(head.pid, signal.SIGKILL)
                pytest.fail(f"ray head did not start: {(tmp_path / 'ray-head.log').read_text()[-2000:]}")
            time.sleep(1)
    yield address, auth
    # `ray start` alone, which stops its processes: signalled with them, it found its GCS gone and
    # waited 30 s for it.
    head.terminate()
    try:
        head.wait(timeout=60)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(head.pid, signal.SIGKILL)  # whatever did not stop with it
    except ProcessLookupError:
        pass
    log.close()


def test_submitted_sweep_finishes_and_lands_in_mlflow(ray_head, tmp_path):
    ray_head, auth = ray_head
    db = tmp_path / "mlflow.db"
    result = curvlt("submit", "--address", ray_head, "--env", f"MLFLOW_TRACKING_URI=sqlite:///{db}", "--wait", "--",
                    "curvlt", "tune", str(SPACES / "tiny.yaml"),
                    "--set", f"checkpoint.storage_path={tmp_path / 'runs'}", cwd=tmp_path, env=auth)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert auth["RAY_AUTH_TOKEN"] not in result.stdout + result.stderr
    assert "submitted job" in result.stdout and "SUCCEEDED" in result.stdout
    runs = sweep_runs(db, "tiny-sweep")
    assert len(runs) == 2 and all(run.info.status == "FINISHED" for run in runs)
    job_id = result.stdout.split("submitted job ")[1].split()[0]
    assert "SUCCEEDED" in curvlt("submit", "--address", ray_head, "--status", job_id, cwd=tmp_path, env=auth).stdout


@pytest.mark.parametrize("arguments,message", [
    (["--working-dir", "{tmp}/nope", "--", "curvlt", "train", "digits_lt"], "--working-dir {tmp}/nope: no such folder"),
    (["--env", "FOO", "--", "curvlt", "train", "digits_lt"], "--env FOO: expected KEY=VALUE"),
    ([], "submit: give the command to run after --"),
    (["--follow", "--", "curvlt", "train", "digits_lt"], "--follow: only with --logs JOB_ID"),
    (["--status", "raysubmit_1", "--wait"], "submit: --status, --logs and --stop take no command and no --wait"),
])
def test_a_bad_submission_stops_before_the_cluster_is_contacted(tmp_path, arguments, message):
    """At an address where nothing answers: the argument's own message, not the address's."""
    args = build_parser().parse_args(["submit", "--address", f"http://127.0.0.1:{free_port()}",
                                      *(argument.format(tmp=tmp_path) for argument in arguments)])
    with pytest.raises(UserError) as info:
        args.run(args)
    assert str(info.value).startswith(message.format(tmp=tmp_path))


def test_a_cluster_address_where_nothing_answers_is_one_line_at_once():
    """A GCS ``host:port`` (not the dashboard's http:// address): Ray waited 45 s on it."""
    address = f"127.0.0.1:{free_port()}"
    args = build_parser().parse_args(["submit", "--address", address, "--", "curvlt", "train", "digits_lt"])
    start = time.time()
    with pytest.raises(UserError, match=f"--address {address}: no Ray cluster answers there"):
        args.run(args)
    assert time.time() - start < 15
