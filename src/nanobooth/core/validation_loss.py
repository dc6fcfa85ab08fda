"""Validation loss: the training objective on a fixed set of (image, timestep, noise) triples.

The training loss of a DreamBooth run is noise: every step draws new timesteps, and with 3-5 photos it
keeps falling while the model memorises them. Scoring the *same* triples at every validation step
removes the draw's noise, so the curve moves only because the weights did; on a held-out photo of the
subject (validation_images_dir) a rising curve while the training one falls is the overfitting signal.

The triples are drawn once, at the start, from a generator of their own (seed + 6); evaluation runs in
eval mode without gradients, with ToMe given a fresh generator of its own for each evaluation and the
global RNG forked, so computing it draws nothing from training's streams (resume stays bit-exact).
Everything the loop would do to a batch comes from the family and its objective (noisy input, target,
per-example weights), so it means the same for SD, SDXL, SD3 and FLUX.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..families import cond_batch, cond_to

VALIDATION_LOSS_SEED_OFFSET = 6  # seed + 1..5 are training's streams, + 4 validation renders' ToMe


@dataclass
class _Fixed:
    """One image set's frozen triples: latents (M, C, h, w), noise (M, ...), timesteps (M,), coords (M, 4), prompts."""

    latents: torch.Tensor
    noise: torch.Tensor
    timesteps: torch.Tensor
    coords: torch.Tensor
    prompts: list[str]


class ValidationLoss:
    """Scores the denoiser on fixed triples of each named image set.

    sets: {name: (LatentSource, ImageSet)}, e.g. {"train": ..., "heldout": ...}; each image gets `per_image`
    (timestep, noise) pairs. Latents are the VAE posterior mean (no sampling noise), uncropped-center,
    unflipped. `encode(prompt)` returns the family's conditioning for a prompt (the loop's text cache or
    a no-grad encoder pass).
    """

    def __init__(self, family, objective, sets: dict, per_image: int, seed: int, noise_offset: float, resolution: int,
                 snr_gamma: float | None = None):
        self.family, self.objective, self.resolution, self.snr_gamma = family, objective, resolution, snr_gamma
        gen = torch.Generator().manual_seed(seed + VALIDATION_LOSS_SEED_OFFSET)
        self.fixed: dict[str, _Fixed] = {}
        for name, (source, images) in sets.items():
            idx = [i for i in range(len(images)) for _ in range(per_image)]
            mean, _, coords, _ = source.dist(idx, [False] * len(idx), None)  # the mask (masked_loss) is not used here
            noise, t = objective.sample(tuple(mean.shape), gen, noise_offset)
            self.fixed[name] = _Fixed(family.latents_from_vae(mean, source.vae.config), noise, t, coords,
                                      [images.prompt_of(i) for i in idx])

    def prompts(self) -> list[str]:
        """Every prompt the triples use, once (the loop encodes them with the training prompts)."""
        return list(dict.fromkeys(p for f in self.fixed.values() for p in f.prompts))

    @torch.no_grad()
    def __call__(self, unet, text_encoders: list, encode, device, weight_dtype, autocast, batch: int,
                 tome_seed: int) -> dict[str, float]:
        """{set name: weighted mean per-example MSE} of the current weights, in eval mode.

        unet / text_encoders: the raw modules (train mode is restored after, as `train_flags` were);
        autocast: the accelerator's autocast context; batch: rows per denoiser call.
        """
        modules = [unet, *text_encoders]
        flags = [m.training for m in modules]
        info = getattr(unet, "_tome_info", None)
        old_gen = info["args"]["generator"] if info else None
        devices = [device] if device.type == "cuda" else []
        out = {}
        try:
            for m in modules:
                m.eval()
            with torch.random.fork_rng(devices=devices), autocast:
                if info:  # ToMe draws its merges from a generator: a fixed one, not training's
                    info["args"]["generator"] = torch.Generator(device).manual_seed(tome_seed)
                for name, f in self.fixed.items():
                    losses = []
                    for i in range(0, len(f.latents), batch):
                        s = slice(i, i + batch)
                        lat, noise, t = f.latents[s].to(device), f.noise[s].to(device), f.timesteps[s].to(device)
                        prompts = f.prompts[s]
                        cond = cond_to(cond_batch([encode(p) for p in prompts], [1] * len(prompts)), weight_dtype)
                        cond = self.family.micro_conditioning(cond, f.coords[s], self.resolution)
                        pred = self.family.denoise(unet, self.objective.noisy(lat, noise, t).to(weight_dtype), t, cond)
                        target = self.objective.target(lat, noise, t)
                        per = (pred.float() - target.float()).pow(2).mean(dim=tuple(range(1, pred.ndim)))
                        w = self.objective.weights(t, self.snr_gamma)
                        losses.append(per * w if w is not None else per)
                    out[name] = torch.cat(losses).mean().item()
        finally:
            for m, flag in zip(modules, flags):
                m.train(flag)
            if info:
                info["args"]["generator"] = old_gen
        return out


def build(cfg, family, objective, sources: dict, sets: dict, make_source) -> ValidationLoss | None:
    """The run's ValidationLoss (None when validation_loss_steps is 0): the training photos ("train") and
    the photos of validation_images_dir ("heldout", cached through make_source(ImageSet))."""
    if not cfg.validation_loss_steps:
        return None
    chosen = {"train": (sources["instance"], sets["instance"])}
    if cfg.validation_images_dir:
        from .config_values import caption_words
        from .data import ImageSet, resolve_data_dir

        held = ImageSet.from_folder(resolve_data_dir(cfg.validation_images_dir, "validation_images_dir"), cfg.instance_prompt,
                                    cfg.resolution, "validation_images_dir", captions=True, fill=caption_words(cfg))
        chosen["heldout"] = (make_source(held), held)
    return ValidationLoss(family, objective, chosen, cfg.validation_loss_samples, cfg.seed, cfg.noise_offset, cfg.resolution,
                          cfg.snr_gamma)


def log_keys(scores: dict[str, float]) -> dict[str, float]:
    """train_log.jsonl / tracker names: val_loss (training photos), val_loss_heldout."""
    return {("val_loss" if k == "train" else f"val_loss_{k}"): round(v, 6) for k, v in scores.items()}
