"""The prompts a subject's `subject.json` gives a run: it fills the prompts a config leaves empty (a toy subject needs
no prompt keys), replaces the shipped example dog's prompts that the SD/SDXL/SD3/FLUX variants inherit, and is named
in one line wherever the config's own prompt wins over it; its words start the identifier's new embeddings."""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from .errors import ConfigError

if TYPE_CHECKING:
    from .config import TrainConfig

log = logging.getLogger("nanobooth")


def fill_prompts(cfg: "TrainConfig", meta: dict, source) -> None:
    """Fill an empty instance_prompt / class_prompt from the subject's `subject.json` (`meta`, read from
    `source`), logging each one filled: a prompt nobody typed should be visible. ConfigError when the
    file does not set one that is empty. An empty initializer_concept is filled too where new token embeddings
    train and the file names one (a toy subject's look in words); else it stays the class noun."""
    for key in ("instance_prompt", "class_prompt"):
        value = meta.get(key)
        if getattr(cfg, key):
            _keep_or_take(cfg, key, value, source)
            continue
        if not isinstance(value, str) or not value.strip():
            example = {"instance_prompt": "a photo of sks dog", "class_prompt": "a photo of dog"}[key]
            if value is not None:
                what = f"{source} sets it to {value!r}"
            else:
                what = f"{source} does not set it" if Path(source).is_file() else f"there is no {source} to fill it"
            raise ConfigError(f"config key '{key}' is empty and {what}; pass {key}=\"{example}\" (your subject's class "
                              "noun for dog)")
        setattr(cfg, key, value)
        log.info("%s from %s: %r", key, source, value)
    if words := subject_initializer(cfg, meta):
        cfg.initializer_concept = words
        log.info("initializer_concept from %s: %r", source, words)


def _keep_or_take(cfg: "TrainConfig", key: str, value, source) -> None:
    """A prompt set in the config beside a subject.json that names another: the SD/SDXL/SD3/FLUX variants carry the
    shipped example dog's prompts, which are no one's guess about a user's own subject, so the file's prompt replaces
    them (said in one line); any other prompt was the user's choice and wins, said in one info line."""
    current = getattr(cfg, key)
    if not isinstance(value, str) or not value.strip() or value == current:
        return
    if current == _example_prompts().get(key) and not str(cfg.instance_data_dir).startswith("example:"):
        setattr(cfg, key, value)
        log.info("%s from %s: %r (not the shipped example dog's %r)", key, source, value, current)
    else:
        # info, not a warning: a prompt the user typed winning is what they asked for (the UI builds its own from the form)
        log.info("%s=%r is used, not %s's %r (leave %s out to use the file's)", key, current, source, value, key)


@functools.cache
def _example_prompts() -> dict:
    """The prompts the packaged variants inherit for `example:dog` (configs/dreambooth.yaml)."""
    from . import config  # config imports this module's names for its callers

    data = config._read_yaml("dreambooth")[0]
    return {k: data.get(k) for k in ("instance_prompt", "class_prompt")}


def subject_initializer(cfg: "TrainConfig", meta: dict) -> Optional[str]:
    """The words subject.json (`meta`) gives an empty initializer_concept where new token embeddings train (a toy
    subject's look: "blue purple dotted eye"); None where it gives none or cfg needs none (fill_prompts)."""
    words = meta.get("initializer_concept")
    if cfg.trains_embeddings and not cfg.initializer_concept and isinstance(words, str) and words.strip():
        return words
    return None
