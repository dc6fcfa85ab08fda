"""Start a run from an exported toy pipeline: `nanobooth toy pretrain --init-from MODEL` continues it (its UNet and
text encoder as stage 2's starting point, its VAE as the run's autoencoder); `--vae-from MODEL` takes its VAE only
and trains stage 2 from a random init (another UNet layout in the same latent space).

Why: the shipped model is all that survives of the run that made it (its run folder and optimizer state are not
kept), and the autoencoder stages plus a stage 2 from a random init are 6 h of CPU. Continuing the exported
weights with a fresh AdamW and lr schedule (warm-up, then cosine) on newly seeded renders trains the same model
further in the latent space it already knows. A recipe that changes only stage 2 (v6: a wider UNet) shares v5's
autoencoder stages, so their 1.4 h need not be spent again: v5's exported VAE is what they made (in fp16).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from nanobooth.toy.recipes.ckpt import add_history


def load_exported(model: Path, unet, te) -> None:
    """Load an exported toy pipeline's UNet and text encoder weights (fp16 files, upcast) into `unet`, `te` (of the
    same layout: pretrain.main checks the UNet's against the recipe's before anything runs)."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    unet.load_state_dict(UNet2DConditionModel.from_pretrained(str(model / "unet"), dtype=torch.float32).state_dict())
    te.load_state_dict(CLIPTextModel.from_pretrained(str(model / "text_encoder"), dtype=torch.float32).state_dict())


def autoencoder_from(out: Path, model: Path, seed: int, continues: bool = True):
    """`--init-from` (continues) or `--vae-from`: the exported pipeline `model`'s VAE stands in for stages 1-1e (its
    latent space is the one its UNet was trained in), written to the run as vae_centred/ (fp32) so export and the
    latent cache find it; history.json records where stage 2 started."""
    from diffusers import AutoencoderKL

    final = out / "vae_centred"
    if not (final / "config.json").exists():
        vae = AutoencoderKL.from_pretrained(str(model / "vae"), dtype=torch.float32)
        shutil.rmtree(final.with_suffix(".tmp"), ignore_errors=True)
        vae.save_pretrained(str(final.with_suffix(".tmp")))
        final.with_suffix(".tmp").rename(final)
        info = json.loads((model / "toy_model.json").read_text()) if (model / "toy_model.json").is_file() else {}
        steps = f"{info.get('unet_steps', '?')} steps, {'EMA' if info.get('ema') else 'raw'} weights in fp16"
        add_history(out, f"stage 2 started from the exported model {model} ({steps}) with its VAE, a fresh AdamW and "
                         f"lr schedule, on renders of seed {seed}; autoencoder stages 1-1e skipped" if continues else
                         f"autoencoder stages 1-1e skipped: the VAE is the exported model {model}'s ({steps}); stage 2 "
                         f"starts from a random init on renders of seed {seed}")
    return AutoencoderKL.from_pretrained(str(final)).eval().requires_grad_(False)


def recorded_init(out: Path, key: str = "init_from") -> str | None:
    """The --init-from (key "init_from") or --vae-from ("vae_from") a run in `out` was started with (its
    args_*.json), or None."""
    for f in sorted(out.glob("args_*.json")) if out.is_dir() else []:
        if init := json.loads(f.read_text()).get(key):
            return init
    return None


def init_error(model: Path, recipe: str, unet_arch: str, vae_factor: int, stage: str,
               flag: str = "--init-from") -> str | None:
    """The one line `--init-from model` (or `--vae-from model`, flag) is refused with before anything runs, or None:
    no exported toy pipeline there, a UNet (--init-from only) or VAE of another layout than the recipe's, or a
    --stage that stops before stage 2."""
    from nanobooth.toy.recipes.pretrain import UNETS

    if not model.exists():
        return f"{flag} {model}: no such folder; pass an exported toy model, such as src/nanobooth/assets/toy_model"
    needs = ("unet", "text_encoder", "vae") if flag == "--init-from" else ("vae",)
    if not all((model / d / "config.json").is_file() for d in needs):
        flux = " (a FLUX twin: continue it with `toy pretrain-flux`)" if (model / "transformer").is_dir() else ""
        return (f"{flag} {model}: no exported toy pipeline there{flux} (needs {', '.join(d + '/' for d in needs)}); "
                "pass a folder written by --export, such as src/nanobooth/assets/toy_model")
    got = (json.loads((model / "unet" / "config.json").read_text()).get("block_out_channels")
           if flag == "--init-from" else None)  # --vae-from trains a UNet of its own
    if got is not None and got != list(UNETS[unet_arch]["block_out_channels"]):
        arch = next((k for k, v in UNETS.items() if list(v["block_out_channels"]) == got), None)
        fix = f"pass --recipe {arch} (and no other --unet-arch)" if arch else "it is no toy recipe's UNet"
        return (f"--init-from {model}: its UNet (block_out_channels {got}) is not --unet-arch {unet_arch} (recipe "
                f"{recipe}); {fix}")
    factor = 2 ** (len(json.loads((model / "vae" / "config.json").read_text())["block_out_channels"]) - 1)
    if factor != vae_factor:
        return f"{flag} {model}: its VAE downsamples {factor}x, not --vae-factor {vae_factor}; drop --vae-factor"
    if stage != "all":
        return f"--stage {stage}: {flag} runs no autoencoder stage to stop after; drop --stage"
    return None
