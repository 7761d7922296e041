"""Learning-curve plots written next to ``metrics.json``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only: the simulator runs on machines without a screen
import matplotlib.pyplot as plt


def plot_learning_curves(summary: dict[str, Any], path: Path) -> None:
    """Training loss per round (left) and validation RMSE / accuracy (right)."""
    fig, (ax_loss, ax_val) = plt.subplots(1, 2, figsize=(11, 4))
    loss = summary.get("train_loss", [])
    ax_loss.plot(range(1, len(loss) + 1), loss, lw=0.8)
    ax_loss.set_xlabel("round" if summary.get("algorithm") != "centralized" else "epoch")
    ax_loss.set_ylabel("training MSE")
    ax_loss.set_yscale("log")
    ax_loss.set_title("training loss")
    val = summary.get("validation", [])
    if val:
        xs = [m["round"] for m in val]
        ax_val.plot(xs, [m["rmse"] for m in val], marker="o", ms=3, label="RMSE")
        ax_val.set_ylabel("validation RMSE")
        ax_acc = ax_val.twinx()
        ax_acc.plot(xs, [m["accuracy"] for m in val], color="tab:orange", marker="s", ms=3, label="accuracy")
        ax_acc.set_ylabel("validation accuracy")
    ax_val.set_xlabel("round" if summary.get("algorithm") != "centralized" else "epoch")
    ax_val.set_title(f"{summary.get('algorithm', '')}: validation users")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
