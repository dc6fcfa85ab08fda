#!/usr/bin/env bash
# s/step and peak VRAM of real-architecture training on a GPU, with no download:
#
#   bash bench/gpu.sh            # SD1.5 at 512² and SDXL at 1024², bf16, random weights
#   bash bench/gpu.sh --tiny     # the same matrix on the tests' tiny SD/SDXL models at 32² (CPU: checks the script)
#
# Builds SD1.5- and SDXL-architecture pipelines (the published UNet/VAE/CLIP shapes, random weights)
# once into $NANOBOOTH_CACHE (default ~/.cache/nanobooth), then runs bench/train_step.py on each for
# LoRA + prior preservation and full fine-tune, with each of: defaults, ToMe 0.5, torch.compile, both.
# Every row is a fresh process; the table (s/step = median after warm-up, peak RSS, peak CUDA MB) is printed
# and written to bench/results/. Random weights train exactly as fast as real ones; the images are noise.
set -euo pipefail
cd "$(dirname "$0")/.."
TINY=0
[[ "${1:-}" == "--tiny" ]] && TINY=1
CACHE="${NANOBOOTH_CACHE:-$HOME/.cache/nanobooth}"
export HF_HUB_OFFLINE=1

if [[ $TINY == 1 ]]; then
  SD="$CACHE/bench-gpu-tiny-sd"; SDXL="$CACHE/bench-gpu-tiny-sdxl"; RES_SD=32; RES_XL=32
  STEPS=4; WARMUP=1; PREC=no; CLASS=2
  # torch.compile on CPU means minutes of C++ compilation per row; --tiny checks the other options
  OPTIONS=("" "tome_ratio=0.5")
else
  SD="$CACHE/bench-gpu-sd15"; SDXL="$CACHE/bench-gpu-sdxl"; RES_SD=512; RES_XL=1024
  STEPS=20; WARMUP=8; PREC=bf16; CLASS=4   # warm-up covers torch.compile's first (compiling) steps
  OPTIONS=("" "tome_ratio=0.5" "torch_compile=true" "tome_ratio=0.5,torch_compile=true")
fi

python - "$TINY" "$SD" "$SDXL" <<'PY'
import sys
from pathlib import Path

import torch

tiny, sd, sdxl = sys.argv[1] == "1", Path(sys.argv[2]), Path(sys.argv[3])
if tiny:
    from nanobooth.tiny import build_tiny_pipeline, build_tiny_sdxl_pipeline

    build_tiny_pipeline(sd) if not (sd / "model_index.json").is_file() else None
    build_tiny_sdxl_pipeline(sdxl) if not (sdxl / "model_index.json").is_file() else None
    sys.exit()
from diffusers import (AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline,
                       UNet2DConditionModel)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from nanobooth.tiny import tokenizer_dir

tok = CLIPTokenizer.from_pretrained(tokenizer_dir(), model_max_length=77)
clip = dict(bos_token_id=49406, eos_token_id=49407, pad_token_id=49407, vocab_size=49408, max_position_embeddings=77)
betas = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1)


def vae(**kw):  # the SD/SDXL f=8 VAE: 128/256/512/512, 2 layers per block
    return AutoencoderKL(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                         down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, **kw)


if not (sd / "model_index.json").is_file():  # SD1.5: 860M UNet, CLIP ViT-L/14 text encoder
    sys.path.insert(0, "bench")
    from train_step import build_sd15_model

    build_sd15_model(sd)
    print(f"built SD1.5-architecture pipeline in {sd}", flush=True)
if not (sdxl / "model_index.json").is_file():  # SDXL base: 2.6B UNet, CLIP-L + OpenCLIP bigG
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=128, block_out_channels=(320, 640, 1280), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), transformer_layers_per_block=(1, 2, 10),
        attention_head_dim=(5, 10, 20), cross_attention_dim=2048, use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816)
    te = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
                                      hidden_act="quick_gelu", **clip))
    te2 = CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=1280, intermediate_size=5120, num_attention_heads=20,
                                                     num_hidden_layers=32, hidden_act="gelu", projection_dim=1280, **clip))
    pipe = StableDiffusionXLPipeline(unet=unet, vae=vae(sample_size=1024, scaling_factor=0.13025, force_upcast=True),
                                     text_encoder=te, text_encoder_2=te2, tokenizer=tok, tokenizer_2=tok,
                                     scheduler=EulerDiscreteScheduler(timestep_spacing="leading", **betas))
    pipe.to(torch.float16).save_pretrained(sdxl)
    print(f"built SDXL-architecture pipeline in {sdxl}", flush=True)
PY

for spec in "$SD:$RES_SD" "$SDXL:$RES_XL"; do
  model="${spec%:*}"; res="${spec##*:}"
  echo "== $(basename "$model") at ${res}²"
  python bench/train_step.py --model "$model" --resolution "$res" --steps "$STEPS" --warmup "$WARMUP" \
    --mixed-precision "$PREC" --class-images "$CLASS" --variants dreambooth-lora-prior-pre dreambooth --options "${OPTIONS[@]}"
done
