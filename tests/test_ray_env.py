"""The local Ray instance curvlt starts listens on the loopback interface only (issue: sweeps,
safety), and its processes poll Ray Train workers often enough for short epochs (issue: training);
a ``RAY_ADDRESS`` where no cluster answers is one line (bad input)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from conftest import free_port

from orchestrator.ray_env import LOCAL_TRAIN_POLL_S, TRAIN_POLL_ENV
from test_training import CURVLT

PROBE = """
import json, os, time, psutil
from orchestrator.ray_env import TRAIN_POLL_ENV, ensure_ray
ensure_ray()
import ray
poll = ray.get(ray.remote(lambda: os.environ.get(TRAIN_POLL_ENV)).remote())  # a worker process is up too
me = psutil.Process()
pids = {me.pid, *(child.pid for child in me.children(recursive=True))}
listening = [c.laddr.ip for c in psutil.net_connections(kind="inet")
             if c.status == psutil.CONN_LISTEN and c.pid in pids]
print(json.dumps({"listening": listening, "poll": poll}))
"""


def test_local_ray_listens_on_loopback_only_and_polls_reports_often():
    env = {name: value for name, value in os.environ.items() if name != TRAIN_POLL_ENV}
    result = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    probe = json.loads(result.stdout.strip().splitlines()[-1])
    addresses = probe["listening"]
    assert len(addresses) >= 3, addresses  # GCS, raylet and workers at least
    assert set(addresses) <= {"127.0.0.1", "::ffff:127.0.0.1", "::1"}, addresses
    assert probe["poll"] == LOCAL_TRAIN_POLL_S  # what Ray Train's controller, a Ray actor, reads


def test_an_address_where_no_cluster_answers_is_one_line(tmp_path):
    """Ray alone retried it for minutes, with a warning every few seconds."""
    address = f"127.0.0.1:{free_port()}"
    start = time.time()
    result = subprocess.run([CURVLT, "train", "digits_lt"], capture_output=True, text=True, timeout=300, cwd=tmp_path,
                            env={**os.environ, "RAY_ADDRESS": address})
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip().splitlines() == [f"curvlt: error: RAY_ADDRESS={address}: no Ray cluster answers there "
                                                  "(Connection refused); start one (ray start --head) or correct the "
                                                  "address"]
    assert time.time() - start < 60
