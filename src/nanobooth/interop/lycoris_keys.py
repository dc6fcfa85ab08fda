"""LoKr and LoHa runs (peft's parameters) in LyCORIS's key layout, which A1111, ComfyUI, Forge and LyCORIS load.

Each module is named as kohya names a LoRA's (kohya.kohya_name: `lora_unet_...`, SGM blocks for SDXL,
`lora_te_` / `lora_te1_` / `lora_te2_`) and holds LyCORIS's tensors:

- LoKr: `.lokr_w1` or `.lokr_w1_a` + `.lokr_w1_b`, `.lokr_w2` or `.lokr_w2_a` + `.lokr_w2_b`, `.alpha`. The loaders
  rebuild `kron(w1, w2) * alpha / dim`, dim the rank of the decomposed factor (ComfyUI
  comfy/weight_adapter/lokr.py: w2_b's rows, else w1_b's; LyCORIS modules/lokr.py: the `lora_dim` of w1_a/w2_a).
  When both factors are full matrices every loader uses scale 1 and ignores alpha (ComfyUI's dim is then None,
  A1111's calc_scale 1.0, LyCORIS sets alpha = lora_dim), while peft still scales by alpha / r: the export
  multiplies w1 by alpha / r and writes alpha = r, LyCORIS's own value for that case.
- LoHa: `.hada_w1_a`, `.hada_w1_b`, `.hada_w2_a`, `.hada_w2_b`, `.alpha`; every loader computes
  `(w1_a @ w1_b) * (w2_a @ w2_b) * alpha / r` with r = w1_b's rows, as peft does, so tensors and alpha pass as they are.

peft and LyCORIS share the factor shapes (w1 (a, c), w2 (b, d) for a weight (a*b, c*d); `hada_w1_a` (out, r)) and
the Kronecker order, so only names and that one scale differ. Tucker factors (`lokr_t2`, `hada_t1/t2`, peft's
use_effective_conv2d, which nanobooth never sets) are refused.
"""

from __future__ import annotations

import re
from typing import Callable

import torch

from .ldm import ExportError

_KEY = re.compile(r"^(unet|text_encoder|text_encoder_2)\.(.+)\.(lokr_w1|lokr_w1_a|lokr_w1_b|lokr_w2|lokr_w2_a|lokr_w2_b|"
                  r"hada_w1_a|hada_w1_b|hada_w2_a|hada_w2_b|lokr_t2|hada_t1|hada_t2)$")
ALGOS = {"LOKR": "lokr", "LOHA": "loha"}


def is_lycoris(state: dict) -> bool:
    """Whether a run's LoRA file holds peft LoKr/LoHa parameters."""
    return any(re.search(r"\.(lokr|hada)_[a-z0-9_]+$", k) for k in state)


def _modules(state: dict) -> dict[tuple[str, str], dict[str, torch.Tensor]]:
    out: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        m = _KEY.match(key)
        if not m:
            raise ExportError(f"key '{key}' is not a LoKr or LoHa parameter LyCORIS's layout holds; re-train with method=lokr or loha")
        comp, module, part = m.groups()
        if part in ("lokr_t2", "hada_t1", "hada_t2"):
            raise ExportError(f"'{key}' is a Tucker factor (use_effective_conv2d), which this export does not write")
        out.setdefault((comp, module), {})[part] = tensor
    return out


def delta_shapes(state: dict) -> dict[str, tuple[int, int]]:
    """{component.module: (out_features, in_features)} of each adapted weight, for export._base_info's guesses."""
    shapes = {}
    for (comp, module), p in _modules(state).items():
        if "hada_w1_a" in p:
            shapes[f"{comp}.{module}"] = (p["hada_w1_a"].shape[0], p["hada_w1_b"].shape[1])
        else:
            w1 = p.get("lokr_w1", p.get("lokr_w1_a"))
            w1_in = p["lokr_w1"].shape[1] if "lokr_w1" in p else p["lokr_w1_b"].shape[1]
            w2_out = p["lokr_w2"].shape[0] if "lokr_w2" in p else p["lokr_w2_a"].shape[0]
            w2_in = p["lokr_w2"].shape[1] if "lokr_w2" in p else p["lokr_w2_b"].shape[1]
            shapes[f"{comp}.{module}"] = (w1.shape[0] * w2_out, w1_in * w2_in)
    return shapes


def lycoris_to_kohya(state: dict[str, torch.Tensor], configs: dict[str, dict], name_of: Callable[[str, str], str],
                     pattern_value: Callable) -> dict[str, torch.Tensor]:
    """peft LoKr/LoHa tensors (`unet.<module>.lokr_w1`, ...) -> LyCORIS's names and alphas. name_of(comp, module)
    gives kohya's module name; pattern_value(pattern, module, default) peft's rank/alpha pattern lookup."""
    out: dict[str, torch.Tensor] = {}
    for (comp, module), p in _modules(state).items():
        conf = configs.get(comp)
        if conf is None or conf.get("peft_type") not in ALGOS:
            raise ExportError(f"the LoRA file has no LoKr/LoHa adapter config for '{comp}' (rank and alpha unknown); re-save it with nanobooth")
        r = int(pattern_value(conf.get("rank_pattern"), module, conf.get("r")))
        alpha = float(pattern_value(conf.get("alpha_pattern"), module, conf.get("alpha", r)))
        name = name_of(comp, module)
        loha = conf["peft_type"] == "LOHA"
        need = [("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")] if loha else [
            (w,) if w in p else (f"{w}_a", f"{w}_b") for w in ("lokr_w1", "lokr_w2")]
        missing = [n for group in need for n in group if n not in p]
        if missing:
            raise ExportError(f"'{comp}.{module}' lacks {', '.join(missing)}; the run's file is incomplete: retrain")
        ranks = {p[n].shape[0] for n in ("hada_w1_b", "hada_w2_b", "lokr_w1_b", "lokr_w2_b") if n in p}
        if ranks - {r}:
            raise ExportError(f"'{comp}.{module}' has rank {sorted(ranks)} but its adapter config says {r}")
        tensors = {k: v.contiguous() for k, v in p.items()}
        if not loha and "lokr_w1" in p and "lokr_w2" in p:
            # two full factors: loaders apply scale 1, peft alpha / r; carry the scale in w1
            tensors["lokr_w1"] = (p["lokr_w1"] * (alpha / r)).contiguous()
            alpha = float(r)
        out |= {f"{name}.{k}": v for k, v in tensors.items()}
        out[f"{name}.alpha"] = torch.tensor(alpha)
    return dict(sorted(out.items()))
