"""LoRA: low-rank adapters (peft) on the UNet's attention projections (and the text encoders' read layers)."""

from __future__ import annotations

from ..core.models import check_targets, lora_config
from ..core.run_folder import LORA_FILE
from . import embeddings
from .base import Method


def adapted_text_encoders(family, text_encoders: list, cfg):
    """(index, text encoder, layers or None for all) for each encoder that gets adapters with train_text_encoder: only
    on the layers whose output reaches the denoiser (others would be saved untrained), and none on an encoder the
    family never trains (SD3's T5)."""
    for i, te in enumerate(text_encoders if cfg.train_text_encoder else []):
        n = te.config.num_hidden_layers
        read = family.layers_read(i, n)
        if read:
            yield i, te, (read if len(read) < n else None)


class LoRA(Method):
    """Base weights stay untouched; the result is one file, LORA_FILE (`pipe.load_lora_weights(run_dir)`),
    plus the new tokens' embeddings with train_text_encoder_ti (embeddings.py)."""

    name = "lora"
    use_dora = False  # methods/dora.py: the same adapters with a trained magnitude

    def check(self, family, unet, text_encoders, cfg):
        # peft adds adapters where any target matches and says nothing of a target that matched nothing (a full
        # module path with a typo): the run would train fewer modules than asked
        check_targets(unet, cfg.lora_target_modules, "lora_target_modules", family.denoiser_name)
        for i, te, _ in adapted_text_encoders(family, text_encoders, cfg):
            check_targets(te, cfg.text_encoder_lora_target_modules, "text_encoder_lora_target_modules",
                          family.text_encoder_names[i])

    def attach(self, family, unet, text_encoders, cfg):
        unet.add_adapter(lora_config(cfg.lora_rank, cfg.effective_lora_alpha, cfg.lora_target_modules, cfg.lora_dropout,
                                     use_dora=self.use_dora))
        for _, te, layers in adapted_text_encoders(family, text_encoders, cfg):
            te.add_adapter(lora_config(cfg.lora_rank, cfg.effective_lora_alpha, cfg.text_encoder_lora_target_modules, cfg.lora_dropout,
                                       layers=layers, use_dora=self.use_dora))

    def param_groups(self, unet, text_encoders, cfg, scale):
        """The default groups; with loraplus_lr_ratio each adapter group splits in two: its A matrices at the group's
        lr, its B matrices and 1-D parameters (DoRA's magnitudes) at ratio x that lr (LoRA+, peft's grouping rule)."""
        groups = super().param_groups(unet, text_encoders, cfg, scale)
        if cfg.loraplus_lr_ratio is None:
            return groups
        names = {id(p): n for m in (unet, *text_encoders) for n, p in m.named_parameters()}
        split = []
        for g in groups:
            if g.get("name") == embeddings.TI_GROUP:  # the new token rows: not an adapter
                split.append(g)
                continue
            b_side = [p for p in g["params"] if "lora_B" in names[id(p)] or p.ndim == 1]
            ids = {id(p) for p in b_side}
            split += [{**g, "params": [p for p in g["params"] if id(p) not in ids]},
                      {**g, "params": b_side, "lr": g["lr"] * cfg.loraplus_lr_ratio}]
        return split

    def save(self, folder, components, unet, text_encoders, cfg):
        components.family.save_lora(folder, LORA_FILE, unet, text_encoders if cfg.train_text_encoder else None)
        if cfg.train_text_encoder_ti:  # pivotal tuning: the new tokens' rows beside the LoRA
            embeddings.save(folder, components.family, text_encoders, cfg)

    def load_for_inference(self, run_dir, load_base, torch_dtype=None):
        pipe = load_base()
        pipe.load_lora_weights(str(run_dir), weight_name=LORA_FILE)
        return embeddings.load_beside(pipe, run_dir)  # pivotal tuning's new tokens
