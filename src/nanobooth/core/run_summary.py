"""The console line before the first step: what a run trains, with which rates and regularisers."""

from __future__ import annotations

from .config_values import TI_GROUP, new_tokens, one_identifier

# how each method trains, in words (newcomer56: "... parameters) with full")
HOW = {"full": "as a full fine-tune", "lora": "with LoRA", "dora": "with DoRA", "lokr": "with LoKr", "loha": "with LoHa",
       "textual_inversion": "by textual inversion"}


def run_summary(trained: dict, groups: list[dict], cfg, denoiser_name: str = "unet") -> str:
    """One line saying what a run trains, for the console before the first step: each trained module's trainable
    parameter count (for textual inversion and pivotal tuning that includes only the new token rows: the old table is
    frozen, embeddings.NewTokenEmbedding), the method, each optimizer group's lr, the identifier's new tokens (pivotal
    tuning, textual inversion: how many, their start, for how many steps), and whether the weights are averaged (EMA),
    the prior preserved and the timesteps restricted (`min_timestep`/`max_timestep`). Users read from it that e.g. a
    LoRA recipe trains the text encoder too, which its name does not say. `trained`: the method's
    `trained_modules` {name: module}; `groups`: its `param_groups` list; `denoiser_name`: the family's name for the
    denoiser, which the methods key `unet` in every family (SD3, FLUX: `transformer`)."""
    def count(m):
        n = sum(p.numel() for p in m.parameters() if p.requires_grad)
        return f"{n / 1e6:.2f}M" if n >= 10_000 else str(n)

    names = {"unet": denoiser_name}
    if cfg.trains_embeddings and not cfg.train_text_encoder:  # the encoders are frozen: their trained parameters are the rows
        names.update({te: f"{te}'s new tokens" for te in trained if te.startswith("text_encoder")})
    parts = [f"training {', '.join(f'{names.get(name, name)} ({count(m)} parameters)' for name, m in trained.items())} "
             f"{HOW.get(cfg.method, 'with ' + cfg.method)}",
             "lr " + _rates(groups, {**names, "text_encoder": "text encoder", TI_GROUP: "new tokens"})]
    if cfg.trains_embeddings:  # newcomer51: what pivotal tuning does was said nowhere before the first step
        toks = "".join(new_tokens(cfg))
        # newcomer55: own photos (no subject.json) bound little and nothing said why; started from a few words of the
        # subject's look, the toy recipe's identity rose 0.490 -> 0.622 on 16 subjects (docs/evaluation.md, session 47)
        n_new = len(new_tokens(cfg))
        # each new token starts from one of the concept's tokens in turn (methods/embeddings.py): fewer new tokens than
        # words leave the rest unused (newcomer55: one token "from 'blue red dotted eye'" started from 'blue' alone)
        fewer = cfg.initializer_concept and n_new < len(cfg.initializer_concept.split())
        start = (f"'{cfg.initializer_concept}'" + (f" (its first {n_new} token{'s' if n_new > 1 else ''}, one a new token)"
                                                  if fewer else "") if cfg.initializer_concept else
                 "the class noun (initializer_concept=\"a few words of its look\" binds the subject sooner)")
        frac = cfg.new_tokens_frac
        when = "all the steps" if frac >= 1 else f"the first {frac:.0%} of the steps"
        parts.append(f"'{one_identifier(cfg) or 'the identifier'}' becomes {toks} in every prompt, new tokens started "
                     f"from {start} and trained {when}")
    if cfg.loraplus_lr_ratio:  # the lrs above then come in (A, B) pairs
        parts.append(f"LoRA+ (B matrices at {cfg.loraplus_lr_ratio:g}x)")
    if cfg.use_ema:
        parts.append(f"EMA of the weights (decay {cfg.ema_decay})")
    if cfg.with_prior_preservation:
        parts.append(f"prior preservation (weight {cfg.prior_loss_weight}, {cfg.num_class_images} class images)")
    spanned = cfg.min_timestep or cfg.max_timestep is not None
    if spanned:  # the toy recipe's min_timestep 200: its name does not say
        last = "the last" if cfg.max_timestep is None else cfg.max_timestep - 1
        parts.append(f"timesteps {cfg.min_timestep} to {last}")
    if cfg.timestep_bias_strategy != "none":  # earlier/later take their portion of the span above, where there is one
        where = (f"timesteps {cfg.timestep_bias_begin} to {cfg.timestep_bias_end - 1}" if cfg.timestep_bias_strategy == "range"
                 else f"{'the' if spanned else 'timesteps the'} {cfg.timestep_bias_strategy} {cfg.timestep_bias_portion:.0%}"
                      + (" of them" if spanned else ""))
        parts.append(f"{where} drawn {cfg.timestep_bias_multiplier:g}x as often")
    return "; ".join(parts)


def _rates(groups: list[dict], labels: dict) -> str:
    """Each group's lr, labelled by the group's name where every group has one ("unet 2.0e-03, text encoder 1.0e-03,
    new tokens 1.0e-03"; LoRA+'s A/B pairs share a name: "unet 2.0e-03 / 8.0e-03"), else in group order."""
    if not all(g.get("name") for g in groups):
        return " / ".join(f"{g['lr']:.1e}" for g in groups)
    by_name: dict[str, list[str]] = {}
    for g in groups:
        by_name.setdefault(labels.get(g["name"], g["name"]), []).append(f"{g['lr']:.1e}")
    return ", ".join(f"{name} {' / '.join(lrs)}" for name, lrs in by_name.items())
