"""Sweep throughput benchmark (issue "Sweeps"): quickstart trials per hour at concurrency 1 vs 2,
measured side by side in one run, and where a trial's time goes (Ray start-up, data and model
set-up, training epochs, evaluation and geometry, MLflow logging, checkpointing).

    python benchmarks/sweep.py              # 4 quickstart trials per concurrency (digits + synthetic, λ 0 / 0.5)
    python benchmarks/sweep.py --full       # the whole 12-trial quickstart per concurrency

Each concurrency runs in a fresh folder with its own local Ray and MLflow store.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml
from mlflow.tracking import MlflowClient

from _machine import describe

REPO = Path(__file__).resolve().parent.parent
PARTS = ["setup", "train", "eval", "logging", "checkpoint"]


def write_space(folder: Path, concurrency: int, full: bool) -> Path:
    space = yaml.safe_load((REPO / "search_spaces" / "quickstart.yaml").read_text())
    if not full:
        space["param_space"] = {"cr.weight": {"grid": [0.0, 0.5]}}
    space["tune"]["max_concurrent_trials"] = concurrency
    space["experiment"] = f"bench-c{concurrency}"
    path = folder / "space.yaml"
    path.write_text(yaml.safe_dump(space))
    return path


def run(concurrency: int, full: bool) -> dict:
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        space = write_space(folder, concurrency, full)
        curvlt = str(Path(sys.executable).with_name("curvlt"))
        start = time.perf_counter()
        subprocess.run([curvlt, "tune", str(space)], cwd=folder, check=True, capture_output=True,
                       env={**os.environ, "MLFLOW_TRACKING_URI": ""})
        wall = time.perf_counter() - start
        client = MlflowClient(f"sqlite:///{folder / 'mlflow.db'}")
        experiment = client.get_experiment_by_name(f"bench-c{concurrency}")
        runs = [r for r in client.search_runs([experiment.experiment_id]) if r.data.tags.get("curvlt.trial")]
        parts = {part: np.mean([r.data.metrics.get(f"time/{part}_s", np.nan) for r in runs]) for part in PARTS}
        trial = np.mean([r.data.metrics.get("time/trial_s", np.nan) for r in runs])
        return {"trials": len(runs), "wall": wall, "per_hour": len(runs) / wall * 3600, "trial": trial, **parts}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="the whole 12-trial quickstart per concurrency")
    args = parser.parse_args()
    print(describe())
    results = {c: run(c, args.full) for c in (1, 2)}
    print("\n| concurrency | trials | sweep wall (s) | trials per hour | mean trial (s) | Ray start-up + teardown (s) "
          "| setup (s) | epochs (s) | eval + geometry (s) | MLflow logging (s) | checkpoints (s) |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for concurrency, r in results.items():
        inside = sum(r[p] for p in PARTS)
        print(f"| {concurrency} | {r['trials']} | {r['wall']:.0f} | {r['per_hour']:.0f} | {r['trial']:.1f} | "
              f"{r['trial'] - inside:.1f} | " + " | ".join(f"{r[p]:.1f}" for p in PARTS) + " |")
    print(f"\nthroughput ratio, concurrency 2 / 1: {results[2]['per_hour'] / results[1]['per_hour']:.2f}x")


if __name__ == "__main__":
    main()
