"""generate's --weights, checked before any model loads: a nanobooth run folder, or one line naming the path, what
it is instead and what to pass.

The loaders cannot tell: a folder `nanobooth export` wrote into (kohya LoRA, A1111 embedding, single-file
checkpoint) loaded the whole base model before the refusal (minutes on a real model), and a pivotal run's export
(`<out>_emb.safetensors` beside the LoRA) looked like a textual-inversion run whose tokens then loaded as nothing. A
file's header (its tensor names and metadata, no weights) says what it is; reading it takes milliseconds.
"""

from __future__ import annotations

from pathlib import Path

from ..core.errors import ModelError
from ..core.run_folder import CONFIG, EMB_SUFFIX, LORA_FILE, RunFolderError, list_checkpoints, result_kind

KOHYA_LORA = "kohya LoRA"
WEBUI_EMBEDDING = "A1111/ComfyUI embedding"
CHECKPOINT = "single-file checkpoint"
FLUX_CHECKPOINT = "FLUX transformer checkpoint"  # BFL's layout, as flux1-dev.safetensors
DIFFUSERS_LORA = "LoRA in diffusers' layout"
TOKEN_EMBEDDINGS = "nanobooth token embeddings"

# what to do with each kind of file instead of passing it as --weights
_USE = {
    CHECKPOINT: "to render the single-file checkpoint pass --model {file} (with --single-file-config BASE_MODEL, the model "
                "the run trained on, to describe it offline)",
    FLUX_CHECKPOINT: "a FLUX transformer file is for ComfyUI's Load Diffusion Model, Forge or "
                     "FluxTransformer2DModel.from_single_file (it holds no VAE or text encoders, so --model cannot render it)",
}
_USE_ADAPTER = "exported LoRA and embedding files are for A1111, ComfyUI, Forge, kohya or diffusers' load_lora_weights"


def safetensors_header(path: Path) -> tuple[set[str], dict[str, str]] | None:
    """(tensor names, metadata) from a .safetensors file's header (safetensors reads only the header here, no
    weights); None for a file that is not one."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), "np") as f:
            return set(f.keys()), dict(f.metadata() or {})
    except (OSError, ValueError, SafetensorError):
        return None


def describe(path: Path) -> str | None:
    """What a weights file is, by its header: one of the names above, None when unreadable or unrecognised."""
    header = safetensors_header(path)
    if header is None:
        return None
    keys, meta = header
    if "token_abstraction" in meta:  # embeddings.save's metadata: a run's own file, or its diffusers export
        return TOKEN_EMBEDDINGS
    if keys and (keys == {"emb_params"} or keys <= {"clip_l", "clip_g"}):  # embeddings.webui_tensors
        return WEBUI_EMBEDDING
    if "ss_network_module" in meta or any(k.startswith(("lora_unet_", "lora_te")) for k in keys):
        return KOHYA_LORA
    if any(k.startswith(("model.diffusion_model.double_blocks.", "double_blocks.")) for k in keys):
        return FLUX_CHECKPOINT
    if any(k.startswith("model.diffusion_model.") for k in keys):
        return CHECKPOINT
    if any(k.startswith(("unet.", "transformer.", "text_encoder")) for k in keys):
        return DIFFUSERS_LORA
    return None


def _advice(found: dict[Path, str]) -> str:
    """'; what to do instead' for each kind of file in `found` (path -> describe's name)."""
    kinds = set(found.values())
    said = [_USE[k].format(file=next(p for p, what in found.items() if what == k)) for k in (CHECKPOINT, FLUX_CHECKPOINT)
            if k in kinds]
    if kinds - set(_USE):
        said.insert(0, _USE_ADAPTER)
    return "".join("; " + s for s in said)


def _listing(found: dict[Path, str]) -> str:
    items = [f"{what} {p.name}" for p, what in found.items()]
    return ", ".join(items[:4]) + (f" and {len(items) - 4} more" if len(items) > 4 else "")


def _results_below(folder: Path) -> list[str]:
    """Sub-folders --weights would take (a folder of runs, or a full run's diffusers export among other exports)."""
    names = []
    for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
        try:
            check_weights(sub, look_below=False)
        except ModelError:
            continue
        names.append(sub.name)
    return names


def check_weights(weights, look_below: bool = True) -> None:
    """Raise ModelError, in one line, unless `weights` is a folder the run loaders can read: a run's LoRA (its own
    diffusers-layout file), full pipeline or token embeddings. A folder mixing results is refused here too
    (result_kind), as is one holding several embedding files. None (no run) passes. look_below: name the sub-folders
    that would pass, for a folder that does not."""
    if weights is None:
        return
    path = Path(weights)
    if not path.exists():
        raise ModelError(f"--weights '{weights}': nothing is there; pass a finished nanobooth run folder")
    if path.is_file():  # newcomer55: an exported LoRA or checkpoint passed as --weights
        what = describe(path)
        if what is None:
            raise ModelError(f"--weights '{weights}' is a file; --weights takes a nanobooth run folder (the one it was exported "
                             "from). Exported files are for A1111, ComfyUI, kohya or diffusers' load_lora_weights; a single-file "
                             "checkpoint goes to --model")
        raise ModelError(f"--weights '{weights}' is a file ({what}); --weights takes a nanobooth run folder (the one it was "
                         f"exported from){_advice({path: what})}")
    kind = result_kind(path)
    if kind == "full":  # a pipeline folder: a full run, its diffusers export, or any diffusers folder
        return
    several = None  # embeddings.find's refusal of a folder holding several embedding files
    if kind is not None:
        from ..methods import embeddings

        try:
            emb = embeddings.find(path)
        except RunFolderError as e:
            several = e
        else:
            read = ([path / LORA_FILE] if kind == "lora" else []) + ([emb] if emb else [])
            if all(describe(p) in (None, DIFFUSERS_LORA, TOKEN_EMBEDDINGS) for p in read):
                return
    found = {p: what for p in sorted(path.glob("*.safetensors")) if p.is_file() and (what := describe(p))}
    if several is not None and all(what in (DIFFUSERS_LORA, TOKEN_EMBEDDINGS) for what in found.values()):
        raise several  # two runs' own files: its line says so
    if found:
        raise ModelError(f"--weights '{weights}' is an export folder ({_listing(found)}), not a nanobooth run folder: pass "
                         f"the run folder they were exported from (nanobooth export's RUN_DIR){_advice(found)}")
    below = _results_below(path) if look_below else []
    hint = f"; it holds results in its sub-folders {', '.join(below[:4])}{' ...' if len(below) > 4 else ''}: pass one" if below else ""
    if ckpts := list_checkpoints(path):  # newcomer56: a copy of a stopped run got no hint
        step = int(ckpts[-1].name.split("-")[-1])
        hint += (f"; it is a run stopped at step {step} (its last checkpoint): finish it with `nanobooth train "
                 f"{path / CONFIG} output_dir={path} resume_from_checkpoint=latest`, then pass it here")
    raise ModelError(f"--weights '{weights}': no {LORA_FILE}, model_index.json or *{EMB_SUFFIX} there; pass a finished "
                     f"nanobooth run folder{hint}")
