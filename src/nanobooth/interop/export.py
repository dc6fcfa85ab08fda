"""`nanobooth export RUN_DIR --format kohya|comfyui|diffusers|single-file --out PATH`: hand a run to other tools.

- kohya: a LoRA file that AUTOMATIC1111, ComfyUI, kohya's sd-scripts and diffusers all load: kohya's key names
  and metadata with each module's trained alpha (kohya.py says how each adapter and family is named).
- comfyui: the same file as kohya for SD, SDXL and FLUX. For SD3 it is the run's own diffusers-named file:
  ComfyUI and Forge map `transformer.<diffusers path>` keys for SD3 (comfy/lora.py, via utils.mmdit_to_diffusers)
  and diffusers loads it. kohya's SD3 layout (networks/lora_sd3.py: SAI MMDiT names such as
  `lora_unet_joint_blocks_0_x_block_attn_qkv`) is not written: diffusers has no loader for it to test against,
  so --format kohya is refused for SD3.
- diffusers: the run's own LoRA file or pipeline folder, copied (optionally cast to --dtype).
- A pivotal-tuning run (`train_text_encoder_ti`) also gets its new tokens beside --out, as
  `<out stem>_emb.safetensors`: for kohya/comfyui/single-file the embedding A1111 and ComfyUI load
  (`emb_params` for SD 1.x/2.x, `clip_l` + `clip_g` for SDXL; the prompt names it by its file name), for
  diffusers the run's own file (diffusers' advanced-script keys, for `load_textual_inversion`), which a full run's
  pipeline folder holds inside (`<out name>_emb.safetensors`, where generate and eval look for a run's).
- A textual-inversion run (`method=textual_inversion`) is its embedding file alone: kohya/comfyui write it at --out
  in A1111's and ComfyUI's keys (as above), diffusers copies the run's own file; single-file is refused (no weight
  changed: the checkpoint would be the base model).
- single-file: one checkpoint in the original LDM/SGM layout (`model.diffusion_model.`,
  `first_stage_model.`, `cond_stage_model.` / `conditioner.embedders.`), as A1111, ComfyUI and diffusers'
  `from_single_file` read it. A LoRA run is fused into its base model first. A FLUX run gives its transformer
  in BFL's original layout (`double_blocks.0.img_attn.qkv.weight`, ...), as flux1-dev.safetensors ships it
  (ComfyUI's Load Diffusion Model, Forge, `FluxTransformer2DModel.from_single_file`); SD3 runs (full or LoRA) are refused.
- LoKr/LoHa runs of FLUX and SD3 are refused for kohya/comfyui (LyCORIS's layout is written for SD/SDXL): diffusers
  works for both, single-file for FLUX.
- --out: a .safetensors file, except a full run as diffusers (a pipeline folder); the other shape is refused.
  A built-in model name in the run's config (tiny-sdxl, toy-flux, ...) is resolved to its folder to tell the family.

Everything is safetensors; every output is written under a temporary name and renamed into place.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch

from .kohya import pattern_value, adapter_configs, kohya_metadata, kohya_name, lora_to_kohya, modelspec, sgm_unet_pairs
from .export_cli import FORMATS, read_run  # noqa: F401 (read_run: importable from here)
from .ldm import ExportError, pipeline_to_checkpoint
from .lycoris_keys import delta_shapes, is_lycoris, lycoris_to_kohya
from ..core.builtin_models import PIPELINES
from ..core.run_folder import EMB_SUFFIX, LORA_FILE, MODEL_INDEX, atomic_file, make_readable
from ..methods import embeddings

log = logging.getLogger("nanobooth")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}  # export_cli.DTYPE_NAMES


# --- reading a run ---------------------------------------------------------------------------------------

def _json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def _folder_state(folder: Path) -> dict[str, torch.Tensor]:
    """One component's weights, sharded or not (SDXL's fp32 UNet is saved in shards)."""
    from safetensors.torch import load_file

    index = next(folder.glob("*.safetensors.index.json"), None)
    files = sorted({folder / f for f in _json(index)["weight_map"].values()}) if index else sorted(folder.glob("*.safetensors"))
    if not files:
        raise ExportError(f"'{folder}' holds no .safetensors weights (pickled .bin weights are not read); re-save it with safe_serialization=True")
    return {k: v for f in files for k, v in load_file(f).items()}


def _base_info(kind: str, run: Path, cfg: dict, shapes: dict[str, torch.Size]) -> dict:
    """What family a run belongs to (sd_v1 / sd_v2 / sdxl) and how it predicts, for the metadata other
    tools read and the text-encoder layout. From the run's or the base model's configs where they can be
    read offline, else from the adapter shapes (cross-attention width 768 / 1024 / 2048)."""
    model = str(cfg.get("model") or "")
    if kind != "full" and model in PIPELINES:  # a built-in name (tiny-sdxl, toy-flux, ...): its folder holds the configs
        from ..core.models import resolve_model

        model = resolve_model(model)
    folder = run if kind == "full" else Path(model).expanduser()
    if folder.is_file() and cfg.get("single_file_config"):
        folder = Path(cfg["single_file_config"]).expanduser()
    names = (MODEL_INDEX, "unet/config.json", "scheduler/scheduler_config.json", "text_encoder/config.json",
             "transformer/config.json")
    index, unet, sched, te, dit = (_json(folder / n) for n in names)
    if not index and kind == "lora" and model.count("/") == 1 and not folder.exists():
        from huggingface_hub import try_to_load_from_cache

        found = [try_to_load_from_cache(model, n, revision=cfg.get("revision")) for n in names]
        index, unet, sched, te, dit = (_json(Path(p)) if isinstance(p, str) else {} for p in found)
    # flow-matching transformers: by pipeline class, else (config not at hand) by the LoRA's module names
    family = {"FluxPipeline": "flux", "StableDiffusion3Pipeline": "sd3"}.get(index.get("_class_name"))
    if family is None and any(k.startswith("transformer.") for k in shapes):
        family = "flux" if any(".single_transformer_blocks." in k for k in shapes) else "sd3"
    if family:
        res = int(cfg.get("resolution") or 1024)
        # kohya's sai_model_spec architectures; FLUX.1-schnell is the one without the guidance embedding
        arch = ("flux-1-dev" if dit.get("guidance_embeds", True) else "flux-1-schnell") if family == "flux" else "stable-diffusion-3"
        return dict(family=family, sdxl=False, v2=False, vpred=False, resolution=res, arch=arch,
                    version="flux1" if family == "flux" else "sd3")
    width = unet.get("cross_attention_dim") or next((s[1] for k, s in shapes.items() if "attn2.to_k" in k and len(s) == 2), 768)
    sdxl = (index.get("_class_name") == "StableDiffusionXLPipeline" or "text_encoder_2" in index or width == 2048
            or any(k.startswith("text_encoder_2.") for k in shapes))
    # OpenCLIP (SD 2) uses gelu where OpenAI's CLIP (SD 1) uses quick_gelu
    v2 = not sdxl and (te["hidden_act"] == "gelu" if "hidden_act" in te else width == 1024)
    vpred = sched.get("prediction_type") == "v_prediction"
    res = int(cfg.get("resolution") or (unet.get("sample_size") or (128 if sdxl else 96 if v2 else 64)) * 8)
    arch = ("stable-diffusion-xl-v1-base" if sdxl else
            ("stable-diffusion-v2-768-v" if vpred else "stable-diffusion-v2-512") if v2 else "stable-diffusion-v1")
    # kohya's ss_base_model_version strings (library/model_util.py, sdxl_train_util.py)
    version = "sdxl_base_v1-0" if sdxl else ("sd_v2" if v2 else "sd_v1") + ("_v" if vpred else "")
    return dict(family="sdxl" if sdxl else "sd", sdxl=sdxl, v2=v2, vpred=vpred, resolution=res, arch=arch, version=version)


_FAMILY_NAMES = {"flux": "FLUX", "sd3": "SD3"}


def _lora_shapes(state: dict) -> dict:
    """A run's LoRA file as _base_info reads it: each module's weight shape (LoKr/LoHa: the delta's, for SD/SDXL's
    width guess); transformer runs (FLUX, SD3) are told apart by their key names alone."""
    if is_lycoris(state) and not any(k.startswith("transformer.") for k in state):
        return delta_shapes(state)
    return {k: v.shape for k, v in state.items()}


def _fused_components(run: Path, cfg: dict) -> tuple[dict, dict, list[dict]]:
    """A LoRA run merged into its base model (W + alpha/r * B A): the whole model a checkpoint must hold."""
    from ..inference.generate import load_run

    if not cfg.get("model"):
        raise ExportError(f"RUN_DIR '{run}' has no config.yaml naming its base model; a LoRA run needs it to export a checkpoint")
    pipe = load_run(str(cfg["model"]), str(run), allow_pickle=bool(cfg.get("allow_pickle")),
                    single_file_config=cfg.get("single_file_config"))
    from ..families import FAMILIES

    family = FAMILIES.get(type(pipe).__name__)
    if family is None or family.denoiser_name != "unet":  # transformers go through _flux_single_file
        raise ExportError(f"RUN_DIR '{run}': its base model {cfg['model']} is a {type(pipe).__name__}, not SD or SDXL; "
                          "single-file export of it is not written: use --format diffusers")
    names = [n for n in ("text_encoder", "text_encoder_2") if getattr(pipe, n, None) is not None]
    pipe.fuse_lora(components=[family.denoiser_name, *names], lora_scale=1.0)
    pipe.unload_lora_weights()  # after fuse_lora this keeps the merged weights and drops the adapters
    embeddings.unload(pipe)  # pivotal tuning: the base vocabulary; the new tokens go beside (<out>_emb.safetensors)
    return pipe.unet.state_dict(), pipe.vae.state_dict(), [getattr(pipe, n).state_dict() for n in names]


def _flux_single_file(run: Path, kind: str, cfg: dict, info: dict, out: Path, dtype: torch.dtype | None) -> None:
    """A FLUX transformer (a LoRA run fused into its base first) in BFL's layout, as flux1-dev.safetensors
    ships it: the transformer alone (ComfyUI's Load Diffusion Model, Forge, diffusers' from_single_file)."""
    from .flux_keys import transformer_to_bfl

    if info["family"] != "flux":
        raise ExportError(f"RUN_DIR '{run}' is an SD3 run: single-file export is written for SD/SDXL and FLUX only; "
                          "use --format diffusers")
    if kind == "full":
        state = _folder_state(run / "transformer")
    else:
        from ..inference.generate import load_run

        if not cfg.get("model"):
            raise ExportError(f"RUN_DIR '{run}' has no config.yaml naming its base model; a LoRA run needs it to export a checkpoint")
        pipe = load_run(str(cfg["model"]), str(run), allow_pickle=bool(cfg.get("allow_pickle")))
        if any(n.startswith("text_encoder") for n in _load(run / LORA_FILE)[0]):
            log.warning("the run's CLIP-L LoRA is not in the file: BFL's checkpoint holds the transformer only")
        pipe.fuse_lora(components=["transformer"], lora_scale=1.0)
        pipe.unload_lora_weights()
        state = pipe.transformer.state_dict()
    save_atomic(_cast(transformer_to_bfl(state), dtype), out, modelspec(info, out.stem, lora=False))


# --- writing --------------------------------------------------------------------------------------------------

FILE_SUFFIXES = (".safetensors", ".sft", ".ckpt", ".pt", ".pth", ".bin")  # what names a weights file, not a folder
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")


def _check_out(out: Path, overwrite: bool, folder: bool, fmt: str = "") -> None:
    what = f"--format {fmt}" if fmt else "this export"
    if folder and not out.exists() and out.suffix.lower() in FILE_SUFFIXES:
        # a full run as diffusers is a pipeline folder (model_index.json + one folder per part), never one file
        raise ExportError(f"--out '{out}': {what} of a full run writes a diffusers pipeline folder, not a {out.suffix} file; "
                          f"pass a folder path, e.g. {out.with_suffix('')}")
    # the kind first: --overwrite cannot turn a folder into a file, so it is not offered there
    if out.exists() and out.is_dir() != folder:
        raise ExportError(f"--out '{out}' is a {'folder' if out.is_dir() else 'file'}; this export writes a "
                          f"{'folder' if folder else 'file'}: pass " + ("a new folder name" if folder else
                                                                       f"a file name, e.g. {out / 'lora.safetensors'}"))
    if out.exists() and not overwrite:
        raise ExportError(f"--out '{out}' already exists; pass --overwrite to replace it")
    if not folder and out.suffix.lower() in PICKLE_SUFFIXES:
        raise ExportError(f"--out '{out}': {what} writes a .safetensors file (never a pickle); name it "
                          f"{out.with_name(out.name + '.safetensors').name}")
    if not folder and out.suffix != ".safetensors":
        raise ExportError(f"--out '{out}': {what} writes one .safetensors file; pass a file path ending in .safetensors, "
                          f"e.g. {out.with_name(out.name + '.safetensors')}")


def _load(path: Path, dtype: torch.dtype | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """Tensors (floats cast to dtype; 0-d tensors such as alphas kept exact) and metadata of one file."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    return _cast(tensors, dtype), meta


def _cast(tensors: dict, dtype: torch.dtype | None) -> dict:
    return {k: (v.to(dtype) if dtype is not None and v.is_floating_point() and v.ndim > 0 else v).contiguous()
            for k, v in tensors.items()}


def save_atomic(tensors: dict | None, out: Path, metadata: dict | None = None, copy_from: Path | None = None) -> None:
    """Temp file beside the target, then os.replace: a crash never leaves a half-written file at --out; the
    file gets the modes a plain open() gives (run_folder.atomic_file)."""
    from safetensors.torch import save_file

    with atomic_file(out) as tmp:
        shutil.copyfile(copy_from, tmp) if copy_from else save_file(tensors, tmp, metadata=metadata or None)


def _copy_pipeline(run: Path, out: Path, dtype: torch.dtype | None, emb: Path | None = None) -> None:
    """The pipeline folder alone (no logs, samples or checkpoints), built aside and renamed into place. `emb`, a
    pivotal run's new tokens, goes inside as `<out name>_emb.safetensors`, where nanobooth's loaders look for a run's
    (generate, eval and toy eval on the exported folder then rewrite the identifier as on the run)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        parts = [k for k, v in _json(run / MODEL_INDEX).items() if isinstance(v, list) and (run / k).is_dir()]
        shutil.copy2(run / MODEL_INDEX, tmp / MODEL_INDEX)
        for part in parts:
            shutil.copytree(run / part, tmp / part)
        if emb is not None:
            shutil.copy2(emb, tmp / (out.name + EMB_SUFFIX))
        for f in tmp.rglob("*.safetensors") if dtype is not None else []:
            tensors, meta = _load(f, dtype)
            save_atomic(tensors, f, meta)
        make_readable(tmp)  # mkdtemp made it 0700, and copies keep the run's file modes
        old = None
        if out.exists():  # only with --overwrite: move the old folder aside, put the new one in, then delete
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old.", dir=out.parent))
            os.replace(out, old / out.name)
        os.replace(tmp, out)
        if old:
            shutil.rmtree(old)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def export(run_dir, fmt: str, out, dtype: str | None = None, overwrite: bool = False) -> Path:
    """Export a finished run; returns the written path. Everything is checked before anything is written."""
    run, out = Path(run_dir), Path(out)
    if fmt not in FORMATS:
        raise ExportError(f"--format '{fmt}': choose one of {', '.join(FORMATS)}")
    kind, cfg = read_run(run)
    if kind == "textual_inversion":
        return _export_embedding(run, fmt, out, dtype, overwrite)
    if fmt in ("kohya", "comfyui") and kind != "lora":
        raise ExportError(f"RUN_DIR '{run_dir}' is a full fine-tune; kohya's format holds LoRA weights only: "
                          "use --format single-file (an A1111/ComfyUI checkpoint) or diffusers")
    inside = fmt == "diffusers" and kind == "full"  # --out is a pipeline folder, and the new tokens go inside it
    _check_out(out, overwrite, folder=inside, fmt=fmt)
    # pivotal tuning: the new tokens go beside the LoRA or the checkpoint, inside a pipeline folder (newcomer56: beside
    # the folder, generate --weights FOLDER lost them)
    emb = embeddings.find(run)
    emb_out = out / (out.name + EMB_SUFFIX) if inside else out.with_name(out.stem + EMB_SUFFIX)
    if emb is not None and not inside:
        _check_out(emb_out, overwrite, folder=False)
    torch_dtype = DTYPES[dtype] if dtype else None
    if fmt == "diffusers":
        if inside:
            _copy_pipeline(run, out, torch_dtype, emb)
        elif torch_dtype is None:
            save_atomic(None, out, copy_from=run / LORA_FILE)  # byte for byte
        else:
            tensors, meta = _load(run / LORA_FILE, torch_dtype)  # metadata kept: it carries the adapter config
            save_atomic(tensors, out, meta)
    elif fmt in ("kohya", "comfyui"):
        state, meta = _load(run / LORA_FILE)
        configs = adapter_configs(meta, cfg)
        lycoris = is_lycoris(state)  # a LoKr/LoHa run
        info = _base_info(kind, run, cfg, _lora_shapes(state))
        if lycoris and info["family"] in ("sd3", "flux"):
            algo = {"LOKR": "LoKr", "LOHA": "LoHa"}.get(configs.get("transformer", {}).get("peft_type"), "LoKr/LoHa")
            works = "--format diffusers or single-file" if info["family"] == "flux" else "--format diffusers"
            raise ExportError(f"--format {fmt}: RUN_DIR '{run_dir}' is a {_FAMILY_NAMES[info['family']]} {algo} run, and LyCORIS's "
                              f"{fmt} layout is written for SD and SDXL runs only; use {works}")
        if info["family"] == "sd3":
            if fmt == "kohya":
                raise ExportError(f"RUN_DIR '{run_dir}' is an SD3 LoRA: kohya's SD3 layout is not written (diffusers cannot load it); "
                                  "use --format comfyui (diffusers' names, which ComfyUI, Forge and diffusers load for SD3)")
            # ComfyUI maps SD3 LoRAs by their diffusers names (`transformer.transformer_blocks...`): the run's file
            return export(run_dir, "diffusers", out, dtype, overwrite)
        if info["family"] == "flux":
            from .flux_keys import flux_run_to_kohya

            tensors = flux_run_to_kohya(state, configs)
        else:
            pairs = sgm_unet_pairs(cfg["model"]) if info["sdxl"] else None
            if info["sdxl"] and pairs is None:
                log.warning("base model %s's UNet config is not available offline: SDXL UNet LoRA keys keep diffusers names", cfg["model"])
            if lycoris:
                tensors = lycoris_to_kohya(state, configs, lambda comp, module: kohya_name(comp, module, info["sdxl"], pairs),
                                           pattern_value)
            else:
                tensors = lora_to_kohya(state, configs, sdxl=info["sdxl"], unet_pairs=pairs)
        tensors = _cast(tensors, torch_dtype)
        save_atomic(tensors, out, kohya_metadata(tensors, cfg, info, configs, out.stem))
    elif (info := _base_info(kind, run, cfg, _lora_shapes(_load(run / LORA_FILE)[0]) if kind == "lora" else {})).get("family") in ("flux", "sd3"):
        _flux_single_file(run, kind, cfg, info, out, torch_dtype)
    else:
        from tqdm.auto import tqdm

        # the three phases of a multi-GB checkpoint (a minute or more for SD-sized models)
        bar = tqdm(total=3, desc="export: load" + (" and fuse" if kind == "lora" else ""), unit="phase")
        if kind == "full":
            names = [n for n in ("text_encoder", "text_encoder_2") if n in _json(run / MODEL_INDEX)]
            unet, vae, tes = _folder_state(run / "unet"), _folder_state(run / "vae"), [_folder_state(run / n) for n in names]
        else:
            unet, vae, tes = _fused_components(run, cfg)
        bar.set_description("export: convert")
        bar.update()
        ckpt = pipeline_to_checkpoint(unet, vae, tes, sdxl=len(tes) == 2, openclip=info["v2"])
        bar.set_description(f"export: write {out.name}")
        bar.update()
        save_atomic(_cast(ckpt, torch_dtype), out, modelspec(info, out.stem, lora=False))
        bar.update()
        bar.close()
    if emb is not None:
        identifier, tokens = next(iter(embeddings.read(emb)[1].items()), ("the identifier", "its tokens"))
        if fmt == "diffusers":  # the run's own file (clip_l/clip_g, diffusers' advanced-script keys)
            if not inside:
                save_atomic(None, emb_out, copy_from=emb)
            log.warning("the run's new tokens are in %s%s; in diffusers, pipe.load_textual_inversion(its clip_l tensor "
                        "(SDXL: clip_g too, into text_encoder_2), token=%s) and write '%s' where the run's prompts say '%s'",
                        emb_out, " (nanobooth generate --weights on the folder loads them)" if inside else "",
                        re.findall(r"<s\d+>", tokens), tokens, identifier)
        else:  # A1111's and ComfyUI's keys
            save_atomic(embeddings.webui_tensors(emb), emb_out)
            log.warning("the run's new tokens are in %s: put it in A1111's embeddings/ (or ComfyUI's models/embeddings/) and "
                        "write '%s' (ComfyUI: 'embedding:%s') where the run's prompts say '%s'", emb_out, emb_out.stem,
                        emb_out.stem, identifier)
    return out


def _export_embedding(run: Path, fmt: str, out: Path, dtype: str | None, overwrite: bool) -> Path:
    """A textual-inversion run: its embedding file is the whole result. kohya/comfyui: A1111's and ComfyUI's
    keys (embeddings.webui_tensors: `emb_params`, or SDXL's `clip_l` + `clip_g`, as kohya's TI scripts write
    them); diffusers: the run's own file (load_textual_inversion). single-file is refused: no weight changed."""
    if fmt == "single-file":
        raise ExportError(f"RUN_DIR '{run}' is a textual-inversion run: it changes no model weight, so a checkpoint would be the "
                          "base model unchanged; use --format kohya or comfyui (the A1111/ComfyUI embedding) or diffusers")
    emb = embeddings.find(run)
    _check_out(out, overwrite, folder=False, fmt=fmt)
    torch_dtype = DTYPES[dtype] if dtype else None
    if fmt == "diffusers" and torch_dtype is None:
        save_atomic(None, out, copy_from=emb)  # byte for byte, its token metadata kept
    elif fmt == "diffusers":
        tensors, meta = _load(emb, torch_dtype)
        save_atomic(tensors, out, meta)
    else:
        save_atomic(_cast(embeddings.webui_tensors(emb), torch_dtype), out)
        log.warning("put %s in A1111's embeddings/ (or ComfyUI's models/embeddings/) and write '%s' (ComfyUI: 'embedding:%s') "
                    "where the run's prompts say '%s'", out, out.stem, out.stem, next(iter(embeddings.read(emb)[1]), "the identifier"))
    return out


# --- command line -------------------------------------------------------------------------------------------
