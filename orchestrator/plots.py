"""Plots saved as PNG files (and logged to MLflow by the caller): the pictures people would rather
look at than tables (SPEC §7)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402


def accuracy_vs_curvature(table: pd.DataFrame, path: Path, title: str) -> Path:
    """Scatter of class accuracy against the class's angle curvature (train features), coloured
    by training count: is it curvature, not sample count, that tracks accuracy?"""
    measured = table.dropna(subset=["train_mean_angle"])
    fig, ax = plt.subplots(figsize=(5.5, 4.2))
    points = ax.scatter(measured["train_mean_angle"], 100 * measured["accuracy"], c=measured["train_images"],
                        cmap="viridis", s=36)
    for _, row in measured.iterrows():
        ax.annotate(str(int(row["label"])), (row["train_mean_angle"], 100 * row["accuracy"]), fontsize=7,
                    xytext=(3, 3), textcoords="offset points")
    fig.colorbar(points, ax=ax, label="training images")
    ax.set_xlabel("class angle curvature a_c (rad)")
    ax.set_ylabel("class test accuracy (%)")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def correlations_over_epochs(history: pd.DataFrame, path: Path, title: str) -> Path:
    """Pearson correlation between class accuracy and curvature / separation / volume per epoch —
    the paper's finding (curvature's negative correlation grows, separation's fades) as a picture."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for column, label in (("geometry/corr_acc_curvature", "curvature"), ("geometry/corr_acc_separation", "separation"),
                          ("geometry/corr_acc_volume", "volume")):
        if column in history:
            series = history[column].dropna()
            ax.plot(series.index + 1, series.values, marker="o", label=label)
    ax.axhline(0, color="grey", linewidth=0.8)
    ax.set_xlabel("epoch")
    ax.set_ylabel("Pearson r with class accuracy")
    ax.set_ylim(-1.05, 1.05)
    ax.legend()
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
