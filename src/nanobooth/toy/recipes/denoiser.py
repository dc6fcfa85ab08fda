"""Stage 2 of the toy recipes: a denoiser and its text encoders, trained jointly from scratch on cached latents.

One loop for the UNet recipe (pretrain.py: SD's DDPM objective with min-SNR-5 weights) and the FLUX twin
(pretrain_flux.py: rectified flow, logit-normal noise levels shifted for the image size). As in the trainer
(core/train.py) the family turns VAE posterior samples into latents and calls the denoiser, and its
objective draws noise and timesteps and says the target and the per-example weights; a recipe says only
which modules train and how a batch's captions become conditioning (a Stage).

Resumable and bit-exact: every batch, noise draw and timestep is a function of (seed, step), and a
checkpoint (weights, AdamW state, EMA, step) is written to a temp folder and swapped in, so a run stopped
anywhere continues as an uninterrupted one would have.
"""
from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, load_model, save_file, save_model
from tqdm import tqdm

from nanobooth.core.losses import dreambooth_loss
from nanobooth.families.base import Family
from nanobooth.families.objective import Objective
from nanobooth.toy import world
from nanobooth.toy.recipes.ckpt import (EMA, add_time, checkpointed_loop, load_optimizer, lr_at, save_optimizer,
                                       stop_if_requested, stop_requested, swap_in, write_json)

log = logging.getLogger("nanobooth.toy.recipes.denoiser")


@dataclass
class Stage:
    """What one recipe's stage 2 trains and how."""

    name: str
    """'unet' or 'flux': the checkpoint folder (<name>_ckpt), the timings keys (<name>_seconds, ...), the bar."""
    family: Family
    """Latent scaling (latents_from_vae) and the denoiser call (denoise)."""
    objective: Objective
    """Noise, timesteps, noisy input, target and weights."""
    modules: dict
    """Checkpoint file stem -> module, the denoiser first; EMA names are '<stem>.<parameter>'."""
    encode: Callable[[list[str]], dict]
    """A batch's captions -> the denoiser's conditioning (called under autocast, so the text encoders train)."""
    stream: int
    """Batches and captions come from np.random.default_rng([seed, stream, step])."""
    noise_seed: int
    """Posterior samples, noise and timesteps from torch.Generator seeded seed * 1_000_003 + noise_seed + step."""
    snr_gamma: float | None = None
    """Min-SNR-gamma weights (DDPM objectives only)."""
    noise_offset: float = 0.0
    """Std of a per-image, per-channel constant added to the noise (Objective.sample; DDPM objectives)."""
    timestep_bias: tuple[float, float] = (0.0, 1.0)
    """(portion, multiplier): the last `portion` of a DDPM objective's timesteps (the noisiest) drawn `multiplier`
    times as often (diffusers' --timestep_bias_strategy later, later_biased_timesteps); (0, 1): uniform."""
    patterned_weight: float = 1.0
    """Images of patterned or marked objects (world.Spec.pattern set) drawn this many times as often as the rest
    (draw_probabilities); 1: every image alike, the draws of runs from before this option."""
    configs: dict = field(default_factory=dict)
    """File name -> dict, written as json into every checkpoint (what export rebuilds a module from)."""
    state: dict = field(default_factory=dict)
    """Extra entries of every checkpoint's state.json."""


def training_caption(spec: world.Spec, rng: np.random.Generator) -> str:
    """Partial captions are part of the recipe: DreamBooth prompts such as
    "a photo of a star" or "a photo of a sks star on the beach" omit
    attributes, and empty captions (10%) give classifier-free guidance its
    unconditional branch."""
    u = rng.random()
    if u < 0.10:
        return ""
    if u < 0.16:
        return world.caption(spec, colour=False, scene=False)
    if u < 0.28:
        # a patterned object: half of these name its pattern and mark without its colours (the extra
        # draw happens for patterned objects only, so v4's data stream is unchanged)
        return world.caption(spec, colour=False, look=spec.pattern is not None and rng.random() < 0.5)
    if u < 0.40:
        return world.caption(spec, scene=False)
    return world.caption(spec)


def draw_probabilities(specs: list, patterned_weight: float) -> np.ndarray | None:
    """Per-image probabilities of a batch draw: patterned/marked objects `patterned_weight` times as likely as
    the rest. None for 1.0, so that rng.choice draws exactly as it did before the option existed (a resumed
    run from then continues bit-exactly)."""
    if patterned_weight == 1.0:
        return None
    w = np.array([patterned_weight if s.pattern is not None else 1.0 for s in specs])
    return w / w.sum()


def later_biased_timesteps(num_timesteps: int, n: int, portion: float, multiplier: float,
                           generator: torch.Generator) -> torch.Tensor:
    """n timesteps in [0, num_timesteps) with the last `portion` of them `multiplier` times as likely as the rest,
    as diffusers' generate_timestep_weights (strategy "later") weights them (train_text_to_image_sdxl.py)."""
    weights = torch.ones(num_timesteps)
    weights[num_timesteps - int(portion * num_timesteps):] *= multiplier
    return torch.multinomial(weights, n, replacement=True, generator=generator)


def named_parameters(modules: dict) -> dict:
    return {f"{k}.{n}": p for k, m in modules.items() for n, p in m.named_parameters()}


def load_ema(ck: Path) -> dict:
    shadow = load_file(str(ck / "ema.safetensors"))
    # the UNet recipe's checkpoints from before this loop named its text encoder "te"
    return {("text_encoder." + k[3:] if k.startswith("te.") else k): v for k, v in shadow.items()}


def load_weights(modules: dict, ck: Path, use_ema: bool) -> None:
    """Load a checkpoint's raw weights, or its EMA (parameters only: buffers keep their init)."""
    shadow = load_ema(ck) if use_ema else None
    for k, m in modules.items():
        if use_ema:
            m.load_state_dict({n[len(k) + 1:]: v for n, v in shadow.items() if n.startswith(k + ".")}, strict=False)
        else:
            load_model(m, str(ck / f"{k}.safetensors"))


def save_checkpoint(ck: Path, stage: Stage, ema: EMA, opt, state: dict) -> None:
    """Into a temp folder, then swapped in: a run stopped mid-save keeps its previous checkpoint whole."""
    tmp = ck.with_name(ck.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for k, m in stage.modules.items():
        save_model(m, str(tmp / f"{k}.safetensors"))  # save_model: T5 ties its input embedding to `shared`
    save_file(ema.shadow, str(tmp / "ema.safetensors"))
    save_optimizer(opt, tmp / "optim.safetensors")
    for name, config in stage.configs.items():
        write_json(tmp / name, config)
    write_json(tmp / "state.json", {**state, **stage.state})
    swap_in(tmp, ck)


def recover_checkpoint(ck: Path) -> None:
    """A run stopped between save_checkpoint's two renames has no `ck`, and its last whole checkpoint in
    `ck`.old: put that back, so the run resumes instead of starting over (and deleting it)."""
    old = ck.with_name(ck.name + ".old")
    if not ck.exists() and (old / "state.json").is_file():
        old.rename(ck)
        log.info("recovered %s from %s (a run stopped mid-save)", ck.name, old.name)


def train(out: Path, stage: Stage, specs: list, mean: torch.Tensor, std: torch.Tensor, vae_config: dict, seed: int,
          steps: int, batch: int, ckpt_s: float, lr: float, bf16: bool = False) -> None:
    """Train stage.modules for `steps` AdamW steps of `batch` images (lr: warm-up, then cosine to a tenth).

    mean, std: (N, C, h, w) VAE posteriors of the N images whose world.Spec are specs (captions are drawn
    from them, training_caption). bf16: forward passes under CPU bfloat16 autocast, weights and optimizer
    state fp32 (mixed precision as GPU trainers run it): 1.4x faster steps for the v5 UNet and 1.6x for the
    FLUX twin on CPUs with bf16 instructions, 13x slower where bf16 is emulated (core.threads.native_bf16)."""
    ck = out / f"{stage.name}_ckpt"
    recover_checkpoint(ck)
    params = [p for m in stage.modules.values() for p in m.parameters()]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-2)
    step, ema = 0, None
    if (ck / "state.json").exists():
        load_weights(stage.modules, ck, use_ema=False)
        load_optimizer(opt, ck / "optim.safetensors")
        # a carried checkpoint (carry.py) has no EMA: it restarts from the weights, below
        ema = EMA(load_ema(ck)) if (ck / "ema.safetensors").is_file() else None
        step = json.loads((ck / "state.json").read_text())["step"]
        log.info("resuming %s from step %d", stage.name, step)
    if step >= steps:
        log.info("%s already done (%d steps)", stage.name, step)
        return
    ema = ema or EMA(named_parameters(stage.modules))
    for m in stage.modules.values():
        m.train()
    denoiser = next(iter(stage.modules.values()))
    fam, obj, n = stage.family, stage.objective, len(mean)
    draw_p = draw_probabilities(specs, stage.patterned_weight)
    t0 = last = time.time()
    ema_loss = None
    bar = tqdm(total=steps, initial=step, desc=stage.name, mininterval=15)
    with checkpointed_loop():
        while step < steps:
            rng = np.random.default_rng([seed, stage.stream, step])
            idx = rng.choice(n, batch, replace=False, p=draw_p)
            caps = [training_caption(specs[i], rng) for i in idx]
            g = torch.Generator().manual_seed(seed * 1_000_003 + stage.noise_seed + step)
            it = torch.from_numpy(idx)
            z = fam.latents_from_vae(mean[it].float() + std[it].float() * torch.randn(mean[it].shape, generator=g), vae_config)
            noise, t = obj.sample(z.shape, g, stage.noise_offset)
            if stage.timestep_bias[0] > 0:
                t = later_biased_timesteps(obj.scheduler.config.num_train_timesteps, len(t), *stage.timestep_bias, g)
            for pg in opt.param_groups:
                pg["lr"] = lr_at(step, steps, lr)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                pred = fam.denoise(denoiser, obj.noisy(z, noise, t), t, stage.encode(caps)).float()
            target = obj.target(z, noise, t)
            loss = dreambooth_loss(pred, target, batch, weights=obj.weights(t, stage.snr_gamma))[0]  # no class rows
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            ema.update(named_parameters(stage.modules), step)
            step += 1
            bar.update(1)
            mse = F.mse_loss(pred.detach(), target).item()  # unweighted, so runs with other weightings compare
            ema_loss = mse if ema_loss is None else 0.98 * ema_loss + 0.02 * mse
            if step % 25 == 0:
                log.info("%s step %d/%d mse %.4f (ema %.4f) lr %.2e", stage.name, step, steps, mse, ema_loss,
                         opt.param_groups[0]["lr"])
            if time.time() - last > ckpt_s or step == steps or stop_requested():
                save_checkpoint(ck, stage, ema, opt, {"step": step, "loss_ema": ema_loss})
                add_time(out, f"{stage.name}_seconds", time.time() - t0,
                         {f"{stage.name}_steps_done": step, f"{stage.name}_loss_ema": ema_loss})
                t0 = last = time.time()
                log.info("checkpoint at step %d", step)
                stop_if_requested(stage.name, step, steps, ck, bar)
    bar.close()
