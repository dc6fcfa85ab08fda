"""Value checks of config keys: the type check and coercion of a YAML or `key=value` value against a
TrainConfig field's annotation, the guidance-cutoff fraction (also the type of --guidance-cutoff), whole-number
flags (at_least), and the
identifier words that instance_prompt and class_prompt imply, and the new tokens that stand for the identifier (and the
optimizer group that trains them)."""

from __future__ import annotations

import argparse
import typing
from typing import Literal

# The optimizer group holding the new token rows (pivotal tuning, textual inversion): the methods name their group so,
# the pivot finds it by this name and the run summary labels it "new tokens"
TI_GROUP = "text_encoder_ti"

# --sampler's choices (generate, eval, toy eval; inference.generate.with_sampler applies them), torch-free so that each
# command's parser can name them before anything loads
SAMPLERS = ("model", "dpm++", "auto")


def _is_guidance_fraction(value: float) -> bool:
    """The one range check of a guidance cutoff (config key and --guidance-cutoff): (0, 1]."""
    return 0.0 < value <= 1.0


def guidance_fraction(text: str) -> float:
    """argparse type of --guidance-cutoff: a fraction of the sampling steps in (0, 1]."""
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not _is_guidance_fraction(value):
        raise argparse.ArgumentTypeError(f"{text!r}: pass a fraction of the sampling steps in (0, 1], e.g. 0.5")
    return value


def at_least(least: int):
    """argparse type: a whole number >= `least` (image and step counts 1, subject seeds 0: numpy seeds no negative)."""
    def parse(text: str) -> int:
        try:
            n = int(text)
        except ValueError:
            n = least - 1
        if n < least:
            raise argparse.ArgumentTypeError(f"{text!r}: pass a whole number of at least {least}")
        return n
    return parse


def identifier_words(cfg) -> list[str]:
    """The words of cfg.instance_prompt that cfg.class_prompt lacks, in order, repeats kept ("a photo of sks dog" vs
    "a photo of dog": ["sks"]). The one derivation of "the identifier": prepare's warning (none), keep_best's scores
    (the first; subject.json's may come first) and pivotal tuning / textual inversion (exactly one, else refused)."""
    lacked = set((cfg.class_prompt or "").split())
    return [w for w in (cfg.instance_prompt or "").split() if w not in lacked]


def one_identifier(cfg) -> str | None:
    """token_abstraction, else the identifier when identifier_words finds exactly one word; None otherwise (the
    caller refuses or leaves it out: embeddings.identifier, caption_words)."""
    return getattr(cfg, "token_abstraction", None) or (w[0] if len(w := identifier_words(cfg)) == 1 else None)


def new_tokens(cfg) -> list[str]:
    """The identifier's new tokens, diffusers' advanced script's names: ["<s0>", "<s1>", ...], one per
    num_new_tokens_per_abstraction (pivotal tuning, textual inversion: methods/embeddings.py; the run summary)."""
    return [f"<s{i}>" for i in range(cfg.num_new_tokens_per_abstraction)]


def caption_words(cfg) -> dict[str, str]:
    """What `{identifier}` and `{class}` in a caption file stand for (issue #23; kohya's and OneTrainer's captions name
    them through the config): token_abstraction or the one identifier word (identifier_words), and the word after
    it in instance_prompt ("a photo of sks dog": sks, dog). A key that cannot be told is left out: caption_of
    then refuses that placeholder, naming the file."""
    ident = one_identifier(cfg)
    words = (cfg.instance_prompt or "").split()
    if not ident or ident not in words:
        return {"identifier": ident} if ident else {}
    after = words.index(ident) + 1
    return {"identifier": ident, **({"class": words[after]} if after < len(words) else {})}


def _type_name(tp) -> str:
    if typing.get_origin(tp) is Literal:
        return "one of " + "|".join(map(str, typing.get_args(tp)))
    if typing.get_origin(tp) is typing.Union:
        return " or ".join(_type_name(a) for a in typing.get_args(tp) if a is not type(None)) + " or null"
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _wants_str(tp) -> bool:
    """True for str-like keys (str, Optional[str], Literal of str), whose values must stay text."""
    if typing.get_origin(tp) is typing.Union:
        return any(_wants_str(a) for a in typing.get_args(tp) if a is not type(None))
    if typing.get_origin(tp) is Literal:
        return all(isinstance(a, str) for a in typing.get_args(tp))
    return tp is str


def _check_type(value, tp):
    """Return (ok, value coerced to tp). Ints are accepted for floats, nothing else is coerced."""
    origin = typing.get_origin(tp)
    if origin is typing.Union:
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return True, None
        for arg in args:
            if arg is type(None):
                continue
            ok, v = _check_type(value, arg)
            if ok:
                return True, v
        return False, value
    if origin is Literal:
        return value in typing.get_args(tp), value
    if origin is list:
        (item,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            return False, value
        out = []
        for v in value:
            ok, v = _check_type(v, item)
            if not ok:
                return False, value
            out.append(v)
        return True, out
    if tp is float:
        if isinstance(value, bool):
            return False, value
        if isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
            try:
                return True, float(value)
            except ValueError:
                return False, value
        return (isinstance(value, (int, float)), float(value) if isinstance(value, (int, float)) else value)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if tp is bool:
        return isinstance(value, bool), value
    if tp is str:
        return isinstance(value, str), value
    return isinstance(value, tp), value
