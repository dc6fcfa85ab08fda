"""kohya's LoRA layout, which AUTOMATIC1111, ComfyUI, Forge, kohya's sd-scripts and diffusers all load
(`nanobooth export --format kohya|comfyui`): key names, alphas and the metadata those tools read.

Keys are kohya's: `lora_unet_<diffusers module path, dots as underscores>` (kohya trains SD 1.x/2.x on a
UNet with diffusers' module names; A1111 and ComfyUI translate those names themselves), `lora_te_`
for the text encoder (`lora_te1_`/`lora_te2_` for SDXL's two). SDXL UNet modules get SGM block names
(`lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q`), as kohya trains SDXL on its SGM UNet
and as civitai's SDXL LoRAs are named; each with `.lora_down.weight`,
`.lora_up.weight` and `.alpha`. The alpha is the trained one, read from the adapter config saved in
the run's metadata; diffusers' own `convert_state_dict_to_kohya` writes alpha = rank, which silently
rescales every rank != alpha LoRA. A DoRA run adds each module's magnitude as `.dora_scale`, shaped
(out_features, 1): LyCORIS's DoRA layout with the decomposition on the output axis (its `wd_on_output`),
the one peft trains, which ComfyUI and Forge read by that shape. (ComfyUI and Forge divide by the norm of
the base weight's rows where LyCORIS and peft divide by the adapted weight's, and A1111 decomposes along
the input axis only, so there a DoRA export loads as an approximation of the run; diffusers' kohya
loader drops `dora_scale` for SD/SDXL. `--format diffusers` keeps the run's own file, which it reloads
exactly.)
LoKr and LoHa runs (SD, SDXL) get LyCORIS's tensors under the same module names (`.lokr_w1`, `.lokr_w2` or their
`_a`/`_b` factors, `.hada_w1_a` ..., `.alpha`; lycoris_keys.py), which A1111, ComfyUI, Forge and LyCORIS load
(diffusers does not load LoKr/LoHa files).
FLUX.1 LoRAs are named as kohya's lora_flux names them, by BFL's modules (`lora_unet_double_blocks_0_img_attn_qkv`,
q/k/v fused: see flux_keys), CLIP-L as `lora_te1_`; that is what ComfyUI's LoraLoader and Forge map.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import math
import re
from pathlib import Path

import torch

from .ldm import RESNET, ExportError, rename, unet_prefixes
from .lycoris_keys import ALGOS

# --- names ------------------------------------------------------------------------------------------

# diffusers writes peft adapters as lora_A/lora_B, or in its older spellings (lora.down for the UNet,
# lora_linear_layer.down for text encoders); all mean the same down/up pair.
LORA_KEY = re.compile(r"^(unet|transformer|text_encoder|text_encoder_2)\.(.+)\.(lora_A|lora_B|lora\.down|lora\.up|"
                       r"lora_linear_layer\.down|lora_linear_layer\.up|lora_magnitude_vector)(\.weight)?$")
_KOHYA_PREFIX = {"unet": "lora_unet_", "text_encoder": "lora_te_", "text_encoder_2": "lora_te2_"}


def pattern_value(pattern: dict, module: str, default):
    """peft's rank_pattern/alpha_pattern lookup: a key matches a module path or its dotted suffix."""
    return next((v for k, v in (pattern or {}).items() if re.fullmatch(rf"(.*\.)?{k}", module)), default)


def adapter_configs(meta: dict, cfg: dict) -> dict[str, dict]:
    """The peft adapter config per component ('unet', 'text_encoder', ...), from the LoRA file's metadata
    (diffusers saves it under `lora_adapter_metadata`), else rebuilt from the run's config.yaml."""
    flat = json.loads(meta.get("lora_adapter_metadata", "{}"))
    out: dict[str, dict] = {}
    for key, value in flat.items():
        comp, _, field = key.partition(".")
        out.setdefault(comp, {})[field] = value
    if not out and cfg.get("lora_rank"):
        rank = int(cfg["lora_rank"])
        alpha = float(cfg["lora_alpha"] if cfg.get("lora_alpha") is not None else rank)
        out = {c: {"r": rank, "lora_alpha": alpha} for c in ("unet", "transformer", "text_encoder", "text_encoder_2")}
    return out


def sgm_unet_pairs(model: str) -> list[tuple[str, str]] | None:
    """diffusers -> SGM block prefixes of the base model's UNet, from its config alone (built on the meta
    device: no weights read). None when the config cannot be had (offline, not cached)."""
    from diffusers import UNet2DConditionModel

    from ..core.models import resolve_model

    try:
        conf = UNet2DConditionModel.load_config(resolve_model(model), subfolder="unet")
        with torch.device("meta"):
            unet = UNet2DConditionModel.from_config(conf)
    except Exception:  # hub/cache/format errors all mean the same here: no layout to map to
        return None
    return unet_prefixes(unet.state_dict().keys())


def kohya_name(comp: str, module: str, sdxl: bool = False, unet_pairs: list[tuple[str, str]] | None = None) -> str:
    """kohya's name of one adapted module: `lora_unet_...` (SGM blocks with unet_pairs), `lora_te_`/`lora_te1_`/`lora_te2_`."""
    named = module
    if comp == "unet" and unet_pairs and (hit := rename(module + ".", unet_pairs)):
        src, dst, rest = hit
        if ".resnets." in src:
            head, _, tail = rest.partition(".")
            rest = f"{RESNET.get(head, head)}.{tail}"
        named = (dst + rest).rstrip(".")
    if comp != "unet" and module.startswith(("encoder.", "embeddings.", "final_layer_norm")):
        # transformers 5 dropped CLIP's `text_model` wrapper; every other tool still names it
        named = "text_model." + module
    prefix = "lora_te1_" if comp == "text_encoder" and sdxl else _KOHYA_PREFIX[comp]
    return prefix + named.replace(".", "_")


def lora_to_kohya(state: dict[str, torch.Tensor], configs: dict[str, dict], sdxl: bool = False,
                  unet_pairs: list[tuple[str, str]] | None = None) -> dict[str, torch.Tensor]:
    """diffusers/peft LoRA tensors -> kohya's names, with each module's true alpha. With unet_pairs
    (SDXL), UNet modules are named by their SGM blocks."""
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        m = LORA_KEY.match(key)
        if not m:
            raise ExportError(f"LoRA key '{key}' is not a LoRA down/up weight or DoRA magnitude (other adapters cannot be "
                              "expressed in kohya's format)")
        comp, module, part, _ = m.groups()
        conf = configs.get(comp)
        if conf is None:
            raise ExportError(f"the LoRA file has no adapter config for '{comp}' (rank and alpha unknown); re-save it with nanobooth")
        name = kohya_name(comp, module, sdxl, unet_pairs)
        if part == "lora_magnitude_vector":
            if tensor.ndim != 1:  # peft keeps a linear layer's magnitude as (out_features,)
                raise ExportError(f"'{key}' is a DoRA magnitude of shape {tuple(tensor.shape)}; only linear layers' (1-D) are exported")
            out[f"{name}.dora_scale"] = tensor.reshape(-1, 1).contiguous()
            continue
        down = part in ("lora_A", "lora.down", "lora_linear_layer.down")
        out[f"{name}.{'lora_down' if down else 'lora_up'}.weight"] = tensor.contiguous()
        if down:
            rank = int(pattern_value(conf.get("rank_pattern"), module, conf.get("r", tensor.shape[0])))
            if rank != tensor.shape[0]:
                raise ExportError(f"'{key}' has rank {tensor.shape[0]} but its adapter config says {rank}")
            alpha = float(pattern_value(conf.get("alpha_pattern"), module, conf.get("lora_alpha", rank)))
            # kohya scales by alpha/rank; rsLoRA by alpha/sqrt(rank): this alpha gives rsLoRA's scale
            out[f"{name}.alpha"] = torch.tensor(alpha * math.sqrt(rank) if conf.get("use_rslora") else alpha)
    return dict(sorted(out.items()))


def addnet_hash(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 of the tensor bytes after the safetensors header: `sshs_model_hash`, which A1111 shows and
    matches LoRAs by. The byte layout does not depend on metadata, so it can be computed before it."""
    from safetensors.torch import save

    blob = save(tensors)
    return hashlib.sha256(blob[8 + int.from_bytes(blob[:8], "little"):]).hexdigest()


def kohya_metadata(tensors: dict, cfg: dict, info: dict, configs: dict, title: str) -> dict[str, str]:
    """The `ss_*` keys kohya's sd-scripts write (A1111 and kohya's tools show them; LyCORIS networks say so in
    `ss_network_module`/`ss_network_args`), then the model-spec keys: all strings, as safetensors metadata must be."""
    unet_conf = configs.get("unet") or configs.get("transformer") or {}
    rank = unet_conf.get("r", cfg.get("lora_rank"))
    alpha = unet_conf.get("lora_alpha", unet_conf.get("alpha", cfg.get("lora_alpha") or rank))  # peft's LoKr/LoHa: `alpha`
    res = info["resolution"]
    model = str(cfg.get("model", ""))
    dora = any(k.endswith(".dora_scale") for k in tensors)
    algo = ALGOS.get(unet_conf.get("peft_type"))  # lokr / loha
    args = ({"algo": "lora", "dora_wd": "True", "wd_on_output": "True"} if dora else {"algo": algo} if algo else None)
    if algo == "lokr":  # LyCORIS's network_args spellings
        args |= {"factor": str(unet_conf.get("decompose_factor", -1)), "decompose_both": str(bool(unet_conf.get("decompose_both")))}
    meta = {
        # a DoRA, LoKr or LoHa file is a LyCORIS network (DoRA: LoRA algorithm, weight decomposition on the output axis)
        "ss_network_module": "lycoris.kohya" if args else "networks.lora",
        "ss_network_args": json.dumps(args) if args else None,
        "ss_network_dim": rank, "ss_network_alpha": alpha, "ss_network_dropout": cfg.get("lora_dropout"),
        "ss_network_train_unet_only": not any(k.startswith("lora_te") for k in tensors),
        "ss_base_model_version": info["version"], "ss_v2": info["v2"],
        "ss_sd_model_name": Path(model).name if Path(model).expanduser().exists() else model,
        "ss_output_name": title, "ss_resolution": f"({res}, {res})",
        "ss_max_train_steps": cfg.get("max_train_steps"), "ss_learning_rate": cfg.get("learning_rate"),
        "ss_unet_lr": cfg.get("learning_rate"),
        "ss_text_encoder_lr": (cfg.get("text_encoder_lr") or cfg.get("learning_rate")) if cfg.get("train_text_encoder") else None,
        "ss_lr_scheduler": cfg.get("lr_scheduler"), "ss_lr_warmup_steps": cfg.get("lr_warmup_steps"),
        "ss_seed": cfg.get("seed"), "ss_mixed_precision": cfg.get("mixed_precision"),
        "ss_prior_loss_weight": cfg.get("prior_loss_weight") if cfg.get("with_prior_preservation") else None,
        "ss_num_reg_images": cfg.get("num_class_images") if cfg.get("with_prior_preservation") else 0,
        "ss_instance_prompt": cfg.get("instance_prompt"), "ss_class_prompt": cfg.get("class_prompt"),
        "ss_training_comment": f"nanobooth DreamBooth {'DoRA' if dora else {'lokr': 'LoKr', 'loha': 'LoHa'}.get(algo, 'LoRA')}; instance prompt: {cfg.get('instance_prompt')}",
        "sshs_model_hash": addnet_hash(tensors),
    }
    return {k: str(v) for k, v in meta.items() if v is not None} | modelspec(info, title, lora=True)


def modelspec(info: dict, title: str, lora: bool) -> dict[str, str]:
    """Stability AI's model-spec keys (kohya's library/sai_model_spec.py): what SwarmUI and others sort
    models by. Our LoRAs name modules the diffusers way; checkpoints use the LDM/SGM layout."""
    res = info["resolution"]
    flux = info.get("family") == "flux"  # FLUX LoRAs are named the BFL way; FLUX has no prediction-type key
    impl = "https://github.com/black-forest-labs/flux" if flux else "diffusers" if lora else "https://github.com/Stability-AI/generative-models"
    return {"modelspec.sai_model_spec": "1.0.0", "modelspec.architecture": info["arch"] + ("/lora" if lora else ""),
            "modelspec.implementation": impl, "modelspec.title": title, "modelspec.resolution": f"{res}x{res}",
            "modelspec.date": datetime.datetime.now().replace(microsecond=0).isoformat(),
            **({} if flux else {"modelspec.prediction_type": "v" if info["vpred"] else "epsilon"})}
