"""The local Ray instance curvlt starts listens on the loopback interface only (issue: sweeps,
safety)."""

from __future__ import annotations

import json
import subprocess
import sys

PROBE = """
import json, time, psutil
from orchestrator.ray_env import ensure_ray
ensure_ray()
import ray
ray.get(ray.remote(lambda: 1).remote())  # a worker process is up too
me = psutil.Process()
pids = {me.pid, *(child.pid for child in me.children(recursive=True))}
listening = [c.laddr.ip for c in psutil.net_connections(kind="inet")
             if c.status == psutil.CONN_LISTEN and c.pid in pids]
print(json.dumps(listening))
"""


def test_local_ray_listens_on_loopback_only():
    result = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    addresses = json.loads(result.stdout.strip().splitlines()[-1])
    assert len(addresses) >= 3, addresses  # GCS, raylet and workers at least
    assert set(addresses) <= {"127.0.0.1", "::ffff:127.0.0.1", "::1"}, addresses
