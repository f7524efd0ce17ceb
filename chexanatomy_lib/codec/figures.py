"""Figures of chapter 2: codebook training and reconstructions beside originals."""

from __future__ import annotations

from typing import Sequence

import numpy as np


def plot_training(record: dict, axes=None):
    """Reconstruction loss and codebook perplexity over steps, and final code usage.

    record: the training record of :func:`chexanatomy_lib.codec.vqvae.train_vqvae`.
    Returns the array of three Axes.
    """
    import matplotlib.pyplot as plt

    if axes is None:
        _, axes = plt.subplots(1, 3, figsize=(13, 3.2))
    h = record["history"]
    steps = [r["step"] for r in h]
    axes[0].semilogy(steps, [r["recon_mse"] for r in h], label="reconstruction MSE")
    q = [r for r in h if r["perplexity"] == r["perplexity"]]  # after the autoencoder warm-up
    axes[0].semilogy([r["step"] for r in q], [max(r["commitment"], 1e-8) for r in q], label="commitment")
    if len(q) < len(h) and q:
        axes[0].axvline(q[0]["step"], ls=":", c="gray", lw=0.8)
    axes[0].set_xlabel("step")
    axes[0].legend(fontsize=8)
    axes[0].set_title("losses (training batches)")
    axes[1].plot([r["step"] for r in q], [r["perplexity"] for r in q])
    axes[1].axhline(record["codebook_size"], ls="--", c="gray", lw=0.8)
    axes[1].set_xlabel("step")
    axes[1].set_title("codebook perplexity per batch")
    counts = np.sort(np.asarray(record["code_counts"]))[::-1]
    axes[2].bar(np.arange(len(counts)), counts, width=1.0)
    axes[2].set_yscale("log")
    axes[2].set_xlabel("code (sorted by use)")
    axes[2].set_title(f"{record['codebook_used']}/{record['codebook_size']} codes used, "
                      f"perplexity {record['codebook_perplexity']:.0f}")
    return axes


def plot_reconstructions(image: np.ndarray, originals: np.ndarray, reconstructions: dict[str, np.ndarray],
                         names: Sequence[str], titles: Sequence[str], zoom: bool = True, axes=None):
    """One column per structure: the original mask (filled) and each route's reconstruction (outline).

    image: float [H, W] in [0, 1]; originals: bool [K, H, W]; reconstructions: {route: bool [K, H, W]};
    names: route label per colour; titles: one per column. With ``zoom`` each panel shows
    the structure's box plus a margin. Returns the Axes.
    """
    import matplotlib.pyplot as plt

    k = len(originals)
    if axes is None:
        _, axes = plt.subplots(1, k, figsize=(2.6 * k, 2.9), squeeze=False)
        axes = axes[0]
    colours = ["tab:red", "tab:cyan", "tab:orange", "tab:green"]
    h, w = originals.shape[-2:]
    for j in range(k):
        ax = axes[j]
        ax.imshow(image, cmap="gray", vmin=0, vmax=1)
        ax.imshow(np.ma.masked_where(~originals[j], originals[j]), cmap="autumn", alpha=0.35, vmin=0, vmax=1)
        for c, (route, rec) in enumerate(reconstructions.items()):
            if rec[j].any():
                ax.contour(rec[j].astype(float), levels=[0.5], colors=colours[c % len(colours)], linewidths=1.0)
        if zoom and originals[j].any():
            rows = np.flatnonzero(originals[j].any(1))
            cols = np.flatnonzero(originals[j].any(0))
            m = max(6, int(0.15 * max(rows[-1] - rows[0], cols[-1] - cols[0])))
            ax.set_xlim(max(cols[0] - m, 0), min(cols[-1] + m, w - 1))
            ax.set_ylim(min(rows[-1] + m, h - 1), max(rows[0] - m, 0))
        ax.set_title(titles[j], fontsize=9)
        ax.axis("off")
    handles = [plt.Line2D([], [], color=colours[c % len(colours)], label=r) for c, r in enumerate(reconstructions)]
    handles.insert(0, plt.Rectangle((0, 0), 1, 1, color="tab:red", alpha=0.35, label="original"))
    axes[-1].legend(handles=handles, fontsize=7, loc="lower right")
    return axes
