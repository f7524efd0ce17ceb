"""Figures of chapter 1: projected radiographs with their masks (figures are returned, not shown)."""

from __future__ import annotations

from typing import Mapping, Sequence


def plot_examples(dataset, indices: Sequence[int], overlay: Mapping[str, str]):
    """One column per image: the radiograph plain (top) and with mask contours (bottom).

    ``dataset``: a :class:`~chexanatomy_lib.ct.dataset.ProjectedDataset`;
    ``indices``: rows of its index; ``overlay``: structure name -> matplotlib
    colour of its contour (names must be dataset structures; empty masks are
    skipped). Titles give each image's view and id, and the structures drawn
    (their names without the last ``_part``).
    """
    import matplotlib.pyplot as plt

    idx = dataset.index
    fig, axes = plt.subplots(2, len(indices), figsize=(4.5 * len(indices), 9), squeeze=False)
    for col, i in enumerate(indices):
        axes[0, col].imshow(dataset.images[i], cmap="gray", vmin=0, vmax=1)
        axes[0, col].set_title(f"{idx.at[i, 'view'].upper()}  ({idx.at[i, 'image_id']})", fontsize=9)
        axes[1, col].imshow(dataset.images[i], cmap="gray", vmin=0, vmax=1)
        for name, color in overlay.items():
            m = dataset.mask(i, name)
            if m.any():
                axes[1, col].contour(m, levels=[0.5], colors=[color], linewidths=1.0)
        axes[1, col].set_title("masks: " + ", ".join(dict.fromkeys(n.rsplit("_", 1)[0] for n in overlay)),
                               fontsize=8)
    for ax in axes.ravel():
        ax.set_axis_off()
    fig.tight_layout()
    return fig


def plot_cohort_grid(dataset, indices: Sequence[int], overlay: Mapping[str, str],
                     shape: tuple[int, int] = (2, 6), figsize: tuple[float, float] = (15, 5.4)):
    """Images of a cohort side by side (row-major in a ``shape`` grid, at most
    ``rows * cols`` of them), each with the contours of ``overlay``'s structures
    (name -> colour; those not in the dataset are skipped) and its copy and
    in-plane rotation ``rz`` in the title."""
    import matplotlib.pyplot as plt

    idx = dataset.index
    fig, axes = plt.subplots(*shape, figsize=figsize, squeeze=False)
    for ax, i in zip(axes.ravel(), indices):
        ax.imshow(dataset.images[i], cmap="gray", vmin=0, vmax=1)
        for name, color in overlay.items():
            if name in dataset.structures:
                ax.contour(dataset.mask(i, name), levels=[0.5], colors=[color], linewidths=0.7)
        ax.set_title(f"copy {idx.at[i, 'copy_id'][-3:]}  rz {idx.at[i, 'rz']:+.0f} deg", fontsize=8)
    for ax in axes.ravel():
        ax.set_axis_off()
    fig.tight_layout()
    return fig
