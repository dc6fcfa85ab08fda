"""FLUX.1 LoRAs in kohya's layout: diffusers' FluxTransformer2DModel module names -> the original BFL names.

kohya's sd-scripts (networks/lora_flux.py) train FLUX on BFL's own model, so its LoRA modules are named
`lora_unet_<BFL module path, dots as underscores>` (`lora_unet_double_blocks_0_img_attn_qkv`), and that is
the name ComfyUI and Forge look up: their key map turns every `diffusion_model.<path>.weight` of the loaded
model into `lora_unet_<path with underscores>` (comfy/lora.py `model_lora_keys_unet`). BFL fuses what
diffusers keeps apart: a double block's image q/k/v are one `img_attn.qkv` (its text q/k/v one
`txt_attn.qkv`), a single block's q/k/v *and* MLP input are one `linear1` of width 3 * dim + 4 * dim.
A LoRA trained on the separate projections is written on the fused module exactly: the parts' down
matrices stacked (rank = the sum of the parts' ranks), the up matrix block-diagonal with each part's up
in its own rows and columns and zeros elsewhere (rows of untrained parts stay zero). That is the layout
kohya's `split_qkv` saves and diffusers' `_convert_kohya_flux_lora_to_diffusers` splits back ("sparse").
Loaders scale by alpha / rank with the fused rank, so the fused alpha is the parts' scale times the fused
rank (kohya's split_qkv keeps the per-part alpha there, which loaders then divide by the fused rank).
"""

from __future__ import annotations

import math
import re

import torch

from .kohya import LORA_KEY, lora_to_kohya, pattern_value
from .ldm import ExportError

# module inside a double / single block -> (BFL module, index of this part in the fused module or None)
_DOUBLE = {
    "attn.to_q": ("img_attn.qkv", 0), "attn.to_k": ("img_attn.qkv", 1), "attn.to_v": ("img_attn.qkv", 2),
    "attn.add_q_proj": ("txt_attn.qkv", 0), "attn.add_k_proj": ("txt_attn.qkv", 1), "attn.add_v_proj": ("txt_attn.qkv", 2),
    "attn.to_out.0": ("img_attn.proj", None), "attn.to_add_out": ("txt_attn.proj", None),
    "ff.net.0.proj": ("img_mlp.0", None), "ff.net.2": ("img_mlp.2", None),
    "ff_context.net.0.proj": ("txt_mlp.0", None), "ff_context.net.2": ("txt_mlp.2", None),
    "norm1.linear": ("img_mod.lin", None), "norm1_context.linear": ("txt_mod.lin", None),
}
_SINGLE = {
    "attn.to_q": ("linear1", 0), "attn.to_k": ("linear1", 1), "attn.to_v": ("linear1", 2), "proj_mlp": ("linear1", 3),
    "proj_out": ("linear2", None), "norm.linear": ("modulation.lin", None),
}
_TOP = {
    "x_embedder": "img_in", "context_embedder": "txt_in", "proj_out": "final_layer.linear",
    "norm_out.linear": "final_layer.adaLN_modulation.1",
    "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer", "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
    "time_text_embed.text_embedder.linear_1": "vector_in.in_layer", "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
    "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
    "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
}
MLP_RATIO = 4  # FLUX's single-block MLP width / model width (linear1 = q, k, v, then the MLP input)


def bfl_name(module: str) -> tuple[str, int | None]:
    """diffusers transformer module path -> (BFL module path, part index within a fused module or None).
    ExportError for a module BFL's model has no counterpart for."""
    if m := re.fullmatch(r"(transformer_blocks|single_transformer_blocks)\.(\d+)\.(.+)", module):
        blocks, i, rest = m.groups()
        double = blocks == "transformer_blocks"
        hit = (_DOUBLE if double else _SINGLE).get(rest)
        if hit:
            return f"{'double' if double else 'single'}_blocks.{i}.{hit[0]}", hit[1]
    elif module in _TOP:
        return _TOP[module], None
    raise ExportError(f"FLUX LoRA module '{module}' has no counterpart in the BFL layout kohya/ComfyUI use; "
                      "export it with --format diffusers")


def _swap_halves(up: torch.Tensor) -> torch.Tensor:
    """diffusers' AdaLayerNormContinuous emits (scale, shift) where BFL's final layer emits (shift, scale)."""
    scale, shift = up.chunk(2, dim=0)
    return torch.cat([shift, scale], dim=0)


def flux_lora_to_kohya(modules: dict[str, tuple[torch.Tensor, torch.Tensor, float]]) -> dict[str, torch.Tensor]:
    """{diffusers transformer module: (down (r, in), up (out, r), scale)} -> kohya/ComfyUI tensors
    (`lora_unet_<BFL path>.lora_down.weight` / `.lora_up.weight` / `.alpha`), scale being the LoRA's
    multiplier (alpha / r, or alpha / sqrt(r) for rsLoRA). Fused modules get the block layout above; the
    result applies up @ down * alpha / rank to each BFL weight, equal to the sum of the parts' updates."""
    fused: dict[str, dict[int, tuple]] = {}
    out: dict[str, torch.Tensor] = {}
    for module, (down, up, scale) in modules.items():
        name, part = bfl_name(module)
        if part is None:
            key = "lora_unet_" + name.replace(".", "_")
            out[f"{key}.lora_down.weight"] = down.contiguous()
            out[f"{key}.lora_up.weight"] = (_swap_halves(up) if module == "norm_out.linear" else up).contiguous()
            out[f"{key}.alpha"] = torch.tensor(float(scale * down.shape[0]))
        else:
            fused.setdefault(name, {})[part] = (down, up, scale)
    for name, parts in fused.items():
        key = "lora_unet_" + name.replace(".", "_")
        dim = next(iter(parts.values()))[0].shape[1]  # every part reads the model width
        widths = [dim] * 3 + ([MLP_RATIO * dim] if name.endswith("linear1") else [])
        order = sorted(parts)
        downs = [parts[p][0] for p in order]
        rank = sum(d.shape[0] for d in downs)
        ref = parts[order[0]][2]
        up = torch.zeros(sum(widths), rank, dtype=downs[0].dtype)
        col = 0
        for p in order:
            d, u, s = parts[p]
            if d.shape[1] != dim or u.shape[0] != widths[p]:
                raise ExportError(f"FLUX LoRA parts of '{name}' have inconsistent shapes {tuple(d.shape)}, {tuple(u.shape)}")
            row = sum(widths[:p])
            # parts trained at different scales: fold the ratio into their up block (exact for equal scales)
            up[row:row + widths[p], col:col + d.shape[0]] = u if s == ref else u * (s / ref)
            col += d.shape[0]
        out[f"{key}.lora_down.weight"] = torch.cat(downs, dim=0).contiguous()
        out[f"{key}.lora_up.weight"] = up
        out[f"{key}.alpha"] = torch.tensor(float(ref * rank))
    return out


def flux_run_to_kohya(state: dict[str, torch.Tensor], configs: dict[str, dict]) -> dict[str, torch.Tensor]:
    """A FLUX run's LoRA -> kohya/ComfyUI/Forge names: the transformer on BFL's fused modules
    (flux_keys), CLIP-L as `lora_te1_` (kohya's lora_flux prefix for it)."""
    conf = configs.get("transformer")
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        if not key.startswith("transformer."):
            continue
        m = LORA_KEY.match(key)
        if not m:
            raise ExportError(f"LoRA key '{key}' is not a LoRA down/up weight (other adapters cannot be expressed in kohya's format)")
        if m.group(3) == "lora_magnitude_vector":
            raise ExportError(f"'{key}' is a DoRA magnitude: BFL's fused qkv/linear1 modules cannot hold DoRA "
                              "magnitudes of separate projections; export a FLUX DoRA run with --format diffusers")
        if conf is None:
            raise ExportError("the LoRA file has no adapter config for 'transformer' (rank and alpha unknown); re-save it with nanobooth")
        pairs.setdefault(m.group(2), {})["down" if m.group(3) in ("lora_A", "lora.down", "lora_linear_layer.down") else "up"] = tensor
    modules = {}
    for module, p in pairs.items():
        if p.keys() != {"down", "up"}:
            raise ExportError(f"FLUX LoRA module '{module}' has no {'up' if 'down' in p else 'down'} weight; the LoRA file is incomplete")
        rank = int(pattern_value(conf.get("rank_pattern"), module, conf.get("r", p["down"].shape[0])))
        if rank != p["down"].shape[0]:
            raise ExportError(f"'transformer.{module}' has rank {p['down'].shape[0]} but its adapter config says {rank}")
        alpha = float(pattern_value(conf.get("alpha_pattern"), module, conf.get("lora_alpha", rank)))
        modules[module] = (p["down"], p["up"], alpha / (math.sqrt(rank) if conf.get("use_rslora") else rank))
    rest = {k: v for k, v in state.items() if not k.startswith("transformer.")}
    return dict(sorted({**flux_lora_to_kohya(modules), **lora_to_kohya(rest, configs, sdxl=True)}.items()))


# RMSNorm scales of the attention (diffusers `<module>.weight`, BFL `<module>.scale`)
_NORMS = {
    "double": {"attn.norm_q": "img_attn.norm.query_norm", "attn.norm_k": "img_attn.norm.key_norm",
               "attn.norm_added_q": "txt_attn.norm.query_norm", "attn.norm_added_k": "txt_attn.norm.key_norm"},
    "single": {"attn.norm_q": "norm.query_norm", "attn.norm_k": "norm.key_norm"},
}


def transformer_to_bfl(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A diffusers FluxTransformer2DModel state dict -> BFL's layout (flux1-dev.safetensors' keys, no prefix):
    the inverse of diffusers' `convert_flux_transformer_checkpoint_to_diffusers`. q/k/v (and a single block's
    MLP input) are concatenated into BFL's fused weights and biases, the final norm's (scale, shift) halves
    swapped to BFL's (shift, scale). ExportError for a tensor with no BFL counterpart."""
    out: dict[str, torch.Tensor] = {}
    fused: dict[str, dict[int, torch.Tensor]] = {}
    for key, tensor in state.items():
        module, _, param = key.rpartition(".")
        m = re.fullmatch(r"(transformer_blocks|single_transformer_blocks)\.(\d+)\.(.+)", module)
        norms = _NORMS["double" if m and m.group(1) == "transformer_blocks" else "single"] if m else {}
        if m and m.group(3) in norms and param == "weight":
            kind = "double" if m.group(1) == "transformer_blocks" else "single"
            out[f"{kind}_blocks.{m.group(2)}.{norms[m.group(3)]}.scale"] = tensor
            continue
        name, part = bfl_name(module)
        if part is not None:
            fused.setdefault(f"{name}.{param}", {})[part] = tensor
        else:
            out[f"{name}.{param}"] = _swap_halves(tensor) if module == "norm_out.linear" else tensor
    for key, parts in fused.items():
        wanted = 4 if ".linear1." in key else 3
        if sorted(parts) != list(range(wanted)):
            raise ExportError(f"the transformer lacks part of BFL's fused '{key}' (has parts {sorted(parts)} of {wanted})")
        out[key] = torch.cat([parts[p] for p in range(wanted)], dim=0)
    return dict(sorted(out.items()))
