"""Validation loss (core/validation_loss.py): fixed triples, logged beside the training loss, never changing training."""

import json

import pytest
from conftest import train_args
from PIL import Image

from nanobooth import events
from nanobooth.cli import main
from nanobooth.core.config import load_config
from nanobooth.core.train import train


@pytest.fixture(scope="module")
def heldout_dir(subject_dir, tmp_path_factory):
    """One held-out 'photo' of the subject: a mirrored training photo (a different image, same subject)."""
    out = tmp_path_factory.mktemp("heldout")
    src = sorted(subject_dir.glob("*.png"))[0]
    Image.open(src).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(out / "held.png")
    return out


def log_of(run):
    return [json.loads(x) for x in (run / "train_log.jsonl").read_text().splitlines()]


def test_logged_at_start_every_n_steps_and_end_with_events(tiny_model, subject_dir, heldout_dir, tmp_path):
    seen = []
    cfg = load_config("dreambooth-lora", train_args(tiny_model, subject_dir, tmp_path / "r", "learning_rate=1e-3", "max_train_steps=5",
                                                    "validation_loss_steps=2", f"validation_images_dir={heldout_dir}"))
    train(cfg, callbacks=[seen.append])
    log = log_of(tmp_path / "r")
    scored = {r["step"]: (r["val_loss"], r["val_loss_heldout"]) for r in log if "val_loss" in r}
    assert sorted(scored) == [0, 2, 4, 5]  # the base model, every 2 steps, the last step
    assert all(0 < v < 10 for pair in scored.values() for v in pair)
    assert "loss" in log[1] and "val_loss" not in log[1]
    vl = [e for e in seen if isinstance(e, events.ValidationLoss)]
    assert [(e.step, round(e.loss, 6), round(e.loss_heldout, 6)) for e in vl] == [(s, *scored[s]) for s in sorted(scored)]
    kinds = [type(e).__name__ for e in seen]
    assert kinds.index("ValidationLoss") < kinds.index("Step")  # step 0 first; then each one follows its Step
    i = [j for j, e in enumerate(seen) if isinstance(e, events.Step) and e.step == 2][0]
    assert isinstance(seen[i + 1], events.ValidationLoss) and seen[i + 1].step == 2
    # training moved the weights, and the fixed set sees it
    assert scored[5][0] != scored[0][0]


@pytest.mark.parametrize("variant,fixture,extra", [("dreambooth-lora", "tiny_model", ["tome_ratio=0.5"]),
                                                     ("sdxl/dreambooth-lora", "tiny_sdxl_model", ["random_flip=true"])])
def test_the_set_is_fixed_same_weights_same_score(variant, fixture, extra, request, subject_dir, tmp_path):
    """learning_rate=0: the weights never change, so a fixed set scores exactly alike at every step (a fresh draw
    of timesteps or noise per evaluation, or dropout/ToMe randomness, would not). SDXL: its micro-conditioning."""
    model = request.getfixturevalue(fixture)
    assert main(["train", variant, *train_args(model, subject_dir, tmp_path / "r", "learning_rate=0", "max_train_steps=3",
                                               "validation_loss_steps=1", "lora_dropout=0.5", *extra)]) == 0
    scores = [r["val_loss"] for r in log_of(tmp_path / "r")]
    assert len(scores) == 4 and len(set(scores)) == 1


def test_a_missing_heldout_folder_is_one_line_and_no_run_folder(tiny_model, subject_dir, tmp_path, capsys):
    out = tmp_path / "r"
    assert main(["train", "dreambooth-lora", *train_args(tiny_model, subject_dir, out, "validation_loss_steps=1",
                                                         f"validation_images_dir={tmp_path / 'nope'}")]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert any("validation_images_dir" in line and "does not exist" in line for line in err)
    assert "Traceback" not in "\n".join(err) and not out.exists()
