"""Pretrain the tiny Stable-Diffusion-format model of the toy world.

    nanobooth toy pretrain --out toy_pretrain --seed 0        # the defaults are the shipped recipe (v5)
    nanobooth toy pretrain --out toy_pretrain --export src/nanobooth/assets/toy_model
    nanobooth toy pretrain --recipe v4 --out toy_v4        # the previous model's recipe: see RECIPES
    nanobooth toy pretrain --recipe v6 --out toy_v6 --vae-from src/nanobooth/assets/toy_model  # v5's VAE, a wider UNet

Stages 1/1b/1c/1d train the AutoencoderKL (`toy/autoencoder.py`), 1e (recipe v5) centres its latents;
stage 2 trains UNet2DConditionModel + CLIPTextModel jointly on latents cached from it.
Re-running the same command resumes from the last checkpoint: every batch,
noise draw and timestep is a function of (seed, step), so a resumed run sees
exactly what an uninterrupted one would have.
"""
from __future__ import annotations

import argparse
import json
import logging
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from nanobooth.toy import world
from nanobooth.toy.recipes import autoencoder, denoiser, exported
from nanobooth.toy.recipes.data import encode_latents, load_or_render_data
from nanobooth.toy.recipes.autoencoder import refine_decoder, refine_vae, train_decoder, train_vae
from nanobooth.core.threads import native_bf16
from nanobooth.toy.recipes.ckpt import add_history, add_time, read_history, stops_at_checkpoints, timings, write_json

log = logging.getLogger("nanobooth.toy.recipes.pretrain")
TOKENIZER_DIR = Path(__file__).resolve().parents[2] / "assets" / "clip_tokenizer"
SD_BETAS = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)


# ---------------------------------------------------------------- the models
def make_text_encoder():
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = CLIPTextConfig(
        vocab_size=49408, hidden_size=128, intermediate_size=512, num_hidden_layers=4,
        num_attention_heads=4, max_position_embeddings=77, projection_dim=128,
        bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
    )
    return CLIPTextModel(cfg)


UNETS = {
    # 16x16 latents (f=4 VAE): 8.8M parameters, 17.6 MB in fp16
    "v4": dict(sample_size=16, down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
               up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
               block_out_channels=(64, 128, 192)),
    # 32x32 latents (f=2 VAE): one level more, a narrow one without attention at 32x32 (attention
    # over 1024 positions would cost more than the rest of the net), so a step costs about what v4's
    # does on one CPU thread; 10.9M parameters, 21.9 MB in fp16
    "v5": dict(sample_size=32, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                                 "DownBlock2D"),
               up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
               block_out_channels=(32, 96, 160, 192)),
}
# v5 with its attention-free 32x32 level twice as wide (64 channels): that level is where subjects' marks and
# patterns are drawn, and v5 gives it 32 channels. 11.6M parameters, 23.2 MB in fp16.
UNETS["v6"] = dict(UNETS["v5"], block_out_channels=(64, 96, 160, 192))


def make_unet(arch: str = "v4"):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        in_channels=4, out_channels=4, layers_per_block=1, cross_attention_dim=128, attention_head_dim=8,
        norm_num_groups=32, **UNETS[arch],
    )


def make_tokenizer():
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(TOKENIZER_DIR))


# ------------------------------------------------------------------ stage 2
def centre_latents(out: Path, scenes: np.ndarray, imgs: np.ndarray, seed: int):
    """Stage 1e: the last autoencoder (vae_dir) with its latent space shifted to zero channel means over the
    training data (autoencoder.centre_vae, exact), its latent cache shifted alike (no re-encode) and
    scaling_factor re-measured as 1/std on the held-apart scenes. Written to vae_centred/.

    Why: SD's noise schedule never reaches zero SNR; x_T keeps sqrt(alpha_bar_T) ~ 0.07 of the latent
    (Lin et al. 2024, "Common Diffusion Noise Schedules and Sample Steps are Flawed"). A UNet trained on
    latents whose channel means are far from 0 learns to read them off x_T, and pure noise carries none:
    recipe v5's first samples came out colour-cast (data means -0.99, 0.90, 0.43, -0.49 in scaled units,
    sample means within 0.15 of 0); adding sqrt(alpha_bar_T) * mean to x_T restored the colours. With
    centred latents pure noise is what training saw at T. A run whose stage 2 had started before this
    stage continues on the centred latents, as history.json records."""
    from diffusers import AutoencoderKL

    final = out / "vae_centred"
    if (final / "config.json").exists():
        return AutoencoderKL.from_pretrained(str(final)).eval().requires_grad_(False)
    t0, src = time.time(), vae_dir(out)
    vae = AutoencoderKL.from_pretrained(str(src)).eval().requires_grad_(False)
    mean, std = encode_latents(out, vae, imgs)
    mu = mean.double().mean((0, 2, 3)).float()
    autoencoder.centre_vae(vae, mu)
    z, mse = autoencoder.held_apart_recon(vae, scenes, seed)
    vae.register_to_config(scaling_factor=float(1.0 / z.std()))
    tmp = out / "latents_centred.tmp"
    save_file({"mean": (mean.float() - mu.view(1, -1, 1, 1)).half().contiguous(), "std": std.contiguous()}, str(tmp))
    tmp.replace(out / "latents_centred.safetensors")
    shutil.rmtree(final.with_suffix(".tmp"), ignore_errors=True)
    vae.save_pretrained(str(final.with_suffix(".tmp")))
    final.with_suffix(".tmp").rename(final)  # last: its config.json is what says the stage is done
    add_time(out, "centre_seconds", time.time() - t0, {"centre_raw_latent_means": mu.tolist(),
                                  "centre_recon_mse": mse, "centre_scaling_factor": vae.config.scaling_factor})
    state = out / "unet_ckpt" / "state.json"
    if state.is_file():
        step = json.loads(state.read_text())["step"]
        add_history(out, f"stage 2 trained steps 0-{step} on uncentred latents ({src.name}); stage 1e (centred latents) "
                         f"was added to the recipe then, and stage 2 continued from step {step} on centred ones")
    log.info("stage 1e: latents centred (raw channel means %s), scaling_factor %.4f, recon mse %.5f",
             [round(v, 3) for v in mu.tolist()], vae.config.scaling_factor, mse)
    return vae


def train_unet(out: Path, vae, imgs, specs, seed: int, steps: int, batch: int, ckpt_s: float, lr: float,
               arch: str = "v4", bf16: bool = False, noise_offset: float = 0.0,
               timestep_bias: tuple[float, float] = (0.0, 1.0), patterned_weight: float = 1.0,
               init: Path | None = None):
    """UNet + CLIP text encoder by SD's objective (epsilon, min-SNR-5 weights: the same optimum, markedly faster
    convergence in short runs), in the shared stage-2 loop (denoiser.train).

    noise_offset (recipe v5: 0.1): offset noise (Guttenberg 2023; diffusers' and kohya's `noise_offset`). Centring
    (stage 1e) zeroes the data's mean, not each image's: x_T still carries sqrt(alpha_bar_T) ~ 0.07 of every
    image's channel means, and on a 32x32 grid pure noise's own channel means are only 1/32 ~ 0.031 wide, so the
    UNet learns to read the scene's brightness and colour off x_T. v5 at step 5179 without it drew "at night"
    in 0 of 6 images and "on a red rug" in 2 of 6 (wrong colours); starting the same samples from x_T plus the
    scene's leaked mean, 6 of 6 each. The leaked means' std over the data is 0.057 / 0.046 / 0.025 / 0.019 per
    channel; an offset of 0.1 makes the noise's channel means 0.105 wide, so the prompt, not x_T, must say the
    scene. A run whose stage 2 started without it continues with it, as history.json records.

    timestep_bias (recipe v5: (0.15, 3.0), denoiser.later_biased_timesteps): the noisiest 15% of the timesteps
    drawn 3x as often (35% of each batch). That is where a sample's scene and colours are settled, and where
    the UNet must learn them from the caption rather than off x_T: 376 steps of offset noise alone left v5's
    first-step x0 prediction for "at night" at the same channel means as for "on the beach" (-0.14, -0.09 vs
    -0.11, -0.03 at t=961), where v4's differ by 5.7 on channel 0 (-3.14 vs 2.60, guidance 4).

    patterned_weight (recipe v5: 3.0, denoiser.draw_probabilities): patterned/marked objects drawn 3x as often, half
    of each batch instead of a quarter. What limits DreamBooth on v5 at 9000 steps with uniform draws was the base
    model's patterns: drawing 40 described subjects ("a photo of a red and blue striped cube with an eye"), the
    probe read the class right 100% of the time, the mark 63%, the pattern 31% (metrics.described_subject_accuracy;
    docs/evaluation.md).

    init: an exported toy pipeline (`--init-from`) whose UNet and text encoder a new stage 2 starts from instead
    of a random init (a continuation of a shipped model; ignored once the run has a checkpoint)."""
    from diffusers import DDPMScheduler

    from nanobooth.families import FAMILIES, DDPMObjective

    mean, std = encode_latents(out, vae, imgs)
    tok = make_tokenizer()
    torch.manual_seed(seed + 1)
    unet, te = make_unet(arch), make_text_encoder()
    if init is not None and not (out / "unet_ckpt" / "state.json").is_file():
        exported.load_exported(init, unet, te)

    def encode(caps):
        ids = tok(caps, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        return {"encoder_hidden_states": te(ids)[0]}

    stage = denoiser.Stage("unet", FAMILIES["StableDiffusionPipeline"],
                           DDPMObjective(DDPMScheduler(**SD_BETAS, prediction_type="epsilon")),
                           {"unet": unet, "text_encoder": te}, encode, stream=2, noise_seed=7, snr_gamma=5.0,
                           noise_offset=noise_offset, timestep_bias=tuple(timestep_bias),
                           patterned_weight=patterned_weight,
                           configs={"unet_config.json": dict(unet.config)},  # what export rebuilds
                           state=objective_settings(noise_offset, timestep_bias, patterned_weight))
    note_objective_change(out, stage.state)
    denoiser.train(out, stage, specs, mean, std, dict(vae.config), seed, steps, batch, ckpt_s, lr, bf16)


def objective_settings(noise_offset: float = 0.0, timestep_bias: tuple[float, float] = (0.0, 1.0),
                       patterned_weight: float = 1.0) -> dict:
    """Stage 2's objective and data options as its checkpoints record them (checkpoints from before an option: its
    default)."""
    return {"noise_offset": noise_offset, "timestep_bias_portion": timestep_bias[0],
            "timestep_bias_multiplier": timestep_bias[1], "patterned_weight": patterned_weight}


def note_objective_change(out: Path, settings: dict) -> None:
    """A stage 2 resumed with other objective options than its checkpoint's continues with the new ones;
    history.json says which, from which step."""
    state = out / "unet_ckpt" / "state.json"
    if not state.is_file():
        return
    st = json.loads(state.read_text())
    was = {k: st.get(k, v) for k, v in objective_settings().items()}
    changed = [k for k in settings if settings[k] != was[k]]
    if not changed:
        return
    line = (f"stage 2 trained up to step {st['step']} with " + ", ".join(f"{k} {was[k]:g}" for k in changed)
            + f"; the recipe changed then, and stage 2 continued from step {st['step']} with "
            + ", ".join(f"{k} {settings[k]:g}" for k in changed))
    if add_history(out, line):  # False: a stop before the next checkpoint resumed here again
        log.info("stage 2: %s (history.json)", line)


# -------------------------------------------------------------------- export
def vae_dir(out: Path) -> Path:
    """The autoencoder a run ships: its last stage's (1e's centring of 1d, 1d's decoder on 1c's encoder, ...)."""
    return next(out / d for d in ("vae_centred", "vae_refined_dec", "vae_refined", "vae_dec", "vae") if (out / d / "config.json").exists())


def build_pipeline(out: Path, use_ema: bool = True):
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    vae = AutoencoderKL.from_pretrained(str(vae_dir(out)))
    ck = out / "unet_ckpt"
    # checkpoints written before unet_config.json was saved are v4's
    unet = (UNet2DConditionModel.from_config(json.loads((ck / "unet_config.json").read_text()))
            if (ck / "unet_config.json").exists() else make_unet())
    te = make_text_encoder()
    denoiser.load_weights({"unet": unet, "text_encoder": te}, ck, use_ema)
    sched = DDIMScheduler(**SD_BETAS, clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon")
    return StableDiffusionPipeline(
        vae=vae, text_encoder=te.eval(), tokenizer=make_tokenizer(), unet=unet.eval(), scheduler=sched,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def save_pipeline(pipe, dest: Path, out: Path, stage: str, use_ema: bool, note: str) -> None:
    """A toy pipeline as it ships: fp16 safetensors in `dest` (replaced), with the CLIP tokenizer's files verbatim
    (no re-serialised 3.6 MB tokenizer.json: CLIPTokenizer builds itself from vocab.json + merges.txt), and
    toy_model.json: the run `out`'s steps of `stage` ('unet', 'flux'), its timings, the world, and `note`."""
    pipe.to(torch.float16)
    if dest.exists():
        shutil.rmtree(dest)
    pipe.save_pretrained(str(dest), safe_serialization=True)
    shutil.rmtree(dest / "tokenizer")
    shutil.copytree(TOKENIZER_DIR, dest / "tokenizer")
    state = json.loads((out / f"{stage}_ckpt" / "state.json").read_text())
    (dest / "toy_model.json").write_text(json.dumps({
        f"{stage}_steps": state["step"], "ema": use_ema, "timings": timings(out),
        "world": {"classes": world.CLASSES, "colours": world.COLOURS, "scenes": world.SCENES}, "note": note,
        # how the shipped weights were actually reached, where that differs from one run of the defaults
        **({"history": history} if (history := read_history(out)) else {}),
    }, indent=2))
    log.info("exported the %s stage (step %d) to %s", stage, state["step"], dest)


def export(out: Path, dest: Path, use_ema: bool = True):
    save_pipeline(build_pipeline(out, use_ema), dest, out, "unet", use_ema, "fp16 weights; on CPU load with dtype=torch.float32")


# Recipes: defaults a --recipe sets (explicit flags still win). "v5" is the shipped model's (the default), "v4"
# the model before it (the flags' own defaults).
RECIPES = {
    "v4": {},
    # issue #24: a latent grid fine enough for the subjects' marks (f=2 VAE, 32x32 UNet), and patterned,
    # marked objects in the world the captions describe, so the base model already draws what subjects
    # are made of; stage 1b is dropped (1c and 1d cover it). Measured: the autoencoder stages 1.4 h on 2
    # threads of an AVX2 EPYC; stage 2 ~2.7 s a step on 1 thread of an AVX-512 EPYC (bf16), 3.5 s on 2
    # threads of the AVX2 one (fp32), so 12000 steps are 9-12 h. Centred latents, offset noise and patterned
    # objects drawn 3x as often: see centre_latents and train_unet.
    "v5": dict(vae_factor=2, unet_arch="v5", n_patterned=12000, decoder_steps=0, vae_refine_steps=800,
               vae_refine_subjects=1500, decoder_refine_steps=300, unet_steps=12000, threads=1, centre_latents=True,
               noise_offset=0.1, timestep_bias=(0.15, 3.0), patterned_weight=3.0),
}
# issue #24: v5 with a wider 32x32 level (UNETS); its autoencoder stages are v5's, so `--vae-from` v5's export skips them
RECIPES["v6"] = dict(RECIPES["v5"], unet_arch="v6")


def autoencoder_stages(out: Path, a: argparse.Namespace, imgs: np.ndarray, specs: list):
    """Stages 1-1e as the parsed flags `a` say; the autoencoder stage 2 trains in, or None where --stage stops
    before stage 2."""
    # the autoencoder stages see the scenes only (as the shipped VAE did; stage 1c's subjects bring the
    # backdrop), which also keeps their held-apart recon images (the last HELD_APART) scenes
    scenes, scene_specs = imgs[:a.n_images], specs[:a.n_images]
    vae = train_vae(out, scenes, a.seed, a.vae_steps, a.vae_batch, a.ckpt_minutes * 60, a.vae_factor)
    vae.eval().requires_grad_(False)
    if a.decoder_steps:
        train_decoder(out, scenes, a.seed, a.decoder_steps, a.vae_batch, a.ckpt_minutes * 60)
    if a.stage == "decoder":
        return None
    if a.vae_refine_steps:
        vae = refine_vae(out, scenes, scene_specs, a.seed, a.vae_refine_steps, a.vae_batch, a.ckpt_minutes * 60,
                         a.vae_refine_subjects)
        vae.eval().requires_grad_(False)
    if a.decoder_refine_steps:
        refine_decoder(out, scenes, scene_specs, a.seed, a.decoder_refine_steps, a.vae_batch, a.ckpt_minutes * 60,
                       a.vae_refine_subjects)
    if a.stage == "decoder-refine":
        return None
    return centre_latents(out, scenes, imgs, a.seed) if a.centre_latents else vae


def main(argv=None):
    p = argparse.ArgumentParser(prog="nanobooth toy pretrain", description=__doc__.split("\n")[0])
    p.add_argument("--recipe", choices=sorted(RECIPES), default="v5",
                   help="a set of defaults: v5 (the shipped model: f=2 VAE, 32x32 UNet, patterned objects), v4 (the one "
                        "before) or v6 (v5 with a wider 32x32 level)")
    p.add_argument("--out", default="toy_pretrain")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-images", type=int, default=30000)
    p.add_argument("--n-plain", type=int, default=6000, help="extra images of objects on the plain backdrop")
    p.add_argument("--n-patterned", type=int, default=0,
                   help="extra images of patterned, marked objects, captioned with their pattern and mark")
    p.add_argument("--vae-factor", type=int, choices=[2, 4], default=4, help="VAE downsampling (latents 64/f square)")
    p.add_argument("--unet-arch", choices=sorted(UNETS), default="v4", help="UNet layout (v5, v6: for 32x32 latents)")
    p.add_argument("--vae-steps", type=int, default=600)
    p.add_argument("--vae-batch", type=int, default=32)
    p.add_argument("--unet-steps", type=int, default=7200)
    p.add_argument("--unet-batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=5e-4, help="stage 2's peak AdamW lr (100 warm-up steps, cosine to a tenth)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                   help="stage 2 under CPU bfloat16 autocast (fp32 weights); default: where the CPU has bf16 instructions")
    p.add_argument("--ckpt-minutes", type=float, default=3.0)
    p.add_argument("--export", default=None, help="write the pipeline (fp16 safetensors) here and exit")
    p.add_argument("--no-ema", action="store_true")
    p.add_argument("--decoder-steps", type=int, default=600, help="stage 1b: decoder-only fine-tuning steps")
    p.add_argument("--vae-refine-steps", type=int, default=1200,
                   help="stage 1c: whole-VAE refinement with object-weighted loss and subject instances")
    p.add_argument("--vae-refine-subjects", type=int, default=800, help="stages 1c/1d: subjects (x5 poses) in the mix")
    p.add_argument("--decoder-refine-steps", type=int, default=600,
                   help="stage 1d: stage 1c's decoder alone, object weighted harder (latents unchanged)")
    p.add_argument("--centre-latents", action=argparse.BooleanOptionalAction, default=False,
                   help="stage 1e: shift the latent space to zero channel means before stage 2 (see centre_latents)")
    p.add_argument("--noise-offset", type=float, default=0.0,
                   help="stage 2: std of a per-image, per-channel constant added to the noise (see train_unet)")
    p.add_argument("--timestep-bias", type=float, nargs=2, default=(0.0, 1.0), metavar=("PORTION", "MULTIPLIER"),
                   help="stage 2: the noisiest PORTION of the timesteps drawn MULTIPLIER times as often (see train_unet)")
    p.add_argument("--patterned-weight", type=float, default=1.0,
                   help="stage 2: images of patterned/marked objects drawn this many times as often (see train_unet)")
    p.add_argument("--stage", choices=["all", "decoder", "decoder-refine"], default="all",
                   help="stop after stage 1b ('decoder') or 1d ('decoder-refine'): decoder stages can run "
                        "alongside stage 2, since they leave the latents alone")
    p.add_argument("--init-from", default=None, metavar="MODEL",
                   help="continue an exported toy model (e.g. src/nanobooth/assets/toy_model): stage 2 starts from its "
                        "UNet and text encoder with a fresh AdamW and lr warm-up, on new renders of --seed, in its VAE's "
                        "latent space; the autoencoder stages and their options (--vae-*, --decoder-*, --centre-latents, "
                        "--stage) are skipped. A resume without it continues what the run started from")
    p.add_argument("--vae-from", default=None, metavar="MODEL",
                   help="skip the autoencoder stages: an exported toy model's VAE stands in for them (a recipe that "
                        "shares its autoencoder stages, e.g. --recipe v6 on v5's export), and stage 2 starts from a "
                        "random init. A resume without it continues what the run started from")
    p.set_defaults(**RECIPES[p.parse_known_args(argv)[0].recipe])
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    torch.set_num_threads(a.threads)
    out = Path(a.out)
    if a.export:
        if not (out / "unet_ckpt" / "state.json").is_file():
            p.error(f"--out {out} holds no stage-2 checkpoint to export; train it first (the same command without --export)")
        if not a.no_ema and not (out / "unet_ckpt" / "ema.safetensors").is_file():
            p.error(f"--out {out}: its checkpoint has no EMA yet (unpacked from a carry); continue the run to its "
                    "next checkpoint, or pass --no-ema")
        export(out, Path(a.export), use_ema=not a.no_ema)
        return 0
    held = autoencoder.HELD_APART
    if a.init_from and a.vae_from:
        p.error("--init-from continues a model (its VAE included) and --vae-from takes only its VAE: pass one of them")
    recorded = {k: exported.recorded_init(out, k) for k in ("init_from", "vae_from")}
    if not (a.init_from or a.vae_from):  # a resume without the flag continues what the run started from
        if key := next((k for k, v in recorded.items() if v), None):
            setattr(a, key, recorded[key])
            log.info("%s was started with --%s %s: continuing it", out, key.replace("_", "-"), recorded[key])
    key = "init_from" if a.init_from else "vae_from"
    flag, source = "--" + key.replace("_", "-"), Path(getattr(a, key)) if getattr(a, key) else None
    if a.n_images < held + a.vae_batch and source is None:  # --init-from and --vae-from run no autoencoder stage
        p.error(f"--n-images {a.n_images}: the autoencoder stages keep the last {held} scenes apart (recon figure, "
                f"latent scale); pass at least {held + a.vae_batch}")
    if source is not None and (err := exported.init_error(source, a.recipe, a.unet_arch, a.vae_factor, a.stage, flag)):
        p.error(err)
    if source is not None and any(out.glob("args_*.json")) and recorded[key] != str(source):  # another latent space
        was = f"with {flag} {recorded[key]}" if recorded[key] else f"without {flag}"
        p.error(f"{out} holds a run started {was}; resume it as it was started, or pass another --out")
    init = source if a.init_from else None
    out.mkdir(parents=True, exist_ok=True)
    for f in sorted(out.glob("args_*.json")):  # a resume must not mix architectures (load_state_dict would fail)
        was = json.loads(f.read_text())
        was = (was.get("vae_factor", 4), was.get("unet_arch", "v4"))  # args files older than v5 are v4's
        if was != (a.vae_factor, a.unet_arch):
            p.error(f"{out} holds a run with --vae-factor {was[0]} --unet-arch {was[1]} ({f.name}); resume it "
                    "with the same recipe, or pass another --out")
    write_json(out / f"args_{a.stage}.json", vars(a))
    with stops_at_checkpoints():  # a stop mid-stage checkpoints that step: rerun to continue
        imgs, specs = load_or_render_data(out, a.n_images, a.seed, a.n_plain, a.n_patterned)
        vae = (exported.autoencoder_from(out, source, a.seed, continues=init is not None) if source is not None
               else autoencoder_stages(out, a, imgs, specs))
        if vae is None:  # --stage stopped after an autoencoder stage
            return 0
        train_unet(out, vae, imgs, specs, a.seed, a.unet_steps, a.unet_batch, a.ckpt_minutes * 60, a.lr, a.unet_arch,
                   native_bf16() if a.bf16 is None else a.bf16, a.noise_offset, a.timestep_bias, a.patterned_weight, init)
    log.info("pretraining done: %s", json.dumps(timings(out)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
