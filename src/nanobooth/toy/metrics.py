"""Toy-world evaluation maths, after the DreamBooth paper's metrics.

All similarities are cosines between the probe's L2-normalised penultimate
features (`Probe.features`), the toy stand-in for the paper's DINO / CLIP-I
embeddings. Everything here is a pure function of image lists and a probe.
"""
from __future__ import annotations

import numpy as np
import torch

from nanobooth.toy import world


def _cross_cosine(a, b, probe) -> torch.Tensor:
    fa, fb = probe.features(list(a)), probe.features(list(b))
    return fa @ fb.T


def subject_fidelity(generated, instance_images, probe) -> float:
    """Mean cosine similarity over all (generated, instance) pairs: the paper's
    DINO score. 1.0 iff every generation embeds exactly like every instance
    image, so with varied instance poses the attainable maximum is the
    instances' own mean pairwise similarity (see `self_similarity`)."""
    if not generated or not instance_images:
        raise ValueError("need at least one generated and one instance image")
    return float(_cross_cosine(generated, instance_images, probe).mean())


def self_similarity(images, probe) -> float:
    """Mean cosine over distinct pairs of one set: the ceiling for subject_fidelity
    against that set (e.g. the instance images among themselves)."""
    return 1.0 - diversity(images, probe)


IDENTITY = {"class": "cls", "pattern": "pattern", "mark": "mark"}
"""The probe's attributes that identify a subject (probe label -> subject.json key): all must read right."""


def _attribute_hits(pred: dict, subject: dict) -> dict[str, np.ndarray]:
    """Per IDENTITY attribute, a bool per image: did the probe read it as the subject's?"""
    return {k: np.array([v == subject[key] for v in pred[k]]) for k, key in IDENTITY.items()}


def _is_subject(pred: dict, subject: dict) -> np.ndarray:
    return np.logical_and.reduce(list(_attribute_hits(pred, subject).values()))


def subject_match(images, subject: dict, probe) -> float:
    """Fraction of images the probe identifies as this subject: its class,
    pattern and mark all read right. Plain world objects have pattern and mark
    "none", so the base model scores ~0 and the ceiling is 1 (the probe's own
    accuracy on renders of the subject). `subject` is subject.json's "subject"."""
    images = list(images)
    if not images:
        raise ValueError("need at least one image")
    return float(_is_subject(probe.predict(images), subject).mean())


def identity_parts(images, subject: dict, probe) -> dict[str, float]:
    """Per IDENTITY attribute ("class", "pattern", "mark"), the fraction of images whose reading matches the subject's:
    which part of `subject_match` a run misses (on the subjects the LoRA recipe binds least, the pattern: a checker
    drawn as camouflage in the subject's colours, docs/evaluation.md). `subject` is subject.json's "subject"."""
    images = list(images)
    if not images:
        raise ValueError("need at least one image")
    return {k: float(v.mean()) for k, v in _attribute_hits(probe.predict(images), subject).items()}


def subject_in_context(images, scenes: list[str], subject: dict, probe) -> float:
    """Fraction of images showing the subject (as `subject_match`) *and* the
    requested scene: DreamBooth's task as a whole ("a sks star on the beach").
    The base model scores ~0 (no subject); a fine-tune that binds the subject
    to its instance backdrop scores ~0 too (no scene)."""
    images = list(images)
    if not images or len(images) != len(scenes):
        raise ValueError("need one requested scene per image, and at least one image")
    pred = probe.predict(images)
    in_scene = np.array([pred["scene"][i] == s for i, s in enumerate(scenes)])
    return float((_is_subject(pred, subject) & in_scene).mean())


def prior_drift(class_images, instance_images, probe) -> float:
    """How much plain "a photo of a <class>" generations look like the subject
    (the paper's PRES): mean cosine of class generations to instance images.
    Lower is better; compare against the same number for the base model, since
    a class image is never dissimilar to a subject of that class."""
    return subject_fidelity(class_images, instance_images, probe)


def diversity(images, probe) -> float:
    """Mean pairwise (1 - cosine) over distinct pairs (the paper's DIV). 0 for
    identical images; needs at least two images."""
    images = list(images)
    if len(images) < 2:
        raise ValueError("diversity needs at least two images")
    f = probe.features(images)
    sim = f @ f.T
    n = len(images)
    off = sim[~torch.eye(n, dtype=torch.bool)]
    return float((1.0 - off).mean().clamp_min(0.0))


def prompt_fidelity(images, requested: list[dict], probe) -> float:
    """Fraction of images whose probe predictions match every requested
    attribute. Each dict may hold "scene", "colour" and "cls"; absent or None
    keys are not judged (a sks subject has no single colour)."""
    images = list(images)
    if len(images) != len(requested):
        raise ValueError("one request per image")
    pred = probe.predict(images)
    keys = {"scene": "scene", "colour": "colour", "cls": "class"}
    ok = []
    for i, req in enumerate(requested):
        hit = True
        for rk, pk in keys.items():
            if req.get(rk) is not None and pred[pk][i] != req[rk]:
                hit = False
        ok.append(hit)
    return float(np.mean(ok))


def attribute_accuracy(images, truth: list[tuple[str, str, str]], probe) -> dict[str, float]:
    """Per-attribute accuracy of the probe's reading against (cls, colour, scene)
    triples, plus "all" (every attribute right at once)."""
    pred = probe.predict(list(images))
    c = np.array([pred["class"][i] == t[0] for i, t in enumerate(truth)])
    k = np.array([pred["colour"][i] == t[1] for i, t in enumerate(truth)])
    s = np.array([pred["scene"][i] == t[2] for i, t in enumerate(truth)])
    return {"class": float(c.mean()), "colour": float(k.mean()), "scene": float(s.mean()), "all": float((c & k & s).mean())}


def base_model_accuracy(pipeline_dir=None, n_captions: int = 40, seed: int = 0, probe=None,
                        steps: int = 25, guidance_scale: float = 7.5, batch: int = 20,
                        return_images: bool = False) -> dict:
    """Generate one image per held-out caption (cycling through them) and
    report probe accuracy per attribute. These (class, colour, scene) triples
    were excluded from pretraining, so this measures composition.
    `pipeline_dir` may be any model name `load_pipeline` takes (default: the shipped toy model) or a
    loaded StableDiffusionPipeline. guidance 7.5 scored best of 3, 5, 7.5 on 40 held-out captions
    (DDIM, 25 steps)."""
    from nanobooth.toy.probe import load_probe

    probe = probe or load_probe()
    pipe = _pipeline(pipeline_dir)
    triples = sorted(world.HELD_OUT)
    caps = world.held_out_captions()
    idx = [i % len(caps) for i in range(n_captions)]
    images = []
    for b in range(0, n_captions, batch):
        chunk = idx[b:b + batch]
        g = torch.Generator().manual_seed(seed * 100_003 + b)
        images += pipe([caps[i] for i in chunk], num_inference_steps=steps, guidance_scale=guidance_scale,
                       generator=g).images
    acc = attribute_accuracy(images, [triples[i] for i in idx], probe)
    acc.update(n=n_captions, steps=steps, guidance_scale=guidance_scale, seed=seed)
    if return_images:
        acc["images"] = images
    return acc


def described_subject_accuracy(pipeline_dir=None, subject_seeds=range(1000, 1040), images_per_subject: int = 2,
                               seed: int = 0, steps: int = 15, guidance: float = 4.0, guidance_cutoff: float = 0.5,
                               probe=None) -> dict:
    """What the base model can draw of a subject before any DreamBooth: for each toy subject (world.make_subject of
    `subject_seeds`; none of toy eval's), `images_per_subject` generations of its description in the pretraining
    captions' words ("a photo of a red and blue striped cube with an eye", world.described_caption), read by the
    probe. Returns the fraction of images whose class, pattern and mark read as the subject's, and "identity"
    (all three at once, as toy eval's subject_identity), with the settings. DreamBooth binds "sks" to what the
    model can already draw, so identity here tracks what a fine-tune reaches: on v5 at 9000 steps the pre-registered
    subjects' described identity and their LoRA + prior identity correlate at 0.74 (docs/evaluation.md). Sampled as
    toy eval samples (DPM-Solver++ 15 steps, guidance 4 on the first half); `pipeline_dir` as base_model_accuracy's."""
    from nanobooth.inference.generate import render, with_sampler
    from nanobooth.toy.probe import load_probe

    probe = probe or load_probe()
    pipe = with_sampler(_pipeline(pipeline_dir), "dpm++")
    pipe.set_progress_bar_config(disable=True)  # the sampler's copy has a bar of its own
    subjects = [world.make_subject(s) for s in subject_seeds]
    rows = render(pipe, [world.described_caption(s) for s in subjects], images_per_subject, seed, steps, guidance,
                  guidance_cutoff=guidance_cutoff)
    hits = {k: [] for k in IDENTITY}
    for s, row in zip(subjects, rows):
        for k, v in _attribute_hits(probe.predict(row), s.__dict__).items():
            hits[k].append(v)
    hits = {k: np.concatenate(v) for k, v in hits.items()}
    acc = {k: float(v.mean()) for k, v in hits.items()}
    acc["identity"] = float(np.logical_and.reduce(list(hits.values())).mean())
    acc.update(n=len(subjects) * images_per_subject, steps=steps, guidance_scale=guidance,
               guidance_cutoff=guidance_cutoff, seed=seed)
    return acc


def _pipeline(pipeline_dir):
    """A loaded StableDiffusionPipeline as it is (e.g. mid-pretraining), else `load_pipeline` of the name (default:
    the shipped toy model) in fp32 (fp16 kernels are slow or missing on CPU); its progress bar off."""
    from diffusers import StableDiffusionPipeline

    from nanobooth.core.models import load_pipeline

    if isinstance(pipeline_dir, StableDiffusionPipeline):
        pipe = pipeline_dir
    else:
        pipe = load_pipeline(str(pipeline_dir) if pipeline_dir else "toy", torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe
