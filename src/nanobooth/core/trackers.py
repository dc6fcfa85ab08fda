"""Experiment trackers (config key `report_to`): TensorBoard or Weights & Biases through accelerate's trackers.

The loop already tells its callers everything worth plotting through events (events.py), so a tracker
is one more callback: `Step` -> loss, instance/prior loss and lr; `ValidationLoss` -> val_loss(_heldout); `ValidationScores` -> val_subject_fidelity, val_prompt_fidelity...;
`SampleGrid` -> the grid image. Events run on the main process only, draw no random numbers and a
callback that raises is dropped with one warning, so a tracker can neither change nor stop training.
TensorBoard writes under OUTPUT_DIR/logs/ (run_folder.TRACKER_LOGS), which `overwrite=true` clears with
the run's other outputs.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

from .config import ConfigError
from .events import Done, Failed, SampleGrid, Step, Stopped, ValidationLoss, ValidationScores
from .run_folder import TRACKER_LOGS

log = logging.getLogger("nanobooth")

PROJECT = "nanobooth"  # accelerate's project name: TensorBoard's subfolder, the W&B project
PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}


def check_trackers(cfg) -> None:
    """Refuse (ConfigError, one line) a tracker whose package is missing, before anything is written."""
    package = PACKAGES.get(cfg.report_to)
    if package and importlib.util.find_spec(package) is None:
        raise ConfigError(f"report_to={cfg.report_to} needs {package}: pip install {package} (or report_to=none)")


def accelerator_kwargs(cfg, run_dir: Path) -> dict:
    """What Accelerator(...) needs for cfg.report_to: log_with and where TensorBoard writes; {} for none."""
    if cfg.report_to == "none":
        return {}
    from accelerate.utils import ProjectConfiguration

    return {"log_with": cfg.report_to,
            "project_config": ProjectConfiguration(project_dir=str(run_dir), logging_dir=str(Path(run_dir) / TRACKER_LOGS))}


def _hparams(cfg) -> dict:
    """The config as scalars (TensorBoard's hparams take numbers, strings and bools only)."""
    out = {}
    for k, v in cfg.to_dict().items():
        out[k] = v if isinstance(v, (int, float, str, bool)) else str(v)
    return out


def start(accelerator, cfg, resume_step: int = 0):
    """Start the trackers (after the run folder exists) and return the callback that feeds them; None for none.
    `resume_step`: the checkpoint's step a resumed run starts from. TensorBoard then hides what the earlier
    run logged after it (purge_step), which the resumed run logs again: one value per step, not two."""
    if cfg.report_to == "none":
        return None
    init = {"tensorboard": {"purge_step": resume_step + 1}} if resume_step and cfg.report_to == "tensorboard" else {}
    accelerator.init_trackers(PROJECT, config=_hparams(cfg), init_kwargs=init)
    return TrackerCallback(accelerator)


class TrackerCallback:
    """An events callback logging to accelerate's trackers; the step axis is the optimizer step."""

    def __init__(self, accelerator):
        self.accelerator = accelerator

    def __call__(self, event) -> None:
        acc = self.accelerator
        if isinstance(event, Step):
            values = {"loss": event.loss, "loss_instance": event.loss_instance, "lr": event.lr}
            if event.loss_prior is not None:
                values["loss_prior"] = event.loss_prior
            acc.log(values, step=event.step)
        elif isinstance(event, ValidationLoss):
            values = {"val_loss": event.loss}
            if event.loss_heldout is not None:
                values["val_loss_heldout"] = event.loss_heldout
            acc.log(values, step=event.step)
        elif isinstance(event, ValidationScores):  # subject/prompt fidelity and the scorer's other numbers
            acc.log({f"val_{k}": v for k, v in event.scores.items()}, step=event.step)
        elif isinstance(event, SampleGrid):
            self._grid(event.step, event.path)
        elif isinstance(event, (Stopped, Failed)):  # end_training is not reached: flush what was logged
            for t in acc.trackers:
                t.finish()
        elif isinstance(event, Done):
            pass  # the loop's accelerator.end_training() finishes them

    def _grid(self, step: int, path: Path) -> None:
        import numpy as np
        from PIL import Image

        with Image.open(path) as im:
            img = im.convert("RGB")
        for t in self.accelerator.trackers:
            if t.name == "tensorboard":
                t.log_images({"samples": np.asarray(img)[None]}, step=step, dataformats="NHWC")
            elif t.name == "wandb":
                t.log_images({"samples": [img]}, step=step)
