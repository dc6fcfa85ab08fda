"""Seconds per training step and peak memory, per variant and option, on a mid-size SD-architecture model.

    python bench/train_step.py                      # all variants, 256², batch 1 (+1 class image)
    python bench/train_step.py --resolution 128 --steps 20 --variants dreambooth-lora
    python bench/train_step.py --options gradient_checkpointing=true tome_ratio=0.5

Each row runs in a fresh process (so peak RSS is that run's own). s/step is the median over the
steps after warm-up, from train_log.jsonl's clock (model loading and class-image generation excluded;
class-image generation is timed separately). Prints a table and writes JSON to bench/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

VARIANTS = ["dreambooth", "dreambooth-finetune-text-encoder", "dreambooth-prior-pre", "dreambooth-lora", "dreambooth-lora-prior-pre"]
ROOT = Path(__file__).resolve().parent


def print_table(header: list[str], lines: list[list], name: str, rows: list[dict]) -> Path:
    """The markdown table every bench prints, and its raw rows as bench/results/NAME-TIMESTAMP.json."""
    print("\n| " + " | ".join(header) + " |\n" + "|---" * len(header) + "|")
    for cells in lines:
        print("| " + " | ".join(str(c) for c in cells) + " |")
    out = ROOT / "results" / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(rows, indent=2))
    print(f"\nwrote {out}")
    return out


def mid_model_path(layers_per_block: int = 2) -> Path:
    cache = Path(os.environ.get("NANOBOOTH_CACHE", Path.home() / ".cache/nanobooth"))
    return build_mid_model(cache / f"bench-mid-v1-lpb{layers_per_block}", layers_per_block)


def build_sd15_model(path: Path) -> Path:
    """SD1.5's architecture with random weights, saved in fp16 (no download): the 860M UNet, the f=8 VAE
    (128/256/512/512), CLIP ViT-L/14's text encoder. Random weights train exactly as fast as real ones."""
    import torch
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from nanobooth.tiny import tokenizer_dir

    if (path / "model_index.json").is_file():
        return path
    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8)  # the defaults are SD1.x's layout
    vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4, sample_size=512,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
    te = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
                                      hidden_act="quick_gelu", bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
                                      vocab_size=49408, max_position_embeddings=77))
    pipe = StableDiffusionPipeline(
        unet=unet, vae=vae, text_encoder=te, tokenizer=CLIPTokenizer.from_pretrained(tokenizer_dir(), model_max_length=77),
        scheduler=PNDMScheduler(skip_prk_steps=True, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.to(torch.float16).save_pretrained(path)
    return path


def build_mid_model(path: Path, layers_per_block: int = 2) -> Path:
    """UNet 64/128/256 with cross-attention (~SD1.5's layout at a fraction of the width), f=8 VAE, 4-layer CLIP.
    layers_per_block=2 is 18.2M UNet params; 1 is 12.8M (the size of the issue's reference measurements)."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from nanobooth.tiny import tokenizer_dir

    if (path / "model_index.json").is_file():
        return path
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(64, 128, 256), layers_per_block=layers_per_block, sample_size=32, cross_attention_dim=256,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=8,
    )
    vae = AutoencoderKL(
        block_out_channels=(32, 64, 64, 64), latent_channels=4, norm_num_groups=32, layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    )
    te = CLIPTextModel(CLIPTextConfig(hidden_size=256, intermediate_size=1024, num_attention_heads=4, num_hidden_layers=4,
                                      vocab_size=49408, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407,
                                      pad_token_id=49407))
    pipe = StableDiffusionPipeline(
        unet=unet, vae=vae, text_encoder=te, tokenizer=CLIPTokenizer.from_pretrained(tokenizer_dir(), model_max_length=77),
        scheduler=DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                                set_alpha_to_one=False, steps_offset=1),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(path)
    return path


def run_one(args) -> dict:
    """Child process: one training run, then its numbers as JSON on stdout's last line."""
    import torch

    from nanobooth.core.config import load_config
    from nanobooth.core.train import train

    out = Path(tempfile.mkdtemp(prefix="nb-bench-"))
    overrides = [f"model={args.model}", f"output_dir={out}", f"resolution={args.resolution}", f"max_train_steps={args.steps}",
                 "validation_prompts=[]", "checkpointing_steps=0", f"train_batch_size={args.batch}", "gradient_accumulation_steps=1",
                 f"num_class_images={args.class_images}", f"sample_batch_size={args.class_images}",
                 f"mixed_precision={args.mixed_precision}", "log_every=1000", *args.option]
    cfg = load_config(args.one, overrides)
    t0 = time.time()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    train(cfg)
    total = time.time() - t0
    log = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    times = [b["time"] - a["time"] for a, b in zip(log, log[1:])][args.warmup:]
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"variant": args.one, "options": " ".join(args.option), "resolution": args.resolution, "batch": args.batch,
            "s_per_step": statistics.median(times), "steps_timed": len(times), "total_s": round(total, 2),
            "train_s": log[-1]["time"], "peak_rss_mb": round(rss_mb),
            "peak_cuda_mb": round(torch.cuda.max_memory_allocated() / 2**20) if torch.cuda.is_available() else None,
            "device": "cuda" if torch.cuda.is_available() else f"cpu x{torch.get_num_threads()}"}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", nargs="*", default=VARIANTS)
    p.add_argument("--options", nargs="*", default=[""], help="option sets, each 'k=v,k=v' ('' = defaults)")
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--class-images", type=int, default=4)
    p.add_argument("--mixed-precision", default="no")
    p.add_argument("--model", default=None, help="default: the mid-size model, built on first use")
    p.add_argument("--layers-per-block", type=int, default=2, help="mid-size UNet depth: 2 (18.2M) or 1 (12.8M)")
    p.add_argument("--one", help=argparse.SUPPRESS)
    p.add_argument("--option", action="append", default=[], help=argparse.SUPPRESS)
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.one:
        import logging

        logging.disable(logging.WARNING)
        print(json.dumps(run_one(args)))
        return
    model = args.model or str(mid_model_path(args.layers_per_block))
    rows = []
    for variant in args.variants:
        for opt in args.options:
            cmd = [sys.executable, __file__, "--one", variant, "--model", model, "--resolution", str(args.resolution),
                   "--steps", str(args.steps), "--warmup", str(args.warmup), "--batch", str(args.batch),
                   "--class-images", str(args.class_images), "--mixed-precision", args.mixed_precision]
            for kv in filter(None, opt.split(",")):
                cmd += ["--option", kv]
            res = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
            if res.returncode != 0:
                print(f"{variant} [{opt}] failed:\n{res.stderr[-2000:]}", file=sys.stderr)
                continue
            rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
            r = rows[-1]
            print(f"{variant:34s} {opt or 'defaults':28s} {r['s_per_step']:7.3f} s/step  peak RSS {r['peak_rss_mb']:6d} MB", flush=True)
    print_table(["variant", "options", "s/step", "peak RSS MB", "peak CUDA MB", "device"],
                [[r["variant"], r["options"] or "-", f"{r['s_per_step']:.3f}", r["peak_rss_mb"], r["peak_cuda_mb"] or "-", r["device"]]
                 for r in rows], "train_step", rows)


if __name__ == "__main__":
    main()
