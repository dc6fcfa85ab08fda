"""`nanobooth config list`: the packaged variants, one line each with what they train.

Read from the YAML files over the config's defaults, without building a TrainConfig per variant: the list stays as
quick as `--help` (46 validated configs take most of a second on a busy CPU). `config show VARIANT` gives every key.
"""
from __future__ import annotations

from .builtin_models import TOY  # the models that ship in the package

_ADAPTERS = {"lora": "LoRA", "dora": "DoRA", "loha": "LoHa", "lokr": "LoKr"}
# families whose denoiser is a transformer (the folder a variant sits in names its family)
_TRANSFORMER_FOLDERS = ("flux/", "sd3/", "toy-flux/")


def _rate(lr: float) -> str:
    """1e-4, 2e-3, 1.5e-3: a learning rate as the recipes write it."""
    mantissa, exponent = f"{lr:e}".split("e")
    return f"{float(mantissa):g}e{int(exponent)}"


def what_it_trains(name: str, values: dict) -> str:
    """A variant's trained parts in words: 'LoRA on the UNet + text encoder', 'full transformer', ...
    values: the variant's keys over the defaults."""
    denoiser = "transformer" if name.startswith(_TRANSFORMER_FOLDERS) else "UNet"
    method = values["method"]
    if method == "textual_inversion":
        return "new token embeddings only"
    parts = [f"{_ADAPTERS[method]} on the {denoiser}" if method in _ADAPTERS else f"full {denoiser}"]
    if values["train_text_encoder"]:
        parts.append("text encoder")
    if values["train_text_encoder_ti"]:
        parts.append("new tokens")
    return " + ".join(parts)


def variant_rows() -> list[tuple[str, str, str, str, str, str]]:
    """(model, variant, trains, prior preservation, steps, lr) per packaged variant, sorted by name."""
    from .config import _read_yaml, field_defaults, variant_names

    defaults = field_defaults()
    rows = []
    for name in variant_names():
        values = {**defaults, **_read_yaml(name)[0]}
        prior = f"{values['num_class_images']} class images" if values["with_prior_preservation"] else "-"
        rows.append((str(values["model"]), name, what_it_trains(name, values), prior,
                     str(values["max_train_steps"]), _rate(values["learning_rate"])))
    return rows


def variant_table() -> str:
    """The rows as aligned columns, under one heading per model, and where to read more."""
    header = ("variant", "trains", "prior", "steps", "lr")
    rows = variant_rows()
    widths = [max(len(r[i + 1]) for r in rows + [("",) + header]) for i in range(len(header))]

    def line(cells) -> str:
        return "  " + "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()

    lines = [line(header)]
    for model in dict.fromkeys(r[0] for r in rows):  # first-seen order: the variants' name order
        lines += ["", f"{model} (embedded, offline):" if model in TOY else f"{model}:"] + [line(r[1:]) for r in rows if r[0] == model]
    return "\n".join(lines + ["", "`nanobooth config show VARIANT` prints every key of one; "
                                  "`nanobooth train VARIANT --help` says what each means."])
