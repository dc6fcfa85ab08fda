"""DoRA (Liu et al. 2024, weight-decomposed low-rank adaptation): LoRA's adapters plus a trained magnitude.

Each adapted linear layer computes `m * (W + s B A) / ||W + s B A||`, the norm taken per output row, with
`m` (one value per output feature, initialised to `||W||`) trained alongside A and B; peft implements it
(`LoraConfig(use_dora=True)`). Everything else is LoRA's: the same targets, rank, alpha and text-encoder
layers, the same optimizer groups, and the result is one LORA_FILE that diffusers' `load_lora_weights`
reads back (the magnitudes as `lora_magnitude_vector`, `use_dora` in the adapter config in the metadata).
`nanobooth export --format kohya` writes LyCORIS's DoRA layout (export.py).
"""

from __future__ import annotations

from pathlib import Path

from ..core.run_folder import LORA_FILE
from .lora import LoRA


class DoRA(LoRA):
    """LoRA with `use_dora`: per-layer magnitudes train too; base weights stay untouched."""

    name = "dora"
    use_dora = True

    def save(self, folder, components, unet, text_encoders, cfg):
        super().save(folder, components, unet, text_encoders, cfg)
        if cfg.train_text_encoder:
            _name_text_encoder_magnitudes_as_weights(Path(folder) / LORA_FILE)


def _name_text_encoder_magnitudes_as_weights(path: Path) -> None:
    """Text-encoder magnitudes as `...lora_magnitude_vector.weight`.

    diffusers writes every magnitude as `...lora_magnitude_vector`; it reads the UNet's back through peft,
    which adds the `.weight`, but the text encoders' through transformers, which does not and then leaves
    them at their initial value (a "MISSING ... lora_magnitude_vector.default_0.weight" load report).
    Named with `.weight`, both load."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        tensors = {(k + ".weight" if k.startswith("text_encoder") and k.endswith(".lora_magnitude_vector") else k): f.get_tensor(k)
                   for k in f.keys()}
    save_file(tensors, str(path), metadata=meta)
