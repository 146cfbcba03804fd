"""Which run ``curvlt train --resume`` continues, on a real MLflow SQLite store (issue: training)."""

from __future__ import annotations

import time

import pytest

from orchestrator.config import load_config
from orchestrator.errors import UserError
from orchestrator.run_heartbeat import HEARTBEAT_TAG, STALE_AFTER_S, Heartbeat
from orchestrator.run_resume import LATEST, config_differences, run_to_resume
from orchestrator.tracking import RUN_KEY_TAG, client, finish_run, public_params, start_run


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


def test_the_logged_head_is_the_one_built():
    """``model.head`` is logged resolved, so a run's params say which classifier it trained; an LDAM
    run from before the key existed trained the linear head, so it is not this config's run."""
    ldam = load_config("digits_lt", ["loss.name=ldam"])
    params = public_params(ldam)
    assert params["model.head"] == "cosine"
    assert public_params(load_config("digits_lt"))["model.head"] == "linear"
    del params["model.head"]
    assert config_differences(params, ldam) == ["model.head: not recorded in the run, cosine here"]


def test_a_key_the_run_predates_must_be_at_its_default():
    """A run logged before a key existed (here: its params lack the key) trained with the key's
    default behaviour: resuming it at the default is the same run; at another value it is not."""
    config = load_config("digits_lt")
    params = public_params(config)
    del params["eval.geometry_tangent_dim"]
    assert config_differences(params, config) == []
    other = load_config("digits_lt", ["eval.geometry_tangent_dim=2"])
    assert config_differences(params, other) == ["eval.geometry_tangent_dim: not recorded in the run, 2 here"]


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


def test_a_run_whose_driver_still_beats_is_not_resumed(store):
    """A RUNNING run stamped within STALE_AFTER_S is refused (by id, and skipped by --resume alone);
    an older stamp, or none (a run from before heartbeats), means its driver is gone."""
    config = load_config("digits_lt")
    alive, gone = start_run(store, config), start_run(store, config)
    client(store).set_tag(gone, HEARTBEAT_TAG, f"{time.time() - STALE_AFTER_S - 5:.3f}")
    client(store).set_tag(alive, HEARTBEAT_TAG, f"{time.time() - 20:.3f}")
    with pytest.raises(UserError, match=rf"run {alive} is still training: its driver's last heartbeat was 2\d s ago "
                                        r"\(one every 30 s\); stop that driver first, or, if it was killed, try "
                                        r"again in [67]\d s$"):
        run_to_resume(store, config, alive)
    assert run_to_resume(store, config, gone).info.run_id == gone
    assert run_to_resume(store, config, LATEST).info.run_id == gone  # the newer run is alive
    finish_run(store, gone, "FINISHED", {})
    with pytest.raises(UserError, match=f"run {alive} is still training"):
        run_to_resume(store, config, LATEST)
    finish_run(store, alive, "KILLED", {})  # stopped: its last stamp no longer matters
    assert run_to_resume(store, config, alive).info.run_id == alive
    edited = start_run(store, config, {HEARTBEAT_TAG: "yesterday"})  # unreadable: taken as stopped
    assert run_to_resume(store, config, edited).info.run_id == edited


def test_heartbeat_stamps_the_run_until_the_block_ends(store):
    run = start_run(store, load_config("digits_lt"))
    stamps = []
    with Heartbeat(store, run, interval_s=0.3):
        for _ in range(3):
            time.sleep(0.45)
            stamps.append(float(client(store).get_run(run).data.tags[HEARTBEAT_TAG]))
    assert stamps == sorted(stamps) and len(set(stamps)) >= 2
    last = client(store).get_run(run).data.tags[HEARTBEAT_TAG]
    time.sleep(0.7)
    assert client(store).get_run(run).data.tags[HEARTBEAT_TAG] == last  # the thread has stopped


def test_heartbeat_failures_warn_once_and_do_not_stop_training(tmp_path):
    with pytest.warns(UserWarning, match="could not record run nope's heartbeat") as caught:
        with Heartbeat(f"sqlite:///{tmp_path / 'mlflow.db'}", "nope", interval_s=0.1):
            time.sleep(0.35)
    assert len([w for w in caught if "heartbeat" in str(w.message)]) == 1


def test_of_two_drivers_resuming_at_once_only_one_goes_on(store):
    """Both see the run's heartbeat as stale before either has stamped it; the claim lets one train."""
    import threading

    from orchestrator.run_resume import CLAIM_TAG, claim

    run = start_run(store, load_config("digits_lt"))
    start = threading.Barrier(2)
    outcomes: list[str] = []

    def resume() -> None:
        start.wait()
        try:
            claim(store, run, settle_s=1.0)
            outcomes.append("trains")
        except UserError as error:
            outcomes.append(str(error))

    drivers = [threading.Thread(target=resume) for _ in range(2)]
    for driver in drivers:
        driver.start()
    for driver in drivers:
        driver.join()
    assert sorted(outcomes)[1] == "trains"
    assert sorted(outcomes)[0].startswith(f"--resume: run {run} is being resumed by another driver (")
    tags = client(store).get_run(run).data.tags
    assert CLAIM_TAG in tags and float(tags[HEARTBEAT_TAG]) > time.time() - 10  # a third driver now sees it alive


def test_run_searches_follow_mlflows_pages(store, monkeypatch):
    """A search answers a page at a time; runs past the first page must not go missing."""
    import orchestrator.tracking as tracking

    config = load_config("digits_lt", ["mlflow.experiment=paged"])
    made = [start_run(store, config) for _ in range(5)]
    monkeypatch.setattr(tracking, "RUNS_PER_PAGE", 2)
    found = tracking.experiment_runs(store, "paged", "attributes.status = 'RUNNING'")
    assert sorted(run.info.run_id for run in found) == sorted(made)
    assert len(tracking.experiment_runs(store, "paged", "", limit=3)) == 3
    assert tracking.experiment_runs(store, "absent", "") == []
