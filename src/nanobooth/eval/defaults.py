"""What `nanobooth eval` and `eval-dataset` use for a flag that is not given: the metric backend for the model
(the toy world's probe for the embedded toy model), and the run's own sampling settings, as `nanobooth generate`."""

from __future__ import annotations

import logging
from pathlib import Path

from ..core.builtin_models import TOY, is_toy, shipped_folder
from ..core.run_folder import load_run_config
from ..inference.generate import sampling_settings

log = logging.getLogger("nanobooth")

# the sampling settings for flags left unset when there is no run config.yaml (a base model): eval's own, as before
EVAL_SAMPLING = {"steps": 50, "guidance": 7.5, "guidance_cutoff": 1.0, "resolution": None, "sampler": "model"}


def toy_model(model: str) -> bool:
    """`model` is an embedded toy-world model: its name (toy, toy-flux) or the shipped folder itself."""
    if is_toy(model):
        return True
    path = Path(model).expanduser()
    return path.is_dir() and any((f := shipped_folder(name)) is not None and f.resolve() == path.resolve() for name in TOY)


def choose_backend(model: str, backend: str | None) -> str:
    """`backend` when given; else "toy" for the embedded toy model (its world's probe, offline; said in one line),
    "real" (DINO + CLIP) for every other model."""
    if backend is not None:
        return backend
    if toy_model(model):
        log.info("--model %s is the embedded toy model: scoring with --backend toy (the toy world's probe, offline); "
                 "pass --backend real for DINO and CLIP", model)
        return "toy"
    return "real"


def eval_sampling(weights=None, **flags) -> dict:
    """steps, guidance, guidance_cutoff, resolution, sampler as `nanobooth generate` picks them (sampling_settings:
    a flag given, not None, wins; else the run's config.yaml); without a run config the defaults are eval's own
    (EVAL_SAMPLING: 50 steps, guidance 7.5, the model's own sampler) rather than generate's."""
    if not weights or load_run_config(weights) is None:
        flags = {k: default if flags.get(k) is None else flags[k] for k, default in EVAL_SAMPLING.items()}
    return sampling_settings(weights, **flags)


def sampling_line(settings: dict, weights, flags: dict) -> str:
    """One line: the sampling settings used, and where each came from."""
    used = ", ".join(f"{k.replace('_', ' ')} {'native' if settings[k] is None else settings[k]}" for k in EVAL_SAMPLING)
    given = [f"--{k.replace('_', '-')}" for k in EVAL_SAMPLING if flags.get(k) is not None]
    run = weights and load_run_config(weights) is not None
    source = "the run's config.yaml" if run else "eval's defaults"
    if given:
        source = " ".join(given) + (f" as given, the rest from {source}" if len(given) < len(EVAL_SAMPLING) else " as given")
    return f"sampling: {used} ({source})"
