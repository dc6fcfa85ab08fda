"""The DreamBooth paper's prompt lists and subject -> class table (its dataset's prompts_and_classes.txt), and
the choice of prompts for one evaluation (`nanobooth eval --prompts`)."""

from __future__ import annotations

import re
from importlib import resources
from pathlib import Path

from ..core.data import DataError

LIVE_CLASSES = ("dog", "cat")  # the paper gives its live-subject prompts to dogs and cats only


def protocol_file() -> Path:
    return Path(str(resources.files("nanobooth") / "assets" / "examples" / "prompts_and_classes.txt"))


def read_protocol(path: str | Path | None = None) -> tuple[dict[str, str], dict[str, list[str]]]:
    """The dataset's own prompts_and_classes.txt: the subject -> class table, and the object and live prompt
    lists as `{0}`/`{1}` templates. Parsed rather than copied so the file stays the single source."""
    path = Path(path or protocol_file())
    try:
        text = path.read_text()
        table = re.search(r"subject_name,class\n(.*?)(?:\n\s*\n|$)", text, re.S).group(1)
        classes = dict(tuple(x.strip() for x in line.split(",", 1)) for line in table.splitlines() if "," in line)
        sets = {}
        for key, header in (("object", "Object Prompts"), ("live", "Live Subject Prompts")):
            start = text.index(header)
            sets[key] = re.findall(r"'([^']*)'\.format", text[start:text.index("]", start)])
    except (OSError, AttributeError, ValueError) as e:
        raise DataError(f"{path}: not a DreamBooth prompts_and_classes.txt ({e})") from None
    return classes, sets


def fill(template: str, identifier: str, noun: str) -> str:
    # replace, not str.format: a user's prompt may contain other braces
    for k, v in (("{0}", identifier), ("{identifier}", identifier), ("{1}", noun), ("{class}", noun)):
        template = template.replace(k, v)
    return template


def choose_prompts(spec: str | None, class_noun: str, backend) -> tuple[str, list[str]]:
    """(the prompt set's name, its templates): `spec` object, live or a file; None/"auto": the backend's own
    prompts (the toy world's scenes), else live for dogs and cats and object for the rest, as the paper."""
    if spec in (None, "auto"):
        if backend.prompt_templates:
            return "toy", backend.prompt_templates
        spec = "live" if class_noun in LIVE_CLASSES else "object"
    if spec in ("object", "live"):
        return spec, read_protocol()[1][spec]
    path = Path(spec)
    if not path.is_file():
        raise DataError(f"--prompts '{spec}': expected object, live or a file of prompts (one per line, {{0}}=identifier, {{1}}=class)")
    text = path.read_text()
    templates = (re.findall(r"'([^']*)'\.format", text) if ".format(" in text
                 else [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")])
    if not templates:
        raise DataError(f"--prompts '{spec}': no prompts in the file")
    return str(path), templates
