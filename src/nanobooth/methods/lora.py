"""LoRA: low-rank adapters (peft) on the UNet's attention projections (and the text encoders' read layers)."""

from __future__ import annotations

from pathlib import Path

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
        try:
            pipe.load_lora_weights(str(run_dir), weight_name=LORA_FILE)
        except ValueError as e:  # peft: "Target modules {...} not found in the base model", a component matching nothing
            if "not found in the base model" in str(e):
                check_attached(pipe, Path(run_dir) / LORA_FILE)
            raise
        # diffusers loads only the keys of components the pipeline has, peft only those of modules it finds: a run of
        # another model family loads nothing, or part, and renders the base model without a word
        check_attached(pipe, Path(run_dir) / LORA_FILE)
        return embeddings.load_beside(pipe, run_dir)  # pivotal tuning's new tokens


class AdapterMismatch(ValueError):
    """Tensors of a LoRA file that found no adapter in the pipeline it was loaded into (a run of another model
    family): `detail` says how many, for generate.load_run's one line."""

    def __init__(self, path, unmatched: int, total: int):
        self.unmatched, self.total = unmatched, total
        self.detail = (f"none of its adapter's {total} tensors matched the model's modules" if unmatched == total
                       else f"{unmatched} of its adapter's {total} tensors matched none of the model's modules")
        super().__init__(f"'{path}': {self.detail}")


# the pipeline components a LoRA file's keys start with (diffusers' prefixes, as every family's save_lora writes them)
LORA_COMPONENTS = ("unet", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3")
_DIFFUSERS_SIDES = {"down": "lora_A", "up": "lora_B"}  # diffusers' names (to_q.lora.down, q_proj.lora_linear_layer.up)


def adapter_slot(key: str) -> tuple[str, str, str] | None:
    """(component, module path, peft adapter layer) a LoRA-file key loads into: `unet.a.to_q.lora.down.weight` ->
    ("unet", "a.to_q", "lora_A"); peft's names (lora_A, lora_magnitude_vector, lokr_w1, hada_w1_a) as they are.
    None for a key in no such layout (kohya's lora_unet_..., an alpha)."""
    comp, *segs = key.split(".")
    for i, seg in enumerate(segs):
        if seg.startswith(("lora", "lokr_", "hada_")):
            name = _DIFFUSERS_SIDES.get(segs[i + 1] if i + 1 < len(segs) else "") if seg in ("lora", "lora_linear_layer") else seg
            return (comp, ".".join(segs[:i]), name) if name and i else None
    return None


def _adapted(model) -> set[tuple[str, str]]:
    """(module path, adapter layer) for each peft adapter layer in `model` that holds parameters, the path also as
    each of its dotted tails (diffusers' text-encoder keys leave out `text_model.`)."""
    import torch
    from peft.tuners.tuners_utils import BaseTunerLayer

    out = set()
    for path, module in model.named_modules():
        if not isinstance(module, BaseTunerLayer):
            continue
        names = [a for a in module.adapter_layer_names
                 if isinstance(getattr(module, a, None), torch.nn.Module) and next(getattr(module, a).parameters(), None) is not None]
        parts = path.split(".")
        out |= {(".".join(parts[k:]), a) for k in range(len(parts)) for a in names}
    return out


def check_attached(pipe, path: Path) -> None:
    """Raise AdapterMismatch when tensors of the LoRA file `path` (LoRA, DoRA, LoKr or LoHa) have no adapter in
    `pipe` after loading: their component is not in the pipeline, or their module not in the component. Checked by
    name (a loaded tensor is in an adapter of its name; a shape that differs is peft's error already), so a run on
    another checkpoint of its own architecture passes."""
    import torch
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        slots = [s for s in map(adapter_slot, f.keys()) if s and (s[0] in LORA_COMPONENTS or s[0] in pipe.components)]
    adapted = {name: _adapted(m) for name, m in pipe.components.items() if isinstance(m, torch.nn.Module)}
    unmatched = sum((module, layer) not in adapted.get(comp, ()) for comp, module, layer in slots)
    if unmatched:
        raise AdapterMismatch(path, unmatched, len(slots))
