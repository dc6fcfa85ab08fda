"""Full fine-tune: every UNet weight trains (and the text encoders' read layers with train_text_encoder)."""

from __future__ import annotations

import torch

from ..core.models import load_pipeline, make_pipeline, train_layers_read
from .base import Method


class Full(Method):
    """The result is a whole diffusers pipeline folder (`from_pretrained(run_dir)`)."""

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
        placed = [next(m.parameters()) for m in modules]
        placed = [(p.device, p.dtype) for p in placed]  # each is uniform here (no adapters in a full fine-tune)
        for m in modules:
            m.to("cpu", torch.float32)
        pipe.save_pretrained(folder, safe_serialization=True)
        for m, (dev, dtype) in zip(modules, placed):  # back where they were, for the final validation render
            m.to(dev, dtype)

    def load_for_inference(self, run_dir, load_base, torch_dtype=None):
        return load_pipeline(str(run_dir), torch_dtype=torch_dtype)  # the run folder is a pipeline itself
