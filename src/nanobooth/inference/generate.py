"""Render images from a base model plus a nanobooth run (full pipeline folder, LoRA weights or token embeddings)."""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path
from typing import Sequence

import torch
from PIL import Image, ImageDraw, ImageFont

from ..methods import METHODS
from ..methods.lora import AdapterMismatch
from ..methods.lycoris import method_of_lora_file
from ..methods import embeddings
from ..core.config_values import SAMPLERS
from ..core.models import ModelError, apply_tome, load_pipeline, no_loading_bars
from ..families import sampling_kwargs
from ..core.run_folder import LORA_FILE, load_run_config, result_kind
from .weights_check import check_weights

log = logging.getLogger("nanobooth")


def load_run(model: str, weights: str | None = None, allow_pickle: bool = False, single_file_config: str | None = None,
             torch_dtype: torch.dtype | None = None):
    """Base model plus the run's result: a full run is a pipeline folder itself; a LoRA run is loaded onto the base,
    a textual-inversion run's embeddings into the base's tokenizers and text encoders (load_textual_inversion)."""
    if weights is None:
        return load_pipeline(model, single_file_config=single_file_config, allow_pickle=allow_pickle, torch_dtype=torch_dtype)
    check_weights(weights)  # a file, an export folder, a folder of something else: refused before the base loads
    run = Path(weights)
    kind = result_kind(run)  # the result's layout ('lora' file or 'full' pipeline) names the method that reads it
    if kind == "lora":  # a LoKr/LoHa file is a LORA_FILE too; its adapter config names its peft type
        kind = method_of_lora_file(run / LORA_FILE)
    loaded = []  # set once the base is in: a shape error after that is the run not fitting this base

    def base():
        pipe = load_pipeline(model, single_file_config=single_file_config, allow_pickle=allow_pickle,
                             torch_dtype=torch_dtype)
        loaded.append(True)
        return pipe

    # diffusers logs a failed LoRA load's whole state-dict error before raising it; the raise is what we report
    peft_log = logging.getLogger("diffusers.loaders.peft")
    level = peft_log.level
    peft_log.setLevel(logging.CRITICAL)
    held = _HeldLibraryOutput()  # peft's and transformers' key lists of a run that does not fit: the one line says it
    try:
        with no_loading_bars(True), held:  # the run's files are local: the adapters' loading bars are noise (newcomer55)
            pipe = METHODS[kind]().load_for_inference(run, base, torch_dtype)
    except AdapterMismatch as e:  # a run of another model family: its adapter attached to nothing, or to part
        held.drop()
        raise ModelError(f"--weights '{weights}' does not fit --model '{model}' ({e.detail}){_trained_on(run)}") from None
    except (RuntimeError, ValueError) as e:  # peft: "size mismatch ..."; load_textual_inversion: "incorrect shape"
        if not loaded or not any(m in str(e) for m in ("size mismatch", "incorrect shape")):
            raise
        held.drop()
        raise ModelError(f"--weights '{weights}' does not fit --model '{model}' (its tensors' shapes differ from the "
                         f"model's){_trained_on(run)}") from None
    finally:
        peft_log.setLevel(level)
        held.replay()
    return pipe


class _HeldLibraryOutput:
    """Python warnings and diffusers'/transformers' log records raised inside, held back: `replay()` emits them as
    they would have been (the load went through, or failed otherwise), unless `drop()` came first (load_run's one
    line replaces peft's "inconsistency ... state_dict contained these additional target modules: [...]" and
    transformers' MISSING-key report for a run that does not fit the model)."""

    LIBRARIES = ("diffusers", "transformers")

    def __enter__(self):
        self.records: list[logging.LogRecord] = []
        self._warnings = warnings.catch_warnings(record=True)
        self.warned = self._warnings.__enter__()
        self._saved = []
        for name in self.LIBRARIES:
            lib = logging.getLogger(name)
            self._saved.append((lib, lib.handlers[:], lib.propagate))
            handler = logging.Handler()
            handler.emit = self.records.append
            lib.handlers[:] = [handler]
            lib.propagate = False
        return self

    def __exit__(self, *exc):
        for lib, handlers, propagate in self._saved:
            lib.handlers[:] = handlers
            lib.propagate = propagate
        self._warnings.__exit__(*exc)
        return False

    def drop(self) -> None:
        self.records.clear()
        self.warned.clear()

    def replay(self) -> None:
        for w in self.warned:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno, source=w.source)
        for record in self.records:
            logging.getLogger(record.name).handle(record)
        self.drop()


def _trained_on(run: Path) -> str:
    """'; pass ... the model it trained on' from the run's config.yaml, '' when that is unreadable."""
    try:
        cfg = load_run_config(run)
    except ValueError:
        cfg = None
    if cfg is None:
        return "; pass the base model the run was trained on"
    return f"; pass the base model the run was trained on: --model {cfg.model} (its config.yaml)"


# Classifier-free guidance doubles these along the batch (unconditional half first); after the cutoff only
# the conditional half is kept. SDXL adds the pooled text embeddings and the size/crop ids, SD3 its pooled ones.
_CFG_DOUBLED = ("prompt_embeds", "add_text_embeds", "add_time_ids", "pooled_prompt_embeds")


def _cfg_cutoff(steps: int, fraction: float):
    """A callback_on_step_end that turns guidance off after `fraction` of the sampler's steps.

    diffusers' SDCFGCutoffCallback keeps `prompt_embeds[-1:]`, one image's embeddings, so a batch of more
    than one image fails in the UNet with a shape error (diffusers 0.42); this keeps the whole conditional half.
    """
    cut = max(1, round(fraction * steps))

    def callback(pipe, step_index, timestep, kwargs):
        if step_index + 1 == cut:
            pipe._guidance_scale = 1.0  # > 1 is what switches guidance on in the SD/SDXL pipelines
            for name in _CFG_DOUBLED:
                if name in kwargs:
                    kwargs[name] = kwargs[name].chunk(2)[1]
        return kwargs

    return callback



def _flow_matching(pipe) -> bool:
    return "FlowMatch" in type(pipe.scheduler).__name__


def resolve_sampler(pipe, sampler: str) -> str:
    """The sampler `with_sampler` uses for `pipe`: "auto" is "dpm++" for a DDPM model (SD, SDXL, the toy UNet) and
    "model" for a flow-matching one (FLUX, SD3), whose Euler sampler is its own; "model" and "dpm++" stay as they
    are. Raises ValueError for another name."""
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler {sampler!r}: use one of {', '.join(SAMPLERS)}")
    if sampler == "auto":
        return "model" if _flow_matching(pipe) else "dpm++"
    return sampler


def with_sampler(pipe, sampler: str = "model"):
    """`pipe` sampling with `sampler`: "model" returns the pipeline itself (its own scheduler); "dpm++" a copy
    sharing its modules, with DPM-Solver++ 2M (diffusers' DPMSolverMultistepScheduler; Lu et al. 2022,
    arXiv:2211.01095) built from its scheduler's config, so the caller's pipeline keeps its sampler; "auto" the
    one `resolve_sampler` picks. On the toy model 10-15 DPM++ steps score like 25 DDIM steps (docs/evaluation.md).
    Raises ModelError for "dpm++" on a flow-matching pipeline (FLUX, SD3: their Euler sampler is the model's own)
    and ValueError for another name."""
    sampler = resolve_sampler(pipe, sampler)
    if sampler == "model":
        return pipe
    if _flow_matching(pipe):
        raise ModelError(f"sampler dpm++: {type(pipe).__name__} samples by flow matching ({type(pipe.scheduler).__name__}), "
                         "which DPM-Solver++ for DDPM models does not; use --sampler model (its own Euler sampler)")
    from diffusers import DPMSolverMultistepScheduler

    copy = type(pipe)(**{**pipe.components, "scheduler": DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)})
    if hasattr(pipe, embeddings.TOKEN_MAP):  # a textual-inversion or pivotal run's identifier -> new tokens: without it
        setattr(copy, embeddings.TOKEN_MAP, getattr(pipe, embeddings.TOKEN_MAP))  # "sks" would render untrained
    return copy


def render(pipe, prompts: list[str], num_images: int = 1, seed: int = 0, steps: int = 25, guidance: float = 7.5,
           resolution: int | None = None, batch_size: int = 8, guidance_cutoff: float = 1.0) -> list[list[Image.Image]]:
    """images[i][j]: prompt i, image j, from its own generator seeded `seed + 1000*i + j`.

    Own generators mean the result depends only on (prompt index, image index, seed), never on batch
    size or on whatever else used the global RNG, and rendering never advances the global RNG.
    `guidance_cutoff` < 1 guides only that fraction of the steps (layout and scene are settled early) and
    samples the rest from the conditional prediction alone, so late steps do not extrapolate fine
    detail such as colours (see docs/evaluation.md, toy model limits).
    """
    if not 0.0 < guidance_cutoff <= 1.0:
        raise ValueError(f"guidance_cutoff={guidance_cutoff}: pass a fraction of the sampling steps in (0, 1]")
    extra = {}
    if guidance_cutoff < 1.0 and "true_cfg_scale" in sampling_kwargs(pipe, 1, guidance):
        # FluxPipeline decides on its second (unconditional) pass once, before the first step
        raise ValueError(f"guidance_cutoff={guidance_cutoff}: a {type(pipe).__name__} without a guidance embedding guides "
                         "every step or none; pass guidance_cutoff=1")
    if guidance_cutoff < 1.0 and guidance > 1.0:
        names = [n for n in _CFG_DOUBLED if n in getattr(pipe, "_callback_tensor_inputs", ())]
        extra = dict(callback_on_step_end=_cfg_cutoff(steps, guidance_cutoff), callback_on_step_end_tensor_inputs=names)
    # a pivotal-tuning run's identifier becomes its new tokens (methods/embeddings.py; set by load_for_inference)
    prompts = [embeddings.rewrite(p, getattr(pipe, embeddings.TOKEN_MAP, None)) for p in prompts]
    jobs = [(i, j) for i in range(len(prompts)) for j in range(num_images)]
    out: list[list[Image.Image]] = [[None] * num_images for _ in prompts]
    denoiser = pipe.unet if hasattr(pipe, "unet") else pipe.transformer  # SD3/FLUX pipelines hold a transformer
    # FLUX's transformer has no sample_size: its VAE's (1024 for FLUX.1, 64 for the toy twin) then
    sample_size = getattr(denoiser.config, "sample_size", None)
    size = resolution or (sample_size * pipe.vae_scale_factor if sample_size else pipe.vae.config.sample_size)
    for start in range(0, len(jobs), batch_size):
        chunk = jobs[start : start + batch_size]
        gens = [torch.Generator(pipe.device).manual_seed(seed + 1000 * i + j) for i, j in chunk]
        with torch.no_grad():
            images = pipe([prompts[i] for i, _ in chunk], num_inference_steps=steps, guidance_scale=guidance,
                          generator=gens, height=size, width=size, **extra, **sampling_kwargs(pipe, len(chunk), guidance)).images
        for (i, j), img in zip(chunk, images):
            out[i][j] = img
    return out


def label_font():
    """Pillow >= 10.1's load_default() is a 10 px FreeType font whose space is 2 px wide, so a label such as
    "a photo of a sks star" reads as one word; its bitmap font (the default before) has 6 px spaces."""
    return getattr(ImageFont, "load_default_imagefont", ImageFont.load_default)()


def wrap_label(text: str, font, width: int) -> list[str]:
    """`text` as lines no wider than `width` pixels in `font`, broken at spaces (a word longer than a line, such as a
    run's name, is cut into pieces that fit); words stay separated by single spaces."""
    lines, line = [], ""
    words = []
    for word in text.split():
        while font.getlength(word) > width and len(word) > 1:
            cut = max(k for k in range(1, len(word)) if k == 1 or font.getlength(word[:k]) <= width)
            words.append(word[:cut])
            word = word[cut:]
        words.append(word)
    for word in words:
        joined = f"{line} {word}" if line else word
        if line and font.getlength(joined) > width:
            lines.append(line)
            line = word
        else:
            line = joined
    return lines + [line] if line or not lines else lines


def grid(rows: list[list[Image.Image]], labels: list[str], title: str | None = None) -> Image.Image:
    """One row per prompt, its label (wrapped to the grid's width) above the row, the title (wrapped too) on top;
    readable even for 64x64 images."""
    cell = max(rows[0][0].size[0], 128)
    font = label_font()
    line_h = 12
    ncol = max(len(r) for r in rows)
    width = max(ncol * cell, 256)
    wrapped = [wrap_label(label, font, width - 8) for label in labels]
    title_lines = wrap_label(title, font, width - 8) if title else []
    title_h = 4 + line_h * len(title_lines) if title else 0
    height = title_h + sum(cell + 2 + line_h * len(lines) for lines in wrapped)
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    for k, line in enumerate(title_lines):
        draw.text((4, 2 + k * line_h), line, fill="black", font=font)
    y = title_h
    for row, lines in zip(rows, wrapped):
        for k, line in enumerate(lines):
            draw.text((4, y + 1 + k * line_h), line, fill="black", font=font)
        y += 2 + line_h * len(lines)
        for c, img in enumerate(row):
            canvas.paste(img.resize((cell, cell), Image.Resampling.NEAREST), (c * cell, y))
        y += cell
    return canvas


def save_png(img: Image.Image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name("." + path.name + ".tmp")
    img.save(tmp, format="PNG")
    os.replace(tmp, path)


# generate's own sampling defaults, for flags left unset and a base model without a run
SAMPLING_DEFAULTS = {"steps": 30, "guidance": 7.5, "guidance_cutoff": 1.0, "resolution": None, "sampler": "model"}


def sampling_settings(weights: str | Path | None = None, **flags) -> dict[str, object]:
    """steps, guidance, guidance_cutoff, resolution, sampler: a value given in `flags` (not None) wins; else the
    run's own settings (its config.yaml's validation_inference_steps, validation_guidance_scale,
    validation_guidance_cutoff, resolution and validation_sampler: what its sample grids used); else
    SAMPLING_DEFAULTS."""
    cfg = load_run_config(weights) if weights else None
    run = {} if cfg is None else {"steps": cfg.validation_inference_steps, "guidance": cfg.validation_guidance_scale,
                                  "guidance_cutoff": cfg.validation_guidance_cutoff, "resolution": cfg.resolution,
                                  "sampler": cfg.validation_sampler}
    out = {}
    for key, default in SAMPLING_DEFAULTS.items():
        flag = flags.get(key)
        out[key] = flag if flag is not None else run.get(key, default)
    if run:
        log.info("sampling with steps=%s guidance=%s guidance_cutoff=%s resolution=%s sampler=%s (the run's settings "
                 "unless a flag set them)", *out.values())
    return out


DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def generate(model: str, prompts: str | Sequence[str], *, weights: str | Path | None = None, num_images: int = 1,
             seed: int = 0, steps: int | None = None, guidance: float | None = None, guidance_cutoff: float | None = None,
             resolution: int | None = None, out: str | Path | None = None, device: str | None = None, dtype: str = "fp32",
             tome_ratio: float = 0.0, allow_pickle: bool = False, single_file_config: str | None = None,
             sampler: str | None = None) -> list[Image.Image]:
    """Render `num_images` images of each prompt from `model` (hub id, diffusers folder, .safetensors, toy, tiny)
    plus the nanobooth run folder `weights` (LoRA or full; None: the base model alone).

    Returns the images prompt by prompt: image j of prompt i is at i * num_images + j, seeded
    `seed + 1000*i + j` (render's scheme: the same pixels whatever else is rendered). steps, guidance,
    guidance_cutoff (fraction of the steps that use guidance, in (0, 1]), resolution (pixels; square) and sampler
    ("model", "dpm++" or "auto": with_sampler) left None take the run's validation settings, else SAMPLING_DEFAULTS
    (sampling_settings). `out`: a folder to write promptII-JJ.png and grid.png into. device: default cuda if
    available, else cpu; dtype: fp32, fp16 or bf16. Raises ModelError for a model or weights folder that cannot be loaded.
    """
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    sampling = sampling_settings(weights, steps=steps, guidance=guidance, guidance_cutoff=guidance_cutoff,
                                 resolution=resolution, sampler=sampler)
    pipe = load_run(model, weights, allow_pickle=allow_pickle, single_file_config=single_file_config,
                    torch_dtype=DTYPES[dtype])
    pipe.to(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if tome_ratio:
        apply_tome(pipe.unet, tome_ratio)
    pipe = with_sampler(pipe, sampling["sampler"])
    rows = render(pipe, prompts, num_images, seed, sampling["steps"], sampling["guidance"], sampling["resolution"],
                  guidance_cutoff=sampling["guidance_cutoff"])
    if out is not None:
        out = Path(out)
        for i, row in enumerate(rows):
            for j, img in enumerate(row):
                save_png(img, out / f"prompt{i:02d}-{j:02d}.png")
        save_png(grid(rows, prompts), out / "grid.png")
    return [img for row in rows for img in row]
