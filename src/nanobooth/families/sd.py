"""Stable Diffusion 1.x / 2.x (StableDiffusionPipeline): one CLIP text encoder, DDPM training."""

from __future__ import annotations

import inspect

import torch

from .base import Family
from .objective import DDPMObjective, Objective


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
        if cfg is None:
            return DDPMObjective(training_scheduler)
        from ..core.config import ConfigError

        # the flow-matching families' weighting keys (sd3.py refuses snr_gamma the other way): set here they would train
        # as if unset, a run that looks fine
        flow = {"weighting_scheme": cfg.weighting_scheme != "none", "precondition_outputs": cfg.precondition_outputs,
                "resolution_shift": cfg.resolution_shift}
        if set_keys := [k for k, on in flow.items() if on]:
            keys = " and ".join(f"{k}={str(getattr(cfg, k)).lower()}" for k in set_keys)
            is_, it = ("is", "it") if len(set_keys) == 1 else ("are", "them")
            raise ConfigError(f"config key '{set_keys[0]}': {keys} {is_} for flow-matching models (SD3, FLUX); {self.name} "
                              f"trains by DDPM, where {it} would change nothing: leave {it} unset (min-SNR is snr_gamma here, "
                              "and timestep_bias_strategy biases the timesteps)")
        try:  # the span and a bias range are checked against the model's T where T is known: the objective
            return DDPMObjective(training_scheduler, cfg.min_timestep, cfg.max_timestep,
                                 (cfg.timestep_bias_strategy, cfg.timestep_bias_multiplier, cfg.timestep_bias_portion,
                                  cfg.timestep_bias_begin, cfg.timestep_bias_end))
        except ValueError as e:  # its message names the keys
            raise ConfigError(str(e)) from None

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

        kwargs = {f"{self.denoiser_name}_lora_layers": _diffusers_or_peft(get_peft_model_state_dict(unet)),
                  # rank, alpha and targets ride in the safetensors metadata, so diffusers reloads a
                  # rank != alpha LoRA at the trained scale
                  f"{self.denoiser_name}_lora_adapter_metadata": unet.peft_config["default"].to_dict()}
        for name, te in zip(self.text_encoder_names, text_encoders or []):
            kwargs[f"{name}_lora_layers"] = convert_state_dict_to_diffusers(get_peft_model_state_dict(te))
            kwargs[f"{name}_lora_adapter_metadata"] = te.peft_config["default"].to_dict()
        self.pipeline_class_obj().save_lora_weights(folder, weight_name=weight_name, **kwargs)


def _diffusers_or_peft(peft_state: dict) -> dict:
    """diffusers' names for a UNet LoRA state (as its DreamBooth scripts save), unless that would mix naming schemes:
    convert_state_dict_to_diffusers renames the attention projections only (to_q.lora_A -> to_q.lora.down), and
    diffusers' loader, seeing any peft name (a LoRA on the resnets' convolutions, proj_in or ff: kohya's LoCon),
    reads the whole file as peft's and drops the renamed adapters without an error. Such a state stays in peft's
    names, which the loader reads whole."""
    from diffusers.utils import convert_state_dict_to_diffusers

    converted = convert_state_dict_to_diffusers(peft_state)
    return peft_state if any(".lora_A." in k or ".lora_B." in k for k in converted) else converted
