"""Pretrain the toy world's FLUX-shaped twin (`model=toy-flux`).

    nanobooth toy pretrain --recipe v5 --out toy_v5       # first: the world's data and the autoencoder
    nanobooth toy pretrain-flux --base toy_v5 --out toy_flux
    nanobooth toy pretrain-flux --out toy_flux --export src/nanobooth/assets/toy_flux

A FluxTransformer2DModel (double- then single-stream blocks, RoPE over 2x2-packed latents) with a CLIP text
encoder (its pooled output) and a T5 encoder (the joint sequence), trained jointly from scratch by
rectified flow on the latents of the UNet recipe's autoencoder: the same images, captions and VAE, so the
FLUX family's DreamBooth is measured offline exactly like the UNet's. The loss, the noise levels and the
denoiser call are the FLUX family's own (families/flux.py, families/objective.py: logit-normal noise
levels shifted for the image size, as the sampler's dynamic shifting visits them), so pretraining,
fine-tuning and FluxPipeline's sampling see one model.

Unlike FLUX.1-dev the twin has no guidance embedding (there is no teacher to distil guidance from):
nanobooth samples it with true classifier-free guidance (Flux.sampling_kwargs), which the 10% empty
captions train. Its T5 sequence is 32 tokens (the tokenizer's model_max_length, which the family reads;
512 would make each step 5x slower for captions of 20 tokens). With diffusers directly (fp16 files, so
fp32 on a CPU): `FluxPipeline.from_pretrained(DIR, dtype=torch.float32)(prompt, max_sequence_length=32,
true_cfg_scale=4, negative_prompt="", height=64, width=64)`.

Resumable like stage 2 of the UNet recipe: every batch, noise draw and noise level is a function of
(seed, step); a re-run of the same command continues from the last checkpoint.
"""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import torch

from nanobooth.toy import world
from nanobooth.toy.recipes import denoiser
from nanobooth.core.threads import native_bf16
from nanobooth.families.flux import quiet_rms_norm_mismatch
from nanobooth.toy.recipes.ckpt import stops_at_checkpoints, timings, write_json
from nanobooth.toy.recipes.data import encode_latents, load_or_render_data
from nanobooth.toy.recipes.pretrain import make_text_encoder, make_tokenizer, save_pipeline, vae_dir

log = logging.getLogger("nanobooth.toy.recipes.pretrain_flux")
T5_LENGTH = 32  # the longest world caption, identifier included, is 18 pieces with its end token
# FLUX.1's dynamic shifting, unchanged: a 64x64 image is 256 packed tokens, FLUX's base_image_seq_len, so
# the sampler's shift there is exp(base_shift) = 1.65
SCHEDULER = dict(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                 base_image_seq_len=256, max_image_seq_len=4096)
TRANSFORMER = dict(patch_size=1, in_channels=16, num_layers=2, num_single_layers=4, attention_head_dim=32,
                   num_attention_heads=6, joint_attention_dim=128, pooled_projection_dim=128, guidance_embeds=False,
                   axes_dims_rope=(8, 12, 12))


# ---------------------------------------------------------------- the models
def world_words() -> list[str]:
    """Every word a world caption, DreamBooth prompt or toy-eval prompt uses, and the identifier."""
    words = {"a", "an", "and", "photo", "of", "with", world.IDENTIFIER}
    for phrase in [*world.CLASSES, *world.RGB, *world.SCENES, *world.PATTERN_WORDS.values(), *world.MARK_WORDS.values()]:
        words.update(phrase.split())
    return sorted(words)


def make_t5_tokenizer():
    """A Unigram tokenizer of the world's words (whole words win: scored by length), with letters and
    punctuation to fall back on, so any other word (another identifier) still tokenizes. Built in code:
    T5's 32k-piece sentencepiece model is not needed for a world of 50 words."""
    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    pieces += [(f"\u2581{w}", -1.0) for w in world_words()] + [("\u2581", -4.0)]
    pieces += [(c, -5.0) for c in "abcdefghijklmnopqrstuvwxyz0123456789-'.,"]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=T5_LENGTH)


def make_t5(vocab_size: int):
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(vocab_size=vocab_size, d_model=128, d_kv=32, d_ff=256, num_layers=3, num_heads=4,
                                   relative_attention_num_buckets=16, relative_attention_max_distance=32,
                                   feed_forward_proj="gated-gelu", dropout_rate=0.0, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0))


def make_transformer():
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel(**TRANSFORMER)


def load_vae(base: Path):
    """The UNet recipe's shipped autoencoder (vae_dir), with shift_factor 0 (FluxPipeline adds it back when decoding)."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(str(vae_dir(base)))
    vae.register_to_config(shift_factor=0.0)
    return vae.eval().requires_grad_(False)


def base_data(base: Path):
    """The images, specs and cached latents of the UNet recipe's run folder `base`, and the weight its stage 2
    draws patterned objects with (args_all.json's patterned_weight; 1.0 for runs from before the option), so the
    twin sees the same mix."""
    check_base(base)
    a = json.loads((base / "args_all.json").read_text())
    imgs, specs = load_or_render_data(base, a["n_images"], a["seed"], a["n_plain"], a.get("n_patterned", 0))
    vae = load_vae(base)
    mean, std = encode_latents(base, vae, imgs)
    return vae, specs, mean, std, float(a.get("patterned_weight", 1.0))


def check_base(base: Path) -> None:
    """Refuse (one line, nothing written) a --base that is not a UNet recipe run past its autoencoder stages."""
    if not base.is_dir():
        raise SystemExit(f"nanobooth toy pretrain-flux: --base {base} does not exist; pass the run folder of "
                         "`nanobooth toy pretrain --out DIR`")
    if not (base / "args_all.json").is_file() or not any((base / f).is_file() for f in ("latents.safetensors",
                                                                                           "latents_refined.safetensors")):
        raise SystemExit(f"nanobooth toy pretrain-flux: --base {base} has no encoded latents yet; run `nanobooth toy "
                         f"pretrain --out {base}` (with its recipe) until its stage 2 has started")


# ------------------------------------------------------------------ training
def train(out: Path, base: Path, seed: int, steps: int, batch: int, ckpt_s: float, lr: float, bf16: bool = False):
    """Transformer + CLIP + T5 by the FLUX family's objective, in the shared stage-2 loop (denoiser.train)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from nanobooth.families import FAMILIES
    from nanobooth.families.objective import FlowMatchObjective

    vae, specs, mean, std, patterned_weight = base_data(base)
    clip_tok, t5_tok = make_tokenizer(), make_t5_tokenizer()
    torch.manual_seed(seed + 2)
    transformer, clip, t5 = make_transformer(), make_text_encoder(), make_t5(len(t5_tok))

    def encode(caps):
        """The family's tokenize/encode, batched (FluxPipeline's encode_prompt)."""
        clip_ids = clip_tok(caps, padding="max_length", max_length=clip_tok.model_max_length, truncation=True,
                            return_tensors="pt").input_ids
        t5_ids = t5_tok(caps, padding="max_length", max_length=T5_LENGTH, truncation=True, return_tensors="pt").input_ids
        return {"encoder_hidden_states": t5(t5_ids)[0], "pooled_projections": clip(clip_ids).pooler_output,
                "guidance": torch.ones(1)}  # read only by guidance-distilled models

    stage = denoiser.Stage(
        "flux", FAMILIES["FluxPipeline"],
        FlowMatchObjective(FlowMatchEulerDiscreteScheduler(**SCHEDULER), "logit_normal", resolution_shift=True),
        {"transformer": transformer, "text_encoder": clip, "text_encoder_2": t5}, encode,
        stream=3, noise_seed=11, patterned_weight=patterned_weight,  # stream 3: the UNet recipe draws from stream 2
        state={"base": str(base), "patterned_weight": patterned_weight})
    denoiser.train(out, stage, specs, mean, std, dict(vae.config), seed, steps, batch, ckpt_s, lr, bf16)


# -------------------------------------------------------------------- export
def build_pipeline(out: Path, use_ema: bool = True):
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    ck = out / "flux_ckpt"
    state = json.loads((ck / "state.json").read_text())
    t5_tok = make_t5_tokenizer()
    modules = {"transformer": make_transformer(), "text_encoder": make_text_encoder(), "text_encoder_2": make_t5(len(t5_tok))}
    denoiser.load_weights(modules, ck, use_ema)
    for m in modules.values():
        m.eval()
    return FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER), vae=load_vae(Path(state["base"])),
                        tokenizer=make_tokenizer(), tokenizer_2=t5_tok, **modules)


def export(out: Path, dest: Path, use_ema: bool = True):
    save_pipeline(build_pipeline(out, use_ema), dest, out, "flux", use_ema,
                  "fp16 weights; on CPU load with dtype=torch.float32. No guidance embedding: sample with "
                  f"max_sequence_length={T5_LENGTH}, true_cfg_scale > 1 and negative_prompt=''")


def main(argv=None):
    p = argparse.ArgumentParser(prog="nanobooth toy pretrain-flux", description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--base", default="toy_pretrain", help="the UNet recipe's run folder: data, captions, latents, VAE")
    p.add_argument("--out", default="toy_flux", help="this run's folder (checkpoints, timings); re-run to resume")
    p.add_argument("--seed", type=int, default=0, help="batches, noise and noise levels are a function of (seed, step)")
    # two thirds of the UNet's stage 2 (9000), for CPU time: 2.7 s a step on 2 AVX2 threads (docs/performance.md),
    # 4.6 h; its rectified flow ends at pure noise, so it has no terminal-SNR leak to unlearn as stage 2 had
    p.add_argument("--steps", type=int, default=6000, help="optimizer steps")
    p.add_argument("--batch", type=int, default=32, help="images a step")
    p.add_argument("--lr", type=float, default=3e-4, help="peak AdamW lr (100 warm-up steps, cosine to a tenth)")
    p.add_argument("--threads", type=int, default=1,
                   help="CPU threads: one, so it runs beside the UNet recipe's stage 2 on a 2-core machine")
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                   help="forward passes under CPU bfloat16 autocast, weights fp32; default (None): where the CPU has bf16 "
                        "instructions (core.threads.native_bf16), since emulated bf16 is 13x slower than fp32")
    p.add_argument("--ckpt-minutes", type=float, default=3.0, help="checkpoint this often")
    p.add_argument("--export", default=None, help="write the FluxPipeline (fp16 safetensors) here and exit")
    p.add_argument("--no-ema", action="store_true", help="export the raw weights, not their EMA")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    torch.set_num_threads(a.threads)
    out = Path(a.out)
    if a.export:
        if not (out / "flux_ckpt" / "state.json").is_file():
            raise SystemExit(f"nanobooth toy pretrain-flux: --out {out} holds no checkpoint to export; train it first "
                             f"(nanobooth toy pretrain-flux --base BASE --out {out})")
        if not a.no_ema and not (out / "flux_ckpt" / "ema.safetensors").is_file():
            raise SystemExit(f"nanobooth toy pretrain-flux: --out {out}: its checkpoint has no EMA yet (unpacked from "
                             "a carry); continue the run to its next checkpoint, or pass --no-ema")
        export(out, Path(a.export), use_ema=not a.no_ema)
        return 0
    check_base(Path(a.base))  # before anything is written
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "args.json", vars(a))
    quiet_rms_norm_mismatch()  # bf16 activations meet fp32 RMSNorm weights: torch's unfused path says so (families/flux.py)
    with stops_at_checkpoints():  # a stop mid-run checkpoints that step: rerun to continue
        train(out, Path(a.base).resolve(), a.seed, a.steps, a.batch, a.ckpt_minutes * 60, a.lr,
              native_bf16() if a.bf16 is None else a.bf16)
    log.info("FLUX twin done: %s", json.dumps(timings(out)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
