"""SDXL (StableDiffusionXLPipeline): two CLIP text encoders and size/crop micro-conditioning."""

from __future__ import annotations

import torch

from .sd import SD


class SDXL(SD):
    """SDXL: two text encoders (penultimate hidden states concatenated), the second's pooled projection,
    and size/crop micro-conditioning ("time ids")."""

    name = "sdxl"
    pipeline_class = "StableDiffusionXLPipeline"
    text_encoder_names = ("text_encoder", "text_encoder_2")
    tokenizer_names = ("tokenizer", "tokenizer_2")
    tome_max_downsample = 2  # SDXL's first level has no attention: merging must reach level 2 to pay
    pipeline_kwargs = {}

    def encode(self, text_encoders, ids: list[torch.Tensor], resolution: int) -> dict:
        hidden, pooled = [], None
        for te, tok_ids in zip(text_encoders, ids):
            out = te(tok_ids, output_hidden_states=True)
            pooled = out[0]  # the projection model's text_embeds; the last encoder's wins, as in diffusers
            hidden.append(out.hidden_states[-2])
        # An uncropped, full-size image (the pipeline's default at this resolution); training replaces
        # it per example through micro_conditioning.
        time_ids = torch.tensor([[resolution, resolution, 0, 0, resolution, resolution]], dtype=hidden[0].dtype,
                                device=hidden[0].device)
        return {"encoder_hidden_states": torch.cat(hidden, dim=-1),
                "added_cond_kwargs": {"text_embeds": pooled, "time_ids": time_ids.expand(pooled.shape[0], -1)}}

    def layers_read(self, index: int, num_layers: int) -> list[int]:
        # the first encoder feeds only its penultimate hidden state (its pooled output is not used), so its
        # last layer never reaches the UNet; the second's pooled projection reads its last layer
        return list(range(num_layers - 1 if index == 0 else num_layers))

    def micro_conditioning(self, cond: dict, coords: torch.Tensor, resolution: int | tuple[int, int]) -> dict:
        """time_ids (B, 6) = original (h, w), crop (top, left), target (resolution, resolution) per example,
        as diffusers' SDXL DreamBooth script builds them (compute_time_ids); `resolution` (h, w): the batch's
        bucket (enable_bucket) is the target. float32: fp16 would round photo sizes above 2048 px, and the UNet
        embeds time ids in float32 anyway."""
        th, tw = (resolution, resolution) if isinstance(resolution, int) else resolution
        target = torch.tensor([th, tw]).expand(len(coords), 2)
        time_ids = torch.cat([coords.cpu(), target], 1).float().to(cond["encoder_hidden_states"].device)
        return {**cond, "added_cond_kwargs": {**cond["added_cond_kwargs"], "time_ids": time_ids}}
