"""Training objectives: what a model family trains its denoiser to do.

An objective draws the noise and timesteps of a batch, makes the denoiser's noisy input, says what the
denoiser must predict and how much each example's error counts. The training loop calls only these
methods (see family.Family for when), so a family with another objective (flow matching: continuous
timesteps, a velocity target, its own weighting schemes) is a new class here, not a change to the loop.
"""

from __future__ import annotations

import math

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

    def __init__(self, scheduler, min_timestep: int = 0, max_timestep: int | None = None, bias: tuple | None = None):
        """min_timestep, max_timestep: train on the timesteps min_timestep..max_timestep - 1 only, drawn uniformly
        (kohya's --min_timestep/--max_timestep); None: up to T. ValueError for an empty or out-of-range span.
        bias: (strategy, multiplier, portion, begin, end), diffusers' SDXL script's timestep bias (see timestep_bias);
        None or strategy "none": uniform."""
        self.scheduler = scheduler  # a DDPMScheduler: alphas_cumprod, num_train_timesteps, prediction_type
        self.prediction_type = scheduler.config.prediction_type
        T = scheduler.config.num_train_timesteps
        self.min_timestep, self.max_timestep = min_timestep, T if max_timestep is None else max_timestep
        if not 0 <= self.min_timestep < self.max_timestep <= T:
            raise ValueError(f"config keys 'min_timestep'/'max_timestep': {min_timestep}..{max_timestep} is not a span of this "
                             f"model's {T} training timesteps; "
                             f"pass 0 <= min_timestep < max_timestep <= {T}")
        self.timestep_probs = None if bias is None or bias[0] == "none" else timestep_bias(T, *bias, self.min_timestep, self.max_timestep)

    def sample(self, shape: tuple, generator: torch.Generator, noise_offset: float = 0.0):
        noise = torch.randn(shape, generator=generator)
        if noise_offset:  # per-example, per-channel constant: lets the model learn very dark/bright images
            noise += noise_offset * torch.randn((shape[0], shape[1], 1, 1), generator=generator)
        if self.timestep_probs is None:  # uniform: torch.randint, so runs without a bias draw what they always drew
            timesteps = torch.randint(self.min_timestep, self.max_timestep, (shape[0],), generator=generator)
        else:
            timesteps = torch.multinomial(self.timestep_probs, shape[0], replacement=True, generator=generator)
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


def timestep_bias(T: int, strategy: str, multiplier: float, portion: float, begin: int, end: int,
                  min_timestep: int = 0, max_timestep: int | None = None) -> torch.Tensor:
    """Probabilities (T,) of drawing each training timestep: 1 on the trained span min_timestep..max_timestep - 1 (kohya's;
    all T by default), times `multiplier` on the biased ones (the last int(portion * span) of it for "later", the first
    for "earlier", begin..end - 1 for "range"), 0 outside it, normalised. diffusers' `generate_timestep_weights`
    (examples/text_to_image/train_text_to_image_sdxl.py), which takes the portion of all T: the same without a span.
    ValueError, naming the config keys, for a range that reaches outside the span or covers all of it, or a portion
    that is none or all of it (nothing biased); the config checks the multiplier."""
    lo, hi = min_timestep, T if max_timestep is None else max_timestep
    whole = (begin, end) == (lo, hi)
    if strategy == "range" and (whole or not lo <= begin < end <= hi):
        where = "is the whole trained span, so nothing is biased" if whole else f"reaches outside the trained timesteps {lo}..{hi}"
        raise ValueError(f"config keys 'timestep_bias_begin'/'timestep_bias_end': {begin}..{end} {where}; pass "
                         f"{'a narrower range' if whole else 'a range'} inside {lo}..{hi} (min_timestep/max_timestep; this "
                         f"model has {T} timesteps)")
    n = int(portion * (hi - lo))
    if strategy != "range" and not 0 < n < hi - lo:
        raise ValueError(f"config key 'timestep_bias_portion': {portion} of the {hi - lo} trained timesteps ({lo}..{hi}) is "
                         f"{'none' if n == 0 else 'all'} of them, so nothing is biased; pass a portion that leaves some on each side")
    weights = torch.zeros(T, dtype=torch.float64)
    weights[lo:hi] = 1.0
    weights[{"later": slice(hi - n, hi), "earlier": slice(lo, lo + n), "range": slice(begin, end)}[strategy]] *= multiplier
    return (weights / weights.sum()).float()


FLOW_WEIGHTING_SCHEMES = ("none", "sigma_sqrt", "logit_normal", "mode", "cosmap")


def time_shift(mu: float, t: torch.Tensor) -> torch.Tensor:
    """FLUX's resolution-dependent shift of sigmas in (0, 1]: e^mu / (e^mu + 1/t - 1) (the scheduler's
    exponential time shift with sigma 1); mu = 0 leaves t unchanged, mu > 0 moves mass to high noise."""
    return math.exp(mu) / (math.exp(mu) + (1.0 / t - 1.0))


class FlowMatchObjective(Objective):
    """Rectified flow (SD3, FLUX): noisy = (1 - s) x0 + s eps, target eps - x0 (the velocity the Euler
    sampler integrates), s in (0, 1] the noise level ("sigma"); the denoiser sees timestep s * T.

    Where s comes from (diffusers' train_dreambooth_lora_sd3.py / _flux.py): a density u in [0, 1) by
    `weighting_scheme` (logit_normal: sigmoid(N(logit_mean, logit_std)); mode: SD3 paper eq. 20 with
    mode_scale; else uniform), then s = the training scheduler's own (shifted) sigma at index u * T, so
    training sees the noise levels its sampler visits. With `resolution_shift` (FLUX: ai-toolkit's and
    kohya's flux_shift) s is instead u shifted by mu, linear in the latent's 2x2-patch count between the
    scheduler's base_shift at base_image_seq_len and max_shift at max_image_seq_len: bigger images train
    noisier, as the FLUX sampler's dynamic shifting samples them. Loss weights per example by the same
    flag (diffusers' compute_loss_weighting_for_sd3): sigma_sqrt s^-2, cosmap 2 / (pi (1 - 2s + 2s^2)),
    else 1. precondition_outputs (the SD3 script's default) compares x0_hat = noisy - s * pred with x0:
    that is (noisy - s pred - x0)^2 = s^2 (eps - x0 - pred)^2, so it is the velocity loss with an extra
    weight s^2, which is how it is done here (same loss and gradient, no change to the loop).
    """

    def __init__(self, scheduler, weighting_scheme: str = "none", logit_mean: float = 0.0, logit_std: float = 1.0,
                 mode_scale: float = 1.29, precondition_outputs: bool = False, resolution_shift: bool = False):
        if weighting_scheme not in FLOW_WEIGHTING_SCHEMES:
            raise ValueError(f"weighting_scheme '{weighting_scheme}' is not one of {', '.join(FLOW_WEIGHTING_SCHEMES)}")
        self.scheduler = scheduler  # a FlowMatchEulerDiscreteScheduler, never set_timesteps'd: T sigmas, 1 down to 1/T
        self.T = scheduler.config.num_train_timesteps
        self.weighting_scheme, self.logit_mean, self.logit_std, self.mode_scale = weighting_scheme, logit_mean, logit_std, mode_scale
        self.precondition_outputs, self.resolution_shift = precondition_outputs, resolution_shift

    def density(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """u (n,) in [0, 1], drawn as diffusers' compute_density_for_timestep_sampling draws it."""
        if self.weighting_scheme == "logit_normal":
            return torch.sigmoid(torch.normal(mean=self.logit_mean, std=self.logit_std, size=(n,), generator=generator))
        u = torch.rand((n,), generator=generator)
        if self.weighting_scheme == "mode":
            u = 1 - u - self.mode_scale * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)
        return u

    def mu(self, image_seq_len: int) -> float:
        """The resolution shift for a latent of image_seq_len 2x2 patches (diffusers' calculate_shift)."""
        c = self.scheduler.config
        m = (c.max_shift - c.base_shift) / (c.max_image_seq_len - c.base_image_seq_len)
        return image_seq_len * m + c.base_shift - m * c.base_image_seq_len

    def sample(self, shape: tuple, generator: torch.Generator, noise_offset: float = 0.0):
        """noise (shape), then timesteps s * T (shape[0],) float32; noise_offset adds a per-example,
        per-channel constant as for DDPM."""
        noise = torch.randn(shape, generator=generator)
        if noise_offset:
            noise += noise_offset * torch.randn((shape[0], shape[1], 1, 1), generator=generator)
        u = self.density(shape[0], generator)
        if self.resolution_shift:
            sigmas = time_shift(self.mu((shape[2] // 2) * (shape[3] // 2)), u.clamp(1.0 / self.T, 1.0))
            return noise, (sigmas * self.T).float()
        idx = (u * self.T).long().clamp(0, self.T - 1)  # u = 1 (mode at its edge) is the last index, not past it
        return noise, self.scheduler.timesteps[idx]

    def sigmas(self, timesteps: torch.Tensor) -> torch.Tensor:
        """s (N,) float32 of timesteps from sample: the scheduler's sigma where the timestep is one of its
        own (bit-exact, as the reference scripts' get_sigmas), else t / T (resolution_shift)."""
        own = self.scheduler.timesteps.to(timesteps.device)
        match = own[None, :] == timesteps.float()[:, None]
        looked_up = self.scheduler.sigmas.to(timesteps.device)[match.float().argmax(1)]
        return torch.where(match.any(1), looked_up, timesteps.float() / self.T)

    def noisy(self, latents, noise, timesteps):
        s = self.sigmas(timesteps).view(-1, *[1] * (latents.ndim - 1)).to(latents.dtype)
        return (1.0 - s) * latents + s * noise

    def target(self, latents, noise, timesteps):
        return noise - latents

    def weights(self, timesteps, snr_gamma):
        """Per-example weights (N,) float32 by weighting_scheme (times s^2 with precondition_outputs);
        None when both leave every example at 1. snr_gamma is DDPM's and is refused here."""
        if snr_gamma:
            raise ValueError("snr_gamma (min-SNR) is for DDPM models; flow-matching models weight the loss by weighting_scheme")
        if self.weighting_scheme not in ("sigma_sqrt", "cosmap") and not self.precondition_outputs:
            return None
        s = self.sigmas(timesteps)
        if self.weighting_scheme == "sigma_sqrt":
            w = s ** -2.0
        elif self.weighting_scheme == "cosmap":
            w = 2 / (math.pi * (1 - 2 * s + 2 * s ** 2))
        else:
            w = torch.ones_like(s)
        return (w * s ** 2 if self.precondition_outputs else w).float()
