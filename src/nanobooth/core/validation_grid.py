"""The validation grids a run renders (validation_prompts) and the scores of the weights they show
(validation_scores, keep_best), for the training loop (train.py).

A grid is optional: a render that fails is a warning and training goes on; Ctrl-C during one stops the run
at that step (mid-run: the loop checkpoints it; the final grid: the weights are already saved). Rendering
forks the RNG and gives ToMe its own merge generator, so a grid never changes what training draws.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any, Callable

import torch

from ..inference.generate import grid, render, save_png, with_sampler
from ..methods import embeddings
from .config import TrainConfig
from .events import Emitter, SampleGrid, ValidationScores
from .models import make_pipeline
from .optimizers import eval_weights
from .run_folder import SAMPLES
from .stop import StopRequest, TrainingInterrupted

log = logging.getLogger("nanobooth")


@dataclasses.dataclass(eq=False, repr=False)  # holds models: no field-by-field compare or repr
class ValidationGrids:
    """Renders `samples/step-NNNNNN.png` for a step: train.py calls it `validate(step)`, and
    `validate(step, final=True)` after the weights are written. Holds the loop's raw modules (DDP and
    torch.compile wrap these very parameters)."""

    cfg: TrainConfig
    components: Any  # models.Components: the pipeline's other parts
    unet: torch.nn.Module
    text_encoders: list
    idle: list  # modules parked on the CPU while training: brought back for a render, parked again after
    tokens: dict  # pivotal tuning's identifier tokens (render() rewrites the prompts)
    te_trained: bool
    device: torch.device
    accelerator: Any
    optimizer: Any
    stop: StopRequest
    emit: Emitter
    main: bool
    run_dir: Path
    log_path: Path  # train_log.jsonl: validation_scores lines
    scorer: Callable | None  # step_scores.build(): validation_scores of a grid's rows; None: not scored
    keeper: Any  # step_scores.KeepBest, with a scorer
    trained: dict  # name -> trained module (methods' trained_modules): what keep_best copies
    tome_gen: torch.Generator  # training's ToMe generator, given back to ToMe after a render

    def __call__(self, step: int, final: bool = False) -> None:
        """Render the validation grid of `step`; nothing without validation_prompts or off the main process."""
        if not (self.main and self.cfg.validation_prompts):
            return
        stop = self.stop
        try:
            stop.raising = True  # a render can take minutes: Ctrl-C should not wait for it
            if final and stop.requested():
                raise KeyboardInterrupt  # asked during the last step: the weights are saved, skip the grid
            with eval_weights(self.optimizer):  # schedule-free: its averaged weights, as the result will be
                self._render(step)
        except TrainingInterrupted:  # a second Ctrl-C: at once
            raise
        except KeyboardInterrupt:
            if final:
                raise TrainingInterrupted(f"{stop.source or 'Ctrl-C'} during the final validation render: the trained weights "
                                          f"are saved in {self.run_dir} (no step-{step:06d} grid)", stop.signum or 2, step) from None
            stop.request()
            log.warning("validation render at step %d interrupted; stopping", step)
        except Exception as e:  # noqa: BLE001 - GPU OOM, a size the sampler refuses...: the grid is optional
            log.warning("validation render at step %d failed and was skipped (%s: %s)%s", step, type(e).__name__,
                        str(e).splitlines()[0] if str(e) else "", "" if final else "; training goes on")
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
        finally:
            stop.raising = False

    def _render(self, step: int) -> None:
        cfg, unet, device = self.cfg, self.unet, self.device
        info = getattr(unet, "_tome_info", None)
        devices = [device] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), self.accelerator.autocast():
            if info:  # its own merge generator, so rendering leaves training's ToMe draws alone
                info["args"]["generator"] = torch.Generator(device).manual_seed(cfg.seed + 4)
            try:
                unet.eval(), [te.eval() for te in self.text_encoders]
                [m.to(device) for m in dict.fromkeys((self.components.vae, *self.idle))]
                pipe = with_sampler(make_pipeline(self.components, unet=unet, text_encoders=self.text_encoders), cfg.validation_sampler)
                setattr(pipe, embeddings.TOKEN_MAP, self.tokens)  # render() rewrites the identifier
                pipe.set_progress_bar_config(desc=f"validation step {step}", leave=False)  # runs on rank 0 only
                rows = render(pipe, cfg.validation_prompts, cfg.num_validation_images,
                              cfg.validation_seed if cfg.validation_seed is not None else cfg.seed,
                              cfg.validation_inference_steps, cfg.validation_guidance_scale, cfg.resolution,
                              guidance_cutoff=cfg.validation_guidance_cutoff)
                scores = self._score(pipe, rows, step)
            finally:  # also after a failed or interrupted render: training goes on from here
                unet.train(), [te.train(self.te_trained) for te in self.text_encoders], [m.to("cpu") for m in self.idle]
                if info:
                    info["args"]["generator"] = self.tome_gen
        path = self.run_dir / SAMPLES / f"step-{step:06d}.png"
        save_png(grid(rows, cfg.validation_prompts, title=f"{self.run_dir.name} step {step}"), path)
        self.emit(SampleGrid(step, path))
        if scores:  # validation_scores: logged, plotted and (keep_best) the weights kept if this step is the best
            with self.log_path.open("a") as f:
                f.write(json.dumps({"step": step, **scores}) + "\n")
            self.keeper.add(step, scores, self.trained)
            self.emit(ValidationScores(step, scores))

    def _score(self, pipe, rows, step: int) -> dict[str, float]:
        """validation_scores of the weights the grid shows; {} without a scorer or when scoring fails (a warning)."""
        if not self.scorer:
            return {}
        try:
            scores = self.scorer(pipe, rows)
        except Exception as e:  # noqa: BLE001 - optional like the grid: this step is just not scored
            log.warning("validation scores at step %d failed and were skipped (%s: %s)", step, type(e).__name__,
                        str(e).splitlines()[0] if str(e) else "")
            return {}
        log.info("step %d validation scores: %s", step, " ".join(f"{k} {v:.4f}" for k, v in scores.items()))
        return scores
