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
                    weights: torch.Tensor | None = None):
    """Return (loss, instance_loss, prior_loss or None).

    pred/target: (B, C, H, W) with the first n_instance rows from subject images and the rest from
    class images; weights: (B,) per-example loss weights (Objective.weights) or None.
    loss = instance + prior_loss_weight * prior.
    """
    per_example = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=tuple(range(1, pred.ndim)))
    if weights is not None:
        per_example = per_example * weights
    instance = per_example[:n_instance].mean()
    if n_instance == per_example.shape[0]:
        return instance, instance, None
    prior = per_example[n_instance:].mean()
    return instance + prior_loss_weight * prior, instance, prior
