"""Training loss of the baseline: soft Dice plus binary cross-entropy per structure,
with structures cut by the CT's field of view left out per image.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["MaskedDiceBCELoss"]


class MaskedDiceBCELoss(torch.nn.Module):
    """Dice + BCE over sigmoid channels, counting only valid (image, structure) pairs.

    forward(logits float [B, S, h, w], target float [B, S, h, w] in [0, 1],
    valid bool [B, S]) -> dict with scalar tensors "loss", "dice", "bce".

    - A truncated structure (the CT volume cut it, so its projected mask is
      partial) is invalid for that image: it adds nothing to either term.
    - An absent structure is a valid, empty target: the model must predict nothing.

    NOTE: the Dice term is MONAI's `DiceLoss(batch=True)`: intersection and
    sums are pooled over the valid images of the batch per structure, so an
    empty target does not make the per-image Dice ill-defined (a per-image Dice
    of an empty target is 1 - eps/(sum p + eps) ~ 1 for any soft prediction and
    gives no useful gradient). Invalid pairs are zeroed in both prediction and
    target before pooling; structures with no valid image in the batch are
    left out of the mean.
    """

    def __init__(self, dice_weight: float = 1.0, bce_weight: float = 1.0):
        super().__init__()
        from monai.losses import DiceLoss

        self.dice_weight = float(dice_weight)
        self.bce_weight = float(bce_weight)
        self._dice = DiceLoss(sigmoid=False, batch=True, reduction="none", smooth_nr=1e-5, smooth_dr=1e-5)

    def forward(self, logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor) -> dict[str, torch.Tensor]:
        if logits.shape != target.shape:
            raise ValueError(f"logits {tuple(logits.shape)} and target {tuple(target.shape)} differ")
        if valid.shape != logits.shape[:2]:
            raise ValueError(f"valid {tuple(valid.shape)} must be [B, S] = {tuple(logits.shape[:2])}")
        logits = logits.float()
        target = target.float()
        w = valid.to(logits.dtype)  # [B, S]
        w4 = w[:, :, None, None]
        prob = torch.sigmoid(logits)
        dice_per_s = self._dice(prob * w4, target * w4).reshape(-1)  # [S]
        has_valid = valid.any(dim=0)  # [S]
        n_valid_s = has_valid.sum().clamp(min=1)
        dice = (dice_per_s * has_valid.to(dice_per_s.dtype)).sum() / n_valid_s
        bce_map = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
        bce_per_bs = bce_map.mean(dim=(2, 3))  # [B, S]
        bce = (bce_per_bs * w).sum() / w.sum().clamp(min=1.0)
        loss = self.dice_weight * dice + self.bce_weight * bce
        return {"loss": loss, "dice": dice.detach(), "bce": bce.detach()}
