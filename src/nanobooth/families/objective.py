"""Training objectives: what a model family trains its denoiser to do.

An objective draws the noise and timesteps of a batch, makes the denoiser's noisy input, says what the
denoiser must predict and how much each example's error counts. The training loop calls only these
methods (see family.Family for when), so a family with another objective (flow matching: continuous
timesteps, a velocity target, its own weighting schemes) is a new class here, not a change to the loop.
"""

from __future__ import annotations

import torch


class Objective:
    """The objective's contract; shapes are (N, C, h, w) latents and (N,) timesteps, N examples."""

    def sample(self, shape: tuple, generator: torch.Generator, noise_offset: float = 0.0):
        """(noise (shape), timesteps (shape[0],)) drawn from `generator`, in a fixed order: the loop draws
        the whole global batch on every rank and slices its own rows, so every rank sees the same draws."""
        raise NotImplementedError

    def noisy(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """The denoiser's input for clean latents, their noise and timesteps (shape of latents)."""
        raise NotImplementedError

    def target(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """What the denoiser must predict (shape of latents)."""
        raise NotImplementedError

    def weights(self, timesteps: torch.Tensor, snr_gamma: float | None) -> torch.Tensor | None:
        """Per-example loss weights (N,), float32, or None for an unweighted mean."""
        raise NotImplementedError


class DDPMObjective(Objective):
    """Denoising diffusion on the training scheduler's discrete timesteps 0..T-1 (SD 1.x/2.x, SDXL).

    noisy = sqrt(ab_t) x0 + sqrt(1 - ab_t) eps (ab: alphas_cumprod); the target is eps, or for
    prediction_type v_prediction (SD 2.x 768) v = sqrt(ab_t) eps - sqrt(1 - ab_t) x0. Both are the
    scheduler's own formulas (add_noise, get_velocity), so training and sampling agree by construction.
    """

    def __init__(self, scheduler):
        self.scheduler = scheduler  # a DDPMScheduler: alphas_cumprod, num_train_timesteps, prediction_type
        self.prediction_type = scheduler.config.prediction_type

    def sample(self, shape: tuple, generator: torch.Generator, noise_offset: float = 0.0):
        noise = torch.randn(shape, generator=generator)
        if noise_offset:  # per-example, per-channel constant: lets the model learn very dark/bright images
            noise += noise_offset * torch.randn((shape[0], shape[1], 1, 1), generator=generator)
        timesteps = torch.randint(0, self.scheduler.config.num_train_timesteps, (shape[0],), generator=generator)
        return noise, timesteps

    def noisy(self, latents, noise, timesteps):
        return self.scheduler.add_noise(latents, noise, timesteps)

    def target(self, latents, noise, timesteps):
        if self.prediction_type == "epsilon":
            return noise
        if self.prediction_type == "v_prediction":
            return self.scheduler.get_velocity(latents, noise, timesteps)
        raise ValueError(f"scheduler prediction_type '{self.prediction_type}' is not supported (epsilon or v_prediction)")

    def snr(self, timesteps: torch.Tensor) -> torch.Tensor:
        """Signal-to-noise ratio ab_t / (1 - ab_t) per example (N,), float32."""
        alphas_cumprod = self.scheduler.alphas_cumprod.to(timesteps.device)[timesteps].float()
        return alphas_cumprod / (1.0 - alphas_cumprod)

    def weights(self, timesteps, snr_gamma):
        """Min-SNR-gamma (Hang et al. 2023), each example by its own timestep; None when snr_gamma is unset."""
        if not snr_gamma:
            return None
        s = self.snr(timesteps)
        clipped = torch.clamp(s, max=snr_gamma)
        if self.prediction_type == "v_prediction":
            return clipped / (s + 1.0)
        return clipped / s
