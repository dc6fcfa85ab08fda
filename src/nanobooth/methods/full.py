"""Full fine-tune: every UNet weight trains (and the text encoders' read layers with train_text_encoder; the
identifier's new tokens with train_text_encoder_ti, pivotal tuning as embeddings.py does it for LoRA)."""

from __future__ import annotations

import torch

from ..core.models import load_pipeline, make_pipeline, train_layers_read
from . import embeddings
from .base import Method


class Full(Method):
    """The result is a whole diffusers pipeline folder (`from_pretrained(run_dir)`); with pivotal tuning, at the
    base model's vocabulary, with the new tokens' rows beside it in `<run name>_emb.safetensors` (as a LoRA run's)."""

    name = "full"

    def attach(self, family, unet, text_encoders, cfg):
        unet.requires_grad_(True)
        for i, te in enumerate(text_encoders):
            read = family.layers_read(i, te.config.num_hidden_layers)
            if cfg.train_text_encoder and read:  # none read: an encoder the family never trains (SD3's T5)
                train_layers_read(te, read)

    def save(self, folder, components, unet, text_encoders, cfg):
        pipe = make_pipeline(components, unet=unet, text_encoders=text_encoders)
        modules = (unet, *text_encoders, components.vae)
        # each is uniform here (no adapters; pivotal tuning's fp32 new rows are saved apart, below)
        placed = [next(m.parameters()) for m in modules]
        placed = [(p.device, p.dtype) for p in placed]
        for m in modules:
            m.to("cpu", torch.float32)
        with embeddings.base_vocabulary(pipe):  # a plain SD/SDXL folder; the new tokens go beside it
            pipe.save_pretrained(folder, safe_serialization=True)
        for m, (dev, dtype) in zip(modules, placed):  # back where they were, for the final validation render
            m.to(dev, dtype)
        if cfg.train_text_encoder_ti:
            embeddings.save(folder, components.family, text_encoders, cfg)

    def load_for_inference(self, run_dir, load_base, torch_dtype=None):
        # the run folder is a pipeline itself; pivotal tuning's new tokens beside it
        return embeddings.load_beside(load_pipeline(str(run_dir), torch_dtype=torch_dtype), run_dir)
