"""Search-space files are validated before anything starts (issue: sweeps, item 1)."""

from __future__ import annotations

import pytest
import yaml

from orchestrator.errors import UserError
from orchestrator.config import CONFIG_DIR
from orchestrator.search_space import (SPACE_DIR, SearchSpace, count_trials, load_space, swept_keys, trial_config,
                                         tune_param_space)
from orchestrator.sweep import search_algorithm

SHIPPED = sorted(path.stem for path in SPACE_DIR.glob("*.yaml"))


def test_shipped_spaces():
    assert {"quickstart", "fashion_mnist_lt", "cifar_lt", "imagenet_lt"} <= set(SHIPPED)


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_space_is_valid(name):
    space = load_space(name)
    assert count_trials(space) >= 1


def test_quickstart_shape():
    space = load_space("quickstart")
    assert space.base == ["digits_lt", "synthetic_manifolds"] and count_trials(space) == 12
    weights = space.params["cr.weight"]["grid"]
    assert 0.0 in weights and len([w for w in weights if w > 0]) >= 2


def test_cli_overrides_win_over_the_space(tmp_path):
    space = load_space("quickstart", ["mlflow.experiment=X", "train.epochs=2"])
    config = trial_config(space, "digits_lt", {"cr.weight": 0.5}, ["mlflow.experiment=X", "train.epochs=2"])
    assert config.mlflow.experiment == "X" and config.train.epochs == 2 and config.cr.weight == 0.5


def test_swept_keys_include_what_the_bases_differ_in(tmp_path):
    """Two bases of one dataset that differ in ``cr.k`` (and in where they checkpoint, which does
    not change what a run computes): ``curvlt compare`` must not pool their runs."""
    data = yaml.safe_load((CONFIG_DIR / "digits_lt.yaml").read_text())
    data["cr"]["k"], data.setdefault("checkpoint", {})["every"] = 12, 2
    other = tmp_path / "digits_k12.yaml"
    other.write_text(yaml.safe_dump(data))
    space = load_space(write(tmp_path, f"base: [digits_lt, {other}]\nparam_space:\n  cr.weight: {{grid: [0, 0.5]}}\n"))
    assert _swept(space) == ["cr.weight", "cr.k"]
    assert _swept(load_space("fashion_mnist_lt_weights")) == ["cr.weight", "seed"]
    assert _swept(load_space("quickstart")) == ["cr.weight", "seed"]  # two datasets: nothing added


def test_a_grid_over_mappings_varies_keys_together(tmp_path):
    """``loss: {grid: [{name: ce}, {name: ldam, drw_epoch: 3}]}``: DRW only with LDAM. Each mapping
    sets the keys it names and leaves the section's others at the base's values; the swept keys are
    the ones the mappings set, as ``curvlt compare`` finds them in the params."""
    space = load_space(write(tmp_path, "base: digits_lt\nparam_space:\n  loss: {grid: [{name: ce}, "
                                       "{name: ldam, drw_epoch: 3}]}\n  cr.weight: {grid: [0, 0.5]}\n"))
    assert count_trials(space) == 4
    ce = trial_config(space, "digits_lt", {"loss": {"name": "ce"}}, [])
    ldam = trial_config(space, "digits_lt", {"loss": {"name": "ldam", "drw_epoch": 3}}, [])
    assert (ce.loss.name, ce.loss.drw_epoch, ldam.loss.name, ldam.loss.drw_epoch) == ("ce", -1, "ldam", 3)
    assert ldam.loss.ldam_max_m == ce.loss.ldam_max_m == trial_config(space, "digits_lt", {}, []).loss.ldam_max_m
    assert _swept(space) == ["loss.name", "loss.drw_epoch", "cr.weight"]
    with pytest.raises(UserError, match="param_space.loss: loss.drw: unknown key"):
        load_space(write(tmp_path, "base: digits_lt\nparam_space: {loss: {grid: [{name: ldam, drw: 3}]}}"))


def test_the_paper_sweep_defers_reweighting_for_ldam_only():
    """Balanced Softmax and logit adjustment already correct for the label prior; DRW on top of
    them would correct twice. ``cifar_lt`` pairs DRW with LDAM, as Cao et al. and the paper do."""
    space = load_space("cifar_lt")
    drw = {value["name"]: value.get("drw_epoch", -1) for value in space.params["loss"]["grid"]}
    assert drw == {"ce": -1, "ldam": 160, "balanced_softmax": -1, "logit_adjust": -1}
    assert count_trials(space) == 72


def _swept(space: SearchSpace) -> list[str]:
    return swept_keys(space, [trial_config(space, base, {}, []) for base in space.base])


def write(tmp_path, text: str) -> str:
    path = tmp_path / "space.yaml"
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize("body,message", [
    ("base: digits_lt\nparam_space: {cr.weight: {grid: []}}", "param_space.cr.weight.grid: must be a non-empty list"),
    ("base: digits_lt\nparam_space: {cr.wait: {grid: [1]}}", "param_space.cr.wait: cr.wait: unknown key"),
    ("base: digits_lt\nparam_space: {cr.weight: {normal: [0, 1]}}", "param_space.cr.weight: must be one of"),
    ("base: digits_lt\nparam_space: {train.lr: {loguniform: [0, 1]}}", "loguniform: bounds must be > 0"),
    ("base: digits_lt\nparam_space: {train.lr: {uniform: [1, 0]}}", "must be [low, high] numbers with low < high"),
    ("base: digits_lt\nparam_space: {train.epochs: {uniform: [1, 3]}}", "train.epochs: must be an integer"),
    ("base: digits_lt\nparam_space: {cr.weight: {grid: [-1]}}", "cr.weight: must be >= 0"),
    ("base: digits_lt\nparam_space: {loss.name: {choice: [ce, ldma]}}",
     "param_space.loss.name: loss.name: unknown loss 'ldma'"),
    ("base: nope\n", "nope: not a config file nor a bundled config"),
    ("param_space: {}\n", "missing 'base'"),
    ("base: digits_lt\ntune: {scheduler: {name: hyperband}}", "tune.scheduler: must be"),
    ("base: digits_lt\ntune: {scheduler: {name: asha, reduction_factor: 1}}",
     "tune.scheduler.reduction_factor: must be a number > 1, got 1"),
    ("base: digits_lt\ntune: {scheduler: {name: asha, grace_period: 0}}",
     "tune.scheduler.grace_period: must be an integer >= 1, got 0"),
    ("base: digits_lt\ntune: {scheduler: {name: asha, grace_period: 40}}",
     "tune.scheduler.grace_period: must be at most max_t (or train.epochs) = 30, got 40"),
    ("base: digits_lt\ntune: {resources_per_trial: {gpu: -1}}", "tune.resources_per_trial"),
    ("base: digits_lt\ntune: {budget: 3}", "tune.budget: unknown key"),
    ("base: digits_lt\ntune: {seed: -1}", "tune.seed: must be an integer >= 0"),
    ("base: digits_lt\nextra: 1", "unknown key 'extra'"),
    ("base: digits_lt\ntune: {metric: test/accuracy}", "tune.metric: must be reported at every epoch: one of "
                                                      "train/loss, train/base_loss, train/cr_loss, train/lr, test/acc"),
    ("base: digits_lt\ntune: {metric: geometry/curvature_imbalance}",
     "or a geometry metric with eval.geometry_every 1; got 'geometry/curvature_imbalance'"),
    ("base: digits_lt\nfixed: {eval.geometry_every: 1}\ntune: {metric: geometry/curvature_imbalence}",
     "or a geometry metric (geometry/curvature_mean, geometry/curvature_imbalance, geometry/corr_acc_curvature, "),
])
def test_bad_spaces_stop_with_a_clear_message(tmp_path, body, message):
    with pytest.raises(UserError) as info:
        load_space(write(tmp_path, body))
    assert message in str(info.value)


def test_a_geometry_metric_is_accepted_when_every_epoch_measures_geometry(tmp_path):
    space = load_space(write(tmp_path, "base: digits_lt\nfixed: {eval.geometry_every: 1}\n"
                                       "tune: {metric: geometry/curvature_imbalance, mode: min}"))
    assert space.metric == "geometry/curvature_imbalance"


def test_unknown_space_lists_shipped():
    with pytest.raises(UserError, match="bundled: "):
        load_space("nope")


def _sampled_trials(space: SearchSpace) -> list[dict]:
    """The trial configs the sweep's variant generator hands out, without running them."""
    from ray.tune.experiment import Experiment

    generator = search_algorithm(space, space.max_concurrent_trials)
    generator.add_configurations([Experiment("sampled", run=lambda config: None, config=tune_param_space(space),
                                             num_samples=space.num_samples)])
    trials = []
    while (trial := generator.next_trial()) is not None:
        trials.append(trial.config)
    return trials


def test_sampled_values_repeat_with_the_space_seed(tmp_path):
    body = ("base: digits_lt\n"
            "param_space: {train.lr: {loguniform: [0.01, 0.2]}, cr.weight: {choice: [0.0, 0.5, 1.0]}}\n"
            "tune: {num_samples: 4, seed: %d}")
    first, again = (_sampled_trials(load_space(write(tmp_path, body % 3))) for _ in range(2))
    other = _sampled_trials(load_space(write(tmp_path, body % 4)))
    assert len(first) == 4 and first == again, (first, again)
    assert [trial["train.lr"] for trial in first] != [trial["train.lr"] for trial in other]


def test_at_most_max_concurrent_trials_are_handed_out_at_once(tmp_path):
    body = "base: digits_lt\nparam_space: {cr.weight: {grid: [0.0, 0.5, 1.0]}}\ntune: {max_concurrent_trials: %d}"
    assert len(_sampled_trials(load_space(write(tmp_path, body % 2)))) == 2
    assert len(_sampled_trials(load_space(write(tmp_path, body % 0)))) == 3  # 0: no limit
