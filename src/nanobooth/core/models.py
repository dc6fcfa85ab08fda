"""Load Stable Diffusion components the way users address them, and put adapters/ToMe on them.

`model` may be a hub id, a local diffusers folder, a single-file checkpoint or a built-in name (builtin_models). Pickle
checkpoints (.ckpt/.bin/.pt) can execute code when loaded, so they are refused unless allow_pickle.
"""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import ConfigError, ModelError  # noqa: F401 (defined torch-free: the run folder's checks raise it before torch loads)

log = logging.getLogger("nanobooth")

SINGLE_FILE_EXTS = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
PICKLE_EXTS = (".ckpt", ".pt", ".pth", ".bin")


@dataclass
class Components:
    family: object  # nanobooth.families.SD / SDXL: how to tokenize, encode, build pipelines, save LoRA
    components: dict  # the pipeline's modules by name, for rebuilding pipelines around trained ones
    tokenizers: list
    text_encoders: list
    vae: torch.nn.Module
    unet: torch.nn.Module
    noise_scheduler: object  # what training adds noise with: the family's training_scheduler (DDPM for SD/SDXL)
    scheduler: object  # the model's own inference sampler
    source: str

    @property
    def tokenizer(self):
        return self.tokenizers[0]

    @property
    def text_encoder(self):
        return self.text_encoders[0]


def cache_dir() -> Path:
    return Path(os.environ.get("NANOBOOTH_CACHE", Path.home() / ".cache" / "nanobooth"))


_WARNED: set[str] = set()


def resolve_model(model: str) -> str:
    """Map the built-in names (builtin_models) to folders; everything else is passed through."""
    from . import builtin_models
    from .. import tiny

    if builtin_models.is_toy(model):
        folder = builtin_models.shipped_folder(model)
        if folder is not None:
            return str(folder)
        fallback = builtin_models.TOY_FALLBACK[model]
        if model not in _WARNED:  # once a process: a demo or an eval resolves the name several times
            _WARNED.add(model)
            log.warning("model=%s: this build does not ship its pretrained weights; using model=%s (random weights: its "
                        "pictures are noise, and toy eval scores of them measure nothing)", model, fallback)
        model = fallback
    builders = {"tiny": ("tiny-v1", tiny.build_tiny_pipeline), "tiny-sdxl": ("tiny-sdxl-v1", tiny.build_tiny_sdxl_pipeline),
                "tiny-sd3": ("tiny-sd3-v1", tiny.build_tiny_sd3_pipeline), "tiny-flux": ("tiny-flux-v1", tiny.build_tiny_flux_pipeline)}
    if model in builders:
        name, build = builders[model]
        path = cache_dir() / name
        if not (path / "model_index.json").is_file():
            # the builders seed torch's RNG: without the fork, a run that builds the model first (after its set_seed) drew
            # other LoRA inits and noise than every later run of the same command (newcomer55)
            with torch.random.fork_rng(devices=[]):
                build(path)
        return str(path)
    return model


def _check_path(model: str, allow_pickle: bool) -> str:
    """Classify `model`: 'folder', 'file' or 'hub'; refuse what cannot or must not be loaded."""
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "model_index.json").is_file() and not (path / "unet" / "config.json").is_file():
            raise ModelError(f"model '{model}': folder is not a diffusers pipeline (no model_index.json); pass a diffusers folder, a .safetensors checkpoint or a hub id")
        return "folder"
    if path.is_file():
        if path.suffix.lower() in PICKLE_EXTS and not allow_pickle:
            raise ModelError(f"model '{model}': {path.suffix} files are pickles that can run code when loaded; convert it to .safetensors or pass allow_pickle=true if you trust it")
        if path.suffix.lower() not in SINGLE_FILE_EXTS:
            raise ModelError(f"model '{model}': not a checkpoint file (expected .safetensors); pass a diffusers folder, a .safetensors checkpoint or a hub id")
        return "file"
    if model.startswith((".", "/", "~")) or model.endswith(SINGLE_FILE_EXTS) or model.count("/") != 1:
        import difflib

        from .builtin_models import PIPELINES

        near = difflib.get_close_matches(model, list(PIPELINES), n=1)
        hint = f"did you mean '{near[0]}'? " if near else ""
        raise ModelError(f"model '{model}': no such file or folder, and not a hub id (owner/name); {hint}built-in "
                         f"names: {', '.join(PIPELINES)}")
    return "hub"


def _one_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def pipeline_class_name(model: str, kind: str, revision: str | None, single_file_config: str | None,
                        files_only: bool = False) -> str:
    """Which pipeline a model is, without loading its weights (files_only: from the hub cache alone)."""
    import json

    if kind == "folder":
        index = Path(model).expanduser() / "model_index.json"
        return json.loads(index.read_text())["_class_name"] if index.is_file() else "StableDiffusionPipeline"
    if kind == "hub":
        from diffusers import DiffusionPipeline

        return DiffusionPipeline.load_config(model, revision=revision, local_files_only=files_only)["_class_name"]
    if single_file_config:
        return pipeline_class_name(single_file_config, _check_path(single_file_config, False), None, None)
    from safetensors import safe_open

    if Path(model).suffix.lower() == ".safetensors":
        with safe_open(model, "pt") as f:
            if any(k.startswith("conditioner.embedders.1") for k in f.keys()):
                return "StableDiffusionXLPipeline"
            if any(k.startswith("model.diffusion_model.joint_blocks.") for k in f.keys()):
                return "StableDiffusion3Pipeline"
            if any(k.startswith(("double_blocks.", "model.diffusion_model.double_blocks.")) for k in f.keys()):
                return "FluxPipeline"
    return "StableDiffusionPipeline"


def hub_reachable(timeout: float = 3.0) -> bool:
    """One TCP connection to the hub's endpoint (HF_ENDPOINT, default huggingface.co:443). True behind a proxy
    (HTTPS_PROXY/ALL_PROXY set): the proxy decides, so the hub client tries."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout=timeout).close()
        return True
    except OSError:
        return False


def hub_files_only(repo: str, revision: str | None, index: str = "model_index.json", what: str = "model",
                   local: str = "diffusers folder or .safetensors file") -> bool:
    """Whether a hub repo loads from the hub cache alone (local_files_only): HF_HUB_OFFLINE=1, or the hub cannot be
    reached and the repo's `index` file is cached. Uncached and unreachable raises a ModelError naming `what` and the
    hub: the hub client would retry for about 30 s and then report `index` missing, which reads as a wrong id."""
    from huggingface_hub import constants, try_to_load_from_cache

    if constants.HF_HUB_OFFLINE:
        return True
    if hub_reachable():
        return False
    if not isinstance(try_to_load_from_cache(repo, index, revision=revision), str):
        raise ModelError((f"{what} " if what else "") + f"'{repo}': {constants.ENDPOINT} cannot be reached (no network?) and it is not in the "
                         f"hub cache; load it once on a machine that is online (it is cached then), or pass a local {local}")
    log.info("%s cannot be reached: %s %s loads from the hub cache", constants.ENDPOINT, what, repo)
    return True


def load_pipeline(model: str, revision: str | None = None, single_file_config: str | None = None,
                  allow_pickle: bool = False, torch_dtype: torch.dtype | None = None):
    """An SD or SDXL pipeline without safety checker, from any way a user names a model."""
    from ..families import family_for
    from .threads import apply_held_threads

    model = resolve_model(model)
    kind = _check_path(model, allow_pickle)
    apply_held_threads()  # the inputs checked so far were good: now torch's threads (generate, eval, export, toy eval)
    files_only = kind == "hub" and hub_files_only(model, revision)
    if single_file_config:  # a built-in name ("toy") describes a checkpoint as well as a folder does
        single_file_config = resolve_model(single_file_config)
    if kind == "file":
        _warn_unbound_identifier(Path(model))
    try:
        name = pipeline_class_name(model, kind, revision, single_file_config, files_only)
        try:
            fam = family_for(name)
        except ValueError:
            raise ModelError(f"model '{model}' is a {name}; nanobooth trains StableDiffusionPipeline (SD 1.x/2.x), StableDiffusionXLPipeline (SDXL), "
                             "StableDiffusion3Pipeline (SD3) and FluxPipeline (FLUX.1)") from None
        cls = fam.pipeline_class_obj()
        common = {k: v for k, v in fam.pipeline_kwargs.items() if k != "feature_extractor"}
        # fp32 unless asked: weights saved in fp16 (the toy model, many hub "fp16" folders) would otherwise
        # load as fp16, which CPUs run slowly or not at all and training must not use as master weights
        common["dtype"] = torch_dtype or torch.float32
        with no_loading_bars(kind != "hub"):
            if kind == "file":
                kwargs = dict(config=single_file_config) if single_file_config else {}
                pipe = cls.from_single_file(model, **kwargs, **common)
            else:
                pipe = cls.from_pretrained(model, revision=revision, local_files_only=files_only, **common)
    except ModelError:
        raise
    except Exception as e:  # diffusers/hub raise many types; the user needs one line, not a traceback
        hint = ("name a diffusers folder, hub id or built-in model describing the checkpoint: --single-file-config "
                "(generate, eval) or the config key single_file_config (train)" if kind == "file"
                else "check the id, or run once online to cache it (HF_HUB_OFFLINE=1 only reads the cache)" if kind == "hub"
                else "check the folder is a complete diffusers pipeline")
        raise ModelError(f"model '{model}': could not load ({_one_line(e)}); {hint}") from e
    for tok_name, te_name in zip(fam.tokenizer_names, fam.text_encoder_names):
        tok, te = getattr(pipe, tok_name), getattr(pipe, te_name)
        if getattr(tok, "model_max_length", 77) > 10_000:
            # tokenizers saved without model_max_length make pipelines pad to 1e30 tokens
            tok.model_max_length = te.config.max_position_embeddings
    pipe.nanobooth_family = fam
    return pipe


@contextmanager
def no_loading_bars(quiet: bool):
    """diffusers' and transformers' per-component loading bars off while `quiet` (a local model, or a run's adapters,
    loads in a second: their bars, nested, left half-drawn lines such as "Loading weights: 0/68" in the demo's output;
    newcomer55), then back as they were. A hub model keeps them: its first load downloads gigabytes."""
    if not quiet:
        yield
        return
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    was = dlog.is_progress_bar_enabled(), tlog.is_progress_bar_enabled()
    dlog.disable_progress_bar()
    tlog.disable_progress_bar()
    try:
        yield
    finally:
        if was[0]:
            dlog.enable_progress_bar()
        if was[1]:
            tlog.enable_progress_bar()


def _warn_unbound_identifier(checkpoint: Path) -> None:
    """A single-file checkpoint exported from a pivotal-tuning run has its identifier's new tokens beside it
    (`<stem>_emb.safetensors`, interop/export.py): loaded alone, the identifier means nothing, so say so."""
    from .run_folder import EMB_SUFFIX

    emb = checkpoint.with_name(checkpoint.stem + EMB_SUFFIX)
    if emb.is_file():
        log.warning("%s: its identifier's embeddings are in %s, which a single-file checkpoint cannot hold; loaded "
                    "alone the identifier is an unknown word. Render the run itself (--model BASE --weights RUN_DIR), "
                    "or in A1111/ComfyUI load %s as an embedding and write '%s' where the prompts said the identifier",
                    checkpoint, emb.name, emb.name, emb.stem)


def load_components(model: str, revision: str | None = None, single_file_config: str | None = None,
                    allow_pickle: bool = False) -> Components:
    pipe = load_pipeline(model, revision, single_file_config, allow_pickle)
    fam = pipe.nanobooth_family
    return Components(
        family=fam,
        components=dict(pipe.components),
        tokenizers=[getattr(pipe, n) for n in fam.tokenizer_names],
        text_encoders=[getattr(pipe, n) for n in fam.text_encoder_names],
        vae=pipe.vae,
        unet=getattr(pipe, fam.denoiser_name),  # the denoiser, UNet or transformer: the loop calls it `unet`
        noise_scheduler=fam.training_scheduler(pipe.scheduler.config),
        scheduler=pipe.scheduler,
        source=model,
    )


def make_pipeline(c: Components, unet=None, text_encoders=None):
    """A pipeline that shares the given (possibly training) modules: no copies, no reload."""
    return c.family.make_pipeline(c.components, unet or c.unet, text_encoders or c.text_encoders)


def lora_config(rank: int, alpha: float, targets: list[str], dropout: float, layers: list[int] | None = None, use_dora: bool = False):
    """layers: only these indices of the model's `layers` stack get adapters (None: every match of targets).
    use_dora: peft's DoRA (a trained magnitude per output row on top of the low-rank direction update)."""
    from peft import LoraConfig

    where = dict(layers_to_transform=list(layers), layers_pattern="layers") if layers is not None else {}
    return LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, init_lora_weights="gaussian", target_modules=list(targets),
                      use_dora=use_dora, **where)


def check_targets(model, targets: list[str], key: str, what: str) -> None:
    """Raise ConfigError naming `key` for the first entry of `targets` that matches no module of `model` the way peft
    matches a list of target modules: a module's full name, or its ending after a dot (`to_q`,
    `down_blocks.0.resnets.0.conv1`); with the nearest name that would match."""
    import difflib

    names = [n for n, _ in model.named_modules() if n]
    for target in targets:
        if not any(n == target or n.endswith("." + target) for n in names):
            depth = target.count(".") + 1
            endings = sorted({".".join(n.split(".")[-depth:]) for n in names if n.count(".") + 1 >= depth})
            near = difflib.get_close_matches(target, endings, n=1)
            hint = f"did you mean '{near[0]}'?" if near else f"name a module of the {what} (its full name or its last parts)"
            raise ConfigError(f"config key '{key}': '{target}' matches no module of the {what}; {hint}")


def train_layers_read(text_encoder, layers: list[int]) -> None:
    """A fully trained CLIP text encoder: only the encoder layers in `layers` (and the embeddings) train.
    Layers past the last one read, and the final layer norm behind them, get no gradient: as trainable
    parameters they would only cost optimizer memory and break DDP's check that every parameter is used."""
    text_encoder.requires_grad_(True)
    body = getattr(text_encoder, "text_model", text_encoder)  # transformers 5 dropped the text_model level
    stack = body.encoder.layers
    unread = [i for i in range(len(stack)) if i not in set(layers)]
    for i in unread:
        stack[i].requires_grad_(False)
    if unread:
        body.final_layer_norm.requires_grad_(False)


def apply_tome(unet, ratio: float, max_downsample: int = 1) -> None:
    """Token merging on the UNet's transformer blocks (tomesd); ratio 0 removes it.

    max_downsample: the deepest level that merges. 1 (SD) merges only at the highest resolution, where
    the attention cost is; deeper levels have few tokens and merging there costs quality for no speed.
    SDXL has no attention at its first level, so its family asks for 2."""
    import tomesd

    tomesd.remove_patch(unet)
    if ratio > 0:
        tomesd.apply_patch(unet, ratio=ratio, max_downsample=max_downsample)


def tome_active(unet) -> bool:
    return getattr(unet, "_tome_info", None) is not None and any(
        type(m).__name__.startswith("ToMe") for m in unet.modules()
    )
