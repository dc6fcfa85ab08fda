"""The optimizer a run trains with (config key `optimizer`), its LR schedule, and its eval-mode weights.

- adamw: torch AdamW (fused on CUDA, multi-tensor elsewhere); adam_* keys.
- adamw8bit: bitsandbytes' 8-bit AdamW (CUDA only); `use_8bit_adam=true` is diffusers' name for it.
- prodigy: Prodigy (prodigyopt) estimates the step size itself; learning_rate is a multiplier of that
  estimate, 1.0 by convention (text_encoder_lr likewise), so a learning_rate outside [0.1, 10] is warned about before the run
  (check_optimizer).
  The logged `lr` is the step size it took, d*lr (`step_size`), not the multiplier.
- schedulefree: AdamW schedule-free (Defazio et al. 2024). It trains on one sequence of weights (y) and
  its result is another (x, an average it keeps implicitly): `eval_weights` puts x in the modules for
  validation, and `final_weights` before the result is saved. It warms up itself (lr_warmup_steps) and
  needs no decay schedule, so its LR schedule is constant.

All keep their whole state in `optimizer.state_dict()` (tensors and plain numbers), which the
checkpoint stores, so a resume restores them bit-exactly.
"""

from __future__ import annotations

import contextlib
import io
import logging

import torch

from .config import ConfigError

log = logging.getLogger("nanobooth")


def optimizer_name(cfg) -> str:
    """The optimizer cfg asks for: use_8bit_adam=true is adamw8bit."""
    return "adamw8bit" if cfg.use_8bit_adam else cfg.optimizer


def check_optimizer(cfg) -> None:
    """Refuse (ConfigError, one line) an optimizer that cannot run here, before anything is written."""
    import importlib.util

    name = optimizer_name(cfg)
    key = "use_8bit_adam=true" if cfg.use_8bit_adam else f"optimizer={name}"
    package = {"adamw8bit": "bitsandbytes", "prodigy": "prodigyopt", "schedulefree": "schedulefree"}.get(name)
    if package and importlib.util.find_spec(package) is None:
        raise ConfigError(f"{key} needs {package}: pip install {package}" + (" (CUDA GPUs only)" if name == "adamw8bit" else ""))
    if name == "adamw8bit" and not torch.cuda.is_available():
        raise ConfigError(f"{key}: bitsandbytes' 8-bit AdamW runs on CUDA GPUs only and none is visible; use optimizer=adamw")
    if name == "prodigy":
        warn_prodigy_lr(cfg)


PRODIGY_LR_RANGE = (0.1, 10.0)  # multipliers of prodigy's own step size that are deliberate; the variants' 1e-4 is not


def warn_prodigy_lr(cfg) -> None:
    """Prodigy's lr multiplies the step size d it estimates (its logged lr is d*lr), so the variants' AdamW rates (1e-4)
    make it learn almost nothing: one warning line naming each key outside PRODIGY_LR_RANGE and the fix."""
    lo, hi = PRODIGY_LR_RANGE
    keys = {"learning_rate": cfg.learning_rate, "text_encoder_lr": cfg.text_encoder_lr}
    bad = [f"{k}={v:g}" for k, v in keys.items() if v is not None and not lo <= v <= hi]
    if bad:
        log.warning("optimizer=prodigy: %s scales prodigy's own step size; use %s (prodigy's default; %g to %g is not warned about)",
                    " and ".join(bad), " and ".join(b.split("=")[0] + "=1.0" for b in bad), lo, hi)
    if cfg.text_encoder_lr is not None and cfg.text_encoder_lr != cfg.learning_rate and (cfg.train_text_encoder or cfg.trains_embeddings):
        log.warning("optimizer=prodigy: every group trains at learning_rate=%g (prodigy estimates one step size for all); "
                    "text_encoder_lr=%g is not used, as in diffusers' DreamBooth scripts", cfg.learning_rate, cfg.text_encoder_lr)


def make_optimizer(cfg, groups: list[dict], device: torch.device):
    """The optimizer of groups ([{"params", "lr"}], Method.param_groups); ConfigError (one line) when its
    package is missing or it cannot run here."""
    name = optimizer_name(cfg)
    betas = (cfg.adam_beta1, cfg.adam_beta2)
    if name == "adamw8bit":
        import bitsandbytes as bnb  # check_optimizer refused it if missing

        return bnb.optim.AdamW8bit(groups, betas=betas, weight_decay=cfg.adam_weight_decay, eps=cfg.adam_epsilon)
    if name == "prodigy":
        from prodigyopt import Prodigy

        # prodigy refuses groups at different lrs (newcomer55: the recipe's text_encoder_lr crashed it after loading);
        # diffusers' scripts train the text encoder at learning_rate with it too (warn_prodigy_lr said so)
        if len({g["lr"] for g in groups}) > 1:
            groups = [{**g, "lr": cfg.learning_rate} for g in groups]

        # prodigyopt print()s "Using decoupled weight decay" whenever weight_decay > 0 (AdamW's kind, as adamw uses; it
        # has no option to stop it): a stray stdout line in the middle of the progress output
        with contextlib.redirect_stdout(io.StringIO()):
            return Prodigy(groups, betas=betas, weight_decay=cfg.adam_weight_decay, eps=cfg.adam_epsilon)
    if name == "schedulefree":
        from schedulefree import AdamWScheduleFree

        if cfg.lr_scheduler not in ("constant", "constant_with_warmup"):
            log.warning("optimizer=schedulefree needs no LR schedule: lr_scheduler=%s is ignored (constant; lr_warmup_steps "
                        "warms it up)", cfg.lr_scheduler)
        opt = AdamWScheduleFree(groups, betas=betas, weight_decay=cfg.adam_weight_decay, eps=cfg.adam_epsilon,
                                warmup_steps=cfg.lr_warmup_steps)
        opt.train()
        return opt
    fused = device.type == "cuda"  # one fused kernel per step on CUDA; multi-tensor (foreach) updates elsewhere
    return torch.optim.AdamW(groups, betas=betas, weight_decay=cfg.adam_weight_decay, eps=cfg.adam_epsilon, fused=fused,
                             foreach=None if fused else True)


def make_schedule(cfg, optimizer):
    """diffusers' get_scheduler for cfg; constant for schedulefree, which warms up inside the optimizer."""
    from diffusers.optimization import get_scheduler

    if optimizer_name(cfg) == "schedulefree":
        return get_scheduler("constant", optimizer)
    return get_scheduler(cfg.lr_scheduler, optimizer, num_warmup_steps=cfg.lr_warmup_steps, num_training_steps=cfg.max_train_steps)


def step_size(optimizer, lr_scheduler) -> float:
    """The learning rate the last update used, as logged (train_log.jsonl `lr`, the progress line, trackers):
    the schedule's lr, times Prodigy's own estimate d for Prodigy, whose lr is only a multiplier (kohya's
    `lr/d*lr`); logging the multiplier showed `lr 1.0` for every run."""
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps it
    group = inner.param_groups[0]
    lr = lr_scheduler.get_last_lr()[0]
    return float(group["d"] * lr) if "d" in group else lr


def _schedule_free(optimizer) -> bool:
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps it
    return bool(inner.param_groups) and "train_mode" in inner.param_groups[0]


def _params(optimizer) -> list[torch.Tensor]:
    return [p for g in optimizer.param_groups for p in g["params"]]


@contextlib.contextmanager
def eval_weights(optimizer):
    """Inside: the modules hold the weights a result would have (schedule-free's x); after: exactly the
    training weights again. Schedule-free's own train() would restore them up to rounding, which would make
    a run with validation differ from one without, so the training weights are copied and put back
    bit for bit. Other optimizers: nothing happens."""
    if not _schedule_free(optimizer):
        yield
        return
    saved = [p.detach().clone() for p in _params(optimizer)]
    optimizer.eval()
    try:
        yield
    finally:
        optimizer.train()
        with torch.no_grad():
            for p, s in zip(_params(optimizer), saved):
                p.copy_(s)


def final_weights(optimizer) -> None:
    """Put the result's weights in the modules for good (schedule-free: x), after the last step."""
    if _schedule_free(optimizer):
        optimizer.eval()
