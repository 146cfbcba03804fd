"""Strict experiment config (issue: training, item 1)."""

from __future__ import annotations

import pytest

from orchestrator.config import CONFIG_DIR, flatten, load_config
from orchestrator.errors import UserError

BUNDLED = sorted(path.stem for path in CONFIG_DIR.glob("*.yaml"))


def test_all_expected_configs_are_bundled():
    assert {"digits_lt", "fashion_mnist_lt", "synthetic_manifolds", "cifar10_lt", "cifar100_lt", "imagenet_lt",
            "inat2018"} <= set(BUNDLED)


@pytest.mark.parametrize("name", BUNDLED)
def test_bundled_config_loads(name):
    config = load_config(name)
    assert config.dataset.name == name or name.startswith(config.dataset.name.split("_")[0])


def test_paper_protocol_for_cifar():
    config = load_config("cifar100_lt")
    assert (config.model.name, config.train.epochs, config.train.batch_size, config.train.lr) == \
        ("resnet32", 200, 128, 0.1)
    assert config.train.schedule == "step" and config.train.warmup_epochs == 5 and config.train.milestones == [160, 180]


def test_overrides_are_typed(tmp_path):
    config = load_config("digits_lt", ["cr.weight=0.5", "train.epochs=3", "cr.start_epoch=1", "cr.tangent_dim=2",
                                       "train.amp=false", "train.milestones=[2, 3]", "mlflow.run_name=x y"])
    assert config.cr.weight == 0.5 and config.train.epochs == 3 and config.cr.tangent_dim == 2
    assert config.train.amp is False and config.train.milestones == [2, 3] and config.mlflow.run_name == "x y"
    path = tmp_path / "mine.yaml"
    path.write_text("dataset: {name: synthetic_manifolds}\ntrain: {epochs: 2}\n")
    assert load_config(str(path)).train.epochs == 2


@pytest.mark.parametrize("override,message", [
    ("train.lrr=0.1", "train.lrr: unknown key; allowed here: epochs"),
    ("bogus=1", "bogus: unknown key"),
    ("train.epochs=three", "train.epochs: must be an integer, got 'three'"),
    ("train.epochs=2.5", "train.epochs: must be an integer"),
    ("train.epochs=0", "train.epochs: must be > 0, got 0"),
    ("cr.weight=-1", "cr.weight: must be >= 0"),
    ("cr.every=0", "cr.every: must be > 0, got 0"),
    ("cr.tangent_dim=many", "cr.tangent_dim: must be an integer or 'auto'"),
    ("cr.tangent_dim=11", "cr.tangent_dim: must be 'auto' or at most cr.k = 10"),
    ("eval.geometry_tangent_dim=0", "eval.geometry_tangent_dim: must be 'auto' or an integer >= 1, got 0"),
    ("eval.geometry_tangent_dim=11", "eval.geometry_tangent_dim: must be 'auto' or at most eval.geometry_k = 10"),
    ("cr.weight=0.5", "cr.start_epoch: must be below train.epochs = 3 when cr.weight > 0 (epochs count from 0), "
                      "got 5: CR would never apply"),
    ("dataset.synthetic.manifold_dim=16", "dataset.synthetic.ambient_dim: must be above dataset.synthetic.manifold_dim "
                                          "= 16 (a 16-sphere lies in 17 dimensions), got 16"),
    ("train.schedule=linear", "train.schedule: must be 'step' or 'cosine' or 'constant'"),
    ("train.amp=maybe", "train.amp: must be true or false"),
    ("dataset.imbalance_factor=0.5", "dataset.imbalance_factor: must be >= 1"),
    ("train.momentum=1.5", "train.momentum: must be in [0, 1)"),
    ("train=3", "train: must be a mapping"),
    ("noequals", "expected key=value"),
    ("loss.name=cross_entropy", "loss.name: unknown loss 'cross_entropy'; choose one of balanced_softmax, ce, focal"),
    ("model.name=resnet18", "model.name: unknown model 'resnet18'; choose one of mlp, resnet32"),
    ("dataset.name=mnist", "dataset.name: unknown dataset 'mnist'; choose one of cifar100_lt"),
    ("mlflow.experiment=' '", "mlflow.experiment: must be a non-empty name, got ' '"),
    ("model.head=mlp", "model.head: must be 'auto' or 'linear' or 'cosine'"),
    ("scaling.loader_workers=-1", "scaling.loader_workers: must be 'auto' or an integer >= 0, got -1"),
    ("scaling.loader_workers=many", "scaling.loader_workers: must be an integer or 'auto', got 'many'"),
    ("model.head=cosine", "model.head: cosine needs loss.name ldam, which scales the cosine logits (in [-1, 1]) by "
                          "loss.ldam_s; got loss.name ce"),
])
def test_bad_values_name_the_key(override, message):
    with pytest.raises(UserError) as info:
        load_config("digits_lt", ["train.epochs=3", override])
    assert message in str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("overrides,message", [
    (["train.schedule=step", "train.milestones=[1, 3]"],
     "train.milestones: must be below train.epochs = 3 (epochs count from 0), got 3: the learning rate would never "
     "drop there"),
    (["eval.geometry_max_points=10"],
     "eval.geometry_max_points: must be above eval.geometry_k = 10 (a class needs k + 1 points to be measured), "
     "got 10"),
    (["train.warmup_epochs=3"],
     "train.warmup_epochs: must be below train.epochs = 3, got 3: the learning rate would never reach train.lr "
     "(for a shorter trial run, set train.warmup_epochs to 0 too)"),
    (["=3"], "--set =3: expected key=value with a dotted key, e.g. --set train.epochs=3"),
    (["train..epochs=3"],
     "--set train..epochs=3: expected key=value with a dotted key, e.g. --set train.epochs=3"),
])
def test_settings_that_would_silently_do_nothing_are_refused(overrides, message):
    """A step schedule shortened below its milestones would never lower the learning rate, nor a
    warm-up as long as the run raise it to ``train.lr``; a geometry subsample of at most k points
    per class would measure no class."""
    with pytest.raises(UserError) as info:
        load_config("digits_lt", ["train.epochs=3", *overrides])
    assert str(info.value) == message


def test_settings_that_do_nothing_by_choice_are_accepted():
    """Milestones only matter to the step schedule; the subsample only when geometry is measured."""
    load_config("digits_lt", ["train.epochs=3", "train.milestones=[5]", "eval.geometry_every=0",
                              "eval.geometry_max_points=2"])


def test_invalid_yaml_says_where_the_parser_stopped(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("dataset:\n  name: digits_lt\n train: {epochs: 3}\n")  # one space short
    with pytest.raises(UserError) as info:
        load_config(str(path))
    assert str(info.value) == (f"{path}: not valid YAML at line 3, column 2: expected <block end>, "
                               "but found '<block mapping start>'")


def test_unknown_config_name_lists_bundled():
    with pytest.raises(UserError, match="bundled: cifar100_lt"):
        load_config("nope")


def test_flatten():
    assert flatten({"a": {"b": 1, "c": {"d": [1]}}, "e": 2}) == {"a.b": 1, "a.c.d": [1], "e": 2}
