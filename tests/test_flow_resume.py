"""Flow-matching families keep the loop's guarantees: resume is bit-exact and validation renders do not
change training (SD3 and FLUX LoRA + prior preservation on the tiny models)."""

import json

import pytest
import torch
from conftest import step2_resume_folder, train_args
from safetensors.torch import load_file

from nanobooth.cli import main


@pytest.mark.parametrize("family,fixture", [("sd3", "tiny_sd3_model"), ("flux", "tiny_flux_model")])
def test_resume_is_bit_exact_and_validation_changes_nothing(family, fixture, request, subject_dir, tmp_path):
    model = request.getfixturevalue(fixture)
    variant = f"{family}/dreambooth-lora-prior-pre"
    extra = ["gradient_checkpointing=false", "learning_rate=1e-3", "max_train_steps=4", "checkpointing_steps=2",
             "random_flip=true", "validation_inference_steps=2"]
    full = tmp_path / "full"  # renders a validation grid and scores the validation loss after every step
    assert main(["train", variant, *train_args(model, subject_dir, full, *extra, "validation_prompts=[a sks dog]",
                                                "validation_steps=1", "validation_loss_steps=1")]) == 0
    part = step2_resume_folder(full, tmp_path / "part", class_images=True)  # no renders; resumed from the step-2 checkpoint
    assert main(["train", variant, *train_args(model, subject_dir, part, *extra, "resume_from_checkpoint=latest")]) == 0
    wa, wb = load_file(full / "pytorch_lora_weights.safetensors"), load_file(part / "pytorch_lora_weights.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    la = [json.loads(x) for x in (full / "train_log.jsonl").read_text().splitlines()][3:]  # after step 0's val_loss line
    assert "val_loss" in la[-1]
    lb = [json.loads(x) for x in (part / "train_log.jsonl").read_text().splitlines()]
    assert [(r["loss"], r["prior_loss"]) for r in la] == [(r["loss"], r["prior_loss"]) for r in lb]
