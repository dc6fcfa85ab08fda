"""Resumable checkpoints and final outputs, written so that a crash never loses a good state.

A checkpoint is a folder `checkpoints/checkpoint-NNNNNN` holding safetensors (trainable weights,
optimizer tensors, RNG states) and JSON (step, optimizer hyper-parameters, LR scheduler, data order, and
the image files that order indexes: name + sha256, checked before a resume).
It is written under a temporary name and renamed into place, so a kill during the save leaves the
previous checkpoint untouched; pruning (checkpoints_total_limit) happens only after that rename.
Nothing is pickled: loading a checkpoint cannot execute code.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .errors import CheckpointError  # noqa: F401 (re-exported: callers catch it from here)
from .run_folder import CHECKPOINTS, make_readable
# the checkpoint folder's paths live in run_folder (torch-free, so the CLI refuses a bad resume early); re-exported
from .run_folder import CKPT, check_steps_left, checkpoint_dir, list_checkpoints, logged_steps, resolve_resume  # noqa: F401

log = logging.getLogger("nanobooth")


def input_record(files: list[Path]) -> list[list[str]]:
    """[[file name, sha256 of its bytes], ...] in data order: a checkpoint's data order is positions in
    this list, so a resume over other files would train on other images (or index past the end)."""
    return [[p.name, hashlib.sha256(p.read_bytes()).hexdigest()] for p in files]


def input_changes(old: list[list[str]], new: list[list[str]]) -> str:
    """'' when the two records match, else what changed ('removed a.png, b.png; modified c.png')."""
    if old == new:
        return ""
    o, n = dict(map(tuple, old)), dict(map(tuple, new))
    parts = [(what, sorted(names)) for what, names in (("removed", o.keys() - n.keys()), ("added", n.keys() - o.keys()),
             ("modified", {k for k in o.keys() & n.keys() if o[k] != n[k]}))]
    text = "; ".join(f"{what} {', '.join(names[:5])}{' ...' if len(names) > 5 else ''}" for what, names in parts if names)
    return text or "the file order changed"


def check_resume(path: Path, max_train_steps: int, inputs: dict[str, list[list[str]]]) -> int:
    """Refuse, before anything is written, a resume that would train nothing or train on other images.
    `inputs`: {"instance_data_dir": record, "class_data_dir": record} of the files there now.
    Returns the checkpoint's step."""
    state = json.loads((path / "state.json").read_text())
    step = int(state["step"])
    check_steps_left(path, step, max_train_steps)
    saved = state.get("inputs")
    if saved is None:
        log.warning("%s does not record its input images (saved by an older nanobooth): cannot check that they are unchanged",
                    path.name)
        return step
    for key, record in inputs.items():
        changes = input_changes(saved.get(key, []), record)
        if changes:
            raise CheckpointError(f"{key} changed since {path.name} ({changes}): its data order would point at other images; "
                                  f"restore the files, or start a new run (overwrite=true or another output_dir)")
    return step


def trainable_state(modules: dict[str, torch.nn.Module]) -> dict[str, torch.Tensor]:
    """Only the parameters being trained: the whole UNet for full, just adapter tensors for LoRA."""
    return {f"{name}.{k}": p.detach().contiguous().cpu() for name, m in modules.items()
            for k, p in m.named_parameters() if p.requires_grad}


def load_trainable_state(modules: dict[str, torch.nn.Module], state: dict[str, torch.Tensor]) -> None:
    for name, m in modules.items():
        prefix = name + "."
        params = dict(m.named_parameters())
        for key, value in state.items():
            if key.startswith(prefix):
                with torch.no_grad():
                    params[key[len(prefix):]].copy_(value)
        expected = {k for k, p in params.items() if p.requires_grad}
        missing = expected - {k[len(prefix):] for k in state if k.startswith(prefix)}
        if missing:
            raise CheckpointError(f"checkpoint lacks {len(missing)} trained tensors of {name} (e.g. {sorted(missing)[0]}): it is from a different config")


def optimizer_to_flat(optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for pid, pstate in sd["state"].items():
        for k, v in pstate.items():
            if torch.is_tensor(v):
                tensors[f"{pid}.{k}"] = v.detach().contiguous().cpu()
            else:
                scalars[f"{pid}.{k}"] = v
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in sd["param_groups"]]
    return tensors, {"param_groups": groups, "scalars": scalars}


def optimizer_from_flat(optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    state: dict[int, dict] = {}
    for key, v in tensors.items():
        pid, k = key.split(".", 1)
        state.setdefault(int(pid), {})[k] = v
    for key, v in meta["scalars"].items():
        pid, k = key.split(".", 1)
        state.setdefault(int(pid), {})[k] = v
    groups = [{k: (tuple(v) if k == "betas" else v) for k, v in g.items()} for g in meta["param_groups"]]
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def save_checkpoint(run_dir: Path, step: int, modules: dict, optimizer, lr_scheduler, rng: dict[str, torch.Tensor],
                    extra: dict, total_limit: int | None = None, files: dict[str, dict[str, torch.Tensor]] | None = None) -> Path:
    """files: more tensors to hold, {file name: tensors} (the EMA's), written inside the same atomic folder."""
    root = Path(run_dir) / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    final = checkpoint_dir(run_dir, step)
    tmp = root / f".tmp-checkpoint-{step:06d}"
    shutil.rmtree(tmp, ignore_errors=True)  # leftover of a save that was killed
    tmp.mkdir()
    with cleanup_on_error(tmp, f"checkpoint-{step:06d}"):
        save_file(trainable_state(modules), tmp / "model.safetensors")
        opt_tensors, opt_meta = optimizer_to_flat(optimizer)
        save_file(opt_tensors, tmp / "optimizer.safetensors")
        save_file({k: v.contiguous().cpu() for k, v in rng.items()}, tmp / "rng.safetensors")
        for name, tensors in (files or {}).items():
            save_file(tensors, tmp / name)
        state = {"step": step, "optimizer": opt_meta, "lr_scheduler": _jsonable(lr_scheduler.state_dict()), **extra}
        (tmp / "state.json").write_text(json.dumps(state))
        make_readable(tmp)  # safetensors writes 0600 files, like nothing else a user meets
        _fsync_dir(tmp)
    if final.exists():  # re-saving the same step after a resume: swap atomically-enough
        old = root / f".old-checkpoint-{step:06d}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    _fsync_dir(root)
    if total_limit:
        for old in list_checkpoints(run_dir)[:-total_limit]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: Path, modules: dict, optimizer, lr_scheduler) -> tuple[dict, dict[str, torch.Tensor]]:
    """Restore weights, optimizer and scheduler in place; return (state.json, rng tensors)."""
    state = json.loads((path / "state.json").read_text())
    load_trainable_state(modules, load_file(path / "model.safetensors"))
    optimizer_from_flat(optimizer, load_file(path / "optimizer.safetensors"), state["optimizer"])
    lr_scheduler.load_state_dict(state["lr_scheduler"])
    return state, load_file(path / "rng.safetensors")


@contextmanager
def cleanup_on_error(tmp: Path, what: str):
    """Remove a half-written temp folder on any failure; a full disk becomes one actionable line."""
    try:
        yield
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise CheckpointError(f"disk full while writing {what} in {tmp.parent}: free some space, then continue with "
                                  f"resume_from_checkpoint=latest (earlier checkpoints are intact)") from None
        raise


def _jsonable(d: dict) -> dict:
    out = {}
    for k, v in d.items():
        try:
            json.dumps(v)
            out[k] = v
        except TypeError:
            continue  # lambdas of LambdaLR: rebuilt from the config, not stored
    return out


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def publish(tmp: Path, dest: Path) -> None:
    """Move every entry of the finished `tmp` folder into `dest`, replacing older outputs of the same name."""
    for entry in tmp.iterdir():
        target = dest / entry.name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        os.replace(entry, target)
    tmp.rmdir()
