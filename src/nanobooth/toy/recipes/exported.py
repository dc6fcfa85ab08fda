"""Continue an exported toy pipeline (`nanobooth toy pretrain --init-from MODEL`): its UNet and text encoder as
stage 2's starting point, its VAE as the run's autoencoder.

Why: the shipped model is all that survives of the run that made it (its run folder and optimizer state are not
kept), and the autoencoder stages plus a stage 2 from a random init are 6 h of CPU. Continuing the exported
weights with a fresh AdamW and lr schedule (warm-up, then cosine) on newly seeded renders trains the same model
further in the latent space it already knows.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from nanobooth.toy.recipes.ckpt import add_history


def load_exported(model: Path, unet, te) -> None:
    """Load an exported toy pipeline's UNet and text encoder weights (fp16 files, upcast) into `unet`, `te`.
    ValueError naming the folder where its UNet's layout is not `unet`'s (another --unet-arch)."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    src = UNet2DConditionModel.from_pretrained(str(model / "unet"), torch_dtype=torch.float32)
    if tuple(src.config.block_out_channels) != tuple(unet.config.block_out_channels):
        raise ValueError(f"--init-from {model}: its UNet has block_out_channels {list(src.config.block_out_channels)},"
                         f" this recipe's {list(unet.config.block_out_channels)}; pass the matching --recipe")
    unet.load_state_dict(src.state_dict())
    te.load_state_dict(CLIPTextModel.from_pretrained(str(model / "text_encoder"), torch_dtype=torch.float32).state_dict())


def autoencoder_from(out: Path, model: Path, seed: int):
    """`--init-from`: the exported pipeline `model`'s VAE stands in for stages 1-1e (its latent space is the one
    its UNet was trained in), written to the run as vae_centred/ (fp32) so export and the latent cache find it;
    history.json records where stage 2 started."""
    from diffusers import AutoencoderKL

    final = out / "vae_centred"
    if not (final / "config.json").exists():
        vae = AutoencoderKL.from_pretrained(str(model / "vae"), torch_dtype=torch.float32)
        shutil.rmtree(final.with_suffix(".tmp"), ignore_errors=True)
        vae.save_pretrained(str(final.with_suffix(".tmp")))
        final.with_suffix(".tmp").rename(final)
        info = json.loads((model / "toy_model.json").read_text()) if (model / "toy_model.json").is_file() else {}
        add_history(out, f"stage 2 started from the exported model {model} ({info.get('unet_steps', '?')} steps, "
                         f"{'EMA' if info.get('ema') else 'raw'} weights in fp16) with its VAE, a fresh AdamW and lr "
                         f"schedule, on renders of seed {seed}; autoencoder stages 1-1e skipped")
    return AutoencoderKL.from_pretrained(str(final)).eval().requires_grad_(False)
