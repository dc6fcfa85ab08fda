"""The run folder: one result per folder, overwrite removes every earlier output (class images kept),
every reader refuses a folder mixing two runs, the config reads back typed, outputs are world-readable."""

import os
import shutil

import pytest
import yaml
from conftest import train_args

from nanobooth.core import run_folder as rf
from nanobooth.cli import main
from nanobooth.core.config import ConfigError, TrainConfig, load_config, save_config


def plain_file_mode() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


@pytest.fixture(scope="module")
def runs(tiny_model, subject_dir, tmp_path_factory):
    """A LoRA run and a full run of the tiny model, and a folder holding both results (two runs mixed)."""
    root = tmp_path_factory.mktemp("runs")
    assert main(["train", "dreambooth-lora", *train_args(tiny_model, subject_dir, root / "lora", "max_train_steps=1")]) == 0
    assert main(["train", "dreambooth", *train_args(tiny_model, subject_dir, root / "full", "max_train_steps=1")]) == 0
    mixed = root / "mixed"
    shutil.copytree(root / "full", mixed)
    shutil.copy(root / "lora" / rf.LORA_FILE, mixed / rf.LORA_FILE)
    return {"lora": root / "lora", "full": root / "full", "mixed": mixed}


# --- A: one module owns the run folder -----------------------------------------------------------------------

def test_result_kind_names_the_result_and_refuses_two(tmp_path):
    assert rf.result_kind(tmp_path) is None
    (tmp_path / rf.LORA_FILE).write_bytes(b"x")
    assert rf.result_kind(tmp_path) == "lora"
    (tmp_path / rf.MODEL_INDEX).write_text("{}")
    with pytest.raises(rf.RunFolderError) as e:
        rf.result_kind(tmp_path)
    msg = str(e.value)
    assert "\n" not in msg and rf.LORA_FILE in msg and rf.MODEL_INDEX in msg and str(tmp_path) in msg
    (tmp_path / rf.LORA_FILE).unlink()
    assert rf.result_kind(tmp_path) == "full"


def test_lora_file_name_has_one_home():
    from nanobooth.interop import export
    from nanobooth.inference import generate

    assert generate.LORA_FILE is rf.LORA_FILE and export.LORA_FILE is rf.LORA_FILE


def test_run_config_reads_back_typed(tmp_path, caplog):
    cfg = load_config("toy/dreambooth-lora-prior-pre", ["learning_rate=1e-4", "validation_guidance_cutoff=0.5"])
    save_config(cfg, tmp_path / rf.CONFIG)
    back = rf.load_run_config(tmp_path)
    assert isinstance(back, TrainConfig) and back == cfg and isinstance(back.learning_rate, float)
    assert rf.load_run_config(tmp_path / "nothing") is None
    # a run of another version: unknown keys are skipped with a warning, missing ones take their defaults
    data = yaml.safe_load((tmp_path / rf.CONFIG).read_text())
    data["retired_key"] = 1
    del data["log_every"]
    (tmp_path / rf.CONFIG).write_text(yaml.safe_dump(data))
    with caplog.at_level("WARNING", logger="nanobooth"):
        back = rf.load_run_config(tmp_path)
    assert "retired_key" in caplog.text and back.log_every == TrainConfig().log_every
    data["lora_rank"] = "four"
    (tmp_path / rf.CONFIG).write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match="lora_rank") as e:
        rf.load_run_config(tmp_path)
    assert str(tmp_path / rf.CONFIG) in str(e.value)


def test_run_folder_module_loads_no_torch():
    """The CLI checks output_dir with it before the training stack loads (help-speed refusals)."""
    import subprocess
    import sys

    code = "import sys, nanobooth.core.run_folder; print(sorted(m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules))"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and res.stdout.strip() == "[]", res.stderr


def _documented_resume_safe_keys() -> set[str]:
    """The keys docs/reliability.md lists as resume-safe (its 'resume with a different config' row)."""
    import re
    from pathlib import Path

    doc = (Path(__file__).parent.parent / "docs" / "reliability.md").read_text()
    (row,) = [ln for ln in doc.splitlines() if ln.startswith("| resume with a different config")]
    return set(re.findall(r"`(\w+)`", row.split("Resume-safe keys")[1].split("|")[0]))


# a new value for every resume-safe key (the test below checks that it covers them all)
SAFE_CHANGES = {"output_dir": "moved/elsewhere", "overwrite": True, "resume_from_checkpoint": "checkpoints/checkpoint-000002",
                "max_train_steps": 999,
                "validation_prompts": ["a sks dog"], "validation_steps": 7, "validation_loss_steps": 5, "report_to": "tensorboard",
                "checkpointing_steps": 3,
                "checkpoints_total_limit": 2, "log_every": 1, "num_threads": 1}


def _saved_run(tmp_path, **changes):
    """A run folder whose config.yaml is toy/dreambooth-lora's with `changes`; returns the folder."""
    run = tmp_path / "run"
    run.mkdir()
    saved = load_config("toy/dreambooth-lora", {"instance_prompt": "a photo of sks dog", "class_prompt": "a photo of dog",
                                                "output_dir": str(run), **changes})
    save_config(saved, run / rf.CONFIG)
    return run


def test_resume_may_change_only_the_resume_safe_keys(tmp_path):
    from nanobooth.core.config import resume_safe_keys

    assert resume_safe_keys() == set(SAFE_CHANGES) == _documented_resume_safe_keys()
    run = _saved_run(tmp_path, **SAFE_CHANGES)
    now = {"instance_prompt": "a photo of sks dog", "class_prompt": "a photo of dog", "output_dir": str(run)}
    rf.check_output_dir(load_config("toy/dreambooth-lora", {**now, "resume_from_checkpoint": "latest"}))  # every safe key differs
    for key, value in {"lora_rank": 8, "learning_rate": 3e-4, "seed": 1, "instance_prompt": "a photo of zzz dog",
                       "resolution": 48, "validation_guidance_scale": 2.0}.items():
        cfg = load_config("toy/dreambooth-lora", {**now, "resume_from_checkpoint": "latest", key: value})
        with pytest.raises(ConfigError, match="different config") as e:
            rf.check_output_dir(cfg)
        assert f"{key}: " in str(e.value) and repr(value) in str(e.value), str(e.value)


def test_bucket_sizes_may_change_on_resume_only_while_buckets_are_off(tmp_path):
    """The toy variants' bucket_reso_steps went from 64 to 16: a toy run saved before still resumes (the key
    does nothing without enable_bucket), but not once buckets are on."""
    run = _saved_run(tmp_path, bucket_reso_steps=64)
    now = {"instance_prompt": "a photo of sks dog", "class_prompt": "a photo of dog", "output_dir": str(run),
           "resume_from_checkpoint": "latest"}
    rf.check_output_dir(load_config("toy/dreambooth-lora", now))
    with pytest.raises(ConfigError, match="bucket_reso_steps: 64 there, 16 now"):
        rf.check_output_dir(load_config("toy/dreambooth-lora", {**now, "enable_bucket": True}))


def test_output_dir_check_refuses_a_file_and_a_foreign_folder_but_not_an_empty_one(tmp_path):
    def cfg(out, *extra):
        return load_config("dreambooth-lora", [f"output_dir={out}", *extra])

    rf.check_output_dir(cfg(tmp_path / "new"))  # missing: created later
    (tmp_path / "empty").mkdir()
    rf.check_output_dir(cfg(tmp_path / "empty"))
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ConfigError, match="is a file, not a folder"):
        rf.check_output_dir(cfg(tmp_path / "afile"))
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("x")
    # a folder of other files has nothing to resume: the refusal does not offer it (newcomer54)
    with pytest.raises(ConfigError, match=r"holds other files and no nanobooth run: pass a new or empty output_dir "
                                          r"\(overwrite=true would write the run beside those files\)"):
        rf.check_output_dir(cfg(tmp_path / "busy"))
    rf.check_output_dir(cfg(tmp_path / "busy", "overwrite=true"))
    rf.check_output_dir(cfg(tmp_path / "busy", "resume_from_checkpoint=latest"))  # no config.yaml to compare with
    # newcomer50: a finished run's folder said "pass resume_from_checkpoint=latest to continue it", which then refused
    # the resume (the run was finished); it says so at once, with the way on
    done = tmp_path / "done"
    done.mkdir()
    (done / rf.LORA_FILE).write_bytes(b"")
    (done / rf.TRAIN_LOG).write_text('{"step": 10}\n{"step": 300}\n')
    # newcomer55: with no checkpoint there is nothing to train on from; with an older one, the steps after it are redone
    with pytest.raises(ConfigError, match=r"holds a run finished at step 300: pass another output_dir, or overwrite=true "
                                          r"to replace it \(it has no checkpoint to train on from"):
        rf.check_output_dir(cfg(done))
    (done / rf.CHECKPOINTS / "checkpoint-100").mkdir(parents=True)
    (done / rf.CHECKPOINTS / "checkpoint-100" / "state.json").write_text('{"step": 100}')
    with pytest.raises(ConfigError, match=r"overwrite=true to replace it, or resume_from_checkpoint=latest with "
                                          r"max_train_steps above 300 to train it on; its last checkpoint is at step 100, "
                                          r"so steps 101-300 are trained again"):
        rf.check_output_dir(cfg(done))
    (done / rf.LORA_FILE).unlink()  # logged steps without a result: an interrupted run, which can be continued
    with pytest.raises(ConfigError, match="is not empty: pass resume_from_checkpoint=latest to continue it"):
        rf.check_output_dir(cfg(done))


# --- B: a run folder never mixes two runs ---------------------------------------------------------------------

def test_overwrite_removes_every_output_of_the_earlier_run_but_keeps_class_images(tiny_model, subject_dir, tmp_path):
    out = tmp_path / "run"
    args = train_args(tiny_model, subject_dir, out, "max_train_steps=2", "checkpointing_steps=1", 'validation_prompts=["a dog"]',
                      "validation_steps=1")
    assert main(["train", "dreambooth-lora-prior-pre", *args]) == 0
    assert (out / rf.LORA_FILE).is_file() and (out / rf.CHECKPOINTS).is_dir()
    (out / "toy_eval.json").write_text("{}")  # scores of the earlier run
    (out / "toy_eval-dpm++-15-2-seed1234-g4.0-gc0.5-nobase.json").write_text("{}")  # and an eval toy eval kept aside
    (out / "notes.txt").write_text("mine")  # not nanobooth's: stays
    class_images = {p.name: p.stat().st_mtime_ns for p in (out / rf.CLASS_IMAGES).iterdir()}
    assert class_images
    # a full fine-tune into the same folder
    assert main(["train", "dreambooth-prior-pre", *train_args(tiny_model, subject_dir, out, "overwrite=true")]) == 0
    assert rf.result_kind(out) == "full" and not (out / rf.LORA_FILE).exists()
    assert not (out / rf.SAMPLES).exists() and not (out / rf.CHECKPOINTS).exists() and not (out / "toy_eval.json").exists()
    assert not list(out.glob("toy_eval-*"))
    assert {p.name: p.stat().st_mtime_ns for p in (out / rf.CLASS_IMAGES).iterdir()} == class_images  # reused, not regenerated
    assert (out / "notes.txt").read_text() == "mine"
    # and back to a LoRA: the pipeline's components go too
    assert main(["train", "dreambooth-lora-prior-pre", *train_args(tiny_model, subject_dir, out, "overwrite=true")]) == 0
    assert rf.result_kind(out) == "lora"
    assert not any((out / n).exists() for n in ("unet", "vae", "text_encoder", "tokenizer", "scheduler", rf.MODEL_INDEX))


def _one_error_line(capsys) -> str:
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1, err
    return err[0]


def test_every_reader_refuses_a_folder_mixing_two_runs(runs, tiny_model, subject_dir, tmp_path, capsys):
    mixed = str(runs["mixed"])
    assert main(["generate", "--model", str(tiny_model), "--weights", mixed, "--prompt", "a sks dog", "--num-images", "1",
                 "--steps", "1", "--out", str(tmp_path / "g")]) == 2
    line = _one_error_line(capsys)
    assert mixed in line and rf.LORA_FILE in line and rf.MODEL_INDEX in line
    assert not (tmp_path / "g").exists()

    from nanobooth.interop import export as ex

    with pytest.raises(rf.RunFolderError, match="two results"):
        ex.export(mixed, "diffusers", tmp_path / "e")
    assert not (tmp_path / "e").exists()

    assert main(["eval", "--model", str(tiny_model), "--weights", mixed, "--subject-dir", str(subject_dir), "--class-noun", "dog",
                 "--backend", "toy", "--out", str(tmp_path / "ev")]) == 2
    line = _one_error_line(capsys)
    assert mixed in line and rf.LORA_FILE in line and rf.MODEL_INDEX in line
    assert not (tmp_path / "ev").exists()

    from nanobooth.toy.evaluate import toy_eval

    with pytest.raises(rf.RunFolderError, match="two results"):
        toy_eval(mixed)
    assert not (runs["mixed"] / "toy_eval.json").exists()


def test_toy_eval_keeps_an_earlier_eval_at_other_settings(tmp_path, capsys):
    # newcomer54: a quick `toy eval RUN --images-per-prompt 2 --no-base` replaced the demo's full scores and sheet
    import json

    from nanobooth.toy.evaluate import _keep_earlier

    def scores(n, base=True):
        st = {"images_per_prompt": n, "seed": 1234, "steps": 15, "sampler": "dpm++", "guidance": 4.0, "guidance_cutoff": 0.5}
        return {"settings": st, "tuned": {"subject_identity": n / 10}, **({"base": {"prior_drift": 0.7}} if base else {})}

    full = scores(8)
    (tmp_path / "toy_eval.json").write_text(json.dumps(full))
    (tmp_path / "toy_eval.png").write_bytes(b"sheet")
    _keep_earlier(tmp_path, scores(8))  # the same settings score the same: replaced, nothing kept
    assert not list(tmp_path.glob("toy_eval-*"))
    again = scores(8, base=False)  # --no-base at those settings (newcomer57: kept aside as "other settings")
    _keep_earlier(tmp_path, again)
    assert not list(tmp_path.glob("toy_eval-*")) and again["base"] == full["base"]  # the base row carried over
    assert "the base model's row: the earlier eval's at these same settings" in capsys.readouterr().out
    _keep_earlier(tmp_path, scores(2, base=False))
    kept_json, kept_png = (tmp_path / f"toy_eval-dpm++-15-8-seed1234-g4.0-gc0.5.{ext}" for ext in ("json", "png"))
    assert json.loads(kept_json.read_text()) == full and kept_png.read_bytes() == b"sheet"
    assert not (tmp_path / "toy_eval.json").exists()  # toy_eval then writes the new one there
    assert str(kept_json) in capsys.readouterr().out
    assert set(rf.output_paths(tmp_path)) >= {kept_json, kept_png}  # an overwriting run clears it


def test_a_resume_before_a_finished_step_says_so_and_keeps_the_toy_eval_of_the_weights_it_replaces(tmp_path, caplog):
    (tmp_path / rf.LORA_FILE).write_bytes(b"")
    (tmp_path / rf.TRAIN_LOG).write_text("".join(f'{{"step": {k}}}\n' for k in range(1, 151)))
    (tmp_path / "toy_eval.json").write_text('{"tuned": {}}')
    with caplog.at_level("WARNING", logger="nanobooth"):
        rf.redo_after(tmp_path, 44)
    assert "finished weights (step 150) are replaced at the end; steps 45-150 are trained again" in caplog.text
    assert (tmp_path / "toy_eval-step150.json").read_text() == '{"tuned": {}}' and not (tmp_path / "toy_eval.json").exists()
    assert rf.logged_steps(tmp_path) == 44
    caplog.clear()
    with caplog.at_level("WARNING", logger="nanobooth"):
        rf.redo_after(tmp_path, 44)  # an interrupted run resumed where its log ends: nothing to say
    assert caplog.text == ""


def test_toy_eval_of_a_missing_folder_says_it_does_not_exist(tmp_path, capsys):
    # newcomer50: a path with nothing there was called "not a finished nanobooth run (no config.yaml ...)"
    assert main(["toy", "eval", str(tmp_path / "nowhere")]) == 2
    line = _one_error_line(capsys)
    assert "nowhere' does not exist; pass the output_dir of a completed `nanobooth train`" in line
    (tmp_path / "notarun").mkdir()
    assert main(["toy", "eval", str(tmp_path / "notarun")]) == 2
    assert "is not a finished nanobooth run" in _one_error_line(capsys)


def test_readers_still_read_a_single_result(runs):
    from nanobooth.interop import export as ex

    assert ex.read_run(runs["lora"])[0] == "lora" and ex.read_run(runs["full"])[0] == "full"
    assert ex.read_run(runs["lora"])[1]["method"] == "lora"


# --- E: outputs readable like every other file ------------------------------------------------------------------

def test_trained_weights_have_plain_file_modes(runs):
    want = plain_file_mode()
    assert want & 0o044  # readable by others under the usual umask: the point of the test
    assert (runs["lora"] / rf.LORA_FILE).stat().st_mode & 0o777 == want
    weights = list((runs["full"] / "unet").glob("*.safetensors"))
    assert weights and all(p.stat().st_mode & 0o777 == want for p in weights)


def test_atomic_file_gives_plain_modes_and_leaves_nothing_on_failure(tmp_path):
    out = tmp_path / "x.bin"
    with rf.atomic_file(out) as tmp:
        tmp.write_bytes(b"new")
    assert out.read_bytes() == b"new" and out.stat().st_mode & 0o777 == plain_file_mode()
    with pytest.raises(RuntimeError), rf.atomic_file(out) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("crash")
    assert out.read_bytes() == b"new" and [p.name for p in tmp_path.iterdir()] == ["x.bin"]


def test_checkpoints_have_plain_file_modes(tmp_path):
    import torch

    from nanobooth.core import checkpoint as ckpt

    model = torch.nn.Linear(2, 2)
    opt = torch.optim.AdamW(model.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    model(torch.ones(1, 2)).sum().backward()
    opt.step()
    ckpt.save_checkpoint(tmp_path, 1, {"unet": model}, opt, sched, {"noise": torch.Generator().get_state()}, {}, None)
    files = [p for p in (tmp_path / "checkpoints").rglob("*") if p.is_file()]
    assert any(p.suffix == ".safetensors" for p in files)
    assert all(p.stat().st_mode & 0o777 == plain_file_mode() for p in files)
