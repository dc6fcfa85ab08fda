"""The toy model's autoencoder: stages 1, 1b, 1c and 1d of toy pretraining.

Stage 1 trains an AutoencoderKL (downsampling 4: 64x64x3 -> 16x16x4; recipe v5: 2) on plain
MSE/L1 over the whole frame. Stage 1b fine-tunes its decoder alone (SD's
"ft-MSE" trick; latents unchanged). Stage 1c refines encoder and decoder where
it matters: the background is most of the pixels, so after stage 1 object
outlines blur enough that a star comes back as a blob (the probe reads the
class of only ~72% of reconstructions of held-out scenes, which caps the base
model below the 80% bar however long the UNet trains). 1c up-weights the loss
on the object (its position and size are known exactly from the world) and
mixes DreamBooth-style subject instances (patterned, marked objects from seeds
disjoint from any test seed) into the batches: the autoencoder is the part of
a latent diffusion model that must be able to *represent* a new subject before
DreamBooth can teach the UNet to draw it. Stage 1d fine-tunes 1c's decoder alone
with the object weighted harder; latents are unchanged, so it can follow stage 2.
Stage 1e (recipe v5, pretrain.centre_latents) shifts the latent space to zero channel means
exactly, by centre_vae below.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from nanobooth.toy import world
from nanobooth.toy.recipes.ckpt import (add_time, checkpointed_loop, load_optimizer, lr_at, save_optimizer, stop_if_requested,
                                       stop_requested, to_tensor, write_json)

log = logging.getLogger("nanobooth.toy.recipes.pretrain")
SUBJECT_SEED0 = 1_000_000  # subjects used for the VAE only; test/demo subjects use small seeds
HELD_APART = 512  # the last scenes, kept out of stages 1b-1d's batches for the recon figure and scaling_factor


def make_vae(factor: int = 4):
    """factor 4 (v4): 64x64x3 -> 16x16x4. factor 2 (recipe v5): 32x32x4, one block fewer, so that a
    subject's eye (pupil ~2.5 px) and pattern cells (~5 px) span whole latent pixels; its mid-block
    attention (1024 positions) is dropped, as at f=2 the decoder needs no global context."""
    from diffusers import AutoencoderKL

    if factor not in (2, 4):
        raise ValueError(f"VAE factor must be 2 or 4, got {factor}")
    n = 3 if factor == 4 else 2
    return AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n, block_out_channels=(32, 64, 64)[:n],
        layers_per_block=1, latent_channels=4, norm_num_groups=16, sample_size=64,
        **({} if factor == 4 else {"mid_block_add_attention": False}),
    )


def centre_vae(vae, mu: torch.Tensor) -> None:
    """Shift `vae`'s latent space by -mu in place, exactly: encode gives z - mu, decode adds mu back.

    mu: (latent_channels,) in raw latent units (before scaling_factor). The encoder's quant_conv (1x1)
    loses mu from its mean channels' bias (the log-variance channels, hence posterior stds, are left
    alone) and post_quant_conv (1x1) gains W @ mu in its bias, so decode(encode(x)) is unchanged up to
    float rounding. A 1x1 conv is needed on each side: a bias folded into a 3x3 conv would see the
    zero padding at the borders. Raises ValueError for a VAE built without quant convs."""
    if not (vae.config.use_quant_conv and vae.config.use_post_quant_conv):
        raise ValueError("centre_vae needs a VAE with quant_conv and post_quant_conv (use_quant_conv=True)")
    c = vae.config.latent_channels
    with torch.no_grad():
        mu = mu.to(vae.quant_conv.bias)
        vae.quant_conv.bias[:c] -= mu
        vae.post_quant_conv.bias += vae.post_quant_conv.weight[:, :, 0, 0] @ mu


def save_vae_ckpt(ck: Path, vae, opt, state: dict) -> None:
    ck.mkdir(parents=True, exist_ok=True)
    save_file(vae.state_dict(), str(ck / "model.safetensors"))
    save_optimizer(opt, ck / "optim.safetensors")
    write_json(ck / "state.json", state)


def load_vae_ckpt(ck: Path, vae, opt, what: str) -> int:
    """Restore a stage's checkpoint written by save_vae_ckpt; returns the step to continue from (0: none)."""
    if not (ck / "state.json").exists():
        return 0
    vae.load_state_dict(load_file(str(ck / "model.safetensors")))
    load_optimizer(opt, ck / "optim.safetensors")
    step = json.loads((ck / "state.json").read_text())["step"]
    log.info("resuming %s from step %d", what, step)
    return step


def held_apart_recon(vae, imgs: np.ndarray, seed: int) -> tuple[torch.Tensor, float]:
    """Latents of the last HELD_APART images (never in stages 1b-1d's training batches) and their reconstruction MSE."""
    with torch.no_grad():
        x = to_tensor(imgs[-HELD_APART:])
        z = vae.encode(x).latent_dist.sample(generator=torch.Generator().manual_seed(seed))
        return z, F.mse_loss(vae.decode(z).sample, x).item()


def train_vae(out: Path, imgs: np.ndarray, seed: int, steps: int, batch: int, ckpt_s: float, factor: int = 4):
    from diffusers import AutoencoderKL

    ck = out / "vae_ckpt"
    final = out / "vae"
    if (final / "config.json").exists():
        log.info("stage 1 (VAE) already done")
        return AutoencoderKL.from_pretrained(str(final))
    torch.manual_seed(seed)
    vae = make_vae(factor)
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    step = load_vae_ckpt(ck, vae, opt, "VAE")
    n = len(imgs)
    t0 = last = time.time()
    ema_loss = None
    bar = tqdm(total=steps, initial=step, desc="vae", mininterval=15)
    with checkpointed_loop():
        while step < steps:
            rng = np.random.default_rng([seed, 1, step])
            x = to_tensor(imgs[rng.choice(n, batch, replace=False)])
            g = torch.Generator().manual_seed(seed * 1_000_003 + step)
            for pg in opt.param_groups:
                pg["lr"] = lr_at(step, steps, 1e-3)
            post = vae.encode(x).latent_dist
            z = post.mean + post.std * torch.randn(post.mean.shape, generator=g)
            rec = vae.decode(z).sample
            mse = F.mse_loss(rec, x)
            # tiny KL: we want a near-deterministic, well-scaled latent, not a prior match
            kl = post.kl().mean() / post.mean[0].numel()  # per latent value (v4: 16 * 16 * 4)
            loss = mse + 1e-4 * kl + 0.5 * F.l1_loss(rec, x)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            bar.update(1)
            ema_loss = mse.item() if ema_loss is None else 0.98 * ema_loss + 0.02 * mse.item()
            if step % 50 == 0:
                log.info("vae step %d/%d mse %.5f (ema %.5f) kl %.2f lr %.2e", step, steps, mse.item(), ema_loss, kl.item(),
                         opt.param_groups[0]["lr"])
            if time.time() - last > ckpt_s or step == steps or stop_requested():
                save_vae_ckpt(ck, vae, opt, {"step": step, "mse_ema": ema_loss})
                add_time(out, "vae_seconds", time.time() - t0)
                t0 = last = time.time()
                stop_if_requested("vae", step, steps, ck, bar)
    bar.close()
    vae.eval()
    # scaling_factor = 1/std of latents, measured on held-apart data
    z, mse = held_apart_recon(vae, imgs, seed)
    sf = float(1.0 / z.std())
    vae.register_to_config(scaling_factor=sf)
    vae.save_pretrained(str(final))
    add_time(out, "vae_seconds", time.time() - t0, {"vae_recon_mse": mse, "vae_scaling_factor": sf, "vae_steps": steps})
    log.info("VAE done: recon mse %.5f (images in [-1,1]), scaling_factor %.4f", mse, sf)
    return vae


def train_decoder(out: Path, imgs: np.ndarray, seed: int, steps: int, batch: int, ckpt_s: float):
    """Stage 1b: fine-tune the VAE decoder alone (SD's "ft-MSE" trick). The
    encoder is frozen, so the latents stage 2 trains on are unchanged and this
    stage may run before, during or after stage 2; it buys sharper subjects."""
    _refine(out, DECODER, "vae", imgs, None, seed, steps, batch, ckpt_s, 0)


def object_weight(xy_size: np.ndarray, fg: float = 4.0) -> torch.Tensor:
    """Per-pixel loss weight 1 + fg inside a disc of 1.25x the object's radius.
    xy_size: Nx3 (x, y, radius) in pixels."""
    yy, xx = np.mgrid[0:world.SIZE, 0:world.SIZE].astype(np.float32) + 0.5
    x, y, r = (xy_size[:, i, None, None] for i in range(3))
    disc = (xx - x) ** 2 + (yy - y) ** 2 < (1.25 * r) ** 2
    return torch.from_numpy(1.0 + fg * disc.astype(np.float32))[:, None]


def subject_pool(n_subjects: int, poses: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """Instance renders of n_subjects fresh subjects (random scenes, or none) and their (x, y, radius)."""
    imgs, geo = [], []
    for i in range(n_subjects):
        s = world.make_subject(SUBJECT_SEED0 + i)
        for k in range(poses):
            scene = [None, *world.SCENES][(i + k) % (len(world.SCENES) + 1)]
            p = world.subject_pose(s, k)
            imgs.append(np.asarray(world.render_subject(s, k, scene)))
            geo.append((p["x"], p["y"], p["size"]))
    return np.stack(imgs), np.asarray(geo, np.float32)


def refine_vae(out: Path, imgs: np.ndarray, specs, seed: int, steps: int, batch: int, ckpt_s: float,
               n_subjects: int = 800):
    """Stage 1c: encoder and decoder, object-weighted, subjects in the mix (moves the latent space)."""
    start = "vae_dec" if (out / "vae_dec" / "config.json").exists() else "vae"
    return _refine(out, VAE_REFINE, start, imgs, specs, seed, steps, batch, ckpt_s, n_subjects)


def refine_decoder(out: Path, imgs: np.ndarray, specs, seed: int, steps: int, batch: int, ckpt_s: float,
                   n_subjects: int = 800):
    """Stage 1d: stage 1c's decoder alone, with the object weighted harder. The encoder is frozen, so
    stage 2's latents are unchanged and this may run alongside or after stage 2."""
    return _refine(out, DECODER_REFINE, "vae_refined", imgs, specs, seed, steps, batch, ckpt_s, n_subjects)


@dataclass(frozen=True)
class Stage:
    """What tells stages 1b/1c/1d apart; their loop is one (`_refine`)."""

    what: str  # log/timings name
    dst: str  # output folder under the pretraining dir (checkpoints in dst + "_ckpt")
    stream: int  # the stage's own random stream: batches and noise are functions of (seed, stream, step)
    decoder_only: bool  # freeze the encoder, so the latents stay as they are
    fg: float  # extra loss weight on the object (0: plain MSE + L1/2)
    warmup: int
    weight_decay: float


DECODER = Stage("decoder", "vae_dec", 3, decoder_only=True, fg=0.0, warmup=20, weight_decay=0.01)
VAE_REFINE = Stage("vae-refine", "vae_refined", 4, decoder_only=False, fg=4.0, warmup=50, weight_decay=0.0)
DECODER_REFINE = Stage("decoder-refine", "vae_refined_dec", 6, decoder_only=True, fg=8.0, warmup=50, weight_decay=0.0)


def _refine(out: Path, stage: Stage, src: str, imgs: np.ndarray, specs, seed: int, steps: int, batch: int,
            ckpt_s: float, n_subjects: int):
    """One loop for stages 1b/1c/1d, starting from the VAE in `src`. n_subjects=0: scenes only."""
    from diffusers import AutoencoderKL

    what, decoder_only = stage.what, stage.decoder_only
    final, ck = out / stage.dst, out / f"{stage.dst}_ckpt"
    if (final / "config.json").exists():
        log.info("%s already done", what)
        return AutoencoderKL.from_pretrained(str(final))
    vae = AutoencoderKL.from_pretrained(str(out / src))
    vae.train().requires_grad_(True)
    if decoder_only:
        vae.encoder.requires_grad_(False)
        vae.quant_conv.requires_grad_(False)
    params = [p for p in vae.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=3e-4, weight_decay=stage.weight_decay)
    step = load_vae_ckpt(ck, vae, opt, what)
    n_sub = batch // 4 if n_subjects else 0
    if n_sub:
        sub_imgs, sub_geo = subject_pool(n_subjects)
    geo = np.zeros((len(imgs), 3), np.float32) if specs is None else np.asarray([(s.x, s.y, s.size) for s in specs], np.float32)
    n = len(imgs) - HELD_APART  # the last ones stay held apart for the recon figure
    key = what.replace("-", "_")
    t0 = last = time.time()
    bar = tqdm(total=steps, initial=step, desc=what, mininterval=15)
    with checkpointed_loop():
        while step < steps:
            rng = np.random.default_rng([seed, stage.stream, step])
            i = rng.choice(n, batch - n_sub, replace=False)
            x, xg = imgs[i], geo[i]
            if n_sub:
                j = rng.choice(len(sub_imgs), n_sub, replace=False)
                x, xg = np.concatenate([x, sub_imgs[j]]), np.concatenate([xg, sub_geo[j]])
            x, w = to_tensor(x), object_weight(xg, stage.fg)
            g = torch.Generator().manual_seed(seed * 1_000_003 + stage.stream + step)
            for pg in opt.param_groups:
                pg["lr"] = lr_at(step, steps, 3e-4, warmup=stage.warmup)
            with torch.set_grad_enabled(not decoder_only):
                post = vae.encode(x).latent_dist
                z = post.mean + post.std * torch.randn(post.mean.shape, generator=g)
            rec = vae.decode(z).sample
            err = (rec - x) ** 2 + 0.5 * (rec - x).abs()
            loss = (err * w).sum() / (w.sum() * 3)
            if not decoder_only:
                loss = loss + 1e-4 * post.kl().mean() / post.mean[0].numel()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            bar.update(1)
            if step % 50 == 0:
                log.info("%s step %d/%d weighted loss %.5f mse %.5f lr %.2e", what, step, steps, loss.item(),
                         F.mse_loss(rec.detach(), x).item(), opt.param_groups[0]["lr"])
            if time.time() - last > ckpt_s or step == steps or stop_requested():
                save_vae_ckpt(ck, vae, opt, {"step": step})
                add_time(out, f"{key}_seconds", time.time() - t0)
                t0 = last = time.time()
                stop_if_requested(what, step, steps, ck, bar)
    bar.close()
    vae.eval()
    z, mse = held_apart_recon(vae, imgs, seed)
    if not decoder_only:
        vae.register_to_config(scaling_factor=float(1.0 / z.std()))  # the latent scale moved with the encoder
    vae.save_pretrained(str(final))
    add_time(out, f"{key}_seconds", time.time() - t0, {f"{key}_recon_mse": mse, f"{key}_steps": steps})
    log.info("%s done: recon mse %.5f, scaling_factor %.4f", what, mse, vae.config.scaling_factor)
    return vae
