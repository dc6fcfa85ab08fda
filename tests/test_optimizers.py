"""optimizer= (core/optimizers.py): each trains, resumes bit-exactly, and schedule-free's result is its averaged weights."""

import json
import logging

import pytest
import torch
from conftest import step2_resume_folder, train_args
from safetensors.torch import load_file

from nanobooth.cli import main
from nanobooth.core import optimizers
from nanobooth.core.config import ConfigError, TrainConfig

LORA = "pytorch_lora_weights.safetensors"


def run(out, tiny_model, subject_dir, *extra, variant="dreambooth-lora-prior-pre"):
    assert main(["train", variant, *train_args(tiny_model, subject_dir, out, *extra)]) == 0
    return out


@pytest.mark.parametrize("opt,lr", [("prodigy", "1.0"), ("schedulefree", "1e-3")])
def test_resume_is_bit_exact_and_validation_changes_nothing(opt, lr, tiny_model, subject_dir, tmp_path):
    """The full run validates (grid + loss) after every step, which for schedule-free swaps its weights out and
    back; the resumed run does neither: both must end bit-identical."""
    extra = [f"optimizer={opt}", f"learning_rate={lr}", "max_train_steps=4", "checkpointing_steps=2", "random_flip=true",
             "lr_warmup_steps=2"]
    full = run(tmp_path / "full", tiny_model, subject_dir, *extra, "validation_prompts=[a sks dog]", "validation_steps=1",
               "validation_loss_steps=1")
    part = step2_resume_folder(full, tmp_path / "part", class_images=True)
    run(part, tiny_model, subject_dir, *extra, "resume_from_checkpoint=latest")
    wa, wb = load_file(full / LORA), load_file(part / LORA)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    la = [json.loads(x) for x in (full / "train_log.jsonl").read_text().splitlines()][3:]
    lb = [json.loads(x) for x in (part / "train_log.jsonl").read_text().splitlines()]
    assert [(r["loss"], r["lr"]) for r in la] == [(r["loss"], r["lr"]) for r in lb]
    base = load_file(next((full / "checkpoints" / "checkpoint-000002").glob("optimizer.safetensors")))
    assert base  # the optimizer's own state (Prodigy's, schedule-free's z) is in the checkpoint


def test_prodigy_logs_its_step_size_d_times_lr_not_the_multiplier(tiny_model, subject_dir, tmp_path, caplog, capsys):
    """train_log.jsonl's lr, the progress line and the Step event (trackers) carry Prodigy's d*lr, as kohya's
    lr/d*lr (they carried the multiplier: lr 1.0 in every run)."""
    import logging

    from nanobooth.core.optimizers import step_size

    with caplog.at_level(logging.INFO, logger="nanobooth"):
        out = run(tmp_path / "p", tiny_model, subject_dir, "optimizer=prodigy", "learning_rate=1.0", "max_train_steps=2",
                  "lr_scheduler=constant", "lr_warmup_steps=0", "log_every=1", variant="dreambooth-lora")
    stdout = capsys.readouterr().out
    assert "decoupled" not in stdout  # prodigyopt's own print() (weight_decay > 0) stays out of the run's output
    lrs = [json.loads(x)["lr"] for x in (out / "train_log.jsonl").read_text().splitlines()]
    assert len(lrs) == 2 and all(0 < lr < 1e-3 for lr in lrs)  # Prodigy's d starts at 1e-6: nowhere near the multiplier 1.0
    assert any(f"lr {lrs[-1]:.2e}" in r.getMessage() for r in caplog.records)
    p = torch.nn.Parameter(torch.ones(3))
    opt = optimizers.make_optimizer(TrainConfig(optimizer="prodigy"), [{"params": [p], "lr": 0.5}], torch.device("cpu"))
    assert TrainConfig().adam_weight_decay > 0 and capsys.readouterr().out == ""  # nothing on stdout
    sched = optimizers.make_schedule(TrainConfig(optimizer="prodigy", lr_scheduler="constant", lr_warmup_steps=0), opt)
    for _ in range(3):
        p.grad = torch.ones(3)
        opt.step(), sched.step()
    assert step_size(opt, sched) == opt.param_groups[0]["d"] * 0.5 and opt.param_groups[0]["d"] > 1e-6  # d has grown
    adam = optimizers.make_optimizer(TrainConfig(), [{"params": [p], "lr": 0.5}], torch.device("cpu"))
    assert step_size(adam, optimizers.make_schedule(TrainConfig(lr_scheduler="constant", lr_warmup_steps=0), adam)) == 0.5


def test_schedulefree_saves_its_averaged_weights(tiny_model, subject_dir, tmp_path, monkeypatch):
    extra = ["optimizer=schedulefree", "learning_rate=1e-2", "max_train_steps=3"]
    x = load_file(run(tmp_path / "x", tiny_model, subject_dir, *extra, variant="dreambooth-lora") / LORA)
    monkeypatch.setattr("nanobooth.core.train.final_weights", lambda opt: None)  # what saving without eval() would give
    y = load_file(run(tmp_path / "y", tiny_model, subject_dir, *extra, variant="dreambooth-lora") / LORA)
    ups = [k for k in x if "lora_B" in k or "lora.up" in k]
    assert ups and any(not torch.equal(x[k], y[k]) for k in ups)


def _sf_optimizer():
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0, 3.0]))
    cfg = TrainConfig(optimizer="schedulefree", lr_warmup_steps=0)
    opt = optimizers.make_optimizer(cfg, [{"params": [p], "lr": 0.1}], torch.device("cpu"))
    for _ in range(3):
        (p ** 2).sum().backward()
        opt.step()
        opt.zero_grad()
    return p, opt


def test_eval_weights_are_schedulefrees_x_and_training_weights_come_back_bit_exact():
    p, opt = _sf_optimizer()
    y = p.detach().clone()
    z = opt.state[p]["z"].clone()
    beta1 = opt.param_groups[0]["betas"][0]
    with optimizers.eval_weights(opt):
        assert torch.allclose(p.detach(), y + (1 - 1 / beta1) * (z - y))
        assert not torch.equal(p.detach(), y)
    assert torch.equal(p.detach(), y) and opt.param_groups[0]["train_mode"]
    optimizers.final_weights(opt)
    assert torch.allclose(p.detach(), y + (1 - 1 / beta1) * (z - y))


def test_eval_weights_leave_adamw_alone():
    p = torch.nn.Parameter(torch.ones(2))
    opt = optimizers.make_optimizer(TrainConfig(), [{"params": [p], "lr": 0.1}], torch.device("cpu"))
    assert isinstance(opt, torch.optim.AdamW)
    with optimizers.eval_weights(opt):
        assert torch.equal(p.detach(), torch.ones(2))
    optimizers.final_weights(opt)
    assert torch.equal(p.detach(), torch.ones(2))


def test_prodigy_warns_before_the_run_naming_the_key_when_learning_rate_is_not_about_1(caplog):
    # the check the run makes before any model loads (prepare_run -> check_optimizer), once, naming the key and the fix
    with caplog.at_level(logging.WARNING, logger="nanobooth"):
        optimizers.check_optimizer(TrainConfig(optimizer="prodigy", learning_rate=1e-4))
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["optimizer=prodigy: learning_rate=0.0001 scales prodigy's own step size; use learning_rate=1.0 "
                     "(prodigy's default; 0.1 to 10 is not warned about)"]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="nanobooth"):
        optimizers.check_optimizer(TrainConfig(optimizer="prodigy", learning_rate=1.0, text_encoder_lr=20.0))
    assert [r.getMessage() for r in caplog.records] == [
        "optimizer=prodigy: text_encoder_lr=20 scales prodigy's own step size; use text_encoder_lr=1.0 "
        "(prodigy's default; 0.1 to 10 is not warned about)"]
    caplog.clear()
    p = torch.nn.Parameter(torch.ones(2))
    with caplog.at_level(logging.WARNING, logger="nanobooth"):
        optimizers.check_optimizer(TrainConfig(optimizer="prodigy", learning_rate=1.0))
        optimizers.check_optimizer(TrainConfig(optimizer="adamw", learning_rate=1e-4))
        optimizers.make_optimizer(TrainConfig(optimizer="prodigy"), [{"params": [p], "lr": 5e-6}], torch.device("cpu"))
    assert caplog.text == ""  # not again when the optimizer is built


def test_schedulefree_schedule_is_constant_and_it_warms_up_itself():
    p, _ = _sf_optimizer()
    cfg = TrainConfig(optimizer="schedulefree", lr_scheduler="cosine", lr_warmup_steps=5, max_train_steps=10)
    opt = optimizers.make_optimizer(cfg, [{"params": [p], "lr": 0.1}], torch.device("cpu"))
    sched = optimizers.make_schedule(cfg, opt)
    for _ in range(4):
        opt.step(), sched.step()
    assert sched.get_last_lr() == [0.1] and opt.param_groups[0]["warmup_steps"] == 5


@pytest.mark.parametrize("key", ["use_8bit_adam=true", "optimizer=adamw8bit"])
def test_8bit_adam_without_a_gpu_is_one_line_and_writes_nothing(key, tiny_model, subject_dir, tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("a CUDA machine can run it")
    out = tmp_path / "r"
    assert main(["train", "dreambooth-lora", *train_args(tiny_model, subject_dir, out, key, prior=False)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and key in err[0] and ("bitsandbytes" in err[0] or "CUDA" in err[0]) and not out.exists()


def test_use_8bit_adam_is_adamw8bit_and_conflicts_with_another_optimizer():
    assert optimizers.optimizer_name(TrainConfig(use_8bit_adam=True)) == "adamw8bit"
    assert optimizers.optimizer_name(TrainConfig(optimizer="prodigy")) == "prodigy"
    with pytest.raises(ConfigError, match="use_8bit_adam"):
        TrainConfig(use_8bit_adam=True, optimizer="prodigy")


def test_prodigy_trains_a_recipe_whose_text_encoder_has_its_own_lr(tiny_model, subject_dir, tmp_path, caplog):
    # newcomer55: the toy recipe with optimizer=prodigy crashed after loading ("Setting different lr values in different
    # parameter groups is only supported for values of 0"); every group now trains at learning_rate, as in diffusers
    with caplog.at_level(logging.WARNING, logger="nanobooth"):
        out = run(tmp_path / "p", tiny_model, subject_dir, "optimizer=prodigy", "learning_rate=1.0", "max_train_steps=2",
                  "train_text_encoder=true", "text_encoder_lr=5e-5", variant="dreambooth-lora")
    assert (out / LORA).is_file()
    assert "every group trains at learning_rate=1 (prodigy estimates one step size for all); text_encoder_lr=5e-05 is not used" \
        in caplog.text
