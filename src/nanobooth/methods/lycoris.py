"""LyCORIS-style adapters through peft (LoKr, LoHa): what they share.

They train like LoRA (same targets, rank, alpha and text-encoder layers; base weights untouched) but their
weights are not LoRA's down/up pair, so diffusers' `load_lora_weights` cannot read them back. The result is
still one LORA_FILE, in diffusers' LoRA-file layout (diffusers' own writer refuses peft's LyCORIS keys): keys are
`<component>.<module path>.<peft parameter>` (`unet.down_blocks.0...to_q.lokr_w1`, `text_encoder....hada_w1_a`)
and the peft config of each component rides in the metadata (`lora_adapter_metadata`, with its `peft_type`),
which is how `method_of_lora_file` tells a LoKr or LoHa file from a LoRA one. `load_for_inference` adds the
same peft adapters to the base pipeline and loads the tensors into them, so generation runs the trained
forward exactly. `nanobooth export --format kohya` writes LyCORIS's layout (interop/lycoris_keys.py).
"""

from __future__ import annotations

import json
from pathlib import Path

from ..core.run_folder import LORA_FILE
from .lora import LoRA, adapted_text_encoders, check_attached

# peft_type in the saved adapter config -> METHODS key
PEFT_TYPES = {"LOKR": "lokr", "LOHA": "loha"}


def adapter_metadata(path) -> dict[str, dict]:
    """{component: peft config dict} from a LoRA file's metadata ({} when it has none)."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    out: dict[str, dict] = {}
    for key, value in json.loads(meta.get("lora_adapter_metadata", "{}")).items():
        comp, _, field = key.partition(".")
        out.setdefault(comp, {})[field] = value
    return out


def method_of_lora_file(path) -> str:
    """'lokr' or 'loha' when the file's adapter config says so, else 'lora' (LoRA and DoRA load alike)."""
    types = {c.get("peft_type") for c in adapter_metadata(path).values()}
    found = [PEFT_TYPES[t] for t in types if t in PEFT_TYPES]
    return found[0] if found else "lora"


class LycorisAdapter(LoRA):
    """A peft LyCORIS adapter (subclasses give `peft_config`); attach/save as LoRA, load by peft itself."""

    def peft_config(self, cfg, targets: list[str], layers: list[int] | None):
        raise NotImplementedError

    def attach(self, family, unet, text_encoders, cfg):
        unet.add_adapter(self.peft_config(cfg, cfg.lora_target_modules, None))
        for _, te, layers in adapted_text_encoders(family, text_encoders, cfg):
            te.add_adapter(self.peft_config(cfg, cfg.text_encoder_lora_target_modules, layers))

    def save(self, folder, components, unet, text_encoders, cfg):
        from peft.utils import get_peft_model_state_dict
        from safetensors.torch import save_file

        family = components.family
        models = [(family.denoiser_name, unet)]
        if cfg.train_text_encoder:
            models += [(n, te) for n, te in zip(family.text_encoder_names, text_encoders) if getattr(te, "peft_config", None)]
        tensors, meta = {}, {}
        for comp, model in models:
            tensors |= {f"{comp}.{k}": v.detach().to("cpu").contiguous() for k, v in get_peft_model_state_dict(model).items()}
            meta |= {f"{comp}.{k}": v for k, v in model.peft_config["default"].to_dict().items()}
        # as diffusers writes a LoRA's adapter config; sets (target_modules) as sorted lists
        blob = json.dumps(meta, sort_keys=True, default=lambda v: sorted(v) if isinstance(v, set) else str(v))
        save_file(tensors, str(Path(folder) / LORA_FILE), metadata={"format": "pt", "lora_adapter_metadata": blob})

    def load_for_inference(self, run_dir, load_base, torch_dtype=None):
        from peft import PeftConfig
        from peft.utils import set_peft_model_state_dict
        from safetensors.torch import load_file

        path = Path(run_dir) / LORA_FILE
        configs = adapter_metadata(path)
        state = load_file(str(path))
        pipe = load_base()
        unfit = []
        for comp, conf in configs.items():
            model = getattr(pipe, comp, None)
            prefix = comp + "."
            tensors = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
            if model is None or not tensors:  # a component this pipeline lacks: check_attached counts its tensors
                continue
            try:
                model.add_adapter(PeftConfig.from_peft_type(**conf))
            except ValueError as e:  # peft: none of the config's targets is in this model (check_attached says so)
                if "not found in the base model" not in str(e):
                    raise
                continue
            result = set_peft_model_state_dict(model, tensors)
            missing = [k for k in result.missing_keys if any(p in k for p in ("lokr_", "hada_"))]
            if result.unexpected_keys or missing:
                unfit.append((comp, conf, result, missing))
        check_attached(pipe, path)  # tensors of a run of another model (unexpected keys) have no adapter: one line
        if unfit:  # what is left: names that fit but a tensor missing (a damaged file)
            from ..core.run_folder import RunFolderError

            comp, conf, result, missing = unfit[0]
            raise RunFolderError(f"'{path}': its {comp} tensors do not fit the {conf.get('peft_type')} adapters they were "
                                 f"saved with ({len(result.unexpected_keys)} unexpected, {len(missing)} missing); "
                                 "the file is damaged or from another model: retrain or pass the right model")
        return pipe
