"""The family contract (Family): what differs between model families (SD 1.x/2.x, SDXL, ...), behind one interface.

The training loop asks its family to tokenize prompts, turn token ids into UNet conditioning, scale VAE
latents, call the denoiser, build a pipeline around (possibly training) modules and save LoRA weights,
and trains on the family's objective (objective.py: noise, timesteps, noisy input, target, loss weights);
it never names an architecture or a scheduler. A new family (SD3, FLUX: a transformer instead of a UNet,
flow matching) is a new file in families/ (its objective in objective.py) and a line in FAMILIES
(families/__init__.py), without touching the loop.
"""

from __future__ import annotations
import torch

from .objective import Objective


class Family:
    """The contract between the training loop (train.py) and a model family; SD and SDXL implement it.

    Once, after loading (models.load_components, train.py):
      training_scheduler(pipeline scheduler config) -> the scheduler training noises with
      objective(that scheduler) -> an Objective (objective.py)
      tokenize(tokenizers, prompt, device) -> token ids, one (1, L) tensor per text encoder
      encode(text_encoders, ids, resolution) -> cond: the denoiser's keyword arguments, batch 1
        (cached when the text encoders are frozen; else once per prompt per step)
      layers_read(index, num_layers) -> the text-encoder layers that reach the denoiser (what may train)
    Every step, in this order (N = the rows this process trains, instance rows first, then class rows):
      latents_from_vae(z (N, C, h, w) VAE posterior samples, vae.config) -> latents (N, C, h, w)
      objective.sample((N_global, C, h, w), noise generator, noise_offset) -> noise, timesteps (N_global,)
        for every rank's rows; each rank slices its own N
      objective.noisy(latents, noise, timesteps) -> the denoiser's input (N, C, h, w)
      micro_conditioning(cond batched to N, coords (N, 4), resolution or the batch's (h, w) bucket) -> cond with
        per-example image info
      denoise(model, noisy, timesteps, cond) -> prediction (N, C, h, w)
      objective.target(latents, noise, timesteps) -> what the prediction is compared with (N, C, h, w)
      objective.weights(timesteps, snr_gamma) -> per-example loss weights (N,) or None
        (losses.dreambooth_loss: weighted per-example MSE, split into instance and prior halves)
    For outputs: make_pipeline(components, unet, text_encoders) (class images, validation, full weights)
    and save_lora(folder, weight_name, unet, text_encoders).
    """

    latent_patch = 1  # the family's own patching of latents before the denoiser (FLUX: 2x2), for check_resolution

    def training_scheduler(self, scheduler_config: dict):
        raise NotImplementedError

    def objective(self, training_scheduler, cfg=None) -> Objective:
        """cfg: the TrainConfig (weighting keys), None for the defaults."""
        raise NotImplementedError

    def latents_from_vae(self, z: torch.Tensor, vae_config) -> torch.Tensor:
        """(z - shift_factor) * scaling_factor, shift 0 when the VAE config has none (SD, SDXL; FLUX has one)."""
        return (z - (vae_config.get("shift_factor") or 0.0)) * vae_config["scaling_factor"]

    def denoise(self, model, noisy: torch.Tensor, timesteps: torch.Tensor, cond: dict) -> torch.Tensor:
        raise NotImplementedError

    def check_sampling(self, cfg, denoiser_config) -> None:
        """Refuse (ConfigError) sampling settings this model cannot honour, before the run folder is written."""

    def sampling_kwargs(self, pipe, num_prompts: int, guidance: float) -> dict:
        """Extra keyword arguments for the pipeline's __call__ wherever nanobooth samples (validation, class
        images, generate, eval), so it samples as the model was trained; none for SD and SDXL."""
        return {}


def cond_batch(conds: list[dict], sizes: list[int]) -> dict:
    """Stack per-prompt conditioning (batch 1 each, possibly nested) into one batch: conds[i] repeated sizes[i] times."""
    out = {}
    for key in conds[0]:
        if isinstance(conds[0][key], dict):
            out[key] = cond_batch([c[key] for c in conds], sizes)
        else:
            out[key] = torch.cat([c[key].expand(n, *c[key].shape[1:]) for c, n in zip(conds, sizes)])
    return out


def cond_to(cond: dict, dtype) -> dict:
    return {k: cond_to(v, dtype) if isinstance(v, dict) else v.to(dtype) for k, v in cond.items()}
