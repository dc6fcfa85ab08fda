"""A candidate toy model's base-model readings (issue #24), before any DreamBooth: held-out composition and what it
draws of described subjects, as one markdown table row per model.

    nanobooth toy pretrain --recipe v5 --out toy_v5 --export /tmp/v5          # or --no-ema for the raw weights
    python bench/toy_model.py /tmp/v5 src/nanobooth/assets/toy_model --captions 200 --threads 2

composition: metrics.base_model_accuracy on --captions held-out (class, colour, scene) captions (DDIM 25, guidance
7.5; #24's target: >= 0.9 each). described: metrics.described_subject_accuracy on 40 subjects, 2 images each
(DPM-Solver++ 15, guidance 4 on the first half, as toy eval samples); its identity tracks what DreamBooth reaches
on the model (docs/evaluation.md, toy model v5). Seconds are wall time on whatever the machine is doing.

    python bench/toy_model.py toy --captions 0 --subjects 10423 9181 --images-per-subject 16

--subjects reads the described subjects one by one (a row each, after the model's row): which of a DreamBooth set's
subjects the model draws when told (docs/evaluation.md, "Set Q").
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from nanobooth.toy import metrics
from nanobooth.toy.probe import load_probe


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("models", nargs="+", help="pipeline folders (or 'toy': the shipped model)")
    p.add_argument("--captions", type=int, default=200, help="held-out captions for the composition reading (0: skip it)")
    p.add_argument("--guidance-cutoff", type=float, default=0.5,
                   help="the described reading's guidance cutoff (toy eval's: 0.5; 1: guidance on every step)")
    p.add_argument("--subjects", type=int, nargs="+", default=None,
                   help="toy subject seeds for the described reading, each read alone (default: 40 subjects, 1000-1039)")
    p.add_argument("--images-per-subject", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default=None, help="also write the readings here")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    rows = {}
    probe = load_probe()
    print("| model | class | colour | scene | described class | pattern | mark | identity | seconds |\n" + "|---" * 9 + "|")
    for model in a.models:
        t0 = time.perf_counter()
        pipe = metrics._pipeline(model)  # loaded once for every reading of it (each sampler is set on a copy)
        comp = (metrics.base_model_accuracy(pipe, n_captions=a.captions, probe=probe) if a.captions
                else {"class": float("nan"), "colour": float("nan"), "scene": float("nan")})  # 0: skipped
        kw = dict(guidance_cutoff=a.guidance_cutoff, images_per_subject=a.images_per_subject, probe=probe)
        if a.subjects:  # the model's row is the subjects' mean (the same number of images each)
            per_subject = {s: metrics.described_subject_accuracy(pipe, subject_seeds=[s], **kw) for s in a.subjects}
            desc = {k: sum(d[k] for d in per_subject.values()) / len(per_subject) for k in (*metrics.IDENTITY, "identity")}
        else:
            per_subject, desc = {}, metrics.described_subject_accuracy(pipe, **kw)
        rows[model] = {"composition": comp, "described": desc, "per_subject": per_subject,
                       "seconds": time.perf_counter() - t0}
        print(f"| {model} | {comp['class']:.3f} | {comp['colour']:.3f} | {comp['scene']:.3f} | {desc['class']:.3f} | "
              f"{desc['pattern']:.3f} | {desc['mark']:.3f} | {desc['identity']:.3f} | {rows[model]['seconds']:.0f} |",
              flush=True)
        for seed, d in per_subject.items():
            print(f"| {model}, subject {seed} | | | | {d['class']:.3f} | {d['pattern']:.3f} | {d['mark']:.3f} | "
                  f"{d['identity']:.3f} | |")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
