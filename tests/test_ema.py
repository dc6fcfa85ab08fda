"""EMA of the trained parameters (ema.py): the update rule by hand, its state round trip, and in training:
the saved result is the average, decay 0 is the plain run, resume is bit-exact."""

import json

import pytest
import torch
from conftest import step2_resume_folder, train_args
from safetensors.torch import load_file

from nanobooth.cli import main
from nanobooth.core.ema import EMA, EMA_FILE


@pytest.mark.parametrize("offload", [False, True])
def test_ema_update_is_the_warmed_up_average_written_out_by_hand(offload):
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    ema = EMA([p], decay=0.5, offload=offload)
    expect = p.detach().clone()
    for n, target in enumerate([3.0, 5.0, -1.0, 0.5]):
        with torch.no_grad():
            p.fill_(target)
        d = min(0.5, (1 + n) / (10 + n))  # 0.1, 0.1818.., 0.25, 0.3077..: diffusers' warm-up, capped at ema_decay 0.5
        expect = d * expect + (1 - d) * p.detach()
        ema.update()
        torch.testing.assert_close(ema.shadow[0], expect, rtol=0, atol=1e-6)
    assert ema.shadow[0].device.type == "cpu" and ema.updates == 4
    again = EMA([p], decay=0.5)
    again.load_state_dict(ema.state_dict(), ema.updates)
    assert torch.equal(again.shadow[0], ema.shadow[0]) and again.current_decay() == ema.current_decay()
    ema.copy_to_params()
    assert torch.equal(p.detach(), ema.shadow[0])


def _run(tiny_model, subject_dir, out, *extra):
    assert main(["train", "dreambooth-lora", *train_args(tiny_model, subject_dir, out, "learning_rate=1e-2", "max_train_steps=4",
                                                          "checkpointing_steps=2", *extra)]) == 0
    return load_file(out / "pytorch_lora_weights.safetensors")


def test_ema_is_the_result_and_resumes_bit_exact(tiny_model, subject_dir, tmp_path):
    plain = _run(tiny_model, subject_dir, tmp_path / "plain")
    # decay 0: the average is the last weights, so the plumbing changes nothing else in training
    zero = _run(tiny_model, subject_dir, tmp_path / "zero", "use_ema=true", "ema_decay=0")
    assert all(torch.equal(plain[k], zero[k]) for k in plain)
    full = tmp_path / "ema"
    ema = _run(tiny_model, subject_dir, full, "use_ema=true", "ema_decay=0.9", "offload_ema=true")
    assert any(not torch.equal(plain[k], ema[k]) for k in plain)  # the result is the average, not the last step
    ck = full / "checkpoints" / "checkpoint-000002"
    assert (ck / EMA_FILE).is_file() and json.loads((ck / "state.json").read_text())["ema_updates"] == 2
    # the average lies between the start (lora_B = 0) and the last weights, closer to the last: 4 warm-up updates
    b = next(k for k in plain if "lora_B" in k or "lora.up" in k)
    assert 0 < ema[b].norm() < plain[b].norm() * 1.5 and not torch.equal(ema[b], plain[b])
    # resumed from step 2 (the EMA from the checkpoint): bit-exact
    part = step2_resume_folder(full, tmp_path / "part")
    resumed = _run(tiny_model, subject_dir, part, "use_ema=true", "ema_decay=0.9", "offload_ema=true", "resume_from_checkpoint=latest")
    assert all(torch.equal(ema[k], resumed[k]) for k in ema)
