"""Golden runs: refactors must not change what training computes.

Each case trains a packaged variant for 5 steps on the tiny model and compares, bit for bit, the loss log
(every field but wall time) and a SHA-256 of every trained tensor written, with `tests/golden/<case>.json`;
one case also pins a validation grid's pixels. The files were written from the code before the seams
refactor (issue #20). A change that is *meant* to alter training regenerates them, and says so in its commit:

    NANOBOOTH_REGEN_GOLDEN=1 python -m pytest tests/test_golden.py
"""

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import train_args
from PIL import Image
from safetensors.torch import load_file

from nanobooth.cli import main

GOLDEN = Path(__file__).parent / "golden"
REGEN = os.environ.get("NANOBOOTH_REGEN_GOLDEN") == "1"
# The files were written at 2 CPU threads: a CPU reduction's order follows the thread count, so the last bit
# of a sum does too. Pinned here, the cases match on any machine and under any OMP_NUM_THREADS.
GOLDEN_THREADS = 2
CASES = {
    "dreambooth": ("dreambooth", "tiny_model", []),
    "dreambooth-finetune-text-encoder": ("dreambooth-finetune-text-encoder", "tiny_model", []),
    "dreambooth-prior-pre": ("dreambooth-prior-pre", "tiny_model", []),
    "dreambooth-lora": ("dreambooth-lora", "tiny_model", ["validation_prompts=[a sks dog, a dog]", "validation_steps=5"]),
    "dreambooth-lora-prior-pre": ("dreambooth-lora-prior-pre", "tiny_model", []),
    "sdxl-dreambooth-lora": ("sdxl/dreambooth-lora", "tiny_sdxl_model", ["gradient_checkpointing=false", "train_text_encoder=true"]),
}


def tensor_digest(tensors: dict[str, torch.Tensor]) -> dict[str, str]:
    return {k: hashlib.sha256(t.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()[:16] for k, t in sorted(tensors.items())}


def trained_tensors(run: Path) -> dict[str, str]:
    lora = run / "pytorch_lora_weights.safetensors"
    files = [lora] if lora.is_file() else sorted(run.glob("*/*.safetensors"))
    out = {}
    for f in files:
        out.update({f"{f.parent.name}/{k}" if f != lora else k: v for k, v in tensor_digest(load_file(f)).items()})
    return out


def observe(run: Path) -> dict:
    log = [{k: v for k, v in json.loads(line).items() if k != "time"} for line in (run / "train_log.jsonl").read_text().splitlines()]
    obs = {"log": log, "tensors": trained_tensors(run)}
    grid = run / "samples" / "step-000005.png"
    if grid.is_file():
        obs["grid_sha256"] = hashlib.sha256(np.asarray(Image.open(grid).convert("RGB")).tobytes()).hexdigest()
    return obs


@pytest.mark.parametrize("case", list(CASES))
def test_training_matches_golden_file(case, request, subject_dir, tmp_path):
    variant, model_fixture, extra = CASES[case]
    model = request.getfixturevalue(model_fixture)
    run = tmp_path / "run"
    args = train_args(model, subject_dir, run, "max_train_steps=5", "learning_rate=1e-3",
                      f"num_threads={GOLDEN_THREADS}", *extra)
    assert main(["train", variant, *args]) == 0
    obs = observe(run)
    path = GOLDEN / f"{case}.json"
    if REGEN:
        GOLDEN.mkdir(exist_ok=True)
        path.write_text(json.dumps(obs, indent=1) + "\n")
    golden = json.loads(path.read_text())
    assert obs["log"] == golden["log"]
    assert obs["tensors"] == golden["tensors"], "trained weights differ from the golden run"
    assert obs.get("grid_sha256") == golden.get("grid_sha256")
