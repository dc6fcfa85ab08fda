"""A tiny, seeded, random Stable Diffusion pipeline, built in code like diffusers' get_dummy_components.

It exercises every real code path (diffusers folder on disk, real CLIP tokenizer, VAE latents,
cross-attention) in milliseconds, for tests and smoke runs. Its pictures are noise: use `model=toy`
for meaningful ones.
"""

from __future__ import annotations

import shutil
import tempfile
from importlib import resources
from pathlib import Path

import torch


def tokenizer_dir() -> Path:
    return Path(str(resources.files("nanobooth") / "assets" / "clip_tokenizer"))


def tiny_components(seed: int = 0, sample_size: int = 16, cross_attention_dim: int = 32):
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=sample_size, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross_attention_dim, attention_head_dim=8, norm_num_groups=8,
    )
    torch.manual_seed(seed)
    vae = AutoencoderKL(
        block_out_channels=(16, 32), in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=8,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"), up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        sample_size=sample_size * 2,
    )
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        bos_token_id=49406, eos_token_id=49407, pad_token_id=49407, hidden_size=cross_attention_dim,
        intermediate_size=37, layer_norm_eps=1e-05, num_attention_heads=4, num_hidden_layers=2,
        vocab_size=49408, max_position_embeddings=77,
    ))
    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir(), model_max_length=77)
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    return dict(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler)


def build_tiny_pipeline(path: Path, seed: int = 0, **kwargs) -> Path:
    """Write the tiny pipeline to `path` atomically."""
    from diffusers import StableDiffusionPipeline

    path = Path(path)
    pipe = StableDiffusionPipeline(**tiny_components(seed, **kwargs), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    return _save_atomic(pipe, path)


def _save_atomic(pipe, path: Path) -> Path:
    """Save into a temp folder beside `path`, then rename: a concurrent or killed build never leaves half a folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tiny-", dir=path.parent))
    pipe.save_pretrained(tmp)
    from .core.run_folder import make_readable

    make_readable(tmp)  # mkdtemp made it 0700 and safetensors writes 0600 files
    try:
        tmp.rename(path)
    except OSError:  # someone else finished first
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def tiny_sdxl_components(seed: int = 0):
    """Two text encoders (the second with a projection), text_time micro-conditioning, no attention at
    the first level: the SDXL layout at toy width."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 2), projection_class_embeddings_input_dim=80,  # 6 time ids * 8 + pooled 32
        cross_attention_dim=64, norm_num_groups=8,  # 32 + 32: both encoders' hidden states side by side
    )
    torch.manual_seed(seed)
    vae = AutoencoderKL(
        block_out_channels=(16, 32), in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=8,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, sample_size=32,
        force_upcast=True,
    )
    te_cfg = dict(bos_token_id=49406, eos_token_id=49407, pad_token_id=49407, hidden_size=32, intermediate_size=37,
                  layer_norm_eps=1e-05, num_attention_heads=4, num_hidden_layers=3, vocab_size=49408,
                  max_position_embeddings=77, hidden_act="gelu", projection_dim=32)
    torch.manual_seed(seed)
    te = CLIPTextModel(CLIPTextConfig(**te_cfg))
    torch.manual_seed(seed + 1)
    te2 = CLIPTextModelWithProjection(CLIPTextConfig(**te_cfg))
    tok = CLIPTokenizer.from_pretrained(tokenizer_dir(), model_max_length=77)
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
                                       timestep_spacing="leading")
    return dict(unet=unet, vae=vae, text_encoder=te, text_encoder_2=te2, tokenizer=tok, tokenizer_2=tok, scheduler=scheduler)


def build_tiny_sdxl_pipeline(path: Path, seed: int = 0) -> Path:
    from diffusers import StableDiffusionXLPipeline

    path = Path(path)
    return _save_atomic(StableDiffusionXLPipeline(**tiny_sdxl_components(seed)), path)
