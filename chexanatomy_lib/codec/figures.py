"""The mask VQ-VAE's training record, drawn (chapter 2). Comparisons of masks are
:mod:`chexanatomy_lib.evaluation.figures`'s."""

from __future__ import annotations

import numpy as np


def plot_training(record: dict, axes=None):
    """Reconstruction loss and codebook perplexity over steps, and final code usage.

    record: the training record of :func:`chexanatomy_lib.codec.vqvae_training.train_vqvae`
    (its ``history`` is the training loop's log: a mean over each logging interval).
    Returns the array of three Axes.
    """
    import matplotlib.pyplot as plt

    if axes is None:
        _, axes = plt.subplots(1, 3, figsize=(13, 3.2))
    h = record["history"]
    steps = [r["step"] for r in h]
    axes[0].semilogy(steps, [r["recon_mse"] for r in h], label="reconstruction MSE")
    q = [r for r in h if r.get("perplexity") is not None]  # after the autoencoder warm-up
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
