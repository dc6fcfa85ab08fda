"""The DreamBooth objective.

Instance and class examples travel in one batch ([instance; class] along dim 0) through one UNet
forward. The loss is split along that same batch dimension. (mmagic splits along latent *channels*,
which mixes subject and class examples in both halves.) Loss weights (min-SNR) come per example from the
family's objective, each from that example's own timestep, so the prior half is weighted by its
timesteps, not by a batch-wide SNR.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def dreambooth_loss(pred: torch.Tensor, target: torch.Tensor, n_instance: int, prior_loss_weight: float = 1.0,
                    weights: torch.Tensor | None = None, mask: torch.Tensor | None = None, unmasked_weight: float = 0.0):
    """Return (loss, instance_loss, prior_loss or None).

    pred/target: (B, C, H, W) with the first n_instance rows from subject images and the rest from
    class images; weights: (B,) per-example loss weights (Objective.weights) or None.
    mask (masked_loss): (n_instance, 1, H, W) in [0, 1] on the latent grid of pred (every family's `denoise`
    returns unpacked latents, so FLUX's 2x2 packing never meets it); each instance pixel's squared error is
    weighted by its mask value clamped to [unmasked_weight, 1] and averaged over all pixels, as kohya's
    masked loss (the subject's error is not renormalised by its area). Class rows are never masked.
    loss = instance + prior_loss_weight * prior.
    """
    se = F.mse_loss(pred.float(), target.float(), reduction="none")
    if mask is not None:
        w = torch.ones((se.shape[0], 1, *se.shape[2:]), device=se.device)
        w[:n_instance] = mask.to(se.device, torch.float32).clamp(unmasked_weight, 1.0)
        se = se * w
    per_example = se.mean(dim=tuple(range(1, pred.ndim)))
    if weights is not None:
        per_example = per_example * weights
    instance = per_example[:n_instance].mean()
    if n_instance == per_example.shape[0]:
        return instance, instance, None
    prior = per_example[n_instance:].mean()
    return instance + prior_loss_weight * prior, instance, prior
