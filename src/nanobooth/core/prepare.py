"""What train() checks and reads before any model loads: the pre-checks, prompt warnings, optimizer, tracker,
bucket and class-image provenance refusals (one line each, nothing written yet), the subject's ImageSet, and
the record of which input files a checkpoint's data order indexes."""

from __future__ import annotations

import logging
from pathlib import Path

from . import checkpoint as ckpt
from . import prior, step_scores, trackers
from .buckets import bucket_sizes
from .config import ConfigError, TrainConfig
from .config_values import caption_words, identifier_words
from .data import ImageSet, image_paths, mask_path, resolve_data_dir
from .optimizers import check_optimizer
from .prechecks import check_train_input
from .prior import ClassImagesMismatch, check_provenance
from .run_folder import class_cache_provenance, class_images_dir

log = logging.getLogger("nanobooth")


def class_provenance(cfg: TrainConfig) -> dict:
    return {**prior.class_provenance(cfg.class_prompt, cfg.model, cfg.resolution), **class_cache_provenance(cfg)}


def prepare_run(cfg: TrainConfig) -> tuple[Path, ImageSet]:
    """Check everything a user can get wrong before anything is written or any model is loaded:
    prompts (filled from subject.json), the subject photos, and the output folder."""
    check_train_input(cfg)  # the CLI's and the UI's pre-checks (prechecks.py), for library callers; fills the prompts
    instance_dir = resolve_data_dir(cfg.instance_data_dir)
    if cfg.instance_prompt.strip() == cfg.class_prompt.strip():
        log.warning("instance_prompt equals class_prompt ('%s'): the subject gets no identifier of its own", cfg.instance_prompt)
    if not identifier_words(cfg):
        log.warning("instance_prompt '%s' has no word that class_prompt lacks: add a rare identifier such as 'sks'", cfg.instance_prompt)
    if cfg.trains_embeddings:
        from ..methods import embeddings  # a layer above core: imported when needed

        embeddings.identifier(cfg)  # refused now if the identifier cannot be found, before anything is written
    run_dir = Path(cfg.output_dir)
    if cfg.validation_images_dir:
        resolve_data_dir(cfg.validation_images_dir, "validation_images_dir")
    check_optimizer(cfg)
    step_scores.check(cfg)  # keep_best without validation steps: refused here
    trackers.check_trackers(cfg)
    buckets = bucket_sizes(cfg.resolution, cfg.bucket_reso_steps, cfg.min_bucket_reso, cfg.max_bucket_reso) if cfg.enable_bucket else None
    if buckets == []:
        if cfg.bucket_reso_steps > cfg.resolution:  # newcomer55: a FLUX variant's 64 at resolution 32 read "[None, None]"
            raise ConfigError(f"config key 'bucket_reso_steps': {cfg.bucket_reso_steps} is above resolution {cfg.resolution}, so no "
                              f"bucket fits; set bucket_reso_steps to a multiple the model takes at or below it (e.g. 16)")
        lo, hi = cfg.min_bucket_reso or cfg.resolution // 2, cfg.max_bucket_reso or cfg.resolution * 2  # bucket_sizes' defaults
        raise ConfigError(f"config keys 'min_bucket_reso'/'max_bucket_reso': no bucket of about {cfg.resolution}x{cfg.resolution} pixels "
                          f"has both sides in [{lo}, {hi}] (multiples of {cfg.bucket_reso_steps}); widen them")
    instance = ImageSet.from_folder(instance_dir, cfg.instance_prompt, cfg.resolution, "instance_data_dir", captions=True,
                                    masks=cfg.masked_loss, buckets=buckets, fill=caption_words(cfg))
    if buckets is not None and len(buckets) == 1:
        log.warning("enable_bucket: %dx%d with bucket_reso_steps=%d leaves one bucket, %dx%d: every photo is cropped to it as without "
                    "buckets; use a smaller bucket_reso_steps (a multiple of what the model renders, e.g. 16 for the toy model)",
                    cfg.resolution, cfg.resolution, cfg.bucket_reso_steps, *buckets[0])
    if cfg.with_prior_preservation:
        try:
            check_provenance(class_images_dir(cfg, run_dir), class_provenance(cfg))
        except ClassImagesMismatch as e:
            raise ConfigError(str(e)) from None
    return run_dir, instance


def input_record(cfg: TrainConfig, run_dir: Path) -> dict:
    """Which files the data order indexes (name + sha256 per image set, only the class images used): a resume
    over other files is refused (ckpt.check_resume)."""
    photos = image_paths(resolve_data_dir(cfg.instance_data_dir))
    captions = [t for p in photos if (t := p.with_suffix(".txt")).is_file()]  # after the photos: positions stay the data order
    masks = [m for p in photos if (m := mask_path(p))] if cfg.masked_loss else []
    record = {"instance_data_dir": ckpt.input_record(photos + captions + masks)}
    if cfg.with_prior_preservation:
        record["class_data_dir"] = ckpt.input_record(image_paths(class_images_dir(cfg, run_dir))[: cfg.num_class_images])
    return record
