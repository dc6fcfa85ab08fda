"""Carry a toy pretraining run to another machine: its irreplaceable part packed into a small folder, and a run
folder unpacked from one that the same `nanobooth toy pretrain` command continues.

    python -m nanobooth.toy.recipes.carry pack toy_v5_run carry/toy_v5       # 79 MB for recipe v5
    python -m nanobooth.toy.recipes.carry unpack carry/toy_v5 toy_v5_run     # then the run's own command

Why: the recipes run for more hours than one machine may be kept, and a run folder is gigabytes (renders,
latent caches, fp32 AdamW state). What is carried:
- every finished autoencoder stage (vae, vae_dec, vae_refined, vae_refined_dec, vae_centred) as written, fp32:
  stage 2 trains in their latent space, so they go bit for bit;
- the run's args*.json, timings.json and history.json, and the probe (probe/), if one was trained there;
- each stage-2 checkpoint (unet_ckpt, flux_ckpt) shrunk: weights fp16, AdamW's second moments bf16; its first
  moments are dropped (zeros again: Adam's first updates then come out smaller and refill within ~20 steps,
  beta1 = 0.9) and so is its EMA (restarted from the weights, denoiser.train: its 1000-step horizon refills
  long before a run ends).
Renders and latent caches are rebuilt by the run's own command (seeded renders; latents re-encoded by the
carried autoencoder). A run continued from a carry is therefore close to, not bit-exact with, an uninterrupted
one; unpack writes a history.json line saying from which step.

Unfinished autoencoder stages (a *_ckpt without its final folder) are not carried: that stage restarts.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from nanobooth.toy.recipes.ckpt import swap_in, write_json
from nanobooth.toy.recipes.pretrain import add_history

FORMAT = 1
AUTOENCODERS = ("vae", "vae_dec", "vae_refined", "vae_refined_dec", "vae_centred")
STAGE2 = ("unet_ckpt", "flux_ckpt")
RUN_FILES = ("timings.json", "history.json")


class CarryError(ValueError):
    """Bad input to pack/unpack: the message is the one line the CLI prints."""


def pack(run: Path, dest: Path) -> dict:
    """Write `run`'s carry to `dest` (replaced only if it holds a carry: written beside it, then swapped in).
    Returns carry.json's contents. CarryError: `run` is no pretraining run, or `dest` is something else."""
    if (run / "carry.json").is_file():
        raise CarryError(f"{run} is a carry, not a run; unpack it into a new folder first")
    if not any(run.glob("args*.json")):
        raise CarryError(f"{run} holds no toy pretraining run (no args*.json); pass the folder given as --out")
    if dest.exists() and any(dest.iterdir()) and not (dest / "carry.json").is_file():
        raise CarryError(f"{dest} exists and holds no carry; pass a new folder")
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for f in sorted(run.glob("args*.json")) + [run / f for f in RUN_FILES if (run / f).is_file()]:
        shutil.copy2(f, tmp / f.name)
    autoencoders = [d for d in AUTOENCODERS if (run / d / "config.json").is_file()]
    for d in autoencoders:
        shutil.copytree(run / d, tmp / d)
    if (run / "probe" / "config.json").is_file():
        shutil.copytree(run / "probe", tmp / "probe", ignore=shutil.ignore_patterns("*cache*"))
    steps = {}
    for name in STAGE2:
        ck = run / name
        if (ck / "state.json").is_file():
            steps[name] = json.loads((ck / "state.json").read_text())["step"]
            _pack_stage2(ck, tmp / name)
    info = {"format": FORMAT, "from": str(run), "autoencoders": autoencoders, "stage2_steps": steps}
    write_json(tmp / "carry.json", info)
    swap_in(tmp, dest)
    return info


def _pack_stage2(ck: Path, out: Path) -> None:
    out.mkdir()
    for f in ck.glob("*.json"):  # state, configs, optim.json (AdamW's hyper-parameters and scalar state)
        shutil.copy2(f, out / f.name)
    for f in ck.glob("*.safetensors"):
        if f.name == "ema.safetensors":
            continue
        if f.name == "optim.safetensors":
            opt = load_file(str(f))
            save_file({k: (v.bfloat16() if k.endswith(".exp_avg_sq") else v) for k, v in opt.items()
                       if not k.endswith(".exp_avg")}, str(out / f.name))
        else:
            save_file({k: v.half() if v.is_floating_point() else v for k, v in load_file(str(f)).items()},
                      str(out / f.name))


def unpack(src: Path, run: Path) -> dict:
    """Write a run folder at `run` (new or empty) from the carry in `src`; returns carry.json's contents.
    CarryError: `src` holds no carry, or `run` holds files (a carry never overwrites a run)."""
    if not (src / "carry.json").is_file():
        raise CarryError(f"{src} holds no carry (no carry.json); pass a folder written by `carry pack`")
    info = json.loads((src / "carry.json").read_text())
    if info.get("format") != FORMAT:
        raise CarryError(f"{src}/carry.json: format {info.get('format')} is not {FORMAT}; pack it again with this version")
    if run.exists() and any(run.iterdir()):
        raise CarryError(f"{run} is not empty; unpack into a new folder (a carry never overwrites a run)")
    run.mkdir(parents=True, exist_ok=True)
    for f in src.glob("*.json"):
        if f.name != "carry.json":
            shutil.copy2(f, run / f.name)
    for d in info["autoencoders"] + (["probe"] if (src / "probe").is_dir() else []):
        shutil.copytree(src / d, run / d)
    for name, step in info["stage2_steps"].items():
        _unpack_stage2(src / name, run / name)
        add_history(run, f"{name.removesuffix('_ckpt')} stage continued at step {step} from a carry (carry.py: weights "
                         "rounded to fp16, AdamW first moments and the EMA restarted)")
    return info


def _unpack_stage2(src: Path, ck: Path) -> None:
    ck.mkdir()
    for f in src.glob("*.json"):
        shutil.copy2(f, ck / f.name)
    for f in src.glob("*.safetensors"):
        t = load_file(str(f))
        if f.name == "optim.safetensors":
            full = {}
            for k, v in t.items():
                if k.endswith(".exp_avg_sq"):
                    full[k[: -len("_sq")]] = torch.zeros(v.shape)
                full[k] = v.float()
            t = full
        else:
            t = {k: v.float() if v.is_floating_point() else v for k, v in t.items()}
        save_file({k: v.contiguous() for k, v in t.items()}, str(ck / f.name))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m nanobooth.toy.recipes.carry", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("pack", help="RUN -> DEST: a run's irreplaceable part")
    a.add_argument("run")
    a.add_argument("dest")
    b = sub.add_parser("unpack", help="SRC -> RUN: a run folder the pretraining command continues")
    b.add_argument("src")
    b.add_argument("run")
    args = p.parse_args(argv)
    try:
        if args.cmd == "pack":
            info = pack(Path(args.run), Path(args.dest))
            print(f"packed {args.run} into {args.dest}: autoencoders {', '.join(info['autoencoders']) or 'none'}; "
                  f"stage 2 {info['stage2_steps'] or 'not started'}")
        else:
            info = unpack(Path(args.src), Path(args.run))
            print(f"unpacked {args.src} into {args.run}: run the pretraining command with --out {args.run} to continue")
    except CarryError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
