"""LoKr (KronA, Edalati et al. 2022; LyCORIS's `algo=lokr`): each adapted weight changes by a Kronecker product.

For a layer of shape (out, in), `out = a*b` and `in = c*d` are split into a factor pair near `lokr_factor`
(peft's and LyCORIS's `factorization`), and the update is `s * kron(w1, w2)` with w1 (a, c) and w2 (b, d), s =
lora_alpha / lora_rank. w2 is a rank-r product `w2_a @ w2_b` unless r >= max(b, d) / 2 (then a full matrix:
LyCORIS's "full dimension"); w1 likewise with `lokr_decompose_both`. peft's LoKr (`LoKrConfig`), initialised
the LyCORIS way (w2, or w2_b, zero: the model starts as the base). Saved and loaded as methods/lycoris.py says.
"""

from __future__ import annotations

from .lycoris import LycorisAdapter


class LoKr(LycorisAdapter):
    name = "lokr"

    def peft_config(self, cfg, targets, layers):
        from peft import LoKrConfig

        where = dict(layers_to_transform=list(layers), layers_pattern="layers") if layers is not None else {}
        return LoKrConfig(r=cfg.lora_rank, alpha=cfg.effective_lora_alpha, target_modules=list(targets), init_weights="lycoris",
                          decompose_factor=cfg.lokr_factor, decompose_both=cfg.lokr_decompose_both, **where)
