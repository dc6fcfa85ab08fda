"""Autogenous class images for prior preservation: generated once by the base model, reused forever.

Image i is `class-{i:05d}.png`, drawn from its own generator seeded with seed + i. So a run killed
midway resumes by generating exactly the missing indices: nothing is regenerated or duplicated, and
the set does not depend on the batch size. Files appear atomically (written to a temp name, renamed).
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm

from ..families import sampling_kwargs
from .data import ImageSet, image_paths, list_images

log = logging.getLogger("nanobooth")
CLASS_NAME = re.compile(r"class-(\d{5})\.png$")
PROVENANCE = ".nanobooth-class-images.json"


class ClassImagesMismatch(ValueError):
    pass


# What class images depend on: reusing images made with other values would preserve the wrong prior.
PROVENANCE_KEYS = ("class_prompt", "model", "resolution")


def class_provenance(class_prompt: str, model: str, resolution: int) -> dict:
    return dict(zip(PROVENANCE_KEYS, (class_prompt, model, resolution)))


def check_provenance(folder: Path, provenance: dict) -> None:
    """Images generated for another class prompt or base model would silently preserve the wrong prior."""
    meta = folder / PROVENANCE
    if not meta.is_file():
        return  # none generated here yet, or the user's own class photos: used as they are
    old = json.loads(meta.read_text())
    diff = [k for k in PROVENANCE_KEYS if old.get(k) != provenance.get(k)]
    if diff:
        k = diff[0]
        raise ClassImagesMismatch(f"class_data_dir '{folder}' holds class images made with {k}={old.get(k)!r}, not "
                                  f"{provenance.get(k)!r}: point class_data_dir elsewhere or empty that folder")


def class_image_set(folder: Path, num_class_images: int, prompt: str, resolution: int) -> ImageSet:
    """Exactly num_class_images class images: the first ones by file name (deterministic), so a shared
    folder of 1,000 photos trains on the number asked for, not on all of them. DataError (naming the
    folder) when it holds none."""
    files = list_images(Path(folder), "class_data_dir")
    log.info("found %d class images in %s, using %d", len(files), folder, min(len(files), num_class_images))
    if len(files) < num_class_images:
        log.warning("class_data_dir '%s' holds %d images, fewer than num_class_images=%d", folder, len(files), num_class_images)
    return ImageSet.from_folder(Path(folder), prompt, resolution, "class_data_dir", limit=num_class_images, warn=False)  # warned above


def missing_indices(folder: Path, num_class_images: int) -> list[int]:
    """Indices still to generate. User-supplied images (any name) count towards the total too."""
    files = image_paths(folder)
    have = {int(m.group(1)) for p in files if (m := CLASS_NAME.match(p.name))}
    need = num_class_images - len(files)
    if need <= 0:
        return []
    out, i = [], 0
    while len(out) < need:
        if i not in have:
            out.append(i)
        i += 1
    return out


def generate_class_images(pipe, folder: Path, prompt: str, num_class_images: int, seed: int, batch_size: int,
                          steps: int, resolution: int, guidance_scale: float = 7.5, sampler: str = "model",
                          provenance: dict | None = None, on_progress: Callable[[int, int], None] | None = None) -> int:
    """Top `folder` up to num_class_images; returns how many were generated. `provenance` (class prompt,
    model, resolution) is checked against and recorded beside the images this function makes.
    `on_progress(done, num_class_images)` is called after each batch written."""
    provenance = {"class_prompt": prompt, "resolution": resolution, **(provenance or {})}
    check_provenance(folder, provenance)
    folder.mkdir(parents=True, exist_ok=True)
    todo = missing_indices(folder, num_class_images)
    if not todo:
        return 0
    # atomic (temp name, rename) like the images: a folder shared between runs (the class-image cache) never
    # holds a half-written record, and a temp name per process keeps two runs filling it at once apart
    tmp_meta = folder / f"{PROVENANCE}.{os.getpid()}.tmp"
    tmp_meta.write_text(json.dumps(provenance))
    os.replace(tmp_meta, folder / PROVENANCE)
    from ..inference.generate import with_sampler

    pipe = with_sampler(pipe, sampler)  # dpm++: a copy, so the caller's pipeline keeps its sampler for validation renders
    log.info("generating %d class images of '%s' into %s", len(todo), prompt, folder)
    pipe.set_progress_bar_config(disable=True)  # one bar over all images, not one per batch
    # batching pays in the UNet; decoding one image at a time keeps the VAE's full-resolution
    # activations (the run's memory peak) to a single image, with identical pixels
    pipe.vae.enable_slicing()
    bar = tqdm(total=len(todo), desc="class images", unit="img")
    for start in range(0, len(todo), batch_size):
        idx = todo[start : start + batch_size]
        generators = [torch.Generator(pipe.device).manual_seed(seed + i) for i in idx]
        with torch.no_grad():
            images = pipe([prompt] * len(idx), num_inference_steps=steps, guidance_scale=guidance_scale,
                          generator=generators, height=resolution, width=resolution,
                          **sampling_kwargs(pipe, len(idx), guidance_scale)).images
        for i, img in zip(idx, images):
            final = folder / f"class-{i:05d}.png"
            tmp = folder / f".class-{i:05d}.png.{os.getpid()}.tmp"
            img.save(tmp, format="PNG")
            os.replace(tmp, final)
        bar.update(len(idx))
        if on_progress is not None:
            on_progress(num_class_images - len(todo) + start + len(idx), num_class_images)
    bar.close()
    pipe.vae.disable_slicing()
    return len(todo)
