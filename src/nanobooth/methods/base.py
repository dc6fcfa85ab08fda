"""The training-method contract: what a method (full fine-tune, LoRA, ...) decides, as hooks train.py calls."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from . import embeddings


class Method:
    """A training method: which parameters train, in which optimizer groups, what is saved and how it loads back.

    Instances hold no state; train.py takes `METHODS[cfg.method]()` and calls, in this order:

    0. `check(family, unet, text_encoders, cfg)`, once, after the model loads and before the run folder is
       made: raise ConfigError (one line naming the key) for settings this model cannot take. Default: none.
    1. `attach(family, unet, text_encoders, cfg)`, once, after the class images are made (they must come
       from the base model) and with every module frozen (`requires_grad_(False)`) and on its device. It
       sets requires_grad on what trains, or adds adapters (new trainable parameters, fp32; their random
       init draws from the global torch RNG, so the order of additions is part of the run's randomness).
       Text encoders train only when `cfg.train_text_encoder`; then only the layers the family reads
       (`family.layers_read`). Returns None. After it, train.py casts every parameter with
       requires_grad to fp32 and the rest to the compute dtype.
    2. `param_groups(unet, text_encoders, cfg, scale)`, once: the optimizer's groups, a list of
       `{"params": [tensors], "lr": float}`; `scale` multiplies the configured rates (scale_lr). The
       order of groups and of tensors within them is the optimizer state's layout in checkpoints.
    3. `trained_modules(family, unet, text_encoders, cfg)`, once: `{name: module}` of the modules with
       trainable parameters, names from `family.text_encoder_names`; accelerate wraps these (DDP) and
       checkpoints hold their trainable tensors under these names.
    4. `save(folder, components, unet, text_encoders, cfg)`, once, on rank 0, after the last step, with
       ToMe removed: write the result into the empty temporary `folder` (train.py publishes it into the
       run folder when it returns; on an error the folder is removed). Modules must be left where they
       were (device, dtype): the final validation render uses them.
    5. `load_for_inference(run_dir, load_base, torch_dtype)`, at generate time (generate.load_run): a
       pipeline holding the saved result; `load_base()` loads the base pipeline, if the method needs it.

    A new method is a new file here plus one line in `METHODS` (and in config's `method` Literal).
    """

    name = ""

    def check(self, family, unet, text_encoders: list, cfg) -> None:
        return None

    def attach(self, family, unet, text_encoders: list, cfg) -> None:
        raise NotImplementedError

    def param_groups(self, unet, text_encoders: list, cfg, scale: float) -> list[dict]:
        """Default: the UNet's trainable parameters at learning_rate, then (train_text_encoder) all text
        encoders' at text_encoder_lr (default learning_rate), each in module order, then (train_text_encoder_ti)
        the new token rows (embeddings.param_group)."""
        # each group named: the console's run summary labels its lr (run_summary.py)
        groups = [{"params": [p for p in unet.parameters() if p.requires_grad], "lr": cfg.learning_rate * scale, "name": "unet"}]
        new_rows = {id(p) for p in embeddings.new_params(text_encoders)}  # their own group, which pivots
        if cfg.train_text_encoder:
            groups.append({"params": [p for te in text_encoders for p in te.parameters() if p.requires_grad and id(p) not in new_rows],
                           "lr": (cfg.learning_rate if cfg.text_encoder_lr is None else cfg.text_encoder_lr) * scale,
                           "name": "text_encoder"})
        if cfg.train_text_encoder_ti:  # pivotal tuning: the new token rows (embeddings.py)
            groups.append(embeddings.param_group(text_encoders, cfg, scale))
        return groups

    def trained_modules(self, family, unet, text_encoders: list, cfg) -> dict:
        """Default: the UNet, plus the text encoders that train (those with trainable parameters)."""
        tes = [(n, te) for n, te in zip(family.text_encoder_names, text_encoders) if any(p.requires_grad for p in te.parameters())]
        return {"unet": unet, **(dict(tes) if cfg.train_text_encoder or cfg.train_text_encoder_ti else {})}

    def save(self, folder: Path, components, unet, text_encoders: list, cfg) -> None:
        raise NotImplementedError

    def load_for_inference(self, run_dir: Path, load_base: Callable, torch_dtype=None):
        raise NotImplementedError
