"""What `train(cfg, callbacks=[...])` tells its caller while it runs (a UI's progress, a notebook's plot).

Each event is a small frozen dataclass. Callbacks are plain callables taking one event; they run on the
main process only (rank 0 under `accelerate launch`), in the training thread, between steps, so a slow
callback slows training. A callback that raises is logged once as a warning and dropped; training goes on.
A callback that returns `STOP` asks for a stop, exactly like `train(should_stop=...)` returning True or
Ctrl-C: the run checkpoints at the next step boundary and raises `TrainingInterrupted`
(resume with `resume_from_checkpoint=latest`). Events only read what the loop computed anyway: they draw
no random numbers and never change what is trained.

Order in one run: ClassImagesProgress* (prior preservation, only for class images still to make),
ValidationLoss and SampleGrid (step 0, when validation_loss_steps / validation_prompts are set), then per
step Step, and where due ValidationLoss, CheckpointSaved and SampleGrid (each SampleGrid followed by ValidationScores
when validation_scores are on; with keep_best a step's grid comes before its checkpoint); finally Done, or Stopped (a stop
request) or Failed (an exception; it is re-raised).
"""

from __future__ import annotations

import enum
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Union

from .ranks import launch_rank

log = logging.getLogger("nanobooth")


class Control(enum.Enum):
    STOP = "stop"


STOP = Control.STOP  # return this from a callback to stop the run at the next step boundary, with a checkpoint


@dataclass(frozen=True)
class ClassImagesProgress:
    """Prior-preservation class images: `done` of `total` (num_class_images) exist in the class folder.
    Emitted after each generated batch; not at all when the folder already holds them."""

    done: int
    total: int


@dataclass(frozen=True)
class Step:
    """One finished optimizer step (all gradient-accumulation micro-batches), averaged over processes.

    step: 1-based number of the finished step; total: max_train_steps.
    loss: the optimised loss (instance + prior_loss_weight * prior), as written to train_log.jsonl
    (unrounded here). loss_instance: the instance half's loss. loss_prior: the class half's loss; None
    without prior preservation. lr: the learning rate the next step uses (first parameter group).
    seconds_per_step: wall-clock seconds since the previous step ended (the first step of a run or a resume:
    that step alone, after the "before" grid; often slower, as caches warm up). A validation grid or a
    checkpoint written after a step counts towards the next one.
    """

    step: int
    total: int
    loss: float
    loss_instance: float
    loss_prior: float | None
    lr: float
    seconds_per_step: float


@dataclass(frozen=True)
class SampleGrid:
    """A validation grid (validation_prompts × num_validation_images) was written to `path` (PNG) after `step`
    steps (0: the base model's "before" grid)."""

    step: int
    path: Path


@dataclass(frozen=True)
class ValidationLoss:
    """The validation loss (validation_loss_steps) after `step` steps (0: the base model): the objective's
    weighted mean per-example MSE on the fixed triples of the training photos (`loss`) and of
    validation_images_dir (`loss_heldout`, None without it), as in train_log.jsonl's val_loss keys."""

    step: int
    loss: float
    loss_heldout: float | None


@dataclass(frozen=True)
class ValidationScores:
    """validation_scores of the weights after `step` steps (0: the base model), as in train_log.jsonl: at least
    subject_fidelity and prompt_fidelity, plus what the scorer measured (toy: the probe's numbers; real: dino,
    clip_i, clip_t). Comes right after that step's SampleGrid (core/step_scores.py)."""

    step: int
    scores: dict


@dataclass(frozen=True)
class CheckpointSaved:
    """A resumable checkpoint of step `step` is complete at `path` (a folder under output_dir/checkpoints)."""

    step: int
    path: Path


@dataclass(frozen=True)
class TimeToModel:
    """Seconds from train() starting (photos in) to the weights written, and where they went: class-image
    generation (0 when every image was there already), the training loop (validation grids during it
    included), writing the weights, and the rest (`setup_s`: loading models, caching latents and prompt
    embeddings, the step-0 grid). The parts add up to `total_s`. A resumed run adds what its checkpoint recorded up to
    that step (the steps redone after it count once; a checkpoint written before session 56 recorded none)."""

    total_s: float
    class_images_s: float
    training_s: float
    save_s: float
    setup_s: float

    @classmethod
    def of(cls, total: float, class_images: float, training: float, save: float) -> "TimeToModel":
        r = lambda x: round(x, 3)  # noqa: E731
        parts = [r(class_images), r(training), r(save)]
        return cls(r(total), *parts, r(max(0.0, r(total) - sum(parts))))

    def __str__(self) -> str:
        return (f"time to model: {self.total_s:.1f} s (class images {self.class_images_s:.1f} s, training {self.training_s:.1f} s, "
                f"export/save {self.save_s:.1f} s, loading/setup {self.setup_s:.1f} s)")


@dataclass(frozen=True)
class Done:
    """Training finished: the weights are in `output_dir` (and the final grid, if validation_prompts are set);
    `time_to_model` says how long getting there took (also in output_dir/time_to_model.json)."""

    output_dir: Path
    time_to_model: TimeToModel | None = None


@dataclass(frozen=True)
class Stopped:
    """A stop request (callback, should_stop, Ctrl-C, SIGTERM) ended the run after `step` steps. `checkpoint`
    holds that step (None when nothing was trained or the weights were already saved); `message` is what
    TrainingInterrupted says, which train() raises next."""

    step: int
    checkpoint: Path | None
    message: str


@dataclass(frozen=True)
class Failed:
    """Training raised an exception; `message` is its one line ("TypeName: text" for an unexpected error).
    train() re-raises the exception after this event."""

    message: str


Event = Union[ClassImagesProgress, Step, ValidationLoss, SampleGrid, ValidationScores, CheckpointSaved, Done, Stopped, Failed]
Callback = Callable[[Event], object]  # returns STOP to ask for a stop; any other value is ignored


class Emitter:
    """Calls each callback with an event; `emit(event)` is the loop's one line per place.

    Only the main process calls callbacks: `main` starts from the launcher's RANK (errors before the
    Accelerator exists) and train sets it from the Accelerator. A callback that raises is dropped after one
    warning; one that returns STOP calls `on_stop()` (the run's StopRequest.request).
    """

    def __init__(self, callbacks: Iterable[Callback] = (), on_stop: Callable[[], None] | None = None):
        self.callbacks = list(callbacks)
        self.on_stop = on_stop
        self.main = launch_rank() == 0

    def __call__(self, event: Event) -> None:
        if not self.main:
            return
        for cb in list(self.callbacks):
            try:
                wanted = cb(event) is STOP
            except Exception as e:  # noqa: BLE001 - a UI's bug must not cost a training run
                self.callbacks.remove(cb)
                log.warning("callback %s raised %s: %s on %s; it gets no more events, training goes on",
                            getattr(cb, "__qualname__", repr(cb)), type(e).__name__, e, type(event).__name__)
                continue
            if wanted and self.on_stop is not None:
                self.on_stop()
