"""`nanobooth export`'s arguments and its first check, torch-free: `--help`, an argument error and a RUN_DIR that is
not a run answer at once; the conversion (interop/export.py, torch) loads when the command runs."""

from __future__ import annotations

from pathlib import Path

from ..core.errors import ExportError
from ..core.run_folder import EMB_SUFFIX, LORA_FILE, load_run_config, result_kind

FORMATS = ("kohya", "comfyui", "diffusers", "single-file")
DTYPE_NAMES = ("fp32", "fp16", "bf16")
ALIASES = {"a1111": "kohya", "forge": "kohya"}  # the tools a kohya-format LoRA is for, as users name them


def read_run(run_dir) -> tuple[str, dict]:
    """('lora' | 'full' | 'textual_inversion', resolved config as a dict) of a finished run; any diffusers SD/SDXL folder counts as
    full ({} when it has no config.yaml). A folder holding both a LoRA and a pipeline is refused."""
    run = Path(run_dir)
    kind = result_kind(run)
    if kind is None:
        raise ExportError(f"RUN_DIR '{run_dir}' is not a finished nanobooth run (no {LORA_FILE}, model_index.json or *{EMB_SUFFIX}); "
                          "pass the output_dir of a completed `nanobooth train`")
    cfg = load_run_config(run)
    return kind, ({} if cfg is None else cfg.to_dict())


def cmd_export(args) -> None:
    read_run(args.run_dir)  # a wrong RUN_DIR answers before torch loads
    from .export import export

    fmt = ALIASES.get(args.format, args.format)
    path = export(args.run_dir, fmt, args.out, args.dtype, args.overwrite)
    print(f"exported {args.run_dir} as {fmt}: {path}")


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "export", help="convert a run for A1111/ComfyUI/kohya (LoRA) or into one checkpoint file",
        description="kohya: a LoRA file for A1111, ComfyUI, Forge, kohya and diffusers (true alpha kept; FLUX in BFL's "
                    "layout). comfyui: the same, but an SD3 LoRA keeps diffusers' names (ComfyUI's for SD3). diffusers: the run's "
                    "own LoRA file or pipeline folder. single-file: an LDM/SGM .safetensors checkpoint (LoRA runs are "
                    "fused into their base model).")
    p.add_argument("run_dir", metavar="RUN_DIR", help="a finished nanobooth run (output_dir)")
    p.add_argument("--format", required=True, choices=FORMATS + tuple(ALIASES),
                   help="kohya (or a1111, forge: the same file): a LoRA for A1111, Forge and kohya; comfyui: a LoRA for "
                        "ComfyUI; diffusers; single-file: a checkpoint for A1111's models/Stable-diffusion or ComfyUI's "
                        "Load Checkpoint")
    p.add_argument("--out", required=True, help="the .safetensors file to write (a folder for a full run as diffusers)")
    p.add_argument("--dtype", choices=DTYPE_NAMES, default=None, help="cast weights (default: as trained)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.set_defaults(func=cmd_export)
