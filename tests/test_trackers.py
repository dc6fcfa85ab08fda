"""report_to= (core/trackers.py): TensorBoard event files in the run folder hold what the run logged."""

import importlib.util
import json

import pytest
from conftest import step2_resume_folder, train_args

from nanobooth.cli import main


def test_tensorboard_gets_loss_lr_validation_loss_and_grids(tiny_model, subject_dir, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "r"
    assert main(["train", "dreambooth-lora-prior-pre", *train_args(tiny_model, subject_dir, out, "report_to=tensorboard",
                                                                   "validation_loss_steps=2", "validation_prompts=[a sks dog]",
                                                                   "validation_steps=2")]) == 0
    files = list((out / "logs").rglob("events.out.tfevents.*"))
    assert files
    acc = {}
    for f in files:  # accelerate writes the hparams in a file of their own
        ea = EventAccumulator(str(f), size_guidance={"images": 0, "scalars": 0})
        ea.Reload()
        for tag in ea.Tags()["scalars"]:
            acc[tag] = [(e.step, e.value) for e in ea.Scalars(tag)]
        for tag in ea.Tags()["images"]:
            acc[tag] = [e.step for e in ea.Images(tag)]
    log = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    steps = [r for r in log if "loss" in r]
    assert [s for s, _ in acc["loss"]] == [1, 2, 3]
    assert [v for _, v in acc["loss"]] == pytest.approx([r["loss"] for r in steps], abs=1e-6)
    assert [v for _, v in acc["loss_prior"]] == pytest.approx([r["prior_loss"] for r in steps], abs=1e-6)
    assert [v for _, v in acc["lr"]] == pytest.approx([r["lr"] for r in steps])
    assert [s for s, _ in acc["val_loss"]] == [0, 2, 3]
    assert [v for _, v in acc["val_loss"]] == pytest.approx([r["val_loss"] for r in log if "val_loss" in r], abs=1e-6)
    assert acc["samples"] == [0, 2, 3]  # the "before" grid, step 2, the final grid


def test_no_report_to_writes_no_logs(tiny_model, subject_dir, tmp_path):
    out = tmp_path / "r"
    assert main(["train", "dreambooth-lora", *train_args(tiny_model, subject_dir, out, "max_train_steps=1")]) == 0
    assert not (out / "logs").exists()


@pytest.mark.skipif(importlib.util.find_spec("wandb") is not None, reason="wandb is installed here")
def test_wandb_without_wandb_is_one_line_and_writes_nothing(tiny_model, subject_dir, tmp_path, capsys):
    out = tmp_path / "r"
    assert main(["train", "dreambooth-lora", *train_args(tiny_model, subject_dir, out, "report_to=wandb", prior=False)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "report_to=wandb" in err[0] and "pip install wandb" in err[0] and not out.exists()


def test_validation_scores_reach_the_trackers():
    from nanobooth.core.events import ValidationScores
    from nanobooth.core.trackers import TrackerCallback

    class Acc:
        trackers, logged = [], []

        def log(self, values, step):
            self.logged.append((step, values))

    acc = Acc()
    TrackerCallback(acc)(ValidationScores(4, {"subject_fidelity": 0.5, "prompt_fidelity": 0.9}))
    assert acc.logged == [(4, {"val_subject_fidelity": 0.5, "val_prompt_fidelity": 0.9})]
def test_a_resumed_run_logs_each_step_once_in_tensorboard(tiny_model, subject_dir, tmp_path):
    """Resumed from step 2 of 4, the run's folder holds the first run's events for steps 1-4 and the resumed run's
    for 3-4: TensorBoard reads each step once, the resumed value (purge_step; it showed 3 and 4 twice)."""
    import shutil

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    extra = ["report_to=tensorboard", "max_train_steps=4", "checkpointing_steps=2"]
    full = tmp_path / "full"
    assert main(["train", "dreambooth-lora", *train_args(tiny_model, subject_dir, full, *extra)]) == 0
    part = step2_resume_folder(full, tmp_path / "part")  # a run stopped after step 4's logs, its newest checkpoint step 2
    shutil.copytree(full / "logs", part / "logs")
    (part / "train_log.jsonl").write_text("".join(ln + "\n" for ln in (full / "train_log.jsonl").read_text().splitlines()))
    assert main(["train", "dreambooth-lora", *train_args(tiny_model, subject_dir, part, *extra, "resume_from_checkpoint=latest")]) == 0
    runs = [d for d in (part / "logs").iterdir() if d.is_dir() and any(d.glob("events.out.tfevents.*"))]
    scalars = {}
    for d in runs:
        if len(list(d.glob("events.out.tfevents.*"))) == 2:  # the run's folder: both runs' event files
            ea = EventAccumulator(str(d), size_guidance={"scalars": 0})
            ea.Reload()
            scalars = {e.step: e.value for e in ea.Scalars("loss")} | {"steps": [e.step for e in ea.Scalars("loss")]}
    assert scalars["steps"] == [1, 2, 3, 4]
    log = [json.loads(x) for x in (part / "train_log.jsonl").read_text().splitlines()]
    assert [scalars[r["step"]] for r in log] == pytest.approx([r["loss"] for r in log], abs=1e-6)
