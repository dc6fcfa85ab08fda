"""`nanobooth demo`: the README's main job. The whole DreamBooth loop on the embedded default model, on a CPU.

Trains `toy/dreambooth-lora-prior-pre` and writes before/after sample grids. When the pretrained toy
model and its world are shipped, the subject is a toy-world subject and `toy_eval.json` is written too.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from .config import load_config

log = logging.getLogger("nanobooth")


def demo(out: str, steps: int | None = None, subject_seed: int = 0) -> Path:
    from .train import train

    out_dir = Path(out)
    t0 = time.time()
    try:
        from .toy import world  # noqa: F401  (present once the toy world ships)

        subject = world.write_subject(subject_seed, out_dir / "subject")
        overrides = {"instance_data_dir": str(subject)}
        noun = world.make_subject(subject_seed).class_noun
        prompts = [f"a photo of a sks {noun}", f"a photo of a sks {noun} on the beach", f"a photo of a sks {noun} in the snow",
                   f"a photo of a {noun}"]
    except (ImportError, AttributeError):
        overrides = {"instance_data_dir": "example:dog", "instance_prompt": "a photo of sks dog", "class_prompt": "a photo of dog"}
        prompts = ["a photo of sks dog", "a sks dog on the beach", "a photo of dog"]
    overrides.update(output_dir=str(out_dir / "run"), validation_prompts=prompts, overwrite=True)
    if steps:
        overrides["max_train_steps"] = steps
    cfg = load_config("toy/dreambooth-lora-prior-pre", overrides)
    run_dir = train(cfg)
    try:
        from .toy.evaluate import toy_eval

        toy_eval(run_dir)
    except ImportError:
        pass
    samples = sorted((run_dir / "samples").glob("step-*.png"))
    print(f"\ndemo finished in {time.time() - t0:.0f} s")
    if samples:
        print(f"before: {samples[0]}\nafter:  {samples[-1]}")
    if (run_dir / "toy_eval.json").is_file():
        print(f"scores: {run_dir / 'toy_eval.json'}")
    return run_dir
