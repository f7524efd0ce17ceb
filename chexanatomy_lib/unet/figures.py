"""Figures of the baseline's chapter: learning curves and overlays on held-out images."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["comparison_table", "plot_learning_curves", "plot_overlays"]


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


def plot_overlays(
    dataset: Any,  # chexanatomy_lib.ct.dataset.ProjectedDataset
    pred: Any,  # chexanatomy_lib.evaluation.predictions.Predictions covering `indices`
    indices: Sequence[int],  # dataset rows to show
    structures: Sequence[str],  # structures to draw (predicted ones)
    title: str = "U-Net",  # name of the model in the legend
):
    """One panel per image: the radiograph, ground-truth outlines (solid) and
    predicted outlines (dashed), one colour per structure. Returns the figure."""
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    indices = [int(i) for i in indices]
    structures = list(structures)
    row_of = {k: r for r, k in enumerate(pred.image_ids.tolist())}
    chans = [pred.channel(s) for s in structures]
    fig, axes = plt.subplots(1, len(indices), figsize=(3.2 * len(indices), 3.8), squeeze=False)
    for ax, i in zip(axes[0], indices):
        meta = dataset.index.iloc[i]
        r = row_of[str(meta["image_id"])]
        ax.imshow(dataset.images[i], cmap="gray", vmin=0, vmax=1)
        gt = dataset.masks_for([i], structures)[0]
        for k, c in enumerate(chans):
            colour = f"C{k % 10}"
            if gt[k].any():
                ax.contour(gt[k], levels=[0.5], colors=[colour], linewidths=1.0)
            if pred.masks[r, c].any():
                ax.contour(pred.masks[r, c], levels=[0.5], colors=[colour], linewidths=1.2, linestyles="--")
        ax.set_title(f"{meta['image_id']} ({meta['view']})", fontsize=9)
        ax.axis("off")
    handles = [Line2D([], [], color=f"C{k % 10}", label=s) for k, s in enumerate(structures)]
    handles += [Line2D([], [], color="k", label="ground truth"),
                Line2D([], [], color="k", ls="--", label=title)]
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 6), frameon=False, fontsize=8)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    return fig


def comparison_table(
    summaries: dict[str, "pd.DataFrame"],  # {model name: summary from evaluate_predictions}
    metrics: Sequence[str] = ("dice", "hd95", "box_acc@0.5"),  # columns of the summaries to show
    digits: int = 3,  # decimals shown
):
    """One table for several models: rows (structure, model), one column per metric
    as "mean [lo, hi]" (95% bootstrap interval) plus the number of scored images.

    Every summary comes from its own `evaluate_predictions` call; nothing is
    re-scored here. Structures a model did not predict are left out for that model.
    """
    import pandas as pd

    frames = []
    for model, s in summaries.items():
        f = pd.DataFrame(index=s.index)
        f["model"] = model
        f["n"] = s["n"].astype(int)
        for m in metrics:
            mean, lo, hi = s[m], s[f"{m}_lo"], s[f"{m}_hi"]
            f[m] = [
                "n/a" if not np.isfinite(a) else f"{a:.{digits}f} [{b:.{digits}f}, {c:.{digits}f}]"
                for a, b, c in zip(mean, lo, hi)
            ]
        frames.append(f.reset_index())
    table = pd.concat(frames, ignore_index=True)
    order = list(dict.fromkeys(n for s in summaries.values() for n in s.index))
    table["structure"] = pd.Categorical(table["structure"], categories=order, ordered=True)
    table["model"] = pd.Categorical(table["model"], categories=list(summaries), ordered=True)
    return table.sort_values(["structure", "model"]).set_index(["structure", "model"])
