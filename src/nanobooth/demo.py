"""`nanobooth demo`: the README's main job. The whole DreamBooth loop on the embedded default model, on a CPU.

Writes a fresh toy-world subject, trains `toy/dreambooth-lora-prior-pre` on it with the embedded toy
model, writes before/after sample grids and scores the run and the base model (`toy_eval.json`).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from .config import load_config

log = logging.getLogger("nanobooth")


def demo(out: str, steps: int | None = None, subject_seed: int = 0) -> Path:
    from .toy import world
    from .toy.evaluate import toy_eval
    from .train import train

    out_dir = Path(out)
    t0 = time.time()
    subject = world.write_subject(subject_seed, out_dir / "subject")
    noun = world.make_subject(subject_seed).class_noun
    prompts = [f"a photo of a sks {noun}", f"a photo of a sks {noun} on the beach", f"a photo of a sks {noun} in the snow",
               f"a photo of a {noun}"]
    overrides = {"instance_data_dir": str(subject), "output_dir": str(out_dir / "run"), "validation_prompts": prompts,
                 "overwrite": True}
    if steps:
        overrides["max_train_steps"] = steps
    run_dir = train(load_config("toy/dreambooth-lora-prior-pre", overrides))
    toy_eval(run_dir)
    samples = sorted((run_dir / "samples").glob("step-*.png"))
    print(f"\ndemo finished in {time.time() - t0:.0f} s")
    if samples:
        print(f"before: {samples[0]}\nafter:  {samples[-1]}")
    if (run_dir / "toy_eval.json").is_file():
        print(f"scores: {run_dir / 'toy_eval.json'}")
    return run_dir
