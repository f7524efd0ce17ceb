"""Figures of the baseline's chapter: learning curves (returned, not shown).

Comparisons of models (tables, bar charts, overlays) are `chexanatomy_lib.evaluation.figures`'s."""

from __future__ import annotations

import numpy as np

__all__ = ["plot_learning_curves"]


def plot_learning_curves(history: dict[str, list[dict[str, float]]], smooth: int = 10):
    """Training loss per step (thin, and a running mean over `smooth` steps) and
    per-epoch mean training and validation loss (Dice + BCE). Returns the figure."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(10, 3.4))
    steps = history.get("steps", [])
    if steps:
        x = np.array([s["step"] for s in steps])
        y = np.array([s["loss"] for s in steps])
        ax[0].plot(x, y, lw=0.6, alpha=0.4, color="C0", label="per step")
        k = max(1, min(int(smooth), len(y)))
        if k > 1:
            ax[0].plot(x[k - 1 :], np.convolve(y, np.ones(k) / k, mode="valid"), color="C0",
                       label=f"running mean ({k} steps)")
    ax[0].set(xlabel="optimizer step", ylabel="loss (Dice + BCE)", title="training loss")
    ax[0].legend(frameon=False)
    epochs = history.get("epochs", [])
    if epochs:
        e = [r["epoch"] + 1 for r in epochs]
        ax[1].plot(e, [r["train_loss"] for r in epochs], "o-", ms=3, label="train (augmented)")
        if "val_loss" in epochs[0]:
            ax[1].plot(e, [r["val_loss"] for r in epochs], "o-", ms=3, label="validation")
            ax[1].plot(e, [r["val_dice_loss"] for r in epochs], ":", label="validation, Dice term")
    ax[1].set(xlabel="epoch", ylabel="loss", title="per epoch")
    ax[1].legend(frameon=False)
    fig.tight_layout()
    return fig
