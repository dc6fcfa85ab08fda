"""Bookkeeping for the resumable toy pretraining recipe: optimizer state and EMA
as safetensors (torch.save would pickle), per-stage wall time, the lr schedule, stopping at a checkpoint."""
from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from nanobooth.core.checkpoint import optimizer_from_flat, optimizer_to_flat
from nanobooth.core.stop import StopRequest, TrainingInterrupted

_STOP: StopRequest | None = None  # the running recipe's (stops_at_checkpoints); None: signals act as usual


def to_tensor(imgs: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(imgs).permute(0, 3, 1, 2).float().div(127.5).sub(1)


def save_optimizer(opt: torch.optim.Optimizer, path: Path):
    """Adam state as safetensors (tensors) + json (hyper-parameters), in the trainer's checkpoint
    layout, because torch.save would pickle."""
    tensors, meta = optimizer_to_flat(opt)
    save_file(tensors, str(path))
    path.with_suffix(".json").write_text(json.dumps(meta))


def load_optimizer(opt: torch.optim.Optimizer, path: Path):
    meta = json.loads(path.with_suffix(".json").read_text())
    if isinstance(meta, list):  # checkpoints written before this layout held the param groups alone
        meta = {"param_groups": meta, "scalars": {}}
    optimizer_from_flat(opt, load_file(str(path)), meta)


class EMA:
    """Exponential moving average of parameters, kept as a flat name->tensor
    dict so it saves with safetensors. (diffusers' EMAModel saves through
    `model_cls.from_config`, which CLIPTextModel does not provide.)"""

    def __init__(self, named: dict[str, torch.Tensor]):
        self.shadow = {k: v.detach().clone() for k, v in named.items()}

    @torch.no_grad()
    def update(self, named: dict[str, torch.Tensor], step: int, decay: float = 0.999):
        d = min(decay, (1 + step) / (10 + step))  # warm-up so early steps are not frozen in
        for k, v in named.items():
            self.shadow[k].lerp_(v.detach(), 1 - d)


def swap_in(tmp: Path, dest: Path) -> None:
    """Replace the folder `dest` with the finished folder `tmp`: `dest` moves to `dest`.old first and is deleted
    last, so a stop between the renames leaves the previous whole folder there (denoiser.recover_checkpoint)."""
    old = dest.with_name(dest.name + ".old")
    if dest.exists():
        dest.rename(old)
    tmp.rename(dest)
    shutil.rmtree(old, ignore_errors=True)


def write_json(path: Path, obj):
    tmp = path.with_suffix(f".{os.getpid()}.tmp")  # stages may run in parallel processes
    tmp.write_text(json.dumps(obj, indent=2))
    tmp.replace(path)


def timings(out: Path) -> dict:
    p = out / "timings.json"
    return json.loads(p.read_text()) if p.exists() else {}


def add_time(out: Path, key: str, seconds: float, extra: dict | None = None):
    t = timings(out)
    t[key] = t.get(key, 0.0) + seconds
    if extra:
        t.update(extra)
    write_json(out / "timings.json", t)


def read_history(out: Path) -> list[str]:
    """history.json: how a run's weights were actually reached, where that differs from one run of the defaults."""
    return json.loads((out / "history.json").read_text()) if (out / "history.json").exists() else []


def add_history(out: Path, line: str) -> bool:
    """Append `line` to history.json unless it is there already; whether it was added."""
    history = read_history(out)
    if line in history:
        return False
    write_json(out / "history.json", history + [line])
    return True


def lr_at(step: int, total: int, peak: float, warmup: int = 100) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    p = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, p))))


@contextlib.contextmanager
def stops_at_checkpoints():
    """Ctrl-C or SIGTERM while a recipe runs: inside a training loop (`checkpointed_loop`) the step in flight
    finishes, a checkpoint of it is written and TrainingInterrupted ends the run (the CLI prints one line and
    exits 130 / 143; the same command continues). Elsewhere (rendering, encoding: nothing to save) the
    signal stops at once. The recipes run for hours, and whatever stops them (a scheduler's SIGTERM, `kill`)
    then costs one step instead of up to --ckpt-minutes of work."""
    global _STOP
    with StopRequest() as stop:
        stop.setup = False
        _STOP = stop
        try:
            yield stop
        finally:
            _STOP = None


@contextlib.contextmanager
def checkpointed_loop():
    """A training loop that checks `stop_requested()` at each step's end: signals only ask, meanwhile."""
    if _STOP is not None:
        _STOP.raising = False
    try:
        yield
    finally:
        if _STOP is not None:
            _STOP.raising = True


def stop_requested() -> bool:
    return _STOP is not None and _STOP.requested()


def stop_if_requested(what: str, step: int, steps: int, ck: Path, bar) -> None:
    """After the checkpoint of `step` in `ck`: raise TrainingInterrupted if a stop was asked before the end
    (its progress `bar` closed first, so the stop's line is the last one printed)."""
    if stop_requested() and step < steps:
        bar.close()
        raise TrainingInterrupted(f"{_STOP.source} at {what} step {step}/{steps}: checkpoint saved in {ck}; run the "
                                  "same command again to continue", _STOP.signum, step, ck)
