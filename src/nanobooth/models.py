"""Load Stable Diffusion components the way users address them, and put adapters/ToMe on them.

`model` may be a hub id, a local diffusers folder, a single-file checkpoint, `toy` or `tiny`. Pickle
checkpoints (.ckpt/.bin/.pt) can execute code when loaded, so they are refused unless allow_pickle.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch

log = logging.getLogger("nanobooth")

SINGLE_FILE_EXTS = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
PICKLE_EXTS = (".ckpt", ".pt", ".pth", ".bin")


class ModelError(ValueError):
    """The model cannot be loaded; the message names it and what to do."""


@dataclass
class Components:
    tokenizer: object
    text_encoder: torch.nn.Module
    vae: torch.nn.Module
    unet: torch.nn.Module
    noise_scheduler: object  # DDPM: what training adds noise with
    scheduler: object  # the model's own inference sampler
    source: str


def cache_dir() -> Path:
    return Path(os.environ.get("NANOBOOTH_CACHE", Path.home() / ".cache" / "nanobooth"))


def resolve_model(model: str) -> str:
    """Map the built-in names to folders; everything else is passed through."""
    if model == "toy":
        res = resources.files("nanobooth") / "assets" / "toy_model"
        if (res / "model_index.json").is_file():
            return str(res)
        log.warning("model=toy: the pretrained toy model is not shipped in this build; using model=tiny (random weights)")
        model = "tiny"
    if model == "tiny":
        from .tiny import build_tiny_pipeline

        path = cache_dir() / "tiny-v1"
        if not (path / "model_index.json").is_file():
            build_tiny_pipeline(path)
        return str(path)
    return model


def _check_path(model: str, allow_pickle: bool) -> str:
    """Classify `model`: 'folder', 'file' or 'hub'; refuse what cannot or must not be loaded."""
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "model_index.json").is_file() and not (path / "unet" / "config.json").is_file():
            raise ModelError(f"model '{model}': folder is not a diffusers pipeline (no model_index.json); pass a diffusers folder, a .safetensors checkpoint or a hub id")
        return "folder"
    if path.is_file():
        if path.suffix.lower() in PICKLE_EXTS and not allow_pickle:
            raise ModelError(f"model '{model}': {path.suffix} files are pickles that can run code when loaded; convert it to .safetensors or pass allow_pickle=true if you trust it")
        if path.suffix.lower() not in SINGLE_FILE_EXTS:
            raise ModelError(f"model '{model}': not a checkpoint file (expected .safetensors); pass a diffusers folder, a .safetensors checkpoint or a hub id")
        return "file"
    if model.startswith((".", "/", "~")) or model.endswith(SINGLE_FILE_EXTS) or model.count("/") != 1:
        raise ModelError(f"model '{model}': no such file or folder, and not a hub id (owner/name)")
    return "hub"


def _one_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def load_pipeline(model: str, revision: str | None = None, single_file_config: str | None = None,
                  allow_pickle: bool = False, torch_dtype: torch.dtype | None = None):
    """A StableDiffusionPipeline without safety checker, from any way a user names a model."""
    from diffusers import StableDiffusionPipeline

    model = resolve_model(model)
    kind = _check_path(model, allow_pickle)
    common = dict(safety_checker=None, requires_safety_checker=False, **({"dtype": torch_dtype} if torch_dtype else {}))
    try:
        if kind == "file":
            kwargs = dict(config=single_file_config) if single_file_config else {}
            pipe = StableDiffusionPipeline.from_single_file(model, **kwargs, **common)
        else:
            pipe = StableDiffusionPipeline.from_pretrained(model, revision=revision, **common)
    except ModelError:
        raise
    except Exception as e:  # diffusers/hub raise many types; the user needs one line, not a traceback
        hint = ("pass single_file_config=DIFFUSERS_FOLDER_OR_HUB_ID describing the checkpoint" if kind == "file"
                else "check the id, or run once online to cache it (HF_HUB_OFFLINE=1 only reads the cache)" if kind == "hub"
                else "check the folder is a complete diffusers pipeline")
        raise ModelError(f"model '{model}': could not load ({_one_line(e)}); {hint}") from e
    if getattr(pipe.tokenizer, "model_max_length", 77) > 10_000:
        # tokenizers saved without model_max_length make pipelines pad to 1e30 tokens
        pipe.tokenizer.model_max_length = pipe.text_encoder.config.max_position_embeddings
    return pipe


def load_components(model: str, revision: str | None = None, single_file_config: str | None = None,
                    allow_pickle: bool = False) -> Components:
    from diffusers import DDPMScheduler

    pipe = load_pipeline(model, revision, single_file_config, allow_pickle)
    return Components(
        tokenizer=pipe.tokenizer,
        text_encoder=pipe.text_encoder,
        vae=pipe.vae,
        unet=pipe.unet,
        noise_scheduler=DDPMScheduler.from_config(pipe.scheduler.config),
        scheduler=pipe.scheduler,
        source=model,
    )


def make_pipeline(c: Components, unet=None, text_encoder=None):
    """A pipeline that shares the given (possibly training) modules: no copies, no reload."""
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline(
        vae=c.vae, text_encoder=text_encoder or c.text_encoder, tokenizer=c.tokenizer, unet=unet or c.unet,
        scheduler=c.scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def lora_config(rank: int, alpha: float, targets: list[str], dropout: float):
    from peft import LoraConfig

    return LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, init_lora_weights="gaussian", target_modules=list(targets))


def apply_tome(unet, ratio: float) -> None:
    """Token merging on the UNet's transformer blocks (tomesd); ratio 0 removes it."""
    import tomesd

    tomesd.remove_patch(unet)
    if ratio > 0:
        # max_downsample=1 merges only at the highest resolution, where attention cost is; deeper
        # levels have few tokens and merging there costs quality for no speed (tomesd's default).
        tomesd.apply_patch(unet, ratio=ratio, max_downsample=1)


def tome_active(unet) -> bool:
    return getattr(unet, "_tome_info", None) is not None and any(
        type(m).__name__.startswith("ToMe") for m in unet.modules()
    )
