"""Model families (the contract is families/base.py): one file per family, registered here by pipeline class."""

from .base import Family, cond_batch, cond_to
from .objective import DDPMObjective, Objective
from .sd import SD
from .sdxl import SDXL
from .sd3 import SD3
from .flux import Flux

FAMILIES = {cls.pipeline_class: cls() for cls in (SD, SDXL, SD3, Flux)}


def family_for(pipeline_class_name: str):
    if pipeline_class_name not in FAMILIES:
        raise ValueError(pipeline_class_name)
    return FAMILIES[pipeline_class_name]

def sampling_kwargs(pipe, num_prompts: int, guidance: float) -> dict:
    """The pipeline's family's extra sampling arguments (Family.sampling_kwargs); none for a pipeline of no family."""
    fam = FAMILIES.get(type(pipe).__name__)
    return fam.sampling_kwargs(pipe, num_prompts, guidance) if fam is not None else {}


__all__ = ["Family", "SD", "SDXL", "SD3", "Flux", "FAMILIES", "family_for", "sampling_kwargs", "cond_batch", "cond_to", "Objective", "DDPMObjective"]
