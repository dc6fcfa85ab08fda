"""Textual inversion (`method=textual_inversion`): only the identifier's new token embeddings train.

diffusers' `examples/textual_inversion/textual_inversion.py` (and `textual_inversion_sdxl.py`), on the
machinery pivotal tuning already uses (embeddings.py): the identifier (`token_abstraction`, the script's
`placeholder_token`) becomes `num_new_tokens_per_abstraction` new tokens (`num_vectors`) whose rows start from
`initializer_concept` (`initializer_token`), and those rows are the only trainable tensors. Every UNet and
text-encoder weight, and every old vocabulary row, stays bit-identical (the new rows are a separate
parameter, embeddings.NewTokenEmbedding). No pivot: the rows train for all max_train_steps.

The result is the embedding file alone, `<run name>_emb.safetensors` (embeddings.save's layout: `clip_l`,
plus `clip_g` for SDXL); `generate` loads it into the base pipeline with diffusers' `load_textual_inversion`.
SD and SDXL only (embeddings.attach refuses SD3/FLUX: their pipelines cannot load the file back).
"""

from __future__ import annotations

from . import embeddings
from .base import Method


class TextualInversion(Method):
    """No adapters and no base weight trains; embeddings.attach (called by train.py) adds the trainable rows."""

    name = "textual_inversion"

    def attach(self, family, unet, text_encoders, cfg):
        pass  # every module stays frozen; the new rows come from embeddings.attach (cfg.trains_embeddings)

    def param_groups(self, unet, text_encoders, cfg, scale):
        """One group, the new rows at learning_rate (the script's only rate; text_encoder_lr is pivotal tuning's)."""
        return [{"params": embeddings.new_params(text_encoders), "lr": cfg.learning_rate * scale, "name": embeddings.TI_GROUP}]

    def trained_modules(self, family, unet, text_encoders, cfg):
        """The text encoders holding new rows: the UNet has no trainable tensor (DDP refuses a module without
        one), so it runs unwrapped."""
        return {n: te for n, te in zip(family.text_encoder_names, text_encoders) if any(p.requires_grad for p in te.parameters())}

    def save(self, folder, components, unet, text_encoders, cfg):
        embeddings.save(folder, components.family, text_encoders, cfg)

    def load_for_inference(self, run_dir, load_base, torch_dtype=None):
        pipe = load_base()
        emb = embeddings.find(run_dir)
        if emb is None:
            from ..core.run_folder import RunFolderError

            raise RunFolderError(f"'{run_dir}' holds no *_emb.safetensors: not a finished textual-inversion run")
        embeddings.load_into(pipe, emb)  # tokens added; render() rewrites the identifier in every prompt
        return pipe
