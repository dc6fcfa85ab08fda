"""`nanobooth toy eval RUN_DIR`: the DreamBooth paper's claims, measured on the toy world.

For the base model and for the run, over fixed seeds:
- subject_fidelity: "a photo of a sks <class> [in scene]" generations vs the instance images, mean
  probe-feature cosine (the paper's DINO score),
- subject_identity: fraction of those generations the probe identifies as the subject (class, pattern
  and mark all read right; the base model scores 0; strict, since small marks blur at 64x64), and
  identity_class / identity_pattern / identity_mark: how often each of the three reads right (which one a
  run misses),
- prompt_fidelity: fraction of "a photo of a sks <class> <scene>" generations showing that scene (the
  context the prompt adds; the subject itself is subject_fidelity's business). The base model scores
  high here, since it ignores "sks": the claim is that fine-tuning keeps it,
- subject_in_context: fraction of those scene generations showing the subject *and* the scene, the
  task as a whole (base ~0; a run that binds the subject to its instance backdrop also ~0),
- prior_drift: plain "a photo of a <class>" generations vs the instance images, mean feature cosine
  (the paper's PRES: does the class now look like the subject? lower is better),
- prior_identity: fraction of those class generations the probe identifies as the subject,
- diversity: mean pairwise feature distance among "a photo of a sks <class>" generations (DIV).
The identity rates need a toy-world subject (subject.json from `nanobooth toy subject`), and so does
the "reference" row: the subject's own renders (fresh poses, the prompts' scenes) after a round trip
through the model's VAE, scored the same way: what a generation that drew the subject exactly would
score. Every generation passes through that decoder, and the toy VAE smears fine patterns, so this,
not 1.0, is what a run should be read against (not a strict bound: a generation can read as the
subject more often than true renders do).
Everything is read by the toy world's probe (`toy/probe.py`), trained on the world's ground truth.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..core.data import load_folder, read_subject_meta
from ..inference.generate import grid, load_run, render, resolve_sampler, save_png, with_sampler
from ..core.models import load_pipeline
from ..core.run_folder import TOY_EVAL
from . import metrics, world
from .probe import load_probe, vae_roundtrip
from .run_check import finished_run

log = logging.getLogger("nanobooth")


# toy eval's default steps per sampler: on the toy model 15 DPM-Solver++ steps score within 0.02 of 25 DDIM steps on
# every metric (docs/evaluation.md) at 60% of the forwards; the flow-matching twin's Euler keeps 25
EVAL_STEPS = {"dpm++": 15, "model": 25}


def prompts_for(noun: str, identifier: str = "sks") -> dict[str, list[str]]:
    return {
        "subject": [f"a photo of a {identifier} {noun}"],
        "scenes": [f"a photo of a {identifier} {noun} {scene}" for scene in world.SCENES],
        "class": [f"a photo of a {noun}"],
    }


def score(pipe, noun: str, instance, probe, identifier: str, n: int, seed: int, steps: int, guidance: float,
          subject: dict | None = None, guidance_cutoff: float = 1.0, bar=None) -> tuple[dict, dict]:
    """`bar`: a progress bar advanced by the number of images rendered."""
    p = prompts_for(noun, identifier)
    kw = dict(guidance_cutoff=guidance_cutoff)
    bar = bar if bar is not None else tqdm(disable=True)
    subj = render(pipe, p["subject"], n, seed, steps, guidance, **kw)[0]
    bar.update(len(subj))
    scenes = render(pipe, p["scenes"], n, seed, steps, guidance, **kw)
    bar.update(sum(map(len, scenes)))
    cls = render(pipe, p["class"], n, seed, steps, guidance, **kw)[0]
    bar.update(len(cls))
    scene_imgs = [img for row in scenes for img in row]
    requested = [{"scene": s} for s in world.SCENES for _ in range(n)]
    result = {
        "subject_fidelity": metrics.subject_fidelity(subj + scene_imgs, instance, probe),
        "prompt_fidelity": metrics.prompt_fidelity(scene_imgs, requested, probe),
        "prior_drift": metrics.prior_drift(cls, instance, probe),
        "diversity": metrics.diversity(subj, probe),
    }
    if subject:  # identity needs the subject's ground truth; format_table orders the keys
        result.update(
            subject_identity=metrics.subject_match(subj + scene_imgs, subject, probe),
            subject_in_context=metrics.subject_in_context(scene_imgs, [r["scene"] for r in requested], subject, probe),
            prior_identity=metrics.subject_match(cls, subject, probe),
            **_parts(subj + scene_imgs, subject, probe),
        )
    rows = {p["subject"][0]: subj, **dict(zip(p["scenes"], scenes)), p["class"][0]: cls}
    return {k: round(float(v), 4) for k, v in result.items()}, rows


def _parts(images, subject: dict, probe) -> dict[str, float]:
    """identity_class, identity_pattern, identity_mark: how often each part of subject_identity reads right."""
    return {f"identity_{k}": v for k, v in metrics.identity_parts(images, subject, probe).items()}


def reference(vae, subject: dict, instance, probe, n: int, seed: int) -> tuple[dict, list]:
    """`score`'s subject metrics for renders of the subject itself through `vae` (see the module doc)."""
    s = world.Subject(**subject)
    rng = np.random.default_rng([seed, 17])
    scenes = [None] + list(world.SCENES)
    imgs = vae_roundtrip([world.render_subject(s, rng, sc) for sc in scenes for _ in range(n)], vae)
    result = {
        "subject_fidelity": metrics.subject_fidelity(imgs, instance, probe),
        "subject_identity": metrics.subject_match(imgs, subject, probe),
        "subject_in_context": metrics.subject_in_context(imgs[n:], [sc for sc in scenes[1:] for _ in range(n)],
                                                         subject, probe),
        **_parts(imgs, subject, probe),
    }
    return {k: round(float(v), 4) for k, v in result.items()}, imgs[:n]


def toy_eval(run_dir: str | Path, images_per_prompt: int = 4, seed: int = 1234, steps: int | None = None,
             guidance: float | None = None, with_base: bool = True, guidance_cutoff: float | None = None,
             sampler: str = "auto") -> dict:
    """Score a finished toy run (and the base model, `with_base`) on fixed seeds and prompts; writes RUN_DIR/toy_eval.json
    and the before/after sheet RUN_DIR/toy_eval.png (an earlier pair at other settings is kept: _keep_earlier). `sampler`: "model" (the model's own, DDIM for the toy UNet),
    "dpm++" or "auto" (DPM++ where the model allows it: inference.generate.with_sampler), `steps` of it (default
    EVAL_STEPS of the sampler used); settings records the sampler used. Raises ModelError for a folder that is not a
    finished run."""
    run, cfg, instance_dir = finished_run(run_dir)
    meta = read_subject_meta(instance_dir)
    noun = meta.get("class_noun") or cfg.class_prompt.split()[-1]
    identifier = meta.get("identifier", "sks")
    instance = load_folder(instance_dir, 0)
    probe = load_probe()
    guidance_arg, cutoff_arg = guidance, guidance_cutoff  # newcomer56: generate and eval say what they sample with
    guidance = guidance if guidance is not None else cfg.validation_guidance_scale
    cutoff = guidance_cutoff if guidance_cutoff is not None else cfg.validation_guidance_cutoff
    # the toy model ships in fp16; fp16 kernels are slow or missing on CPUs, so score in fp32
    tuned_pipe = load_run(cfg.model, str(run), torch_dtype=torch.float32)
    sampler = resolve_sampler(tuned_pipe, sampler)
    steps = EVAL_STEPS[sampler] if steps is None else steps
    tuned_pipe = with_sampler(tuned_pipe, sampler)
    args = (noun, instance, probe, identifier, images_per_prompt, seed, steps, guidance, meta.get("subject"), cutoff)
    out = {"settings": {"images_per_prompt": images_per_prompt, "seed": seed, "steps": steps, "sampler": sampler,
                        "guidance": guidance, "guidance_cutoff": cutoff, "class_noun": noun, "model": cfg.model}}
    if stranger := world.outside_world(noun):  # said under the table; toy_eval.json's readers are told here
        out["settings"]["outside_toy_world"] = True
    ran = [what for what, given in (("guidance", guidance_arg), ("guidance cutoff", cutoff_arg)) if given is None]
    print(f"sampling: {sampler} {steps} steps, guidance {guidance:g}" + (f" on the first {cutoff:.0%} of them" if cutoff < 1 else "")
          + f", seed {seed}, {images_per_prompt} images a prompt" + (f" ({' and '.join(ran)} from the run's config)" if ran else ""))
    tuned_pipe.set_progress_bar_config(disable=True)
    per_model = sum(len(v) for v in prompts_for(noun, identifier).values()) * images_per_prompt
    bar = tqdm(total=per_model * (2 if with_base else 1), desc="toy eval", unit="img")
    out["tuned"], tuned_rows = score(tuned_pipe, *args, bar=bar)
    sheet_rows, labels = [], []
    if with_base:
        base = with_sampler(load_pipeline(cfg.model, torch_dtype=torch.float32), sampler)
        base.set_progress_bar_config(disable=True)
        out["base"], base_rows = score(base, *args, bar=bar)
        for prompt in list(tuned_rows)[:3] + [list(tuned_rows)[-1]]:
            sheet_rows += [base_rows[prompt], tuned_rows[prompt]]
            labels += [f"base: {prompt}", f"tuned: {prompt}"]
    else:
        sheet_rows, labels = list(tuned_rows.values()), list(tuned_rows)
    bar.close()
    sheet_rows.append(instance[: images_per_prompt])
    labels.append("instance images")
    if meta.get("subject"):
        out["reference"], through_vae = reference(tuned_pipe.vae, meta["subject"], instance, probe, images_per_prompt, seed)
        sheet_rows.append(through_vae)
        labels.append("reference: the subject itself, through the model's VAE")
    _keep_earlier(run, out)
    save_png(grid(sheet_rows, labels, title=f"toy eval: {run.name}"), run / TOY_EVAL[1])
    (run / TOY_EVAL[0]).write_text(json.dumps(out, indent=2))
    print(format_table(out))
    if stranger:
        log.warning("toy eval: %s", stranger)
    print(f"wrote {run / TOY_EVAL[0]} and the before/after sheet {run / TOY_EVAL[1]} ({images_per_prompt} images a prompt; "
          "the columns: docs/evaluation.md, `nanobooth toy eval RUN_DIR`)")
    return out


def _settings_name(res: dict) -> str:
    """toy_eval-SAMPLER-STEPS-N-seedS-gG-gcC[-nobase]: the file stem an eval with these settings (toy eval's flags) is
    kept under."""
    st = res.get("settings", {})
    return (f"toy_eval-{st.get('sampler')}-{st.get('steps')}-{st.get('images_per_prompt')}-seed{st.get('seed')}"
            f"-g{st.get('guidance')}-gc{st.get('guidance_cutoff')}" + ("" if "base" in res else "-nobase"))


def _keep_earlier(run: Path, new: dict) -> None:
    """Before `new` replaces RUN/toy_eval.json: an earlier eval at other settings (a quick `--images-per-prompt 2
    --no-base` after the demo's full one) is moved to its settings-named copy, json and sheet, so no score is lost.
    The same settings score the same (fixed seeds), so that one is simply replaced; a --no-base eval at them takes its
    base row."""
    old_json, old_png = (run / name for name in TOY_EVAL)
    try:
        old = json.loads(old_json.read_text())
    except (OSError, ValueError):
        return  # none, or unreadable: nothing worth keeping
    if not isinstance(old, dict):
        return
    if "base" not in new and "base" in old and old.get("settings") == new.get("settings"):
        # --no-base at the earlier eval's settings: the base model scores the same (fixed seeds), so its row carries
        # over, and the eval is replaced as at the same settings (newcomer57: it was kept as "other settings")
        new["base"] = old["base"]
        print("the base model's row: the earlier eval's at these same settings (--no-base rendered none)")
    if _settings_name(old) == _settings_name(new):
        return
    stem = _settings_name(old)
    old_json.replace(run / f"{stem}.json")
    if old_png.is_file():
        old_png.replace(run / f"{stem}.png")
    print(f"kept the earlier eval (other settings) as {run / stem}.json and its sheet as {stem}.png")


def format_table(res: dict) -> str:
    keys = [k for k in ("subject_fidelity", "subject_identity", "prompt_fidelity", "subject_in_context", "prior_drift",
                        "prior_identity", "diversity") if k in res.get("tuned", {})]
    lines = ["| model | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for who in ("base", "tuned", "reference"):
        if who in res:
            lines.append(f"| {who} | " + " | ".join(f"{res[who][k]:.3f}" if k in res[who] else "–" for k in keys) + " |")
    parts = [f"{who} " + " / ".join(f"{res[who][f'identity_{k}']:.2f}" for k in metrics.IDENTITY)
             for who in ("base", "tuned", "reference") if "identity_mark" in res.get(who, {})]
    if parts:
        lines.append(f"\nidentity read part by part ({' / '.join(metrics.IDENTITY)}): " + ", ".join(parts))
    return "\n".join(lines)
