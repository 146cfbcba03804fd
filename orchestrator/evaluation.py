"""Per-epoch evaluation (SPEC §7): accuracy overall, per class and per shot group; at geometry
epochs, per-class geometry of the features and its correlation with class accuracy."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from scipy import stats
from torch.utils.data import DataLoader, Subset

from curvature import class_geometry
from curvature.rotation import TangentDim
from orchestrator.config import ExperimentConfig, loader_workers
from orchestrator.data import DataBundle
from orchestrator.data.long_tail import per_class_subsample
from orchestrator.progress import ProgressLine

SHOT_NAMES = ("many", "medium", "few")
#: What every epoch reports, to MLflow and through Ray Train to a sweep's Tune, which needs the
#: sweep's metric in each report: the losses and learning rate (``orchestrator.train_loop``) and
#: the test accuracies (:func:`accuracy_metrics`; a shot group only when some class is in it).
EPOCH_METRICS = ("train/loss", "train/base_loss", "train/cr_loss", "train/lr", "test/acc",
                 *(f"test/acc_{name}" for name in SHOT_NAMES))
#: Geometry measure -> column of curvature.class_geometry; "curvature" is the dimensionless angle
#: curvature a_c that CR acts on (scale-free, so comparable across classes and epochs).
MEASURES = {"curvature": "mean_angle", "separation": "separation", "volume": "volume"}
#: Correlation metric name suffix -> its coefficient: Pearson's, and Spearman's rank correlation.
CORRELATIONS = {"": stats.pearsonr, "_spearman": stats.spearmanr}
#: Metric prefix of each split's features, as :func:`correlation_metrics` is given it.
GEOMETRY_PREFIXES = {"train": "geometry", "test": "geometry_test"}
#: The metrics of geometry epochs only (``eval.geometry_every``; every epoch when it is 1):
#: :func:`correlation_metrics`' names. A value that is undefined at an epoch is left out of it.
GEOMETRY_METRICS = tuple(f"{prefix}/{name}" for prefix in GEOMETRY_PREFIXES.values()
                         for name in ("curvature_mean", "curvature_imbalance",
                                      *(f"corr_acc_{measure}{suffix}" for measure in MEASURES
                                        for suffix in CORRELATIONS)))


#: Images per forward pass when evaluating (no gradients: larger than a training batch).
EVAL_BATCH = 512


def evaluation_loaders(data: DataBundle, config: ExperimentConfig) -> tuple[DataLoader, DataLoader]:
    """The test set, and the training images whose features geometry epochs measure: at most
    ``eval.geometry_max_points`` per class, the same ones at every epoch (drawn with the run's seed),
    without augmentation. ``curvlt measure --checkpoint`` measures the same images. Both read with
    the run's loader processes (:func:`~orchestrator.config.loader_workers`)."""
    subsample = per_class_subsample(data.train_labels, config.eval.geometry_max_points, config.seed)
    processes = loader_workers(config.scaling)
    return (DataLoader(data.test, batch_size=EVAL_BATCH, num_workers=processes),
            DataLoader(Subset(data.train_plain, subsample.tolist()), batch_size=EVAL_BATCH, num_workers=processes))


@dataclass
class Predictions:
    features: torch.Tensor  # (n, D) on CPU
    labels: torch.Tensor  # (n,)
    predicted: torch.Tensor  # (n,)


@torch.no_grad()
def predict(model: torch.nn.Module, loader: DataLoader, device: torch.device) -> Predictions:
    """Features, labels and argmax predictions of ``model`` (in eval mode) over ``loader``."""
    was_training = model.training
    model.eval()
    features, labels, predicted = [], [], []
    for images, targets in loader:
        feats, logits = model(images.to(device))
        features.append(feats.float().cpu())
        labels.append(targets)
        predicted.append(logits.argmax(dim=1).cpu())
    model.train(was_training)
    return Predictions(torch.cat(features), torch.cat(labels), torch.cat(predicted))


def class_accuracy(predictions: Predictions, num_classes: int) -> np.ndarray:
    correct = torch.bincount(predictions.labels[predictions.predicted == predictions.labels], minlength=num_classes)
    total = torch.bincount(predictions.labels, minlength=num_classes).clamp_min(1)
    return (correct.float() / total.float()).numpy()


def accuracy_metrics(per_class: np.ndarray, groups: np.ndarray) -> dict[str, float]:
    """``test/acc`` (mean over classes = overall accuracy on a balanced test set) and shot groups;
    a group with no class is not reported."""
    metrics = {"test/acc": float(per_class.mean())}
    for index, name in enumerate(SHOT_NAMES):
        if bool((groups == index).any()):
            metrics[f"test/acc_{name}"] = float(per_class[groups == index].mean())
    return metrics


def correlation_metrics(table: pd.DataFrame, accuracy: np.ndarray, prefix: str) -> dict[str, float]:
    """Pearson and Spearman correlations across measured classes between accuracy and each measure;
    the class curvature's mean, and its imbalance (std/mean). Why both: CR lowers the mean, so the
    imbalance, a ratio to it, can grow while the spread across classes stays the same. Undefined
    values are left out."""
    measured = table[table["skipped"] == ""]
    metrics: dict[str, float] = {}
    curvature = measured[MEASURES["curvature"]].to_numpy(dtype=float)
    if len(curvature) > 0:
        metrics[f"{prefix}/curvature_mean"] = float(curvature.mean())
    if len(curvature) > 1 and curvature.mean() > 0:
        metrics[f"{prefix}/curvature_imbalance"] = float(curvature.std() / curvature.mean())
    acc = accuracy[measured["label"].to_numpy(dtype=int)]
    for name, column in MEASURES.items():
        values = measured[column].to_numpy(dtype=float)
        if len(values) < 3 or np.ptp(values) == 0 or np.ptp(acc) == 0:
            continue
        for suffix, correlate in CORRELATIONS.items():
            metrics[f"{prefix}/corr_acc_{name}{suffix}"] = float(correlate(acc, values).statistic)
    return metrics


def geometry_table(train: Predictions, test: Predictions, accuracy: np.ndarray, train_counts: np.ndarray,
                   k: int, tangent_dim: TangentDim = "auto", true_curvature: np.ndarray | None = None,
                   progress_every_s: float = 0.0) -> pd.DataFrame:
    """One row per class: accuracy, training count, and the geometry of train and test features;
    a progress line every ``progress_every_s`` seconds (0: none) while it measures."""
    train_geo = class_geometry(train.features, train.labels, k=k, tangent_dim=tangent_dim,
                               progress=ProgressLine("geometry of the training features", progress_every_s))
    test_geo = class_geometry(test.features, test.labels, k=k, tangent_dim=tangent_dim,
                              progress=ProgressLine("geometry of the test features", progress_every_s))
    train_geo, test_geo = train_geo.set_index("label"), test_geo.set_index("label")
    table = pd.DataFrame({"label": np.arange(len(accuracy)), "accuracy": accuracy, "train_images": train_counts})
    table = table.join(train_geo.add_prefix("train_"), on="label").join(test_geo.add_prefix("test_"), on="label")
    if true_curvature is not None:
        table["true_curvature"] = true_curvature
    return table


def split_geometry(table: pd.DataFrame, split: str) -> pd.DataFrame:
    """The ``train_`` or ``test_`` columns of a geometry table, renamed back to class_geometry's."""
    columns = {f"{split}_{name}": name for name in ("count", "volume", "separation", "mean_angle", "mean_kappa",
                                                      "median_angle", "median_kappa", "tangent_dim", "skipped")}
    part = table[["label", *columns]].rename(columns=columns)
    part["skipped"] = part["skipped"].fillna("class absent")
    return part
