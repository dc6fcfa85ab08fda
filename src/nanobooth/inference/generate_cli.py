"""`nanobooth generate`'s command: --out, --weights and --model checked torch-free, so that a wrong one answers at once;
the rendering (inference/generate.py, torch) loads after them."""

from __future__ import annotations

from pathlib import Path

from ..core.errors import ConfigError
from ..core.run_folder import load_run_config
from .weights_check import check_weights


def check_out_folder(out: Path, overwrite: bool) -> None:
    """`generate --out`: refuse a file, and a folder holding an earlier generate's images (a second run with fewer
    images would leave the first one's beside its own, with nothing to tell them apart) unless overwrite, which
    removes only those images and grid.png first."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out '{out}' is a file; pass a folder (created if missing)")
    earlier = sorted(out.glob("prompt[0-9][0-9]-[0-9][0-9].png")) + ([out / "grid.png"] if (out / "grid.png").is_file() else [])
    if earlier and not overwrite:
        raise ConfigError(f"--out '{out}' holds an earlier generate's images ({len(earlier)} files); pass another --out, "
                          "or --overwrite to replace them")
    for p in earlier:
        p.unlink()


def base_model_of(model: str | None, weights: str | None) -> str:
    """generate's --model: as given, else the model the --weights run trained on (its config.yaml; newcomer55 had to
    repeat what the run already records). ConfigError when neither names one."""
    if model:
        return model
    cfg = load_run_config(weights) if weights and Path(weights).is_dir() else None
    if cfg is None:
        raise ConfigError("--model: pass the base model to render (a hub id, a folder, a .safetensors file or a built-in "
                          "name such as toy); with --weights RUN_DIR it defaults to the model the run trained on")
    return cfg.model


def generate_cli(args) -> Path:
    check_out_folder(Path(args.out), args.overwrite)
    check_weights(args.weights)  # before base_model_of: an export folder's missing config.yaml is not the problem to report
    args.model = base_model_of(args.model, args.weights)
    from .generate import generate

    images = generate(args.model, args.prompt, weights=args.weights, num_images=args.num_images, seed=args.seed,
                      steps=args.steps, guidance=args.guidance, guidance_cutoff=args.guidance_cutoff,
                      resolution=args.resolution, out=args.out, device=args.device, dtype=args.dtype,
                      tome_ratio=args.tome_ratio, allow_pickle=args.allow_pickle, single_file_config=args.single_file_config,
                      sampler=args.sampler)
    out = Path(args.out)
    print(f"wrote {len(images)} image{'' if len(images) == 1 else 's'} and grid.png to {out}")
    return out
