"""diffusers component state dicts -> the original LDM (SD 1.x/2.x) / SGM (SDXL) single-file layout.

The layout A1111, ComfyUI and diffusers' `from_single_file` read: `model.diffusion_model.` (UNet),
`first_stage_model.` (VAE), `cond_stage_model.` / `conditioner.embedders.` (text encoders). Pure key
mapping, derived from each model's own keys so any depth or layers-per-block converts.
"""

from __future__ import annotations

import re

import torch

from ..core.errors import ExportError  # noqa: F401 (importable from here)


RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0", "conv2": "out_layers.3",
           "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}
_VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _indices(keys, prefix: str) -> list[int]:
    pat = re.compile(re.escape(prefix) + r"(\d+)\.")
    return sorted({int(m.group(1)) for k in keys if (m := pat.match(k))})


def unet_prefixes(keys) -> list[tuple[str, str]]:
    """diffusers module prefix -> LDM prefix, from the UNet's own keys (any depth, layers per block, with
    or without attention per level). LDM numbers every layer of a level in one flat list:
    input_blocks.N.0 a resnet, .N.1 its attention, then a separate N for the downsampler; output_blocks
    put the upsampler after the last layer's attention (.2), or after its resnet (.1) where there is none."""
    keys = list(keys)
    pairs = [("time_embedding.linear_1.", "time_embed.0."), ("time_embedding.linear_2.", "time_embed.2."),
             ("add_embedding.linear_1.", "label_emb.0.0."), ("add_embedding.linear_2.", "label_emb.0.2."),
             ("conv_in.", "input_blocks.0.0."), ("conv_norm_out.", "out.0."), ("conv_out.", "out.2."),
             ("mid_block.resnets.0.", "middle_block.0."), ("mid_block.attentions.0.", "middle_block.1."),
             ("mid_block.resnets.1.", "middle_block.2.")]
    n = 1
    for i in _indices(keys, "down_blocks."):
        for j in _indices(keys, f"down_blocks.{i}.resnets."):
            pairs += [(f"down_blocks.{i}.resnets.{j}.", f"input_blocks.{n}.0."), (f"down_blocks.{i}.attentions.{j}.", f"input_blocks.{n}.1.")]
            n += 1
        if any(k.startswith(f"down_blocks.{i}.downsamplers.0.") for k in keys):
            pairs.append((f"down_blocks.{i}.downsamplers.0.conv.", f"input_blocks.{n}.0.op."))
            n += 1
    n = 0
    for i in _indices(keys, "up_blocks."):
        attn = any(k.startswith(f"up_blocks.{i}.attentions.") for k in keys)
        for j in _indices(keys, f"up_blocks.{i}.resnets."):
            pairs += [(f"up_blocks.{i}.resnets.{j}.", f"output_blocks.{n}.0."), (f"up_blocks.{i}.attentions.{j}.", f"output_blocks.{n}.1.")]
            n += 1
        pairs.append((f"up_blocks.{i}.upsamplers.0.", f"output_blocks.{n - 1}.{2 if attn else 1}."))
    return pairs


def vae_prefixes(keys) -> list[tuple[str, str]]:
    """The LDM decoder numbers its levels from the bottom (up.0 is the lowest resolution), diffusers from the top."""
    pairs = []
    for part in ("encoder", "decoder"):
        pairs += [(f"{part}.conv_norm_out.", f"{part}.norm_out."), (f"{part}.mid_block.attentions.0.", f"{part}.mid.attn_1."),
                  (f"{part}.mid_block.resnets.0.", f"{part}.mid.block_1."), (f"{part}.mid_block.resnets.1.", f"{part}.mid.block_2.")]
    for i in _indices(keys, "encoder.down_blocks."):
        pairs += [(f"encoder.down_blocks.{i}.resnets.", f"encoder.down.{i}.block."),
                  (f"encoder.down_blocks.{i}.downsamplers.0.", f"encoder.down.{i}.downsample.")]
    ups = _indices(keys, "decoder.up_blocks.")
    for i in ups:
        pairs += [(f"decoder.up_blocks.{i}.resnets.", f"decoder.up.{len(ups) - 1 - i}.block."),
                  (f"decoder.up_blocks.{i}.upsamplers.0.", f"decoder.up.{len(ups) - 1 - i}.upsample.")]
    return pairs


def rename(key: str, pairs: list[tuple[str, str]]) -> tuple[str, str, str] | None:
    """(diffusers prefix, LDM prefix, rest) for the longest matching prefix."""
    best = max((p for p in pairs if key.startswith(p[0])), key=lambda p: len(p[0]), default=None)
    return (best[0], best[1], key[len(best[0]):]) if best else None


def unet_to_ldm(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    pairs, out = unet_prefixes(state), {}
    for key, value in state.items():
        hit = rename(key, pairs)
        if hit is None:
            raise ExportError(f"UNet weight '{key}' has no place in the LDM layout; only SD 1.x/2.x/SDXL UNets can be exported")
        src, dst, rest = hit
        if ".resnets." in src:
            head, _, tail = rest.partition(".")
            rest = f"{RESNET.get(head, head)}.{tail}"
        out[dst + rest] = value
    return out


def vae_to_ldm(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    pairs, out = vae_prefixes(state), {}
    for key, value in state.items():
        hit = rename(key, pairs)
        src, dst, rest = hit if hit else ("", "", key)  # conv_in/out and (post_)quant_conv keep their names
        if ".attentions." in src:
            layer, _, param = rest.rpartition(".")
            if layer not in _VAE_ATTN:
                raise ExportError(f"VAE weight '{key}' has no place in the LDM layout (re-save the VAE with a current diffusers)")
            rest = f"{_VAE_ATTN[layer]}.{param}"
            if value.ndim == 2:  # the LDM VAE computes attention with 1x1 convolutions
                value = value[:, :, None, None]
        elif ".resnets." in src:
            rest = rest.replace("conv_shortcut", "nin_shortcut")
        out[dst + rest] = value
    return out


def _clip_keys(state: dict) -> dict[str, torch.Tensor]:
    """HF CLIP keys without the `text_model.` wrapper (transformers 5 drops it, older versions keep it)."""
    return {k.removeprefix("text_model."): v for k, v in state.items() if not k.endswith("position_ids")}


def clip_to_hf_ldm(state: dict) -> dict[str, torch.Tensor]:
    """OpenAI CLIP (SD 1.x, SDXL's first encoder): LDM keeps transformers' own names, under text_model."""
    return {(k if k.startswith("text_projection") else "text_model." + k): v for k, v in _clip_keys(state).items()}


def clip_to_openclip(state: dict) -> dict[str, torch.Tensor]:
    """OpenCLIP (SD 2.x, SDXL's second encoder): resblocks with fused q/k/v in_proj and a transposed projection."""
    out, qkv = {}, {}
    for k, v in _clip_keys(state).items():
        if m := re.fullmatch(r"encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)", k):
            qkv.setdefault((m.group(1), m.group(3)), {})[m.group(2)] = v
            continue
        k = (k.replace("embeddings.token_embedding.", "token_embedding.")
             .replace("embeddings.position_embedding.weight", "positional_embedding")
             .replace("final_layer_norm.", "ln_final.").replace("encoder.layers.", "transformer.resblocks.")
             .replace(".layer_norm1.", ".ln_1.").replace(".layer_norm2.", ".ln_2.").replace(".self_attn.", ".attn.")
             .replace(".mlp.fc1.", ".mlp.c_fc.").replace(".mlp.fc2.", ".mlp.c_proj."))
        if k == "text_projection.weight":
            k, v = "text_projection", v.T.contiguous()
        out[k] = v
    for (layer, param), parts in qkv.items():
        out[f"transformer.resblocks.{layer}.attn.in_proj_{param}"] = torch.cat([parts["q"], parts["k"], parts["v"]])
    return out


def pipeline_to_checkpoint(unet: dict, vae: dict, text_encoders: list[dict], sdxl: bool, openclip: bool) -> dict[str, torch.Tensor]:
    """One LDM (SD 1.x/2.x) or SGM (SDXL) state dict from a pipeline's component state dicts."""
    out = {"model.diffusion_model." + k: v for k, v in unet_to_ldm(unet).items()}
    out.update({"first_stage_model." + k: v for k, v in vae_to_ldm(vae).items()})
    if sdxl:
        out.update({"conditioner.embedders.0.transformer." + k: v for k, v in clip_to_hf_ldm(text_encoders[0]).items()})
        out.update({"conditioner.embedders.1.model." + k: v for k, v in clip_to_openclip(text_encoders[1]).items()})
    elif openclip:
        te = clip_to_openclip(text_encoders[0])
        if "transformer.resblocks.22.ln_1.weight" in te and "transformer.resblocks.23.ln_1.weight" not in te:
            # diffusers drops OpenCLIP-H's last block (SD 2 reads the penultimate layer); strict loaders
            # still expect it, so, as kohya does, stand a copy of block 22 in for it: it is never run
            te.update({k.replace(".22.", ".23.", 1): v.clone() for k, v in te.items() if k.startswith("transformer.resblocks.22.")})
        out.update({"cond_stage_model.model." + k: v for k, v in te.items()})
    else:
        out.update({"cond_stage_model.transformer." + k: v for k, v in clip_to_hf_ldm(text_encoders[0]).items()})
    return out
