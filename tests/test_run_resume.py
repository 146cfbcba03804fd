"""Which run ``curvlt train --resume`` continues, on a real MLflow SQLite store (issue: training)."""

from __future__ import annotations

import pytest

from orchestrator.config import load_config
from orchestrator.errors import UserError
from orchestrator.run_resume import LATEST, config_differences, run_to_resume
from orchestrator.tracking import RUN_KEY_TAG, finish_run, public_params, start_run


@pytest.fixture
def store(tmp_path) -> str:
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


def test_only_what_a_run_trains_must_match():
    config = load_config("digits_lt")
    params = public_params(config)
    assert config_differences(params, config) == []
    moved = load_config("digits_lt", ["scaling.num_workers=2", "checkpoint.every=3", "train.progress_every_s=5",
                                      "mlflow.experiment=elsewhere"])
    assert config_differences(params, moved) == []
    other = load_config("digits_lt", ["train.lr=0.3"])
    assert config_differences(params, other) == [f"train.lr: {params['train.lr']} in the run, 0.3 here"]


def test_latest_is_the_newest_unfinished_run_with_this_config(store):
    config = load_config("digits_lt")
    finished, older, newer = (start_run(store, config) for _ in range(3))
    finish_run(store, finished, "FINISHED", {})
    finish_run(store, older, "KILLED", {})
    start_run(store, load_config("digits_lt", ["train.lr=0.3"]))  # unfinished, another config
    start_run(store, config, {RUN_KEY_TAG: "sweep/trial"})  # unfinished sweep trial: its sweep resumes it
    assert run_to_resume(store, config, LATEST).info.run_id == newer
    assert run_to_resume(store, config, older).info.run_id == older


def test_resume_refusals_name_the_reason(store):
    config = load_config("digits_lt")
    with pytest.raises(UserError, match="no unfinished run of experiment 'curvlt-digits' with this config$"):
        run_to_resume(store, config, LATEST)
    done = start_run(store, config)
    finish_run(store, done, "FINISHED", {})
    with pytest.raises(UserError, match=f"run {done} already finished"):
        run_to_resume(store, config, done)
    killed = start_run(store, config)
    finish_run(store, killed, "KILLED", {})
    with pytest.raises(UserError, match=r"another config: train\.lr: .* in the run, 0\.3 here$"):
        run_to_resume(store, load_config("digits_lt", ["train.lr=0.3"]), killed)
    with pytest.raises(UserError, match=r"with this config \(1 with another config; pass one's id"):
        run_to_resume(store, load_config("digits_lt", ["train.lr=0.3"]), LATEST)
    trial = start_run(store, config, {RUN_KEY_TAG: "sweep/trial"})
    with pytest.raises(UserError, match="is a sweep trial; resume its sweep"):
        run_to_resume(store, config, trial)
    with pytest.raises(UserError, match="no run 'nope' in the tracking store"):
        run_to_resume(store, config, "nope")
