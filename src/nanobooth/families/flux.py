"""FLUX.1 (dev, schnell): a rectified-flow transformer on 2x2-packed latents, CLIP-L pooled + T5 sequence.

The hooks (family.Family) for FluxPipeline, as the pipeline samples and diffusers'
train_dreambooth_lora_flux.py trains: the transformer sees latents packed into 2x2 patches (a sequence of
h/2 * w/2 tokens of 4C channels) with one (0, row, col) id per patch and a (0, 0, 0) id per text token,
its timestep as s in [0, 1] (the pipeline's t / 1000), and, for guidance-distilled models (FLUX.1-dev:
`guidance_embeds`), the guidance strength it should imitate.
"""

from __future__ import annotations

import re
import warnings

import torch

from .sd3 import SD3, t5_length

T5_MAX_LENGTH = 512  # FluxPipeline's max_sequence_length default (the reference script's too)
# The guidance a distilled model is trained at: diffusers' FLUX DreamBooth script's --guidance_scale default
# (FLUX.1-dev samples around 3.5 as well).
TRAIN_GUIDANCE = 3.5


def pack(latents: torch.Tensor) -> torch.Tensor:
    """(N, C, h, w) -> (N, h/2 * w/2, 4C): each 2x2 patch one token, channels then the patch's rows and columns."""
    n, c, h, w = latents.shape
    return latents.view(n, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(n, (h // 2) * (w // 2), c * 4)


def unpack(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """The inverse of pack: (N, h/2 * w/2, 4C) -> (N, C, h, w)."""
    n, _, c4 = tokens.shape
    return tokens.view(n, h // 2, w // 2, c4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(n, c4 // 4, h, w)


def image_ids(h: int, w: int, device=None, dtype=None) -> torch.Tensor:
    """(h/2 * w/2, 3): (0, row, col) of each packed patch, in pack's order (rows, then columns)."""
    ids = torch.zeros(h // 2, w // 2, 3)
    ids[..., 1] = torch.arange(h // 2)[:, None]
    ids[..., 2] = torch.arange(w // 2)[None, :]
    return ids.reshape(-1, 3).to(device=device, dtype=dtype)


# FLUX's attention normalises q and k with torch.nn.RMSNorm, whose fused kernel needs the input's dtype to match the
# weight's. Under bf16/fp16 autocast a full fine-tune's trained weights stay fp32 (the optimizer's master copy) while
# the activations reaching the norm are half precision, so torch takes its composite path, which computes the same
# norm, and says "Mismatch dtype between input and weight ... Cannot dispatch to fused implementation" once. Nothing
# is wrong and nothing is for the user to do: only that message, from torch's rms_norm, is silenced.
_RMS_NORM_MISMATCH = ("ignore", re.compile(r"Mismatch dtype between input and weight: input dtype = c10::(BFloat16|Half), "
                                           r"weight dtype = float, Cannot dispatch to fused implementation", re.I),
                      UserWarning, re.compile(r"torch\.nn\.functional\Z"), 0)


def quiet_rms_norm_mismatch() -> None:
    """Put _RMS_NORM_MISMATCH first in warnings.filters unless it is first already: a caller's catch_warnings (pytest's,
    per test) drops it on exit and a broader filter put in front ("always", "error") would shadow it. Changed only
    when it is not first: every change to the filters makes the other warnings' "once per place" forget where they
    were shown."""
    if warnings.filters[:1] != [_RMS_NORM_MISMATCH]:
        action, message, category, module, lineno = _RMS_NORM_MISMATCH
        warnings.filterwarnings(action, message.pattern, category, module.pattern, lineno)


class Flux(SD3):
    """FLUX.1: FluxTransformer2DModel, FlowMatchEulerDiscreteScheduler (dynamic shifting at sampling), a
    16-channel VAE with scale and shift. `train_text_encoder` trains CLIP-L only (as the reference); T5 never."""

    name = "flux"
    pipeline_class = "FluxPipeline"
    text_encoder_names = ("text_encoder", "text_encoder_2")
    tokenizer_names = ("tokenizer", "tokenizer_2")
    trained_text_encoders = 1  # CLIP-L
    latent_patch = 2  # pack() cuts latents into 2x2 patches: real FLUX needs multiples of 16 pixels

    def tokenize(self, tokenizers, prompt: str, device) -> list[torch.Tensor]:
        clip = tokenizers[0](prompt, padding="max_length", max_length=tokenizers[0].model_max_length, truncation=True,
                             return_tensors="pt").input_ids
        t5 = tokenizers[1](prompt, padding="max_length", max_length=t5_length(tokenizers[1], T5_MAX_LENGTH), truncation=True,
                           return_tensors="pt").input_ids
        return [clip.to(device), t5.to(device)]

    def check_sampling(self, cfg, denoiser_config) -> None:
        if not denoiser_config.guidance_embeds and cfg.validation_guidance_cutoff < 1:
            from ..core.errors import ConfigError

            raise ConfigError(f"config key 'validation_guidance_cutoff': {cfg.validation_guidance_cutoff} needs a model whose "
                              "guidance can stop mid-sampling; this FLUX transformer has no guidance embedding, so FluxPipeline "
                              "guides every step or none (true_cfg_scale); use validation_guidance_cutoff=1")

    def sampling_kwargs(self, pipe, num_prompts: int, guidance: float) -> dict:
        """The T5 length (t5_length), and for a transformer without a guidance embedding (FLUX.1-schnell, the
        toy FLUX twin, de-distilled FLUX) classifier-free guidance proper: FluxPipeline's true_cfg_scale with
        an empty negative prompt, the unconditional branch caption dropout trains. guidance_scale alone would
        be ignored by such a model. (FLUX.1-schnell samples at guidance <= 1: no second pass.)"""
        quiet_rms_norm_mismatch()  # training's validation renders run its fp32 transformer under autocast too
        kw = {"max_sequence_length": t5_length(pipe.tokenizer_2, T5_MAX_LENGTH)}
        if not pipe.transformer.config.guidance_embeds and guidance > 1:
            kw.update(true_cfg_scale=guidance, negative_prompt=[""] * num_prompts)
        return kw

    def encode(self, text_encoders, ids: list[torch.Tensor], resolution: int) -> dict:
        """encoder_hidden_states (1, 512, T5 width), pooled_projections (1, CLIP width: its pooled output),
        guidance (1,) (used only by guidance-distilled models)."""
        pooled = text_encoders[0](ids[0], output_hidden_states=False).pooler_output
        t5 = text_encoders[1](ids[1])[0]
        return {"encoder_hidden_states": t5, "pooled_projections": pooled,
                "guidance": torch.full((1,), TRAIN_GUIDANCE, device=t5.device)}

    def layers_read(self, index: int, num_layers: int) -> list[int]:
        """CLIP-L: every layer (its pooled output reads the last); T5: none, so it never trains."""
        return list(range(num_layers)) if index == 0 else []

    def denoise(self, model, noisy: torch.Tensor, timesteps: torch.Tensor, cond: dict) -> torch.Tensor:
        """Pack, call with s = t / 1000 and the ids, unpack: latents (N, C, h, w) in, velocity (N, C, h, w) out."""
        quiet_rms_norm_mismatch()  # training's forward, where autocast meets fp32 norm weights
        n, _, h, w = noisy.shape
        config = getattr(model, "module", model).config  # DDP wraps the module
        cond = dict(cond)
        guidance = cond.pop("guidance")
        text = cond["encoder_hidden_states"]
        out = model(hidden_states=pack(noisy), timestep=timesteps.to(noisy.dtype) / 1000,
                    guidance=guidance.to(noisy.dtype) if config.guidance_embeds else None,
                    txt_ids=torch.zeros(text.shape[1], 3, device=text.device, dtype=text.dtype),
                    img_ids=image_ids(h, w, noisy.device, noisy.dtype), return_dict=False, **cond)[0]
        return unpack(out, h, w)

