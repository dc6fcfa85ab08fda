"""Validation scores per step (config key validation_scores) and keep_best: which step's weights to publish.

At each validation render (step 0 = the base model, every validation_steps, the end) the weights are scored
for subject fidelity (x) and prompt fidelity (y), the two numbers DreamBooth trades against each other:
- toy: `nanobooth toy eval`'s own numbers (toy/evaluate.score) on its subject, scene and class prompts,
  max(2, num_validation_images) images each: subject_fidelity = probe-feature cosine to the photos,
  prompt_fidelity = fraction of the scene images showing their scene.
- real: the validation grid's own images: subject_fidelity = DINO (ViT-S/16) cosine to the photos,
  prompt_fidelity = CLIP-T (each image against its prompt without the identifier), clip_i beside them.
  The models come from the hub cache (offline: downloaded before) and run on the CPU, so they take no
  accelerator memory; when they cannot be loaded scoring is skipped with one warning (keep_best: refused).

keep_best's rule: among the trained steps (not step 0) whose prompt fidelity is at least
(1 - keep_best_tolerance) x the base model's, the highest subject fidelity (ties: higher prompt fidelity,
then the earlier step); when none is within, the highest prompt fidelity (the least overfit step), said so.
Why a constraint, not a blend: kohya / OneTrainer users save every few epochs, look at the samples and keep
the one where the subject looks right before prompts stop being followed ("overcooked"). Likeness rises with
steps while prompt following falls, and the two scales differ (CLIP-T cosines ~0.3, DINO ~0.6), so a
harmonic mean would buy likeness with whatever prompt fidelity it takes; a floor relative to the base model
is what such a user checks by eye.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from .builtin_models import is_toy
from .config import ConfigError, TrainConfig
from .config_values import identifier_words
from .run_folder import KEEP_BEST
from .run_folder import VALIDATION_SCORES as PLOT

log = logging.getLogger("nanobooth")

BEST_FILE = "keep_best.safetensors"  # inside a checkpoint: the best step's trained tensors (safetensors)
DINO, CLIP = "facebook/dino-vits16", "openai/clip-vit-base-patch32"  # `nanobooth eval`'s defaults


def check(cfg: TrainConfig) -> None:
    """Refuse keep_best (ConfigError, one line) where there is no validation step to choose from."""
    if not cfg.keep_best:
        return
    if not cfg.validation_prompts:
        raise ConfigError("config key 'keep_best': needs validation_prompts (the steps it chooses from are the validation "
                          "steps); set validation_prompts or keep_best=false")
    if not 0 < cfg.validation_steps < cfg.max_train_steps:
        # a value to type, not "lower": validation_steps=0 (the default, validation off) is already as low as it goes
        fix = (f"set validation_steps={max(1, cfg.max_train_steps // 4)} (any of 1..{cfg.max_train_steps - 1})"
               if cfg.max_train_steps > 1 else "raise max_train_steps")
        raise ConfigError(f"config key 'keep_best': needs 0 < validation_steps < max_train_steps (got validation_steps="
                          f"{cfg.validation_steps}, max_train_steps={cfg.max_train_steps}): with no validation step before "
                          f"the end there is nothing to choose from; {fix} or keep_best=false")


def identifier(cfg: TrainConfig, meta: dict) -> str | None:
    """subject.json's identifier, else the first word of instance_prompt that class_prompt lacks."""
    return meta.get("identifier") or next(iter(identifier_words(cfg)), None)


class ToyScorer:
    """The toy probe; renders its own prompts (the validation grid's need not name scenes)."""

    kind = "toy"

    def __init__(self, cfg: TrainConfig, instance_dir: Path, meta: dict, probe=None):
        from ..core.data import load_folder
        from ..toy.probe import load_probe

        self.cfg, self.meta = cfg, meta
        self.noun = meta.get("class_noun") or cfg.class_prompt.split()[-1]
        self.ident = identifier(cfg, meta) or "sks"
        self.instance = load_folder(instance_dir, 0, warn=False)  # prepare_run warned about skipped files
        self.probe = probe or load_probe()

    def __call__(self, pipe, rows) -> dict[str, float]:
        from ..toy.evaluate import score

        c = self.cfg
        seed = c.validation_seed if c.validation_seed is not None else c.seed
        out, _ = score(pipe, self.noun, self.instance, self.probe, self.ident, max(2, c.num_validation_images), seed,
                       c.validation_inference_steps, c.validation_guidance_scale, self.meta.get("subject"), c.validation_guidance_cutoff)
        return out


class RealScorer:
    """DINO and CLIP on the validation grid's images (no extra render)."""

    kind = "real"

    def __init__(self, cfg: TrainConfig, instance_dir: Path, meta: dict):
        from ..core.data import load_folder
        from ..eval.metrics import ClipBackend, DinoBackend

        # flag=None: a `nanobooth train` user typed no --clip/--dino; what to do is said here, in config keys
        self.clip = ClipBackend(CLIP, flag=None)  # CLIP-T is the prompt fidelity: without it there is no trade-off to plot
        try:
            self.dino = DinoBackend(DINO, flag=None)
        except Exception as e:  # noqa: BLE001 - subject fidelity falls back to CLIP-I
            log.warning("validation_scores=%s: DINO not loadable (%s); subject_fidelity is CLIP-I (run once online to cache %s "
                        "for DINO)", cfg.validation_scores, str(e).splitlines()[0], DINO)
            self.dino = None
        self.cfg, self.ident = cfg, identifier(cfg, meta)
        instance = load_folder(instance_dir, 0, warn=False)  # prepare_run warned about skipped files
        self.inst_clip = self.clip.image_features(instance)
        self.inst_dino = self.dino.image_features(instance) if self.dino else None

    def __call__(self, pipe, rows) -> dict[str, float]:
        from ..eval.metrics import strip_identifier

        images = [im for row in rows for im in row]
        prompts = [strip_identifier(p, self.ident) if self.ident else p for p, row in zip(self.cfg.validation_prompts, rows) for _ in row]
        f = self.clip.image_features(images)
        out = {"clip_i": float((f @ self.inst_clip.T).mean()), "clip_t": float((f * self.clip.text_features(prompts)).sum(-1).mean())}
        if self.dino:
            out["dino"] = float((self.dino.image_features(images) @ self.inst_dino.T).mean())
        out["subject_fidelity"], out["prompt_fidelity"] = out.get("dino", out["clip_i"]), out["clip_t"]
        return {k: round(v, 4) for k, v in out.items()}


def build(cfg: TrainConfig, instance_dir: Path, meta: dict):
    """The scorer cfg asks for, or None (validation_scores=none, or not loadable: one warning).
    keep_best without a way to score: ConfigError, before anything is written."""
    from .models import ModelError

    mode = cfg.validation_scores
    if mode == "none" and not cfg.keep_best:
        return None
    if not cfg.validation_prompts:
        log.warning("validation_scores=%s: no validation_prompts, so no validation render to score", mode)
        return None
    if mode in ("none", "auto"):
        mode = "toy" if is_toy(cfg.model) else "real"
    try:
        scorer = (ToyScorer if mode == "toy" else RealScorer)(cfg, instance_dir, meta)
        if cfg.validation_scores == "none":  # only keep_best gets here: its override of the default, said out loud
            log.info("keep_best=true turns on validation_scores=auto (%s scores: %s) to choose the step to publish", mode,
                     "the toy probe" if mode == "toy" else "DINO and CLIP-T")
        return scorer
    except (ModelError, OSError, ImportError, ValueError) as e:
        why = (str(e).strip().splitlines() or [type(e).__name__])[0]
        if cfg.keep_best:
            raise ConfigError(f"config key 'keep_best': no way to score the validation steps ({mode} scores: {why}); download "
                              f"{DINO} and {CLIP} once online, use validation_scores=toy on a toy-world subject, or keep_best=false") from None
        # no config key chooses the DINO/CLIP models, so the fix is their cache or another validation_scores
        fix = (f"; run once online to cache {DINO} and {CLIP}, or set validation_scores=toy (a toy-world subject) or "
               "validation_scores=none") if mode == "real" else ""
        log.warning("validation_scores=%s: validation steps are not scored (%s)%s", cfg.validation_scores, why, fix)
        return None


def choose(history: list[dict], tolerance: float) -> tuple[dict | None, str]:
    """keep_best's rule (module doc) over history rows {"step", "subject_fidelity", "prompt_fidelity", ...}:
    (the kept row or None when no trained step was scored, the reason in words)."""
    if not history:
        return None, "no validation step was scored"
    ref = min(history, key=lambda r: r["step"])
    steps = [r for r in history if r["step"] > 0]
    if not steps:
        return None, "no trained step was scored"
    floor = (1 - tolerance) * ref["prompt_fidelity"]
    within = [r for r in steps if r["prompt_fidelity"] >= floor]
    who = "the base model's" if ref["step"] == 0 else f"step {ref['step']}'s"
    if within:
        best = max(within, key=lambda r: (r["subject_fidelity"], r["prompt_fidelity"], -r["step"]))
        k, n = len(within), len(steps)
        # "trained": the base model's step 0 is scored too (the reference), and a count that left it out read as false
        count = (f"{k} of the {n} trained steps scored" if k < n else f"all {n} trained steps scored" if n > 1
                 else "the only trained step scored")
        x = best["subject_fidelity"]
        kept = f"kept it (subject_fidelity {x:.4f})" if k == 1 else f"kept the highest subject_fidelity ({x:.4f})"
        return best, (f"{count} {'keeps' if k == 1 else 'keep'} prompt_fidelity >= {floor:.4f} ({1 - tolerance:g} x {who} "
                      f"{ref['prompt_fidelity']:.4f}); {kept}")
    best = max(steps, key=lambda r: (r["prompt_fidelity"], r["subject_fidelity"], -r["step"]))
    return best, (f"no trained step scored keeps prompt_fidelity >= {floor:.4f} ({1 - tolerance:g} x {who} {ref['prompt_fidelity']:.4f}); "
                  f"kept the highest prompt_fidelity ({best['prompt_fidelity']:.4f}), the least overfit step")


class KeepBest:
    """The scores of every validation step and (keep_best) the trained tensors of the best step so far, in CPU
    memory; both go into each checkpoint, so a resume continues with them."""

    def __init__(self, cfg: TrainConfig, run_dir: Path):
        self.cfg, self.run_dir = cfg, run_dir
        self.history: list[dict] = []
        self.best_step: int | None = None
        self.best_state: dict[str, torch.Tensor] | None = None

    def add(self, step: int, scores: dict, trained: dict) -> None:
        """Record `step`'s scores, capture the weights if it is now the best, redraw the plot."""
        from .checkpoint import trainable_state

        self.history = [r for r in self.history if r["step"] != step] + [{"step": step, **scores}]
        if self.cfg.keep_best:
            best, _ = choose(self.history, self.cfg.keep_best_tolerance)
            if best is not None and best["step"] == step:  # clone: on the CPU trainable_state returns the live tensors
                self.best_step, self.best_state = step, {k: v.clone() for k, v in trainable_state(trained).items()}
        try:
            plot(self.history, self.run_dir / PLOT, self.best_step, self.floor())
        except OSError as e:  # the plot is optional
            log.warning("could not write %s (%s)", PLOT, e)

    def floor(self) -> float | None:
        if not (self.cfg.keep_best and self.history):
            return None
        return (1 - self.cfg.keep_best_tolerance) * min(self.history, key=lambda r: r["step"])["prompt_fidelity"]

    # --- checkpoints ---------------------------------------------------------------------------------------
    def state(self) -> dict:
        return {"history": self.history, "best_step": self.best_step}

    def files(self) -> dict[str, dict[str, torch.Tensor]]:
        return {BEST_FILE: self.best_state} if self.best_state is not None else {}

    def load(self, state: dict | None, checkpoint: Path, start_step: int) -> None:
        from safetensors.torch import load_file

        state = state or {}
        self.history = [r for r in state.get("history", []) if r["step"] <= start_step]
        self.best_step = state.get("best_step")
        if self.cfg.keep_best and self.best_step is not None:
            if not (checkpoint / BEST_FILE).is_file():
                from .checkpoint import CheckpointError

                raise CheckpointError(f"{checkpoint} holds no {BEST_FILE} (saved without keep_best); resume with keep_best=false")
            self.best_state = load_file(checkpoint / BEST_FILE)

    # --- the end -------------------------------------------------------------------------------------------
    def keep(self, trained: dict, final_step: int) -> dict:
        """Put the chosen step's weights into `trained` (the final step's are already there) and write
        keep_best.json; returns its record."""
        from .checkpoint import load_trainable_state

        best, why = choose(self.history, self.cfg.keep_best_tolerance)
        if best is None or best["step"] == final_step or self.best_state is None:
            kept = final_step
            why = why if best is not None else f"{why}: kept the last step's weights"
        else:
            kept = best["step"]
            load_trainable_state(trained, self.best_state)
        record = {"kept_step": kept, "last_step": final_step, "rule": "highest subject_fidelity with prompt_fidelity >= "
                  "(1 - keep_best_tolerance) x the base model's (step 0)", "keep_best_tolerance": self.cfg.keep_best_tolerance,
                  "why": why, "scores": best, "history": self.history}
        (self.run_dir / KEEP_BEST).write_text(json.dumps(record, indent=1) + "\n")
        log.info("keep_best: published the weights of step %d of %d: %s", kept, final_step, why)
        return record


def plot(history: list[dict], path: Path, best_step: int | None = None, floor: float | None = None, size=(520, 420)) -> None:
    """Subject fidelity (x) against prompt fidelity (y), one point per validation step, joined in step order and
    labelled with the step; the kept step ringed, keep_best's prompt-fidelity floor dashed. PNG, PIL only."""
    rows = sorted(history, key=lambda r: r["step"])
    w, h = size
    left, right, top, bottom = 56, 20, 28, 44
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    xs, ys = [r["subject_fidelity"] for r in rows], [r["prompt_fidelity"] for r in rows] + ([floor] if floor is not None else [])

    def span(v):
        lo, hi = min(v, default=0.0), max(v, default=1.0)
        pad = (hi - lo) * 0.1 or 0.05
        return lo - pad, hi + pad

    (x0, x1), (y0, y1) = span(xs), span(ys)

    def at(x, y):
        return left + (x - x0) / (x1 - x0) * (w - left - right), h - bottom - (y - y0) / (y1 - y0) * (h - top - bottom)

    d.rectangle([left, top, w - right, h - bottom], outline="black")
    for i in range(5):  # ticks
        fx, fy = x0 + (x1 - x0) * i / 4, y0 + (y1 - y0) * i / 4
        px, _ = at(fx, y0)
        _, py = at(x0, fy)
        d.text((px - 12, h - bottom + 4), f"{fx:.2f}", fill="black")
        d.text((4, py - 5), f"{fy:.2f}", fill="black")
    d.text((left, h - 16), "subject fidelity ->", fill="black")
    d.text((left, 8), "prompt fidelity (up); points: validation steps", fill="black")
    if floor is not None:
        _, py = at(x0, floor)
        for x in range(left, w - right, 10):
            d.line([x, py, x + 5, py], fill="gray")
    pts = [at(r["subject_fidelity"], r["prompt_fidelity"]) for r in rows]
    if len(pts) > 1:
        d.line(pts, fill="steelblue", width=1)
    for r, (px, py) in zip(rows, pts):
        d.ellipse([px - 3, py - 3, px + 3, py + 3], fill="steelblue")
        d.text((px + 5, py - 12), str(r["step"]), fill="black")
        if r["step"] == best_step:
            d.ellipse([px - 7, py - 7, px + 7, py + 7], outline="red", width=2)
    tmp = path.with_name(path.name + ".tmp")
    img.save(tmp, format="PNG")
    tmp.replace(path)  # a reader never sees half a PNG
