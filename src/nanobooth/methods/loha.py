"""LoHa (FedPara, Hyeon-Woo et al. 2022; LyCORIS's `algo=loha`): each adapted weight changes by a Hadamard product.

The update of a layer (out, in) is `s * (w1_a @ w1_b) * (w2_a @ w2_b)` (elementwise product of two rank-r
products, so its rank can reach r^2), s = lora_alpha / lora_rank; w1_a, w2_a (out, r), w1_b, w2_b (r, in).
peft's LoHa (`LoHaConfig`, its default init: w2_b zero, so the model starts as the base). Saved and loaded as
methods/lycoris.py says.
"""

from __future__ import annotations

from .lycoris import LycorisAdapter


class LoHa(LycorisAdapter):
    name = "loha"

    def peft_config(self, cfg, targets, layers):
        from peft import LoHaConfig

        where = dict(layers_to_transform=list(layers), layers_pattern="layers") if layers is not None else {}
        return LoHaConfig(r=cfg.lora_rank, alpha=cfg.effective_lora_alpha, target_modules=list(targets), **where)
