"""``curvlt measure`` end to end, through the installed console script."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from curvature import manifolds
from orchestrator.checkpoint_features import CHECKPOINT_FILE, checkpoint_features
from orchestrator.config import load_config
from orchestrator.errors import UserError, make_folder
from orchestrator.features_io import load_features
from orchestrator.models import create_model

CURVLT = shutil.which("curvlt") or str(Path(sys.executable).with_name("curvlt"))


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([CURVLT, *args], capture_output=True, text=True, timeout=300)


@pytest.fixture
def feature_file(tmp_path, rng) -> Path:
    features = np.concatenate([manifolds.sphere(800, 2, r, 10, rng) for r in (1.0, 2.0)]).astype(np.float32)
    path = tmp_path / "features.npz"
    np.savez(path, features=features, labels=np.repeat([0, 1], 800))
    return path


def test_npz_to_csv(feature_file, tmp_path):
    out = tmp_path / "results" / "geometry.csv"  # its folder made
    result = run("measure", str(feature_file), "--k", "15", "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert "mean_kappa" in result.stdout
    table = pd.read_csv(out)
    assert table["mean_kappa"].tolist() == pytest.approx([1.0, 0.5], rel=0.05)


def test_pt_to_json(feature_file, tmp_path):
    with np.load(feature_file) as archive:
        torch.save({"features": torch.tensor(archive["features"]), "labels": torch.tensor(archive["labels"])},
                   tmp_path / "features.pt")
    out = tmp_path / "geometry.json"
    result = run("measure", str(tmp_path / "features.pt"), "--tangent-dim", "2", "--out", str(out))
    assert result.returncode == 0, result.stderr
    rows = json.loads(out.read_text())
    assert [row["tangent_dim"] for row in rows] == [2, 2]


def test_bundled_example():
    result = run("measure", "--example")
    assert result.returncode == 0, result.stderr
    assert "true_kappa" in result.stdout


@pytest.mark.parametrize("content,message", [
    ({"feats": np.zeros((5, 2)), "labels": np.zeros(5, dtype=int)}, "missing key 'features'"),
    ({"features": np.zeros(5), "labels": np.zeros(5, dtype=int)}, "'features' must be 2-d"),
    ({"features": np.zeros((5, 2)), "labels": np.zeros(4, dtype=int)}, "'labels' must have shape (5,)"),
])
def test_bad_files_fail_with_one_line(tmp_path, content, message):
    path = tmp_path / "bad.npz"
    np.savez(path, **content)
    result = run("measure", str(path))
    assert result.returncode == 2
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_the_first_row_holding_nan_or_inf_is_named(tmp_path):
    features = np.ones((6, 3), dtype=np.float32)
    features[2, 1], features[4, 0] = np.inf, np.nan
    features[5] = 3e38  # large but finite: a float32 sum would overflow, the check's float64 one does not
    path = tmp_path / "diverged.npz"
    np.savez(path, features=features, labels=np.arange(6) + 10)
    with pytest.raises(UserError) as info:
        load_features(path)
    assert str(info.value) == f"{path}: 'features' row 2 (label 12) holds NaN or Inf values (rows that do: 2 of 6)"


def test_missing_file_and_bad_options(tmp_path, feature_file):
    assert "no such file" in run("measure", str(tmp_path / "nope.npz")).stderr
    assert "--tangent-dim" in run("measure", str(feature_file), "--tangent-dim", "x").stderr
    assert "--out" in run("measure", str(feature_file), "--out", "g.xlsx").stderr
    (tmp_path / "a-file").touch()  # where --out's folder should be: said before anything is measured
    assert run("measure", str(feature_file), "--out", str(tmp_path / "a-file" / "g.csv")).stderr.strip() == \
        f"curvlt: error: --out {tmp_path / 'a-file' / 'g.csv'}: cannot make its folder {tmp_path / 'a-file'} " \
        "(a file is in the way)"
    assert "k: must be a positive integer" in run("measure", str(feature_file), "--k", "0").stderr
    assert "fewer than k + 1 = 5001 points" in run("measure", str(feature_file), "--k", "5000").stdout


@pytest.fixture
def digits_checkpoint(tmp_path) -> Path:
    """A checkpoint folder as ``curvlt train`` writes one, of an untrained digits model (no Ray)."""
    config = load_config("digits_lt", ["eval.geometry_max_points=40"])
    torch.manual_seed(0)
    model = create_model(config.model.name, (1, 8, 8), 10)
    folder = tmp_path / "curvlt-run" / "checkpoint_000"
    folder.mkdir(parents=True)
    torch.save({"epoch": 0, "model": model.state_dict(), "config": config.to_dict()}, folder / CHECKPOINT_FILE)
    return folder


def test_checkpoint_features_are_the_runs_subsample_or_test_set(digits_checkpoint):
    train = checkpoint_features(digits_checkpoint, "train")
    assert train.epoch == 1 and train.config.eval.geometry_max_points == 40
    assert np.bincount(train.features.labels.numpy()).max() == 40  # at most 40 training images per class
    test = checkpoint_features(digits_checkpoint, "test")
    assert np.bincount(test.features.labels.numpy()).tolist() == [50] * 10  # digits' balanced test set
    assert test.features.features.shape[1] == train.features.features.shape[1]
    correct = (test.features.predicted == test.features.labels).numpy()
    assert np.allclose(test.test_accuracy, [correct[test.features.labels.numpy() == c].mean() for c in range(10)])
    assert np.array_equal(train.test_accuracy, test.test_accuracy)


def test_a_checkpoint_at_a_uri_is_read_from_there(digits_checkpoint, tmp_path):
    """A run whose ``checkpoint.storage_path`` is a URI (s3://...) names its checkpoints by URI;
    pyarrow reads any of its filesystems, here the local one through ``file://``."""
    at_uri = checkpoint_features(digits_checkpoint.as_uri(), "test")
    here = checkpoint_features(digits_checkpoint, "test")
    assert torch.equal(at_uri.features.features, here.features.features) and at_uri.epoch == here.epoch
    empty = tmp_path / "empty"
    empty.mkdir()
    for location, message in ((empty.as_uri(), "not a checkpoint of a curvlt run (no state.pt in it)"),
                              ((tmp_path / "nowhere").as_uri(), "no such folder (give a checkpoint folder"),
                              ((digits_checkpoint / CHECKPOINT_FILE).as_uri(), "not a folder (give a checkpoint"),
                              ("nofs://bucket/run", "cannot read it (Unrecognized filesystem type in URI: nofs://")):
        with pytest.raises(UserError) as info:
            checkpoint_features(location, "test")
        assert str(info.value).startswith(f"--checkpoint {location}: {message}"), str(info.value)


def test_measure_a_checkpoint_and_save_its_features(digits_checkpoint, tmp_path):
    saved = tmp_path / "out" / "test-features.npz"
    result = run("measure", "--checkpoint", str(digits_checkpoint), "--split", "test", "--k", "8",
                 "--save-features", str(saved))
    assert result.returncode == 0, result.stderr
    assert "digits_lt, mlp, after epoch 1/" in result.stdout and "test features: 500 points" in result.stdout
    assert "test_accuracy" in result.stdout and "geometry_test/curvature_mean" in result.stdout
    again = run("measure", str(saved), "--k", "8")  # the saved features, measured as a file: the same table
    assert again.returncode == 0, again.stderr
    rows = [line.split() for line in result.stdout.splitlines()[2:12]]
    assert [row[:2] + row[3:] for row in rows] == [line.split() for line in again.stdout.splitlines()[2:12]]


@pytest.mark.parametrize("args,message", [
    (["--checkpoint", "nowhere"], "--checkpoint nowhere: no such folder"),
    (["--checkpoint", "CK/state.pt"], "--checkpoint CK/state.pt: not a folder (give a checkpoint folder"),
    (["--checkpoint", "."], "--checkpoint .: not a checkpoint of a curvlt run (no state.pt in it)\n"),
    (["--checkpoint", "RUN"], "--checkpoint RUN: not a checkpoint of a curvlt run (no state.pt in it); give one of "
                              "its checkpoint folders (oldest first): checkpoint_000\n"),
    (["--example", "--split", "test"], "--split: only with --checkpoint"),
    (["--example", "--save-features", "f.npz"], "--save-features: only with --checkpoint"),
    (["--checkpoint", "CK", "--save-features", "f.csv"], "--save-features: unsupported extension '.csv'; use .npz"),
    (["--checkpoint", "CK", "--split", "val"], "--split: must be one of train, test, got 'val'"),
    (["--checkpoint", "CK", "--tangent-dim", "two"], "--tangent-dim: must be 'auto' or an integer, got 'two'"),
    (["--checkpoint", "CK", "--k", "0"], "--k: must be a positive integer, got 0"),
    (["--checkpoint", "CK", "--example"], "measure: give exactly one of FEATURES, --example or --checkpoint"),
    (["--checkpoint", "NOCONFIG"], "--checkpoint NOCONFIG: not a checkpoint of a curvlt run (state.pt holds no "
                                   "'config')"),
    (["--checkpoint", "OTHERMODEL"], "--checkpoint OTHERMODEL: its weights do not fit this curvlt's model 'mlp' "
                                     "(Error(s) in loading state_dict"),
])
def test_checkpoint_options_fail_with_one_line(digits_checkpoint, tmp_path, args, message):
    state = torch.load(digits_checkpoint / CHECKPOINT_FILE)
    named = {"CK": digits_checkpoint, "RUN": digits_checkpoint.parent, "NOCONFIG": tmp_path / "no-config",
             "OTHERMODEL": tmp_path / "other-model"}
    for name, changed in (("NOCONFIG", {"epoch": 0, "model": state["model"]}),
                          ("OTHERMODEL", {**state, "model": {"layer.weight": torch.zeros(2)}})):
        named[name].mkdir()
        torch.save(changed, named[name] / CHECKPOINT_FILE)
    for name, folder in named.items():  # placeholders (upper case) to paths, in arguments and message
        message, args = message.replace(name, str(folder)), [arg.replace(name, str(folder)) for arg in args]
    result = subprocess.run([CURVLT, "measure", *args], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 2 and result.stderr.startswith(f"curvlt: error: {message}"), result.stderr
    assert result.stderr.count("\n") == 1, result.stderr


@pytest.mark.parametrize("below", ["", "sub"])
def test_a_file_where_a_folder_should_be_is_named(tmp_path, below):
    """At the folder itself or at one of its parents (there mkdir says "Not a directory")."""
    (tmp_path / "a-file").touch()
    with pytest.raises(UserError, match=r"^--out: cannot make it \(a file is in the way\)$"):
        make_folder(tmp_path / "a-file" / below, "--out: cannot make it")


def test_the_command_line_starts_without_torch_pandas_ray_mlflow_or_scipy():
    """Each command imports what it uses when it runs, inside ``main``'s Ctrl-C handling: Ray alone
    added a second to every start, and torch and pandas (imported for ``measure`` at start-up) made
    ``curvlt --help`` take 4 s and a Ctrl-C in those seconds print a traceback."""
    heavy = "{'torch', 'pandas', 'ray', 'mlflow', 'scipy'}"
    probe = f"import sys, orchestrator.cli; print(sorted({heavy} & set(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120,
                            cwd=Path(__file__).resolve().parents[1])
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[]"
