"""Stable Diffusion 3 / 3.5: an MMDiT transformer on flow matching, three text encoders (CLIP-L, CLIP-G, T5).

The family hooks (family.Family) for StableDiffusion3Pipeline: prompts become the transformer's joint
sequence (both CLIPs' penultimate hidden states side by side, zero-padded to T5's width, then T5's
sequence after them) and its pooled projection (both CLIPs' pooled outputs side by side), exactly as the
pipeline's encode_prompt builds them, so training conditions the transformer as sampling will.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .sd import SD
from .objective import FlowMatchObjective, Objective

# What the pipeline's __call__ pads T5 prompts to (max_sequence_length=256). diffusers' SD3 DreamBooth
# script tokenizes training prompts to 77 T5 tokens instead; SD3 attends to every position, padding
# included, so training at 77 would condition the transformer differently from how it samples.
T5_MAX_LENGTH = 256


def t5_length(tokenizer, pipeline_default: int) -> int:
    """The T5 sequence length prompts are padded to: the pipeline's max_sequence_length default, or the
    tokenizer's model_max_length where that is shorter (a model trained on shorter sequences, such as the
    toy FLUX twin, says so in its tokenizer config). The transformer attends to every position, padding
    included, so training, class images and sampling must all use this one length."""
    return min(pipeline_default, int(tokenizer.model_max_length))


class SD3(SD):
    """SD3 / SD3.5 (medium, large): SD3Transformer2DModel, FlowMatchEulerDiscreteScheduler, a 16-channel VAE
    with scaling and shift factors. The T5 encoder never trains (as in diffusers' SD3 DreamBooth scripts:
    `train_text_encoder` trains the two CLIPs); a denoiser named `transformer` in the pipeline."""

    name = "sd3"
    pipeline_class = "StableDiffusion3Pipeline"
    denoiser_name = "transformer"
    text_encoder_names = ("text_encoder", "text_encoder_2", "text_encoder_3")
    tokenizer_names = ("tokenizer", "tokenizer_2", "tokenizer_3")
    pipeline_kwargs = {}

    def training_scheduler(self, scheduler_config: dict):
        """The model's own flow-matching schedule (its shift): training draws the sigmas its sampler visits."""
        from diffusers import FlowMatchEulerDiscreteScheduler

        return FlowMatchEulerDiscreteScheduler.from_config(scheduler_config)

    def objective(self, training_scheduler, cfg=None) -> Objective:
        if cfg is None:
            return FlowMatchObjective(training_scheduler)
        from ..core.config import ConfigError

        # refused before the run folder is written (train.py builds the objective right after loading the model)
        if cfg.with_prior_preservation and cfg.class_sampler == "dpm++":
            raise ConfigError(f"config key 'class_sampler': dpm++ is a DDPM sampler and {self.name} samples by flow matching; pass "
                              "class_sampler=model (the model's own flow-matching Euler sampler)")
        if cfg.validation_sampler == "dpm++" and cfg.validation_prompts:
            raise ConfigError(f"config key 'validation_sampler': dpm++ is a DDPM sampler and {self.name} samples by flow matching; "
                              "pass validation_sampler=model (the model's own flow-matching Euler sampler)")
        if cfg.tome_ratio:
            raise ConfigError(f"config key 'tome_ratio': ToMe (tomesd) patches UNet blocks and {self.name} has a transformer; pass tome_ratio=0")
        if cfg.snr_gamma:
            raise ConfigError(f"config key 'snr_gamma': min-SNR weighting is for DDPM models (SD, SDXL); {self.name} trains on flow "
                              "matching: leave snr_gamma unset and choose weighting_scheme")
        if cfg.min_timestep or cfg.max_timestep is not None:
            raise ConfigError(f"config keys 'min_timestep'/'max_timestep' restrict a DDPM model's timesteps; {self.name} draws noise "
                              "levels by flow matching: leave them unset and bias the levels with weighting_scheme=logit_normal, logit_mean")
        if cfg.timestep_bias_strategy != "none":
            raise ConfigError(f"config key 'timestep_bias_strategy' biases a DDPM model's timesteps; {self.name} draws noise "
                              "levels by flow matching: leave it at none and bias the levels with weighting_scheme=logit_normal, logit_mean")
        return FlowMatchObjective(training_scheduler, cfg.weighting_scheme, cfg.logit_mean, cfg.logit_std, cfg.mode_scale,
                                  cfg.precondition_outputs, cfg.resolution_shift)

    def tokenize(self, tokenizers, prompt: str, device) -> list[torch.Tensor]:
        """(1, 77) ids for each CLIP, (1, 256) for T5 (t5_length; with its end token, as the pipeline)."""
        ids = super().tokenize(tokenizers[:2], prompt, device)
        t5 = tokenizers[2](prompt, padding="max_length", max_length=t5_length(tokenizers[2], T5_MAX_LENGTH), truncation=True,
                           add_special_tokens=True, return_tensors="pt").input_ids
        return [*ids, t5.to(device)]

    def encode(self, text_encoders, ids: list[torch.Tensor], resolution: int) -> dict:
        """encoder_hidden_states (1, 77 + 256, T5 width), pooled_projections (1, CLIP-L + CLIP-G projection widths)."""
        hidden, pooled = [], []
        for te, tok_ids in zip(text_encoders[:2], ids[:2]):
            out = te(tok_ids, output_hidden_states=True)
            pooled.append(out[0])  # the projection model's text_embeds
            hidden.append(out.hidden_states[-2])
        t5 = text_encoders[2](ids[2])[0]
        clip = torch.cat(hidden, dim=-1)
        clip = F.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        return {"encoder_hidden_states": torch.cat([clip, t5.to(clip.dtype)], dim=-2),
                "pooled_projections": torch.cat(pooled, dim=-1)}

    def layers_read(self, index: int, num_layers: int) -> list[int]:
        """Both CLIPs: every layer (the pooled projection reads the last); T5: none, so it never trains."""
        return list(range(num_layers)) if index < 2 else []

    def denoise(self, model, noisy: torch.Tensor, timesteps: torch.Tensor, cond: dict) -> torch.Tensor:
        """The transformer patchifies and unpatchifies itself: latents (N, 16, h, w) in, velocity (N, 16, h, w) out."""
        return model(hidden_states=noisy, timestep=timesteps, return_dict=False, **cond)[0]

    def sampling_kwargs(self, pipe, num_prompts: int, guidance: float) -> dict:
        return {"max_sequence_length": t5_length(pipe.tokenizer_3, T5_MAX_LENGTH)}

    trained_text_encoders = 2  # the CLIPs: what train_text_encoder trains and a LoRA file holds

    def save_lora(self, folder, weight_name: str, unet, text_encoders: list | None) -> None:
        """peft's own key names (module.lora_A/lora_B), as the reference scripts save them: diffusers' SD
        conversion (convert_state_dict_to_diffusers) renames transformer attention keys to UNet
        attention-processor names, which the SD3/FLUX loaders then silently skip."""
        from peft.utils import get_peft_model_state_dict

        kwargs = {f"{self.denoiser_name}_lora_layers": get_peft_model_state_dict(unet),
                  f"{self.denoiser_name}_lora_adapter_metadata": unet.peft_config["default"].to_dict()}
        for name, te in zip(self.text_encoder_names[: self.trained_text_encoders], text_encoders or []):
            kwargs[f"{name}_lora_layers"] = get_peft_model_state_dict(te)
            kwargs[f"{name}_lora_adapter_metadata"] = te.peft_config["default"].to_dict()
        self.pipeline_class_obj().save_lora_weights(folder, weight_name=weight_name, **kwargs)
