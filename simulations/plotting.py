"""Learning-curve plots written next to ``metrics.json``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only: the simulator runs on machines without a screen
import matplotlib.pyplot as plt


def plot_learning_curves(summary: dict[str, Any], path: Path) -> list[str]:
    """Training loss per round (left) and validation RMSE (rating models; others: their loss) and accuracy
    (right), every line in a legend, the round chosen on validation marked on both, and the unseen-test
    result of that round in the title (so the picture says on its own which model was kept and what it
    scored). Returns the title and the legend entries drawn, so a test can check what the picture says."""
    unit = "round" if summary.get("algorithm") != "centralized" else "epoch"
    selected = summary.get("selected", {}).get("round")
    test = summary.get("test", {})
    # Rating models are selected and reported by RMSE (their loss is the MSE); others by their loss.
    rated = "rmse" in test or any("rmse" in m for m in summary.get("validation", []))
    key, name, train_name = ("rmse", "RMSE", "MSE") if rated else ("loss", "loss", "loss")
    fig, (ax_loss, ax_val) = plt.subplots(1, 2, figsize=(11, 4.2))
    loss = summary.get("train_loss", [])
    ax_loss.plot(range(1, len(loss) + 1), loss, lw=0.8,
                 label=f"training {train_name} (clients' post-reconstruction)")
    ax_loss.set_xlabel(unit)
    ax_loss.set_ylabel(f"training {train_name}")
    ax_loss.set_yscale("log")
    ax_loss.set_title("training loss")
    lines = []
    val = summary.get("validation", [])
    if val:
        xs = [m["round"] for m in val]
        lines += ax_val.plot(xs, [m[key] for m in val], marker="o", ms=3, label=f"validation {name}")
        ax_val.set_ylabel(f"validation {name}")
        ax_acc = ax_val.twinx()
        lines += ax_acc.plot(xs, [m["accuracy"] for m in val], color="tab:orange", marker="s", ms=3,
                             label="validation accuracy")
        ax_acc.set_ylabel("validation accuracy")
    if selected is not None:
        for ax in (ax_loss, ax_val):
            marker = ax.axvline(float(selected), color="tab:green", ls="--", lw=1,
                                label=f"selected {unit} {int(selected)}")
        lines.append(marker)
    ax_loss.legend(loc="upper right", fontsize=8)
    if lines:
        ax_val.legend(lines, [str(line.get_label()) for line in lines], loc="center right", fontsize=8)
    ax_val.set_xlabel(unit)
    ax_val.set_title(f"{summary.get('algorithm', '')}: validation users")
    if test:
        fig.suptitle(f"{summary.get('algorithm', '')}: unseen test users {name} {test[key]:.4f}, accuracy "
                     f"{test['accuracy']:.2%} ({unit} {int(selected) if selected is not None else '-'}, "
                     "chosen on validation)", fontsize=11)
    said = [fig.get_suptitle(), *(t.get_text() for ax in (ax_loss, ax_val) if ax.get_legend()
                                  for t in ax.get_legend().get_texts())]
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return said
