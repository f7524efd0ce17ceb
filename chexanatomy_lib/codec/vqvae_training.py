"""Training the mask VQ-VAE on 64x64 crops, in the project's one training loop.

A short plain-autoencoder warm-up, then: the codebook initialised from encoder
outputs, the straight-through estimator for the encoder, an exponential-moving-average
codebook (k-means-like updates), a commitment loss, restarts of unused codes from
current encoder outputs, and the reconstruction loss of :func:`reconstruction_loss`.
The schedule, optimiser, progress, loss log and resumable state are
:func:`chexanatomy_lib.training.train_loop`'s; the codebook statistics and the batch
generator are saved with the state, so a resumed run ends where an uninterrupted one does.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .geometry import MASK_SIZE
from .vqvae import GRID, MaskVQVAE, VQVAEConfig, soft_dice

# Settings that do not change what is computed (a saved state made with other values resumes).
_RESUME_FREE = ("threads", "extra")


@dataclass
class VQVAETrainConfig:
    """Training settings for :func:`train_vqvae`."""

    steps: int = 600  # optimiser steps
    batch_size: int = 128  # masks per step
    lr: float = 2e-3  # AdamW peak learning rate (5% warm-up, cosine decay to 2% of the peak)
    weight_decay: float = 0.0  # AdamW weight decay
    grad_clip: float | None = 1.0  # global gradient-norm clip (None = no clipping)
    mse_weight: float = 1.0  # weight of the squared error to the target 2 * m - 1
    commitment: float = 0.25  # beta of the commitment loss
    bce_weight: float = 0.0  # weight of a binary cross-entropy term on the decoder output (logits x 4)
    dice_weight: float = 0.0  # weight of a soft Dice loss on sigmoid(4 x decoder output), per crop
    ema_decay: float = 0.95  # codebook EMA decay
    ae_warmup: float = 0.1  # fraction of steps trained as a plain autoencoder before the codebook is set
    restart_every: int = 25  # steps between dead-code restarts (0 = never)
    restart_below: float = 0.5  # an entry with EMA usage below this (per batch) is restarted
    flip: bool = True  # random horizontal flips as augmentation
    seed: int = 0  # torch seed (init, batches, restarts)
    threads: int | None = None  # torch CPU threads while training (None = leave as is; restored afterwards)
    extra: dict = field(default_factory=dict)  # free-form notes kept in the record


class CodebookEMA(nn.Module):
    """The codebook's running statistics while it trains (buffers, saved with each training state).

    count float [K] (EMA of assignments), total float [K, D] (EMA of assigned encoder
    outputs), initialised (bool scalar: the codebook has been set from encoder outputs).
    """

    def __init__(self, num_embeddings: int, dim: int):
        super().__init__()
        self.register_buffer("count", torch.ones(num_embeddings))
        self.register_buffer("total", torch.zeros(num_embeddings, dim))
        self.register_buffer("initialised", torch.zeros((), dtype=torch.bool))


class GeneratorState:
    """A ``torch.Generator`` as a checkpointable object (``state_dict`` / ``load_state_dict``)."""

    def __init__(self, generator: torch.Generator):
        self.generator = generator

    def state_dict(self) -> dict:
        return {"state": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["state"])


def draw_batch(n: int, batch_size: int, generator: torch.Generator, weights: torch.Tensor | None = None
               ) -> torch.Tensor:
    """Indices int64 [batch_size] in range(n), drawn with replacement: uniform, or with
    probability proportional to ``weights`` (float [n] >= 0, not all 0)."""
    if weights is None:
        return torch.randint(0, n, (batch_size,), generator=generator)
    return torch.multinomial(weights, batch_size, replacement=True, generator=generator)


def reconstruction_loss(recon: torch.Tensor, m: torch.Tensor, tc: VQVAETrainConfig
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Decoder output float [B, 64, 64] (inside = > 0) against soft crops m float [B, 64, 64] in [0, 1].

    Returns (weighted loss, squared error to ``2 * m - 1``), both scalar tensors:
    ``mse_weight`` x squared error + ``bce_weight`` x cross-entropy + ``dice_weight`` x (1 - soft Dice).
    """
    mse = F.mse_loss(recon, 2.0 * m - 1.0)
    loss = tc.mse_weight * mse
    if tc.bce_weight:
        # NOTE: the decoder output is thresholded at 0; a cross-entropy on it (scaled
        # so that +-1 maps to confident logits) weighs the sign at edges more than MSE.
        loss = loss + tc.bce_weight * F.binary_cross_entropy_with_logits(4.0 * recon, m)
    if tc.dice_weight:
        # NOTE: MSE is dominated by the background of a thin structure's box; a soft
        # Dice per crop weighs a rib's few inside pixels as much as a lung's many.
        loss = loss + tc.dice_weight * (1.0 - soft_dice(recon, m)).mean()
    return loss, mse


def train_vqvae(
    crops: np.ndarray,  # float32 [N, 64, 64] in [0, 1]: the masks' crops (geometry.masks_to_crops)
    model_config: VQVAEConfig | None = None,  # architecture
    train_config: VQVAETrainConfig | None = None,  # optimisation and codebook settings
    device: str | torch.device = "cpu",  # "cpu" or "cuda"
    progress: bool = True,  # progress bar
    weights: np.ndarray | None = None,  # float [N] >= 0: relative probability of drawing each crop (None: uniform)
    checkpoint_dir: str | Path | None = None,  # where training states are saved and resumed from (None: nowhere)
    save_every: int = 0,  # steps between saved states (0: at the end and on Ctrl-C only)
    stop_after: int | None = None,  # save and return after this many steps in all (an interruption)
) -> tuple[MaskVQVAE, dict]:
    """Train a mask VQ-VAE on soft 64x64 crops (see the module docstring).

    Returns the model (eval mode, on ``device``) and a training record (configs, the
    loss log, codebook usage and perplexity over the whole training set, wall time;
    ``"finished"`` is False when ``stop_after`` ended the call early).
    """
    from ..training import LoopConfig, make_accelerator, train_loop

    mc = model_config or VQVAEConfig()
    tc = train_config or VQVAETrainConfig()
    data = torch.as_tensor(np.asarray(crops, dtype=np.float32))
    if data.ndim != 3 or tuple(data.shape[1:]) != (MASK_SIZE, MASK_SIZE) or len(data) == 0:
        raise ValueError(f"crops must be float [N, 64, 64] with N > 0; got {tuple(data.shape)}")
    w = None
    if weights is not None:
        w = torch.as_tensor(np.asarray(weights, dtype=np.float64))
        if w.shape != (len(data),) or not torch.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
            raise ValueError(f"weights must be finite, >= 0, not all 0, of shape ({len(data)},); "
                             f"got shape {tuple(w.shape)}")
    threads_before = torch.get_num_threads()
    if tc.threads:
        torch.set_num_threads(tc.threads)
    try:
        acc = make_accelerator("cuda" if torch.device(device).type == "cuda" else "cpu")
        gen = torch.Generator().manual_seed(tc.seed)
        torch.manual_seed(tc.seed)
        model = MaskVQVAE(mc).to(acc.device)
        data = data.to(acc.device)
        k, d = mc.num_embeddings, mc.embedding_dim
        ema = CodebookEMA(k, d).to(acc.device)
        n_warm = int(tc.ae_warmup * tc.steps) if tc.steps > 1 else 0

        def batches(start: int):
            for _ in range(start, tc.steps):
                m = data[draw_batch(len(data), tc.batch_size, gen, w).to(acc.device)]
                if tc.flip:
                    flip = (torch.rand(len(m), generator=gen) < 0.5).to(acc.device)
                    m = torch.where(flip[:, None, None], m.flip(-1), m)
                yield m

        def loss_fn(_, m: torch.Tensor, step: int):
            z = model.encode_latent(m)  # [B, D, 4, 4]
            if step < n_warm:
                # NOTE: quantising from step 0 collapsed the codebook onto one code for the
                # first ~100 steps (an untrained encoder maps every crop to nearly the same
                # latent); a short autoencoder warm-up spreads the latents first.
                loss, rec = reconstruction_loss(model.decode_latent(z), m, tc)
                return loss, {"recon_mse": rec.detach()}
            flat = z.permute(0, 2, 3, 1).reshape(-1, d)
            emb = model._vq_vae._embedding
            with torch.no_grad():
                if not bool(ema.initialised):  # the codebook starts from encoder outputs
                    pick = torch.randint(0, len(flat), (k,), generator=gen).to(acc.device)
                    emb.copy_(flat[pick] + 1e-3 * torch.randn(k, d, device=acc.device))
                    ema.total.copy_(emb)
                    ema.initialised.fill_(True)
                codes = model._vq_vae.nearest(flat)
                onehot = F.one_hot(codes, k).type_as(flat)
                counts = onehot.sum(0)
                ema.count.mul_(tc.ema_decay).add_(counts, alpha=1 - tc.ema_decay)
                ema.total.mul_(tc.ema_decay).add_(onehot.T @ flat, alpha=1 - tc.ema_decay)
                n = ema.count.sum()
                smoothed = (ema.count + 1e-5) / (n + k * 1e-5) * n
                emb.copy_(ema.total / smoothed[:, None])
                restarted = 0
                if tc.restart_every and step > n_warm and (step - n_warm) % tc.restart_every == 0:
                    dead = torch.nonzero(ema.count < tc.restart_below).flatten()
                    if len(dead):
                        pick = torch.randint(0, len(flat), (len(dead),), generator=gen).to(acc.device)
                        emb[dead] = flat[pick]
                        ema.total[dead] = flat[pick]
                        ema.count[dead] = 1.0
                        restarted = int(len(dead))
                probs = counts / counts.sum()
                perplexity = torch.exp(-(probs * torch.log(probs + 1e-10)).sum())
            q = emb[codes]
            commit = F.mse_loss(flat, q)
            q_st = flat + (q - flat).detach()
            recon = model.decode_latent(q_st.reshape(z.shape[0], GRID, GRID, d).permute(0, 3, 1, 2))
            loss, rec = reconstruction_loss(recon, m, tc)
            return loss + tc.commitment * commit, {"recon_mse": rec.detach(), "commitment": commit.detach(),
                                                   "perplexity": perplexity, "restarted": restarted}

        loop = LoopConfig(steps=tc.steps, lr=tc.lr, warmup_steps=max(1, int(0.05 * tc.steps)), min_lr_ratio=0.02,
                          weight_decay=tc.weight_decay, grad_clip=tc.grad_clip, save_every=save_every,
                          log_every=10, stop_after=stop_after, desc="VQ-VAE", progress=progress)
        # NOTE: hashing the crops takes a moment; only a run that saves states needs it
        fingerprint = None if checkpoint_dir is None else {
            "model": mc.to_json(), "train": {k_: v for k_, v in asdict(tc).items() if k_ not in _RESUME_FREE},
            "crops": _digest(data), "weights": None if w is None else _digest(w)}
        result = train_loop(model, list(model.encoder.parameters()) + list(model.decoder.parameters()), batches,
                            loss_fn, loop, checkpoint_dir=checkpoint_dir, fingerprint=fingerprint,
                            extra_state=(ema, GeneratorState(gen)), accelerator=acc)
        return model, _record(model, data, mc, tc, w, result, acc.device)
    finally:
        torch.set_num_threads(threads_before)


def _digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().cpu().contiguous().numpy().tobytes()).hexdigest()[:16]


def _record(model: MaskVQVAE, data: torch.Tensor, mc: VQVAEConfig, tc: VQVAETrainConfig, w, result, device) -> dict:
    """The training record: configs, loss log, codebook use over the whole training set."""
    k = mc.num_embeddings
    final_counts = torch.zeros(k, dtype=torch.long)
    with torch.no_grad():
        for s in range(0, len(data), 1024):
            c = model.encode(data[s:s + 1024]).cpu().flatten()
            final_counts += torch.bincount(c, minlength=k)
    p = final_counts.double() / final_counts.sum()
    return {
        "model_config": mc.to_json(),
        "train_config": asdict(tc),
        "n_train_crops": int(len(data)),
        "finished": result.finished,
        "weighted_sampling": w is not None,
        "wall_s": round(result.state.wall_s, 2),
        "history": result.log,
        "final_recon_mse": result.log[-1]["recon_mse"] if result.log else None,
        "codebook_used": int((final_counts > 0).sum()),
        "codebook_size": k,
        "codebook_perplexity": float(torch.exp(-(p * torch.log(p + 1e-12)).sum())),
        "code_counts": final_counts.tolist(),
        "device": str(device),
        "torch": torch.__version__,
    }
