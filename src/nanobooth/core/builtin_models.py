"""The built-in model names, torch-free so the CLI's checks can read them before anything loads.

`toy` and `toy-flux` are the pretrained toy-world models (assets/toy_model, assets/toy_flux: a UNet and a
FLUX-shaped transformer on one VAE and one world, `nanobooth toy pretrain` / `pretrain-flux`); a build that
does not ship one falls back to its random tiny twin. `tiny`, `tiny-sdxl`, `tiny-sd3` and `tiny-flux` are
seeded random pipelines of each family's layout (nanobooth.tiny), built into the cache on first use: every
code path runs offline in seconds, and their pictures are noise.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

TOY = {"toy": "toy_model", "toy-flux": "toy_flux"}  # name -> folder under assets/
TOY_FALLBACK = {"toy": "tiny", "toy-flux": "tiny-flux"}
PIPELINES = {"toy": "StableDiffusionPipeline", "toy-flux": "FluxPipeline", "tiny": "StableDiffusionPipeline",
             "tiny-sdxl": "StableDiffusionXLPipeline", "tiny-sd3": "StableDiffusion3Pipeline", "tiny-flux": "FluxPipeline"}


def is_toy(model: str) -> bool:
    """A toy-world model: its runs are scored by the toy probe (toy eval, validation scores)."""
    return model in TOY


def shipped_folder(model: str) -> Path | None:
    """The shipped folder of a toy model, None for other names or when this build lacks it."""
    if model not in TOY:
        return None
    folder = Path(str(resources.files("nanobooth") / "assets" / TOY[model]))
    return folder if (folder / "model_index.json").is_file() else None


def local_folder(model: str) -> Path:
    """Where a model's files are read before loading: a toy model's shipped folder, else the path given."""
    return shipped_folder(model) or Path(model).expanduser()
