"""The DreamBooth objective.

Instance and class examples travel in one batch ([instance; class] along dim 0) through one UNet
forward. The loss is split along that same batch dimension. (mmagic splits along latent *channels*,
which mixes subject and class examples in both halves.) Min-SNR weights are computed per example from
that example's own timestep, so the prior half is weighted by its timesteps, not by a batch-wide SNR.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def prediction_target(scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":  # SD 2.x 768 models
        return scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(f"scheduler prediction_type '{kind}' is not supported (epsilon or v_prediction)")


def snr(scheduler, timesteps: torch.Tensor) -> torch.Tensor:
    alphas_cumprod = scheduler.alphas_cumprod.to(timesteps.device)[timesteps].float()
    return alphas_cumprod / (1.0 - alphas_cumprod)


def min_snr_weights(scheduler, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    """Per-example Min-SNR-gamma weights (Hang et al. 2023) for the scheduler's prediction type."""
    s = snr(scheduler, timesteps)
    clipped = torch.clamp(s, max=gamma)
    if scheduler.config.prediction_type == "v_prediction":
        return clipped / (s + 1.0)
    return clipped / s


def dreambooth_loss(pred: torch.Tensor, target: torch.Tensor, timesteps: torch.Tensor, n_instance: int,
                    prior_loss_weight: float = 1.0, scheduler=None, snr_gamma: float | None = None):
    """Return (loss, instance_loss, prior_loss or None).

    pred/target: (B, C, H, W) with the first n_instance rows from subject images and the rest from
    class images. loss = instance + prior_loss_weight * prior.
    """
    per_example = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=tuple(range(1, pred.ndim)))
    if snr_gamma:
        per_example = per_example * min_snr_weights(scheduler, timesteps, snr_gamma)
    instance = per_example[:n_instance].mean()
    if n_instance == per_example.shape[0]:
        return instance, instance, None
    prior = per_example[n_instance:].mean()
    return instance + prior_loss_weight * prior, instance, prior
