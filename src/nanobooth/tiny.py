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


def tiny_t5_tokenizer(model_max_length: int = 256):
    """A T5 (Unigram) tokenizer built offline: special pieces, then lowercase words and letters, scored by length
    so whole words win; unknown text falls back to letters or <unk>."""
    from transformers import T5Tokenizer

    words = "a an the of on in at photo picture sks dog cat cube ball star ring cup beach snow grass night rug red blue".split()
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    pieces += [(f"\u2581{w}", -1.0) for w in words] + [("\u2581", -4.0)]
    pieces += [(c, -5.0) for c in "abcdefghijklmnopqrstuvwxyz0123456789"]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=model_max_length)


def tiny_sd3_components(seed: int = 0):
    """The SD3.5-medium layout at toy width: a 2-block MMDiT (the first with SD3.5's second attention, qk
    RMS-norm), CLIP-L and CLIP-G with projections (pooled 32 + 32), a T5 encoder (width 64 >= the CLIPs'
    64 side by side, as in SD3), a 16-channel VAE with SD3's scale and shift, the flow-matching sampler."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer, T5Config, T5EncoderModel

    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=16, patch_size=2, in_channels=16, out_channels=16, num_layers=2, attention_head_dim=8,
        num_attention_heads=4, joint_attention_dim=64, caption_projection_dim=32, pooled_projection_dim=64,
        pos_embed_max_size=32, dual_attention_layers=(0,), qk_norm="rms_norm",
    )
    torch.manual_seed(seed)
    vae = AutoencoderKL(
        block_out_channels=(16, 32), in_channels=3, out_channels=3, latent_channels=16, norm_num_groups=8,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, sample_size=32,
        use_quant_conv=False, use_post_quant_conv=False, scaling_factor=1.5305, shift_factor=0.0609,
    )
    te_cfg = dict(bos_token_id=49406, eos_token_id=49407, pad_token_id=49407, hidden_size=32, intermediate_size=37,
                  layer_norm_eps=1e-05, num_attention_heads=4, num_hidden_layers=2, vocab_size=49408,
                  max_position_embeddings=77, hidden_act="gelu", projection_dim=32)
    torch.manual_seed(seed)
    te = CLIPTextModelWithProjection(CLIPTextConfig(**te_cfg))
    torch.manual_seed(seed + 1)
    te2 = CLIPTextModelWithProjection(CLIPTextConfig(**te_cfg))
    torch.manual_seed(seed + 2)
    t5_tok = tiny_t5_tokenizer()
    te3 = T5EncoderModel(T5Config(vocab_size=len(t5_tok), d_model=64, d_kv=16, d_ff=64, num_layers=2, num_heads=4,
                                  relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0))
    tok = CLIPTokenizer.from_pretrained(tokenizer_dir(), model_max_length=77)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    return dict(transformer=transformer, vae=vae, text_encoder=te, text_encoder_2=te2, text_encoder_3=te3, tokenizer=tok,
                tokenizer_2=tok, tokenizer_3=t5_tok, scheduler=scheduler)


def build_tiny_sd3_pipeline(path: Path, seed: int = 0) -> Path:
    from diffusers import StableDiffusion3Pipeline

    return _save_atomic(StableDiffusion3Pipeline(**tiny_sd3_components(seed)), Path(path))


def tiny_flux_components(seed: int = 0):
    """The FLUX.1-dev layout at toy width: one double-stream and one single-stream block with guidance
    embedding, CLIP-L (pooled 32), T5 (width 32), a 16-channel VAE with FLUX's scale and shift (latents packed
    2x2 into 64 channels), the flow-matching sampler with FLUX's resolution-dependent shift."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel

    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=(4, 4, 8),
    )
    torch.manual_seed(seed)
    vae = AutoencoderKL(
        block_out_channels=(16, 32), in_channels=3, out_channels=3, latent_channels=16, norm_num_groups=8,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, sample_size=32,
        use_quant_conv=False, use_post_quant_conv=False, scaling_factor=0.3611, shift_factor=0.1159,
    )
    torch.manual_seed(seed)
    te = CLIPTextModel(CLIPTextConfig(
        bos_token_id=49406, eos_token_id=49407, pad_token_id=49407, hidden_size=32, intermediate_size=37,
        layer_norm_eps=1e-05, num_attention_heads=4, num_hidden_layers=2, vocab_size=49408, max_position_embeddings=77,
        hidden_act="gelu", projection_dim=32))
    torch.manual_seed(seed + 1)
    t5_tok = tiny_t5_tokenizer(512)
    te2 = T5EncoderModel(T5Config(vocab_size=len(t5_tok), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                                  relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0))
    tok = CLIPTokenizer.from_pretrained(tokenizer_dir(), model_max_length=77)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                                                max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)
    return dict(transformer=transformer, vae=vae, text_encoder=te, text_encoder_2=te2, tokenizer=tok, tokenizer_2=t5_tok,
                scheduler=scheduler)


def build_tiny_flux_pipeline(path: Path, seed: int = 0) -> Path:
    from diffusers import FluxPipeline

    return _save_atomic(FluxPipeline(**tiny_flux_components(seed)), Path(path))
