"""Figures of chapter 3: the loss curve and the training tasks (returned, not shown).

Comparisons of models (tables, bar charts, overlays) are `chexanatomy_lib.evaluation.figures`'s."""

from __future__ import annotations

from typing import Sequence

import numpy as np

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
