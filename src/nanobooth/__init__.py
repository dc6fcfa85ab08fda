"""nanobooth: DreamBooth fine-tuning for Stable Diffusion models.

Library use (docs/architecture.md, "Library API"):

    from nanobooth import events, evaluate, generate, load_config, train

The names load on first use, so `import nanobooth` (and the CLI's parser) does not import torch.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> the module that defines it (None: the name is that module)
_PUBLIC = {
    "train": "nanobooth.api", "generate": "nanobooth.api", "evaluate": "nanobooth.api",
    "TrainingInterrupted": "nanobooth.api", "TrainConfig": "nanobooth.core.config",
    "load_config": "nanobooth.core.config", "events": None,
}
_MODULES = {"events": "nanobooth.core.events"}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
    if name not in _PUBLIC:
        raise AttributeError(f"module 'nanobooth' has no attribute '{name}'")
    if _PUBLIC[name] is None:
        return importlib.import_module(_MODULES[name])
    return getattr(importlib.import_module(_PUBLIC[name]), name)
