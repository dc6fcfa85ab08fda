"""Model families: what differs between SD 1.x/2.x and SDXL, behind one small interface (Family).

The training loop asks its family to tokenize prompts, turn token ids into UNet conditioning, scale VAE
latents, call the denoiser, build a pipeline around (possibly training) modules and save LoRA weights,
and trains on the family's objective (objective.py: noise, timesteps, noisy input, target, loss weights);
it never names an architecture or a scheduler. A new family (SD3, FLUX: a transformer instead of a UNet,
flow matching) adds a class here (and its objective in objective.py) and a line in FAMILIES, without
touching the loop.
"""

from __future__ import annotations

import inspect

import torch

from .objective import DDPMObjective, Objective


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
      micro_conditioning(cond batched to N, coords (N, 4), resolution) -> cond with per-example image info
      denoise(model, noisy, timesteps, cond) -> prediction (N, C, h, w)
      objective.target(latents, noise, timesteps) -> what the prediction is compared with (N, C, h, w)
      objective.weights(timesteps, snr_gamma) -> per-example loss weights (N,) or None
        (losses.dreambooth_loss: weighted per-example MSE, split into instance and prior halves)
    For outputs: make_pipeline(components, unet, text_encoders) (class images, validation, full weights)
    and save_lora(folder, weight_name, unet, text_encoders).
    """

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


class SD(Family):
    """Stable Diffusion 1.x / 2.x: one CLIP text encoder, its last hidden state as cross-attention context."""

    name = "sd"
    pipeline_class = "StableDiffusionPipeline"
    denoiser_name = "unet"  # the pipeline's attribute for the denoiser (SD3, FLUX: "transformer")
    text_encoder_names = ("text_encoder",)
    tokenizer_names = ("tokenizer",)
    tome_max_downsample = 1  # attention at the highest-resolution level: merge there
    pipeline_kwargs = {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}

    def training_scheduler(self, scheduler_config: dict):
        """DDPM over the model's own betas and prediction type, whatever sampler the pipeline ships."""
        from diffusers import DDPMScheduler

        return DDPMScheduler.from_config(scheduler_config)

    def objective(self, training_scheduler, cfg=None) -> Objective:
        return DDPMObjective(training_scheduler)

    def denoise(self, model, noisy: torch.Tensor, timesteps: torch.Tensor, cond: dict) -> torch.Tensor:
        return model(noisy, timesteps, **cond).sample

    def tokenize(self, tokenizers, prompt: str, device) -> list[torch.Tensor]:
        return [tok(prompt, padding="max_length", max_length=tok.model_max_length, truncation=True,
                    return_tensors="pt").input_ids.to(device) for tok in tokenizers]

    def encode(self, text_encoders, ids: list[torch.Tensor], resolution: int) -> dict:
        return {"encoder_hidden_states": text_encoders[0](ids[0])[0]}

    def layers_read(self, index: int, num_layers: int) -> list[int]:
        """The encoder layers of text encoder `index` whose output reaches the UNet's conditioning.
        SD reads the final hidden state (there is no clip_skip key), so every layer; an adapter on any
        other layer would get no gradient and be saved untrained."""
        return list(range(num_layers))

    def micro_conditioning(self, cond: dict, coords: torch.Tensor, resolution: int) -> dict:
        """Per-example image conditioning from ImageSet.sample's coords (B, 4); SD has none."""
        return cond

    def pipeline_class_obj(self):
        import diffusers

        return getattr(diffusers, self.pipeline_class)

    def make_pipeline(self, components: dict, unet, text_encoders):
        parts = {**components, self.denoiser_name: unet, **dict(zip(self.text_encoder_names, text_encoders))}
        cls = self.pipeline_class_obj()
        accepted = inspect.signature(cls.__init__).parameters
        kwargs = {k: v for k, v in {**parts, **self.pipeline_kwargs}.items() if k in accepted}
        return cls(**kwargs)

    def save_lora(self, folder, weight_name: str, unet, text_encoders: list | None) -> None:
        from diffusers.utils import convert_state_dict_to_diffusers
        from peft.utils import get_peft_model_state_dict

        kwargs = {f"{self.denoiser_name}_lora_layers": convert_state_dict_to_diffusers(get_peft_model_state_dict(unet)),
                  # rank, alpha and targets ride in the safetensors metadata, so diffusers reloads a
                  # rank != alpha LoRA at the trained scale
                  f"{self.denoiser_name}_lora_adapter_metadata": unet.peft_config["default"].to_dict()}
        for name, te in zip(self.text_encoder_names, text_encoders or []):
            kwargs[f"{name}_lora_layers"] = convert_state_dict_to_diffusers(get_peft_model_state_dict(te))
            kwargs[f"{name}_lora_adapter_metadata"] = te.peft_config["default"].to_dict()
        self.pipeline_class_obj().save_lora_weights(folder, weight_name=weight_name, **kwargs)


class SDXL(SD):
    """SDXL: two text encoders (penultimate hidden states concatenated), the second's pooled projection,
    and size/crop micro-conditioning ("time ids")."""

    name = "sdxl"
    pipeline_class = "StableDiffusionXLPipeline"
    text_encoder_names = ("text_encoder", "text_encoder_2")
    tokenizer_names = ("tokenizer", "tokenizer_2")
    tome_max_downsample = 2  # SDXL's first level has no attention: merging must reach level 2 to pay
    pipeline_kwargs = {}

    def encode(self, text_encoders, ids: list[torch.Tensor], resolution: int) -> dict:
        hidden, pooled = [], None
        for te, tok_ids in zip(text_encoders, ids):
            out = te(tok_ids, output_hidden_states=True)
            pooled = out[0]  # the projection model's text_embeds; the last encoder's wins, as in diffusers
            hidden.append(out.hidden_states[-2])
        # An uncropped, full-size image (the pipeline's default at this resolution); training replaces
        # it per example through micro_conditioning.
        time_ids = torch.tensor([[resolution, resolution, 0, 0, resolution, resolution]], dtype=hidden[0].dtype,
                                device=hidden[0].device)
        return {"encoder_hidden_states": torch.cat(hidden, dim=-1),
                "added_cond_kwargs": {"text_embeds": pooled, "time_ids": time_ids.expand(pooled.shape[0], -1)}}


    def layers_read(self, index: int, num_layers: int) -> list[int]:
        # the first encoder feeds only its penultimate hidden state (its pooled output is not used), so its
        # last layer never reaches the UNet; the second's pooled projection reads its last layer
        return list(range(num_layers - 1 if index == 0 else num_layers))

    def micro_conditioning(self, cond: dict, coords: torch.Tensor, resolution: int) -> dict:
        """time_ids (B, 6) = original (h, w), crop (top, left), target (resolution, resolution) per example,
        as diffusers' SDXL DreamBooth script builds them (compute_time_ids). float32: fp16 would round
        photo sizes above 2048 px, and the UNet embeds time ids in float32 anyway."""
        target = torch.tensor([resolution, resolution]).expand(len(coords), 2)
        time_ids = torch.cat([coords.cpu(), target], 1).float().to(cond["encoder_hidden_states"].device)
        return {**cond, "added_cond_kwargs": {**cond["added_cond_kwargs"], "time_ids": time_ids}}


from .family_flux import Flux  # noqa: E402  (these subclass SD, defined above)
from .family_sd3 import SD3  # noqa: E402

FAMILIES = {cls.pipeline_class: cls() for cls in (SD, SDXL, SD3, Flux)}


def family_for(pipeline_class_name: str):
    if pipeline_class_name not in FAMILIES:
        raise ValueError(pipeline_class_name)
    return FAMILIES[pipeline_class_name]


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
