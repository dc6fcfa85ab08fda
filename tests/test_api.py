"""The library API: train's events and stop requests, and generate/evaluate as typed functions that give
what the CLI gives."""

import dataclasses
import json
import logging
import math

import numpy as np
import pytest
import torch
from conftest import train_args
from PIL import Image
from safetensors.torch import load_file
from test_evaluate import metric_models  # noqa: F401 (a fixture: tiny DINO and CLIP saved to disk)

from nanobooth import api, events
from nanobooth.core.checkpoint import list_checkpoints
from nanobooth.cli import main
from nanobooth.core.config import load_config
from nanobooth.core.train import TrainingError

LORA = "pytorch_lora_weights.safetensors"


def log_lines(run):
    return [json.loads(x) for x in (run / "train_log.jsonl").read_text().splitlines()]


class Recorder:
    """A callback keeping every event; returns STOP on the events `stop_on` accepts."""

    def __init__(self, stop_on=lambda e: False):
        self.events, self.stop_on = [], stop_on

    def __call__(self, event):
        self.events.append(event)
        return events.STOP if self.stop_on(event) else None

    def kinds(self):
        return [(type(e).__name__, getattr(e, "step", getattr(e, "done", None))) for e in self.events]


# --- train: events ----------------------------------------------------------------------------------------------

def test_events_come_in_order_and_match_what_the_run_wrote(tiny_model, subject_dir, tmp_path):
    run = tmp_path / "run"
    cfg = load_config("dreambooth-lora-prior-pre", train_args(
        tiny_model, subject_dir, run, "sample_batch_size=1", "validation_prompts=[a sks dog]", "validation_steps=2",
        "checkpointing_steps=2"))
    rec = Recorder()
    assert api.train(cfg, callbacks=[rec]) == run
    assert rec.kinds() == [("ClassImagesProgress", 1), ("ClassImagesProgress", 2), ("SampleGrid", 0),
                           ("Step", 1), ("Step", 2), ("CheckpointSaved", 2), ("SampleGrid", 2),
                           ("Step", 3), ("SampleGrid", 3), ("Done", None)]
    assert all(e.total == 2 for e in rec.events if isinstance(e, events.ClassImagesProgress))
    steps = [e for e in rec.events if isinstance(e, events.Step)]
    logged = log_lines(run)
    assert len(steps) == len(logged) == 3
    for e, line in zip(steps, logged):
        assert e.total == 3 and all(math.isfinite(x) for x in (e.loss, e.loss_instance, e.loss_prior))
        assert (round(e.loss, 6), round(e.loss_instance, 6), round(e.loss_prior, 6), e.lr) == \
               (line["loss"], line["instance_loss"], line["prior_loss"], line["lr"])
        assert 0 < e.seconds_per_step < 600
    grids = [e.path for e in rec.events if isinstance(e, events.SampleGrid)]
    assert grids == [run / "samples" / f"step-{s:06d}.png" for s in (0, 2, 3)] and all(p.is_file() for p in grids)
    saved = next(e for e in rec.events if isinstance(e, events.CheckpointSaved))
    assert saved.path == list_checkpoints(run)[0] and saved.path.is_dir()
    done = rec.events[-1]
    assert isinstance(done, events.Done) and done.output_dir == run and (run / LORA).is_file()
    # time to model: the library API gets what the run folder records, and the parts add up
    t = done.time_to_model
    assert json.loads((run / "time_to_model.json").read_text()) == dataclasses.asdict(t)
    assert t.class_images_s > 0 and t.training_s > 0 and t.save_s > 0 and t.setup_s >= 0
    assert abs(t.class_images_s + t.training_s + t.save_s + t.setup_s - t.total_s) < 0.01


def test_a_run_without_prior_reports_no_prior_loss(tiny_model, subject_dir, tmp_path):
    rec = Recorder()
    api.train(load_config("dreambooth-lora", train_args(tiny_model, subject_dir, tmp_path / "run")), callbacks=[rec])
    steps = [e for e in rec.events if isinstance(e, events.Step)]
    assert [e.step for e in steps] == [1, 2, 3] and all(e.loss_prior is None for e in steps)
    assert [type(e) for e in rec.events] == [events.Step] * 3 + [events.Done]  # no prompts, no checkpoints: no grids


def test_a_forced_error_ends_with_failed_and_is_raised(tiny_model, subject_dir, tmp_path, monkeypatch):
    import nanobooth.core.train as tr

    real, calls = tr.dreambooth_loss, [0]

    def nan_on_second_step(*a, **k):
        calls[0] += 1
        loss, inst, prior = real(*a, **k)
        return (loss * math.nan if calls[0] == 2 else loss), inst, prior

    monkeypatch.setattr(tr, "dreambooth_loss", nan_on_second_step)
    rec = Recorder()
    with pytest.raises(TrainingError, match="loss is nan at step 2"):
        api.train(load_config("dreambooth-lora", train_args(tiny_model, subject_dir, tmp_path / "run")), callbacks=[rec])
    assert rec.kinds() == [("Step", 1), ("Failed", None)]
    assert rec.events[-1].message.startswith("TrainingError: loss is nan at step 2")


def test_bad_input_is_a_failed_event_before_anything_loads(tiny_model, subject_dir, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "keep.txt").write_text("someone's file")
    rec = Recorder()
    with pytest.raises(Exception, match="holds other files and no nanobooth run"):
        api.train(load_config("dreambooth-lora", train_args(tiny_model, subject_dir, run)), callbacks=[rec])
    assert len(rec.events) == 1 and rec.events[0].message.startswith("ConfigError: output_dir")
    assert [p.name for p in run.iterdir()] == ["keep.txt"]


def test_a_raising_callback_is_dropped_with_one_warning_and_training_goes_on(tiny_model, subject_dir, tmp_path, caplog):
    seen = []

    def broken(event):
        seen.append(event)
        raise RuntimeError("UI bug")

    rec = Recorder()
    with caplog.at_level(logging.WARNING, logger="nanobooth"):
        api.train(load_config("dreambooth-lora", train_args(tiny_model, subject_dir, tmp_path / "run")),
                  callbacks=[broken, rec])
    assert len(seen) == 1  # dropped after its first failure
    assert [type(e) for e in rec.events] == [events.Step] * 3 + [events.Done]  # the others still get every event
    warned = [r.getMessage() for r in caplog.records if "callback" in r.getMessage()]
    assert len(warned) == 1 and "UI bug" in warned[0] and "training goes on" in warned[0]
    assert (tmp_path / "run" / LORA).is_file()


def test_the_console_says_what_the_run_trains_with_the_saved_parameter_counts(tiny_model, subject_dir, tmp_path, caplog):
    """The toy LoRA + prior recipe trains a text-encoder LoRA, which its name does not say: the line before the first
    step names each trained module with its parameter count (the saved file's), each group's lr, and EMA."""
    with caplog.at_level(logging.INFO, logger="nanobooth"):
        api.train(load_config("dreambooth-lora", train_args(tiny_model, subject_dir, tmp_path / "te", "train_text_encoder=true",
                                                            "learning_rate=2e-3", "text_encoder_lr=1e-3", "use_ema=true")))
        api.train(load_config("dreambooth-lora", train_args(tiny_model, subject_dir, tmp_path / "unet")))
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("training ")]
    assert len(lines) == 2
    saved = load_file(tmp_path / "te" / LORA)
    n = {m: sum(v.numel() for k, v in saved.items() if k.startswith(m + ".")) for m in ("unet", "text_encoder")}
    assert min(n.values()) > 0
    assert lines[0].startswith(f"training unet ({n['unet']} parameters), text_encoder ({n['text_encoder']} parameters) with LoRA;")
    assert "lr unet 2.0e-03, text encoder 1.0e-03" in lines[0] and "EMA of the weights" in lines[0]
    assert "text_encoder" not in lines[1] and "EMA" not in lines[1] and "prior" not in lines[1]


# --- train: a callback asks for a stop ---------------------------------------------------------------------------

def test_a_callback_stop_after_step_2_checkpoints_and_resume_gives_the_uninterrupted_run(tiny_model, subject_dir, tmp_path):
    common = ["max_train_steps=4", "learning_rate=1e-3"]
    ref = tmp_path / "ref"
    api.train(load_config("dreambooth-lora", train_args(tiny_model, subject_dir, ref, *common)))
    run = tmp_path / "run"
    args = train_args(tiny_model, subject_dir, run, *common)
    rec = Recorder(stop_on=lambda e: isinstance(e, events.Step) and e.step == 2)
    with pytest.raises(api.TrainingInterrupted) as exc:
        api.train(load_config("dreambooth-lora", args), callbacks=[rec])
    ckpt = run / "checkpoints" / "checkpoint-000002"
    assert exc.value.exit_code == 130 and exc.value.step == 2 and exc.value.checkpoint == ckpt
    assert "stop request at step 2/4" in str(exc.value) and "resume_from_checkpoint=latest" in str(exc.value)
    assert rec.kinds() == [("Step", 1), ("Step", 2), ("CheckpointSaved", 2), ("Stopped", 2)]
    assert rec.events[-1] == events.Stopped(2, ckpt, str(exc.value))
    assert list_checkpoints(run) == [ckpt] and not (run / LORA).exists()

    rec = Recorder()
    api.train(load_config("dreambooth-lora", [*args, "resume_from_checkpoint=latest"]), callbacks=[rec])
    assert rec.kinds() == [("Step", 3), ("Step", 4), ("Done", None)]
    a, b = load_file(ref / LORA), load_file(run / LORA)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [x["loss"] for x in log_lines(ref)] == [x["loss"] for x in log_lines(run)]


def test_a_stop_asked_while_class_images_are_made_ends_setup_at_once(tiny_model, subject_dir, tmp_path):
    run = tmp_path / "run"
    cfg = load_config("dreambooth-lora-prior-pre", train_args(tiny_model, subject_dir, run, "num_class_images=3",
                                                              "sample_batch_size=1"))
    rec = Recorder(stop_on=lambda e: isinstance(e, events.ClassImagesProgress))
    with pytest.raises(api.TrainingInterrupted, match="before the first training step: nothing trained"):
        api.train(cfg, callbacks=[rec])
    assert rec.kinds() == [("ClassImagesProgress", 1), ("Stopped", 0)] and rec.events[-1].checkpoint is None
    assert sorted(p.name for p in (run / "class_images").glob("*.png")) == ["class-00000.png"]  # kept for the rerun
    assert not (run / "train_log.jsonl").exists() and not list_checkpoints(run)


# --- generate and evaluate ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tiny_model, subject_dir):
    out = tmp_path_factory.mktemp("runs") / "dog"
    api.train(load_config("dreambooth-lora", train_args(tiny_model, subject_dir, out, "max_train_steps=2",
                                                        "learning_rate=1e-2")))
    return out


def pixels(img) -> np.ndarray:
    return np.asarray(img.convert("RGB"))


def test_generate_returns_the_pixels_the_cli_writes(lora_run, tiny_model, tmp_path, capsys):
    prompts = ["a sks dog", "a sks dog on the beach"]
    images = api.generate(str(tiny_model), prompts, weights=lora_run, num_images=2, seed=5)
    assert len(images) == 4 and all(isinstance(im, Image.Image) for im in images)
    out = tmp_path / "cli"
    assert main(["generate", "--model", str(tiny_model), "--weights", str(lora_run), "--prompt", prompts[0],
                 "--prompt", prompts[1], "--num-images", "2", "--seed", "5", "--out", str(out)]) == 0
    assert f"wrote 4 images and grid.png to {out}" in capsys.readouterr().out
    for k, (i, j) in enumerate([(0, 0), (0, 1), (1, 0), (1, 1)]):  # prompt by prompt
        assert np.array_equal(pixels(images[k]), pixels(Image.open(out / f"prompt{i:02d}-{j:02d}.png")))
    assert not np.array_equal(pixels(images[0]), pixels(images[1]))  # each image its own seed
    # the LoRA is applied: the base model alone renders other pixels from the same seeds
    from nanobooth.inference.generate import sampling_settings

    base = api.generate(str(tiny_model), prompts[0], num_images=1, seed=5, **sampling_settings(lora_run))
    assert not np.array_equal(pixels(base[0]), pixels(images[0]))


def test_generate_writes_out_when_asked(lora_run, tiny_model, tmp_path):
    images = api.generate(str(tiny_model), "a sks dog", weights=lora_run, seed=1, out=tmp_path / "o")
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["grid.png", "prompt00-00.png"]
    assert np.array_equal(pixels(images[0]), pixels(Image.open(tmp_path / "o" / "prompt00-00.png")))
    assert images[0].size == (32, 32)  # the run's resolution, as generate --weights samples


def test_evaluate_returns_the_numbers_the_cli_writes(lora_run, tiny_model, subject_dir, metric_models, tmp_path):  # noqa: F811
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a {0} {1} in the snow\na {0} {1} on the beach\n")
    common = dict(weights=lora_run, class_noun="dog", prompts=str(prompts), images_per_prompt=2, steps=2, pres_prompts=1,
                  dino=str(metric_models / "dino"), clip=str(metric_models / "clip"))
    res = api.evaluate(str(tiny_model), subject_dir, tmp_path / "api", **common)
    assert main(["eval", "--model", str(tiny_model), "--weights", str(lora_run), "--subject-dir", str(subject_dir),
                 "--class-noun", "dog", "--prompts", str(prompts), "--images-per-prompt", "2", "--steps", "2",
                 "--pres-prompts", "1", "--dino", str(metric_models / "dino"), "--clip", str(metric_models / "clip"),
                 "--out", str(tmp_path / "cli")]) == 0
    written = json.loads((tmp_path / "cli" / "eval.json").read_text())
    assert json.loads(json.dumps(res)) == written  # every number and setting, bit for bit
    assert json.loads((tmp_path / "api" / "eval.json").read_text()) == written
    assert all(-1 <= res["mean"][k] <= 1 for k in ("dino", "clip_i", "clip_t", "pres")) and res["mean"]["div"] >= 0


def test_evaluate_without_a_class_noun_is_one_clear_error(tiny_model, subject_dir, tmp_path):
    from nanobooth.core.data import DataError

    with pytest.raises(DataError, match="class-noun is required"):
        api.evaluate(str(tiny_model), subject_dir, tmp_path / "e")
    assert not (tmp_path / "e").exists()
