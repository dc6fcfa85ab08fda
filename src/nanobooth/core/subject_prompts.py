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
    `source`), logging each one filled: a prompt nobody typed should be visible. ConfigError, one line naming every
    empty one, when the file does not set them. An empty initializer_concept is filled too where new token embeddings
    train and the file names one (a toy subject's look in words); else it stays the class noun."""
    missing = {}
    for key in ("instance_prompt", "class_prompt"):
        value = meta.get(key)
        if getattr(cfg, key):
            _keep_or_take(cfg, key, value, source)
        elif not isinstance(value, str) or not value.strip():
            missing[key] = value
        else:
            setattr(cfg, key, value)
            log.info("%s from %s: %r", key, source, value)
    if missing:
        raise ConfigError(_missing_line(missing, source))
    if words := subject_initializer(cfg, meta):
        cfg.initializer_concept = words
        log.info("initializer_concept from %s: %r", source, words)


def _missing_line(missing: dict, source) -> str:
    """Every empty prompt subject.json could not fill, in one line with values to pass (newcomer57 met instance_prompt,
    fixed it, then met class_prompt)."""
    keys = list(missing)
    named = " and ".join(f"'{k}'" for k in keys)
    it = "it" if len(keys) == 1 else "them"
    if not Path(source).is_file():
        why = f"there is no {source} to fill {it}"
    elif all(v is None for v in missing.values()):
        why = f"{source} does not set {it}"
    else:
        why = f"{source} sets " + " and ".join(f"{k} to {v!r}" if v is not None else f"no {k}" for k, v in missing.items())
    values = " ".join(f'{k}="{_example_prompts()[k]}"' for k in keys)  # the example dog's, as the variants carry
    return (f"config key{'s' if len(keys) > 1 else ''} {named} {'is' if len(keys) == 1 else 'are'} empty and {why}; "
            f"pass {values} (your subject's class noun for dog)")


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
