"""Checks of config keys against the machine and the model: the resolution a model can render (from its
loaded configs, or from a local folder's config.json before loading) and fp16 without a GPU; and the keys a user
set that do nothing without their switch (warn_idle_keys)."""

from __future__ import annotations

import json
import logging
import math
from typing import TYPE_CHECKING

from .builtin_models import local_folder
from .errors import ConfigError

if TYPE_CHECKING:
    from .config import TrainConfig

log = logging.getLogger("nanobooth")

# key -> (its switch is on, what to set): keys that do nothing unless another key turns their feature on
BUCKET_KEYS = ("bucket_reso_steps", "min_bucket_reso", "max_bucket_reso")  # inert unless enable_bucket
ADAPTER_METHODS = ("lora", "dora", "lokr", "loha")
IDLE_WITHOUT_SWITCH = {
    "validation_images_dir": (lambda c: c.validation_loss_steps > 0, "validation_loss_steps > 0; set validation_loss_steps=N"),
    **{key: (lambda c: c.enable_bucket, "enable_bucket=true; set enable_bucket=true") for key in BUCKET_KEYS},
    "timestep_bias_multiplier": (lambda c: c.timestep_bias_strategy != "none",
                                 "a timestep_bias_strategy; set timestep_bias_strategy=later, earlier or range"),
    "timestep_bias_portion": (lambda c: c.timestep_bias_strategy in ("earlier", "later"),
                              "timestep_bias_strategy=earlier or later; set one of them"),
    **{key: (lambda c: c.timestep_bias_strategy == "range", "timestep_bias_strategy=range; set it")
       for key in ("timestep_bias_begin", "timestep_bias_end")},
    # the identifier's new token embeddings (pivotal tuning, or method=textual_inversion, which has no pivot)
    **{key: (lambda c: c.trains_embeddings, "train_text_encoder_ti=true (pivotal tuning) or method=textual_inversion; set one")
       for key in ("initializer_concept", "num_new_tokens_per_abstraction")},
    "train_text_encoder_ti_frac": (lambda c: c.train_text_encoder_ti, "train_text_encoder_ti=true (pivotal tuning); set it"),
    "token_abstraction": (lambda c: c.trains_embeddings, "train_text_encoder_ti=true (pivotal tuning) or method=textual_inversion; set one"),
    # what a method trains: the adapter's shape keys mean nothing to a full fine-tune or to textual inversion
    **{key: (lambda c: c.method in ADAPTER_METHODS, "an adapter: method=lora, dora, lokr or loha; set one")
       for key in ("lora_rank", "lora_alpha", "lora_target_modules")},
    "lora_dropout": (lambda c: c.method in ("lora", "dora"), "method=lora or dora; set one"),  # lokr/loha refuse it (config.py)
    "text_encoder_lora_target_modules": (lambda c: c.method in ADAPTER_METHODS and c.train_text_encoder,
                                         "train_text_encoder=true and an adapter method (lora, dora, lokr, loha); set both"),
    **{key: (lambda c: c.method == "lokr", "method=lokr; set it") for key in ("lokr_factor", "lokr_decompose_both")},
    # textual inversion trains its rows at learning_rate, as diffusers' textual_inversion.py (methods/textual_inversion.py)
    "text_encoder_lr": (lambda c: c.train_text_encoder or c.train_text_encoder_ti,
                        "train_text_encoder=true or train_text_encoder_ti=true (pivotal tuning); set one"),
    **{key: (lambda c: c.use_ema, "use_ema=true; set it") for key in ("ema_decay", "offload_ema")},
    "keep_best_tolerance": (lambda c: c.keep_best, "keep_best=true; set it"),
    "validation_loss_samples": (lambda c: c.validation_loss_steps > 0, "validation_loss_steps > 0; set validation_loss_steps=N"),
    "unmasked_weight": (lambda c: c.masked_loss, "masked_loss=true; set it"),
    **{key: (lambda c: c.with_prior_preservation, "with_prior_preservation=true; set it")
       for key in ("prior_loss_weight", "num_class_images", "class_data_dir", "class_generation_steps", "class_sampler",
                   "sample_batch_size")},
    # diffusers' get_scheduler("constant") drops num_warmup_steps without a word (its DreamBooth scripts default to
    # constant with lr_warmup_steps=500); schedule-free warms up by itself (core/optimizers.py)
    "lr_warmup_steps": (lambda c: c.lr_scheduler != "constant" or c.optimizer == "schedulefree",
                        "an lr_scheduler that warms up (lr_scheduler=constant ignores it); set lr_scheduler=constant_with_warmup"),
    **{key: (lambda c: c.weighting_scheme == "logit_normal", "weighting_scheme=logit_normal; set it")
       for key in ("logit_mean", "logit_std")},
    "mode_scale": (lambda c: c.weighting_scheme == "mode", "weighting_scheme=mode; set it"),
}


def warn_idle_keys(cfg: "TrainConfig", variant: dict) -> None:
    """One warning line per key of IDLE_WITHOUT_SWITCH the user set (its value differs from `variant`'s, the packaged
    variant's values, which include the dataclass defaults) while its switch is off: it would be ignored silently."""
    for key, (on, fix) in IDLE_WITHOUT_SWITCH.items():
        if getattr(cfg, key) != variant[key] and not on(cfg):
            log.warning("%s=%s is used only with %s, or remove it", key, getattr(cfg, key), fix)


def check_resolution(resolution: int, vae_config, unet_config, latent_patch: int = 1) -> int:
    """Refuse a resolution the model cannot render, naming the nearest ones it can. The VAE divides the
    image by 2**(levels-1), the UNet the latent by 2**(levels-1) again (its skip connections must line up),
    and diffusers' SD/SDXL pipelines refuse any size that is not a multiple of 8. Called right after the
    model loads (the factors are the model's), before the run folder is written. `latent_patch`: the
    family's own patching of latents before the denoiser (FLUX packs 2x2 patches: family.latent_patch).
    Returns that multiple (bucket sides must be multiples of it too)."""
    vae_f, unet_f, step = _factors(vae_config, unet_config, latent_patch)
    if resolution % step:
        raise ConfigError(f"config key 'resolution': {resolution} is not a multiple of {step}, which this model needs "
                          f"(VAE x{vae_f}, UNet x{unet_f}, pipelines multiples of 8); use {_nearest_multiples(resolution, step)}")
    return step


def _factors(vae_config, unet_config, latent_patch: int = 1) -> tuple[int, int, int]:
    """(VAE factor, denoiser factor, the multiple a resolution must be): see check_resolution."""
    vae_f = 2 ** (len(vae_config.block_out_channels) - 1)
    # a UNet halves the latent per level; a transformer (SD3, FLUX) cuts it into patch_size patches
    unet_f = 2 ** (len(unet_config.block_out_channels) - 1) if hasattr(unet_config, "block_out_channels") else unet_config.patch_size
    unet_f *= latent_patch
    return vae_f, unet_f, math.lcm(8, vae_f * unet_f)


def check_resolution_before_loading(cfg: "TrainConfig") -> None:
    """check_resolution with the factors read from a local diffusers folder's (or the shipped toy model's)
    vae/ and unet/ or transformer/ config.json, so the CLI refuses before the training stack loads. Hub ids
    and single files are checked after loading (train.py); so is a family's own patching (FLUX's 2x2)."""
    configs = _local_vae_and_denoiser(cfg)
    if configs:
        check_resolution(cfg.resolution, *configs)


def _local_vae_and_denoiser(cfg: "TrainConfig"):
    """(vae config, denoiser config) as namespaces from a local folder's (or the shipped toy model's) config.json
    files, None when unknown before loading (hub ids, single files, another VAE, an unreadable folder)."""
    from types import SimpleNamespace

    if cfg.pretrained_vae_model_name_or_path:
        return None  # another VAE: its factor is known once it loads
    folder = local_folder(cfg.model)
    denoiser = next((folder / d / "config.json" for d in ("unet", "transformer") if (folder / d / "config.json").is_file()), None)
    vae = folder / "vae" / "config.json"
    if denoiser is None or not vae.is_file():
        return None
    try:
        vae_cfg, den_cfg = (SimpleNamespace(**json.loads(p.read_text())) for p in (vae, denoiser))
    except (OSError, ValueError, TypeError):
        return None  # a broken folder is the loader's to report, with its own message
    if hasattr(vae_cfg, "block_out_channels") and (hasattr(den_cfg, "block_out_channels") or hasattr(den_cfg, "patch_size")):
        return vae_cfg, den_cfg
    return None


def resolution_suggestion(cfg: "TrainConfig") -> str:
    """'56 or 64' for a resolution that is not a multiple of 8, in the multiple the model needs where that is known
    before loading (the toy model: 16, so '48 or 64'; newcomer55: it was offered 56, then refused it)."""
    configs = _local_vae_and_denoiser(cfg)
    step = _factors(*configs)[2] if configs else 8
    return _nearest_multiples(cfg.resolution, step) + (f" (this model needs multiples of {step})" if step != 8 else "")


def local_denoiser_blocks(cfg: "TrainConfig") -> int | None:
    """The transformer blocks of a local diffusers folder's (or the toy model's) denoiser, read from its
    config.json: FLUX's num_layers + num_single_layers, SD3's num_layers, 0 for a UNet; None when unknown
    before loading (hub ids, single files, an unreadable config)."""
    folder = local_folder(cfg.model)
    if (folder / "unet" / "config.json").is_file():
        return 0
    try:
        den = json.loads((folder / "transformer" / "config.json").read_text())
        return int(den["num_layers"]) + int(den.get("num_single_layers", 0))
    except (OSError, ValueError, TypeError, KeyError):
        return None


def check_offload(cfg: "TrainConfig", blocks: int | None = None) -> None:
    """Every offload_blocks problem in one ConfigError line (a user fixing one met the next), with the model's
    transformer block count `blocks` when known (None: checked again once it loads, core/offload.py)."""
    n = cfg.offload_blocks
    if n < 0:
        raise ConfigError(f"config key 'offload_blocks': must be >= 0 (0 = off), got {n}")
    if blocks == 0:  # nothing else matters: there is nothing to offload
        raise ConfigError("config key 'offload_blocks': this model has no transformer blocks (SD and SDXL's UNets have "
                          "none; offload_blocks is for SD3/FLUX); use offload_blocks=0")
    fixes = []
    if cfg.method == "full":
        fixes.append("method=lora or dora (it offloads frozen block weights; method=full trains every weight)")
    if not cfg.gradient_checkpointing:
        # autograd keeps what it saved for backward (views of each weight) on the device until the backward pass
        fixes.append("gradient_checkpointing=true (without it each block's saved activations keep its weights on the device)")
    if blocks is not None and n > blocks:
        fixes.append(f"offload_blocks at most {blocks} ({n} asked, but this model has {blocks} transformer blocks)")
    if fixes:
        raise ConfigError(f"config key 'offload_blocks': offload_blocks={n} needs " + ", and ".join(fixes) + "; or use offload_blocks=0")


def _nearest_multiples(resolution: int, step: int) -> str:
    """'512 or 576': the multiples of `step` either side of `resolution` (only the upper one below `step`)."""
    lower, upper = resolution // step * step, (resolution // step + 1) * step
    return f"{lower} or {upper}" if lower else str(upper)


def check_mixed_precision(mixed_precision: str, cpu: bool = False) -> None:
    """fp16 is a GPU format: on a CPU the frozen fp16 weights meet fp32 activations and the run dies with a
    dtype error after the run folder is written. bf16 is the CPU's half precision and trains there.
    `cpu`: the run is forced onto the CPU (CPU processes over gloo) even if a GPU is visible."""
    import torch

    xpu = getattr(torch, "xpu", None)
    gpu = torch.cuda.is_available() or torch.backends.mps.is_available() or bool(xpu and xpu.is_available())
    if mixed_precision == "fp16" and (cpu or not gpu):
        raise ConfigError("config key 'mixed_precision': fp16 needs a GPU and this run would train on the CPU; "
                          "use mixed_precision=bf16 (works on CPUs) or mixed_precision=no")
    if mixed_precision == "bf16" and (cpu or not gpu):
        from .threads import native_bf16

        if not native_bf16():
            log.warning("mixed_precision=bf16 on a CPU without bf16 instructions (no avx512_bf16 or AMX): torch emulates "
                        "it, about 10x slower than fp32 here; mixed_precision=no trains faster on this machine")
