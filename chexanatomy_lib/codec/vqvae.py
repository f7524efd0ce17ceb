"""The mask VQ-VAE of PaliGemma's segmentation tokens, in PyTorch.

Architecture (big_vision's mask VAE, used for ``vae-oid.npz``):

* encoder: input ``2 * (m - 0.5)`` in [-1, 1]; four stride-2 convolutions with
  TensorFlow ``'SAME'`` padding, each followed by ReLU (64x64 -> 4x4); two residual
  blocks (conv, ReLU, conv, ReLU, conv, plus skip); a final conv; nearest codebook
  entry (squared L2) per cell of the 4x4 grid, read in row-major (y, x) order.
* decoder: codebook lookup to ``[B, D, 4, 4]``; 1x1 conv + ReLU; two residual
  blocks; four transposed convs (kernel 4, stride 2, PyTorch padding 1) each with
  ReLU (4 -> 8 -> 16 -> 32 -> 64); 1x1 conv to one channel; output nominally in [-1, 1].

Module names reproduce the checkpoint's key names (``encoder.0.weight``,
``decoder.2.net.0.weight``, ``_vq_vae._embedding`` ...), and weights are stored in
PyTorch layout, so the official file loads with no transposition.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..checkpoints import CheckpointError
from .geometry import MASK_SIZE
from .tokens import NUM_SEG_TOKENS

GRID = 4  # the encoder's output grid: GRID x GRID codes per mask
assert GRID * GRID == NUM_SEG_TOKENS


@dataclass(frozen=True)
class VQVAEConfig:
    """Widths and kernels of a :class:`MaskVQVAE` (defaults: big_vision's decoder widths)."""

    enc_channels: tuple[int, ...] = (16, 32, 64, 128)  # outputs of the four stride-2 convs
    enc_kernel: int = 4  # kernel of the stride-2 convs
    res_kernels: tuple[int, int, int] = (3, 3, 1)  # residual block convs (both encoder and decoder)
    enc_out_kernel: int = 1  # final encoder conv
    embedding_dim: int = 128  # codebook vector size D
    num_embeddings: int = 128  # codebook entries (seg tokens)
    dec_channels: tuple[int, ...] = (128, 128, 64, 32, 16)  # 1x1 conv, then four transposed convs

    def to_json(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_json(cls, d: dict) -> "VQVAEConfig":
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


class SameConv2d(nn.Conv2d):
    """Conv2d with TensorFlow ``'SAME'`` padding (asymmetric when the total pad is odd).

    NOTE: for kernel 4 / stride 2 on an even size this equals PyTorch ``padding=1``;
    for odd totals TensorFlow puts the extra row/column at the bottom/right, which
    a symmetric PyTorch padding would not reproduce.
    """

    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1):
        super().__init__(cin, cout, kernel, stride=stride, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads = []
        for size, k, s in zip(x.shape[-1:-3:-1], self.kernel_size[::-1], self.stride[::-1]):
            out = math.ceil(size / s)
            total = max((out - 1) * s + k - size, 0)
            pads += [total // 2, total - total // 2]
        if any(pads):
            x = F.pad(x, pads)
        return F.conv2d(x, self.weight, self.bias, self.stride)


class ResBlock(nn.Module):
    """conv, ReLU, conv, ReLU, conv, plus skip (keys ``net.0``, ``net.2``, ``net.4``)."""

    def __init__(self, channels: int, kernels: tuple[int, int, int]):
        super().__init__()
        k0, k1, k2 = kernels
        self.net = nn.Sequential(
            SameConv2d(channels, channels, k0), nn.ReLU(),
            SameConv2d(channels, channels, k1), nn.ReLU(),
            SameConv2d(channels, channels, k2),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.net(x)


class VectorQuantizer(nn.Module):
    """Codebook ``_embedding`` float [K, D] (a buffer: trained by EMA, not by gradients)."""

    def __init__(self, num_embeddings: int, dim: int):
        super().__init__()
        self.register_buffer("_embedding", torch.randn(num_embeddings, dim) * 0.1)

    def nearest(self, z: torch.Tensor) -> torch.Tensor:
        """z float [M, D] -> int64 [M] index of the nearest entry (squared L2)."""
        emb = self._embedding
        d = (z * z).sum(1, keepdim=True) + (emb * emb).sum(1)[None] - 2.0 * z @ emb.T
        return d.argmin(1)


def soft_dice(decoded: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Soft Dice of ``sigmoid(4 x decoded)`` against soft masks, per crop: float [N] in (0, 1].

    decoded float [N, 64, 64] (decoder output, inside = > 0); masks float [N, 64, 64] in
    [0, 1]; smoothed by 1 in numerator and denominator. The training's Dice term
    (``vqvae_training.reconstruction_loss``) and :func:`crop_loss` both use it.
    """
    prob = torch.sigmoid(4.0 * decoded)
    inter = (prob * masks).sum((1, 2))
    return (2 * inter + 1.0) / (prob.sum((1, 2)) + masks.sum((1, 2)) + 1.0)


def crop_loss(decoded: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """How far decoded crops are from their masks, per crop: float [N].

    decoded float [N, 64, 64] (decoder output, inside = > 0, clipped to [-1, 1]); masks
    float [N, 64, 64] in [0, 1]. The training's reconstruction loss per crop
    (``vqvae_training.reconstruction_loss`` with MSE and soft Dice weighted 1:1): mean
    squared error to ``2 m - 1`` plus ``1 -`` :func:`soft_dice`.
    """
    mse = ((decoded - (2.0 * masks - 1.0)) ** 2).mean((1, 2))
    return mse + (1.0 - soft_dice(decoded, masks))


#: masks per decoder call in :meth:`MaskVQVAE.decode`: small enough that a chunk's
#: 64x64 feature maps stay in the CPU's caches (on two CPU cores, 1,024 at once decoded
#: 0.6-0.7x as many masks per second as chunks of 64; ``benchmarks/bench_codec.py``)
DECODE_CHUNK = 64


class MaskVQVAE(nn.Module):
    """Mask VQ-VAE: 64x64 soft masks <-> 16 codes in range(``num_embeddings``).

    Use :meth:`encode` / :meth:`decode` for inference, :meth:`load_official_npz` for
    big_vision's ``vae-oid.npz`` and :meth:`save` / :meth:`load` for ours.
    """

    def __init__(self, config: VQVAEConfig | None = None):
        super().__init__()
        self.config = cfg = config or VQVAEConfig()
        if len(cfg.enc_channels) != 4 or len(cfg.dec_channels) != 5:
            raise ValueError("MaskVQVAE needs 4 encoder widths and 5 decoder widths (64 -> 4 -> 64)")
        enc: list[nn.Module] = []
        cin = 1
        for c in cfg.enc_channels:
            enc += [SameConv2d(cin, c, cfg.enc_kernel, stride=2), nn.ReLU()]
            cin = c
        enc += [ResBlock(cin, cfg.res_kernels), ResBlock(cin, cfg.res_kernels),
                SameConv2d(cin, cfg.embedding_dim, cfg.enc_out_kernel)]
        self.encoder = nn.Sequential(*enc)  # indices 0..10 as in the checkpoint
        w = cfg.dec_channels
        dec: list[nn.Module] = [nn.Conv2d(cfg.embedding_dim, w[0], 1), nn.ReLU(),
                                ResBlock(w[0], cfg.res_kernels), ResBlock(w[0], cfg.res_kernels)]
        for cin, cout in zip(w[:-1], w[1:]):
            dec += [nn.ConvTranspose2d(cin, cout, 4, stride=2, padding=1), nn.ReLU()]
        dec += [nn.Conv2d(w[-1], 1, 1)]
        self.decoder = nn.Sequential(*dec)  # indices 0..12 as in the checkpoint
        self._vq_vae = VectorQuantizer(cfg.num_embeddings, cfg.embedding_dim)

    # ------------------------------------------------------------------ core maps
    @property
    def device(self) -> torch.device:
        return self._vq_vae._embedding.device

    def encode_latent(self, masks: torch.Tensor) -> torch.Tensor:
        """masks float [N, 64, 64] in [0, 1] -> encoder output float [N, D, 4, 4]."""
        if masks.ndim != 3 or tuple(masks.shape[1:]) != (MASK_SIZE, MASK_SIZE):
            raise ValueError(f"masks must be [N, 64, 64]; got {tuple(masks.shape)}")
        x = 2.0 * (masks[:, None].to(self._vq_vae._embedding.dtype) - 0.5)
        return self.encoder(x)

    def quantize(self, z: torch.Tensor) -> torch.Tensor:
        """Encoder output float [N, D, 4, 4] -> codes int64 [N, 16] (row-major y, x)."""
        n, d = z.shape[:2]
        flat = z.permute(0, 2, 3, 1).reshape(-1, d)
        return self._vq_vae.nearest(flat).reshape(n, NUM_SEG_TOKENS)

    def embed(self, codes: torch.Tensor) -> torch.Tensor:
        """codes int [N, 16] -> quantised latents float [N, D, 4, 4]."""
        emb = self._vq_vae._embedding[codes.long()]  # [N, 16, D]
        return emb.reshape(codes.shape[0], GRID, GRID, self.config.embedding_dim).permute(0, 3, 1, 2)

    def decode_latent(self, q: torch.Tensor) -> torch.Tensor:
        """Latents float [N, D, 4, 4] -> decoder output float [N, 64, 64] (unclipped)."""
        return self.decoder(q)[:, 0]

    @torch.no_grad()
    def encode(self, masks: torch.Tensor | np.ndarray, search: int = 0, passes: int = 2) -> torch.Tensor:
        """masks float [N, 64, 64] in [0, 1] -> codes int64 [N, 16] in range(num_embeddings).

        ``search`` = 0: each cell's nearest codebook entry (big_vision's encoder).
        ``search`` = K > 0: then :meth:`search_codes` over each cell's K nearest entries.
        """
        m = torch.as_tensor(np.asarray(masks) if not isinstance(masks, torch.Tensor) else masks)
        m = m.to(self.device, torch.float32)
        z = self.encode_latent(m)
        codes = self.quantize(z)
        return self.search_codes(m, codes, z, search, passes) if search else codes

    @torch.no_grad()
    def search_codes(self, masks: torch.Tensor, codes: torch.Tensor, latents: torch.Tensor, candidates: int,
                     passes: int = 2) -> torch.Tensor:
        """Codes chosen by the decoder: coordinate descent on :func:`crop_loss`.

        masks float [N, 64, 64] in [0, 1] (the crops); codes int64 [N, 16] to start from
        (the nearest entries); latents float [N, D, 4, 4] (the encoder's output). For each
        cell in turn (``passes`` sweeps over the 16 cells), the cell's ``candidates``
        nearest codebook entries to its latent are decoded in place of its code, and the
        one whose decoded crop has the lowest loss is kept (the current code when none is
        lower). Returns int64 [N, 16]; the loss never rises above the nearest codes'.

        NOTE: the nearest entry in latent space is not the one the decoder draws best
        from: on chapter 2's held-out masks at 448 px, 4 candidates and 2 passes raise
        the round-trip Dice of ribs by about 0.014 and of lungs and the heart by about
        0.004 (``benchmarks/README.md``), at ``1 + 2 * 16 * candidates`` decoder passes
        per mask. Encoder-side only: the official decoder reads such codes as it reads
        any other.
        """
        n, d = latents.shape[:2]
        if n == 0 or candidates <= 0 or passes <= 0:
            return codes
        emb = self._vq_vae._embedding
        flat = latents.permute(0, 2, 3, 1).reshape(n, NUM_SEG_TOKENS, d)
        dist = (flat * flat).sum(-1, keepdim=True) + (emb * emb).sum(1) - 2.0 * flat @ emb.T  # [N, 16, K]
        k = min(int(candidates), self.config.num_embeddings)
        cand = dist.topk(k, dim=-1, largest=False).indices  # [N, 16, k], nearest first
        codes = codes.clone()
        best = crop_loss(self.decode(codes), masks)
        rows = torch.arange(n, device=codes.device)
        for _ in range(passes):
            for cell in range(NUM_SEG_TOKENS):
                trials = codes.repeat(k, 1)  # [k * N, 16], candidate j of mask i at row j * N + i
                trials[:, cell] = cand[:, cell, :].T.reshape(-1)
                loss = crop_loss(self.decode(trials), masks.repeat(k, 1, 1)).reshape(k, n)
                low, j = loss.min(0)
                better = low < best
                codes[better, cell] = cand[rows[better], cell, j[better]]
                best = torch.where(better, low, best)
        return codes

    @torch.no_grad()
    def decode(self, codes: torch.Tensor | np.ndarray, clip: bool = True) -> torch.Tensor:
        """codes int [N, 16] in range(num_embeddings) -> float [N, 64, 64] in [-1, 1] (> 0 = inside).

        ``clip=False`` returns the raw decoder output (the official decoder has no final
        squashing; its output is only nominally in [-1, 1]). Decoded in chunks of
        :data:`DECODE_CHUNK` masks.
        """
        c = torch.as_tensor(codes).to(self.device).long()
        if c.ndim != 2 or c.shape[1] != NUM_SEG_TOKENS:
            raise ValueError(f"codes must be [N, 16]; got {tuple(c.shape)}")
        if c.numel() and (c.min() < 0 or c.max() >= self.config.num_embeddings):
            raise ValueError(f"codes must be in range({self.config.num_embeddings})")
        q = self.embed(c)
        out = torch.empty((len(c), MASK_SIZE, MASK_SIZE), device=self.device, dtype=q.dtype)
        for s in range(0, len(c), DECODE_CHUNK):
            part = self.decode_latent(q[s:s + DECODE_CHUNK])
            out[s:s + DECODE_CHUNK] = part.clamp_(-1.0, 1.0) if clip else part
        return out

    # ------------------------------------------------------------------ checkpoints
    @classmethod
    def load_official_npz(cls, path: str | Path) -> "MaskVQVAE":
        """Load big_vision's ``vae-oid.npz`` (PyTorch-layout weights; widths read from it).

        Raises :class:`CheckpointError` naming the file and the missing key or wrong shape.
        """
        path = Path(path)
        if not path.is_file():
            raise CheckpointError(path, "no such file (the official mask VAE is 'vae-oid.npz', "
                                  "supplied by the user; nothing downloads it)")
        try:
            with np.load(path, allow_pickle=False) as z:
                arrays = {k: np.asarray(z[k]) for k in z.files}
        except Exception as exc:  # noqa: BLE001
            raise CheckpointError(path, f"not a readable .npz file ({type(exc).__name__}: {exc})") from None
        return cls.from_state_arrays(arrays, source=str(path))

    @classmethod
    def from_state_arrays(cls, arrays: dict[str, np.ndarray], source: str = "<arrays>") -> "MaskVQVAE":
        """Build from a dict of checkpoint arrays with the official key names (shapes checked)."""

        def get(key: str, ndim: int) -> np.ndarray:
            if key not in arrays:
                raise CheckpointError(source, f"missing key {key!r}")
            a = arrays[key]
            if a.ndim != ndim:
                raise CheckpointError(source, f"{key!r} has shape {a.shape}, expected {ndim} dims")
            return a

        emb = get("_vq_vae._embedding", 2)
        enc_w = [get(f"encoder.{i}.weight", 4) for i in (0, 2, 4, 6)]
        res_k = tuple(int(get(f"encoder.8.net.{j}.weight", 4).shape[-1]) for j in (0, 2, 4))
        cfg = VQVAEConfig(
            enc_channels=tuple(int(w.shape[0]) for w in enc_w),
            enc_kernel=int(enc_w[0].shape[-1]),
            res_kernels=res_k,  # type: ignore[arg-type]
            enc_out_kernel=int(get("encoder.10.weight", 4).shape[-1]),
            embedding_dim=int(emb.shape[1]),
            num_embeddings=int(emb.shape[0]),
            dec_channels=(int(get("decoder.0.weight", 4).shape[0]),)
            + tuple(int(get(f"decoder.{i}.weight", 4).shape[1]) for i in (4, 6, 8, 10)),
        )
        model = cls(cfg)
        state = model.state_dict()
        for key, ref in state.items():
            if key not in arrays:
                raise CheckpointError(source, f"missing key {key!r}")
            if tuple(arrays[key].shape) != tuple(ref.shape):
                raise CheckpointError(source, f"{key!r} has shape {tuple(arrays[key].shape)}, "
                                      f"expected {tuple(ref.shape)}")
            state[key] = torch.from_numpy(np.ascontiguousarray(arrays[key], dtype=np.float32))
        model.load_state_dict(state)
        return model.eval()

    def state_arrays(self) -> dict[str, np.ndarray]:
        """Weights as float32 NumPy arrays under the official key names."""
        return {k: v.detach().cpu().float().numpy() for k, v in self.state_dict().items()}

    def save(self, directory: str | Path, record: dict[str, Any] | None = None) -> Path:
        """Write ``model.safetensors``, ``config.json`` and ``training.json`` (``record``) to ``directory``."""
        from safetensors.torch import save_file

        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().cpu().float().contiguous() for k, v in self.state_dict().items()},
                  str(d / "model.safetensors"))
        (d / "config.json").write_text(json.dumps({"format": "chexanatomy-mask-vqvae/1",
                                                   **self.config.to_json()}, indent=2))
        (d / "training.json").write_text(json.dumps(record or {}, indent=2, default=_json_default))
        return d

    @classmethod
    def load(cls, directory: str | Path) -> "MaskVQVAE":
        """Load a VQ-VAE written by :meth:`save` (errors name the directory and the problem)."""
        from safetensors.torch import load_file

        d = Path(directory)
        for name in ("config.json", "model.safetensors"):
            if not (d / name).is_file():
                raise CheckpointError(d, f"missing {name} (expected a directory written by MaskVQVAE.save)")
        try:
            cfg_json = json.loads((d / "config.json").read_text())
            cfg_json.pop("format", None)
            cfg = VQVAEConfig.from_json(cfg_json)
        except (ValueError, TypeError) as exc:
            raise CheckpointError(d / "config.json", f"invalid config ({exc})") from None
        try:
            tensors = load_file(str(d / "model.safetensors"))
        except Exception as exc:  # noqa: BLE001
            raise CheckpointError(d / "model.safetensors", f"unreadable ({type(exc).__name__}: {exc})") from None
        model = cls.from_state_arrays({k: v.numpy() for k, v in tensors.items()},
                                      source=str(d / "model.safetensors"))
        if model.config != cfg:
            raise CheckpointError(d / "config.json", f"config {cfg} does not match the weights "
                                  f"in model.safetensors ({model.config})")
        return model

    @staticmethod
    def training_record(directory: str | Path) -> dict:
        """The ``training.json`` written next to a saved VQ-VAE ({} when absent)."""
        p = Path(directory) / "training.json"
        return json.loads(p.read_text()) if p.is_file() else {}


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(type(o).__name__)
