"""The one-line refusals a train run can meet in its folders, prompts, output folder, resume request and
resolution, in one place: the CLI and the UI run them before the training stack loads (no torch import
here), and train() runs them again for library callers, before anything is written."""

from __future__ import annotations

import contextlib
import logging
import threading
from pathlib import Path

from .config import check_resolution_before_loading
from .subject_prompts import fill_prompts
from .errors import ConfigError
from .data import MAX_PHOTOS, MIN_PHOTOS, check_images, image_paths, read_subject_meta, resolve_data_dir
from .run_folder import check_output_dir, check_resume_request

log = logging.getLogger("nanobooth")


def check_train_input(cfg) -> None:
    """Refuse (ConfigError/DataError/CheckpointError, one line) what a user can get wrong before any model
    loads: the photo folders and photos, the prompts subject.json fills (filled into `cfg` here), the output
    folder and the resume it asks for, and the resolution a local model can render. Run again on a config it has
    checked (train() after the CLI or the UI), it checks again without repeating its warning and info lines."""
    again = getattr(cfg, "_input_checked", None) == repr(cfg.to_dict())
    with _quiet(log) if again else contextlib.nullcontext():
        instance_dir = resolve_data_dir(cfg.instance_data_dir)
        check_images(instance_dir)
        warn_few_photos(cfg, instance_dir)
        if cfg.with_prior_preservation and cfg.class_data_dir:
            resolve_data_dir(cfg.class_data_dir, "class_data_dir", must_exist=False)
        fill_prompts(cfg, read_subject_meta(instance_dir), instance_dir / "subject.json")
        check_token_abstraction(cfg, instance_dir)
        warn_heldout_is_trained_on(cfg, instance_dir)
        warn_class_outside_toy_world(cfg)
        check_output_dir(cfg)
        check_resume_request(Path(cfg.output_dir), cfg.resume_from_checkpoint, cfg.max_train_steps)
        check_resolution_before_loading(cfg)
    cfg._input_checked = repr(cfg.to_dict())  # the prompts as filled: what a second call sees


@contextlib.contextmanager
def _quiet(logger: logging.Logger):
    """This thread's lines to the logger dropped inside (its errors are raised, not logged, so nothing a user needs
    is lost); another thread's (the UI's page while a job starts) still go through."""
    thread = threading.get_ident()

    def other_threads(record: logging.LogRecord) -> bool:
        return record.thread != thread

    logger.addFilter(other_threads)
    try:
        yield
    finally:
        logger.removeFilter(other_threads)


def check_token_abstraction(cfg, instance_dir: Path) -> None:
    """A token_abstraction no prompt contains (neither instance_prompt nor a photo's caption .txt) would train new
    tokens that never reach the text encoder: nothing learnt, a run that looks fine. ConfigError naming both."""
    word = cfg.token_abstraction
    if not (cfg.trains_embeddings and word) or word in (cfg.instance_prompt or "").split():
        return
    # a caption's {identifier} is token_abstraction (config_values.caption_words)
    if any(word in t.split() or "{identifier}" in t for t in (p.read_text(errors="replace") for p in Path(instance_dir).glob("*.txt"))):
        return
    raise ConfigError(f"config key 'token_abstraction': '{word}' is not a word of instance_prompt '{cfg.instance_prompt}' "
                      "(nor of any caption file), so its new tokens would never be trained; set token_abstraction to the "
                      "identifier the prompt uses, or put it in instance_prompt")


def warn_few_photos(cfg, instance_dir: Path) -> None:
    """Under MIN_PHOTOS photos a run learns that picture, backdrop and pose included, rather than the subject: one
    warning line (newcomer56: the CLI trained on one photo without a word, where the UI refuses it). Not refused: a
    library caller may mean it."""
    n = len(image_paths(instance_dir))
    if n < MIN_PHOTOS:
        log.warning("instance_data_dir=%s holds %d photo%s of the subject: DreamBooth needs %d-%d (varied poses and "
                    "backgrounds), or the run learns the picture rather than the subject; add photos", cfg.instance_data_dir,
                    n, "" if n == 1 else "s", MIN_PHOTOS, MAX_PHOTOS)


def warn_heldout_is_trained_on(cfg, instance_dir: Path) -> None:
    """validation_images_dir holding the training photos (the same folder, or copies of its files) gives a "held-out"
    curve that follows the training one, so it can never show overfitting, the one thing it is for (newcomer55). One
    warning line naming how many are shared and a few of them; compared by content, so renamed copies count."""
    if not (cfg.validation_loss_steps and cfg.validation_images_dir):
        return
    held = resolve_data_dir(cfg.validation_images_dir, "validation_images_dir")
    trained = {_digest(p) for p in image_paths(instance_dir)}
    photos = image_paths(held)
    shared = [p.name for p in photos if _digest(p) in trained]
    if shared:
        log.warning("validation_images_dir=%s: %d of its %d photos are training photos (%s%s), so val_loss_heldout follows "
                    "the training loss and cannot show overfitting; point it at photos of the subject that the run does not "
                    "train on", cfg.validation_images_dir, len(shared), len(photos), ", ".join(shared[:3]),
                    ", ..." if len(shared) > 3 else "")


def _digest(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def warn_class_outside_toy_world(cfg) -> None:
    """A toy model knows five kinds of object; a class prompt naming none of them ("a photo of a dog": the UI's example
    dog on the default toy family) trains, but its class images and the base are no prior for the subject, and the
    toy eval's probe reads only the toy world. One warning line saying so (newcomer55)."""
    from . import builtin_models

    if not builtin_models.is_toy(cfg.model):
        return
    from ..toy.world import CLASSES, in_world  # lazily: only a toy run pays for the toy world's import

    words = {w.strip(".,") for w in f"{cfg.class_prompt or ''} {cfg.instance_prompt or ''}".split()}
    if words and not any(in_world(w) for w in words):
        log.warning("model=%s draws %s only; '%s' names none of them, so its class images and base model are no prior "
                    "for this subject (fine to try the pipeline; for a result use a toy subject, `nanobooth toy subject "
                    "--seed N --out DIR`, or a real model)", cfg.model, ", ".join(c + "s" for c in CLASSES),
                    cfg.class_prompt or cfg.instance_prompt)
