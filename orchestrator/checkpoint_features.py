"""A training checkpoint read back outside Ray Train: its state (what ``curvlt train`` resumes
from) and its model's features (what ``curvlt measure --checkpoint`` measures). So a trained
model's class manifolds can be measured again, at another k or tangent dimension, or saved for a
researcher's own analysis, with the run's own data, model and geometry subsample."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from orchestrator.config import ExperimentConfig, config_from_dict, is_uri
from orchestrator.data import build_dataset
from orchestrator.errors import UserError
from orchestrator.evaluation import GEOMETRY_PREFIXES, Predictions, class_accuracy, evaluation_loaders, predict
from orchestrator.models import build_model

#: The file in each Ray Train checkpoint folder of a curvlt run: epoch, model, optimizer, CR
#: queues and the run's config (:func:`orchestrator.train_loop.train_loop_per_worker` writes it).
CHECKPOINT_FILE = "state.pt"
#: Which features ``curvlt measure --checkpoint`` measures: the geometry epochs' training
#: subsample (the metrics under ``geometry/``), or the test set (``geometry_test/``).
SPLITS = tuple(GEOMETRY_PREFIXES)
#: What :func:`checkpoint_features` reads from a checkpoint's state.
STATE_KEYS = ("epoch", "model", "config")


def load_state(folder: Path, device: torch.device | str = "cpu") -> dict:
    """The state saved in a checkpoint folder. Tensors, numbers and strings only, so it loads
    with ``weights_only``: a checkpoint folder cannot run code when it is read."""
    return torch.load(folder / CHECKPOINT_FILE, map_location=device, weights_only=True)


@dataclass
class CheckpointFeatures:
    config: ExperimentConfig  # the run's, as saved in the checkpoint
    epoch: int  # epochs trained (1-based: the checkpoint of epoch 20 of 20 says 20)
    features: Predictions  # of the chosen split
    test_accuracy: np.ndarray  # per class, on the balanced test set: the run's class accuracy
    true_curvature: np.ndarray | None  # per class, where the dataset knows it (synthetic manifolds)


@contextmanager
def local_checkpoint(location: str) -> Iterator[Path]:
    """The checkpoint folder at ``location`` on this machine: the folder itself, or, for a URI such
    as the ``s3://`` or ``gs://`` ones of runs whose ``checkpoint.storage_path`` is one (any
    filesystem pyarrow reads, as Ray Train does), a temporary folder, gone after use, holding a copy
    of its :data:`CHECKPOINT_FILE` (all that is read), or nothing when it has none."""
    if not is_uri(location):
        yield Path(location)
        return
    import pyarrow
    import pyarrow.fs

    with tempfile.TemporaryDirectory(prefix="curvlt-checkpoint-") as copy:
        try:
            filesystem, path = pyarrow.fs.FileSystem.from_uri(location)
            kind = filesystem.get_file_info(path).type
            state = f"{path.rstrip('/')}/{CHECKPOINT_FILE}"
            if kind == pyarrow.fs.FileType.Directory and filesystem.get_file_info(state).is_file:
                pyarrow.fs.copy_files(state, str(Path(copy) / CHECKPOINT_FILE), source_filesystem=filesystem)
        except (pyarrow.ArrowException, OSError) as exc:  # unknown scheme, no credentials, unreachable
            raise UserError(f"--checkpoint {location}: cannot read it ({str(exc).splitlines()[0]})") from None
        if kind != pyarrow.fs.FileType.Directory:
            raise UserError(f"--checkpoint {location}: {_not_a_folder(kind == pyarrow.fs.FileType.NotFound)}")
        yield Path(copy)


def _not_a_folder(missing: bool) -> str:
    return ("no such folder" if missing else "not a folder") + (" (give a checkpoint folder: the 'checkpoint:' line "
                                                                 "curvlt train ends with, or the run's MLflow tag "
                                                                 "curvlt.checkpoint)")


def checkpoint_features(location: str | Path, split: str) -> CheckpointFeatures:
    """Rebuild the run's dataset and model from the config in the checkpoint at ``location`` (a
    folder, or a URI as a string: :func:`local_checkpoint`), load its weights, and compute the
    features of ``split`` (one of :data:`SPLITS`) and the per-class test accuracy, as the run's
    geometry epochs do (on a GPU when there is one)."""
    if split not in SPLITS:
        raise UserError(f"--split: must be one of {', '.join(SPLITS)}, got {split!r}")
    location = str(location)
    with local_checkpoint(location) as folder:
        state = _read_state(location, folder)
    missing = [key for key in STATE_KEYS if not isinstance(state, dict) or key not in state]
    if missing:
        raise UserError(f"--checkpoint {location}: not a checkpoint of a curvlt run ({CHECKPOINT_FILE} holds no "
                        f"{missing[0]!r})")
    try:
        config = config_from_dict(state["config"])
    except UserError as exc:  # a run of a curvlt whose config keys differ
        raise UserError(f"--checkpoint {location}: its run's config: {exc}") from None
    data = build_dataset(config.dataset, config.seed)
    model = build_model(config, data.input_shape, data.num_classes)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as exc:  # a model of another curvlt: dozens of lines of missing and unexpected keys
        raise UserError(f"--checkpoint {location}: its weights do not fit this curvlt's model {config.model.name!r} "
                        f"({str(exc).splitlines()[0]})") from None
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    test_loader, geometry_loader = evaluation_loaders(data, config)
    test = predict(model, test_loader, device)
    features = predict(model, geometry_loader, device) if split == "train" else test
    return CheckpointFeatures(config, int(state["epoch"]) + 1, features, class_accuracy(test, data.num_classes),
                              data.true_curvature)


def _read_state(location: str, folder: Path) -> dict:
    """The state in the checkpoint ``folder`` (a local copy of ``location``), or one line on why
    there is none."""
    if not folder.is_dir():
        raise UserError(f"--checkpoint {location}: {_not_a_folder(not folder.exists())}")
    if not (folder / CHECKPOINT_FILE).is_file():
        inside = sorted(path.parent.name for path in folder.glob(f"checkpoint_*/{CHECKPOINT_FILE}"))  # a run's folder
        hint = f"; give one of its checkpoint folders (oldest first): {', '.join(inside)}" if inside else ""
        raise UserError(f"--checkpoint {location}: not a checkpoint of a curvlt run (no {CHECKPOINT_FILE} in it){hint}")
    try:
        return load_state(folder)
    except Exception as exc:  # torch raises several unrelated types for a corrupt file
        raise UserError(f"--checkpoint {location}: cannot read {CHECKPOINT_FILE} ({str(exc).splitlines()[0]})") from exc
