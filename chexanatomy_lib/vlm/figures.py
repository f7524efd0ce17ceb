"""Figures and tables of chapter 3 (matplotlib figures are returned, not shown)."""

from __future__ import annotations

from typing import Sequence

import numpy as np

COLOURS = ["#e6194b", "#3cb44b", "#ffe119", "#4363d8", "#f58231", "#911eb4", "#46f0f0", "#f032e6"]


def plot_loss(log: Sequence[dict], title: str = "training loss"):
    """Loss (and learning rate) against optimizer step from `train`'s log."""
    import matplotlib.pyplot as plt

    steps = [e["step"] for e in log]
    fig, ax = plt.subplots(figsize=(6, 3.2))
    ax.plot(steps, [e["loss"] for e in log], color="C0", label="loss (mean over log interval)")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (nats / token)")
    ax.set_yscale("log")
    ax2 = ax.twinx()
    ax2.plot(steps, [e["lr"] for e in log], color="C1", alpha=0.5, label="learning rate")
    ax2.set_ylabel("learning rate", color="C1")
    ax.set_title(title)
    fig.tight_layout()
    return fig


def plot_task_examples(samples: Sequence, max_chars: int = 70):
    """One panel per sample: the model input image with its prompt and target text."""
    import matplotlib.pyplot as plt

    n = len(samples)
    fig, axes = plt.subplots(1, n, figsize=(2.6 * n, 3.4))
    for ax, s in zip(np.atleast_1d(axes), samples):
        ax.imshow(s.image)
        ax.set_axis_off()
        tgt = s.target if len(s.target) <= max_chars else s.target[:max_chars] + "…"
        prm = s.prompt if len(s.prompt) <= max_chars else s.prompt[:max_chars] + "…"
        ax.set_title(f"[{s.task}]\n{_wrap(prm, 28)}", fontsize=7)
        ax.text(0.0, -0.04, _wrap("→ " + tgt, 34), transform=ax.transAxes, fontsize=6, va="top")
    fig.tight_layout()
    return fig


def _wrap(text: str, width: int) -> str:
    return "\n".join(text[i:i + width] for i in range(0, len(text), width))


def plot_overlays(images: np.ndarray, truth: np.ndarray, pred: np.ndarray, names: Sequence[str],
                  titles: Sequence[str] | None = None, baseline: np.ndarray | None = None):
    """Held-out images with reference contours (solid) and predicted masks (filled).

    images: float [n, H, W]; truth, pred (and optional baseline): bool [n, S, H, W].
    """
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    n = len(images)
    fig, axes = plt.subplots(1, n, figsize=(3.0 * n, 3.4))
    for k, ax in enumerate(np.atleast_1d(axes)):
        ax.imshow(images[k], cmap="gray", vmin=0, vmax=1)
        for s in range(truth.shape[1]):
            c = COLOURS[s % len(COLOURS)]
            if pred[k, s].any():
                ax.contourf(pred[k, s].astype(float), levels=[0.5, 1.5], colors=[c], alpha=0.35)
            if truth[k, s].any():
                ax.contour(truth[k, s].astype(float), levels=[0.5], colors=[c], linewidths=1.0)
            if baseline is not None and baseline[k, s].any():
                ax.contour(baseline[k, s].astype(float), levels=[0.5], colors=[c], linewidths=0.8,
                           linestyles="dotted")
        ax.set_axis_off()
        if titles is not None:
            ax.set_title(titles[k], fontsize=8)
    handles = [Patch(color=COLOURS[s % len(COLOURS)], label=nm) for s, nm in enumerate(names)]
    fig.legend(handles=handles, loc="lower center", ncol=min(len(names), 6), fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    return fig


def comparison_table(summaries: dict, metrics: Sequence[str] = ("dice", "box_acc@0.5")):
    """Per structure and model: each metric as ``mean [lo, hi]`` plus the invalid rate.

    summaries: ``{model name: summary DataFrame from evaluation.evaluate_predictions}``.
    Returns a pandas DataFrame indexed by structure with one column per (model, metric).
    """
    import pandas as pd

    cols = {}
    for model, summ in summaries.items():
        s = summ.set_index("structure") if "structure" in summ.columns else summ
        for m in metrics:
            cols[(model, m)] = [f"{s.loc[i, m]:.3f} [{s.loc[i, m + '_lo']:.3f}, {s.loc[i, m + '_hi']:.3f}]"
                                for i in s.index]
        if "invalid_rate" in s.columns:
            cols[(model, "invalid")] = [f"{v:.2f}" for v in s["invalid_rate"]]
        index = list(s.index)
    return pd.DataFrame(cols, index=index)
