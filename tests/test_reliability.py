"""Never lose work, never lie: kills, resumes, NaNs, full disks and bad input."""

import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import train_args
from PIL import Image
from safetensors.torch import load_file

from nanobooth.core.checkpoint import list_checkpoints
from nanobooth.core.prior import PROVENANCE
from nanobooth.cli import main

LORA = "pytorch_lora_weights.safetensors"


# Bit-exact comparisons need the same thread count everywhere (it sets the float reduction order).
THREADS = {"OMP_NUM_THREADS": str(torch.get_num_threads())}


def cli(*args, env_extra=None):
    env = {**os.environ, **THREADS, **(env_extra or {})}
    return subprocess.Popen([sys.executable, "-m", "nanobooth", *args], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def error_lines(capsys) -> list[str]:
    """The CLI's error lines (progress bars also write to stderr)."""
    return [ln for ln in capsys.readouterr().err.splitlines() if "error" in ln.lower()]


def same_weights(a: Path, b: Path) -> bool:
    wa, wb = load_file(a / LORA), load_file(b / LORA)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def log_steps(run: Path) -> int:
    p = run / "train_log.jsonl"
    return len(p.read_text().splitlines()) if p.exists() else 0


@pytest.mark.slow
def test_sigkill_at_an_arbitrary_step_then_resume_is_bit_exact(tiny_model, subject_dir, tmp_path):
    args = train_args(tiny_model, subject_dir, tmp_path / "ref", "max_train_steps=30", "checkpointing_steps=4",
                      "learning_rate=1e-3", "random_flip=true", "validation_prompts=[a sks dog]", "validation_steps=7")
    variant = "dreambooth-lora-prior-pre"
    assert cli("train", variant, *args).wait() == 0
    killed = tmp_path / "killed"
    kargs = [a.replace(str(tmp_path / "ref"), str(killed)) for a in args]
    proc = cli("train", variant, *kargs)
    deadline = time.time() + 120
    while log_steps(killed) < 11 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / LORA).exists(), "the run finished before the kill; the test proves nothing"
    assert list_checkpoints(killed), "no checkpoint before the kill"
    assert cli("train", variant, *kargs, "resume_from_checkpoint=latest").wait() == 0
    assert same_weights(tmp_path / "ref", killed)
    ref_log = [json.loads(x)["loss"] for x in (tmp_path / "ref" / "train_log.jsonl").read_text().splitlines()]
    new_log = [json.loads(x)["loss"] for x in (killed / "train_log.jsonl").read_text().splitlines()]
    assert ref_log == new_log  # one line per step, no duplicates from the redone steps


def test_kill_during_checkpoint_save_keeps_the_previous_one(tiny_model, subject_dir, tmp_path):
    run = tmp_path / "run"
    args = train_args(tiny_model, subject_dir, run, "max_train_steps=6", "checkpointing_steps=2", "learning_rate=1e-3",
                      "checkpoints_total_limit=1")
    # Die by SIGKILL halfway through writing the second checkpoint (after its weights, before the rest).
    script = textwrap.dedent(f"""
        import os, signal, sys
        import nanobooth.core.checkpoint as ck
        real, calls = ck.save_file, [0]
        def dying_save(*a, **k):
            calls[0] += 1
            real(*a, **k)
            if calls[0] == 4:
                os.kill(os.getpid(), signal.SIGKILL)
        ck.save_file = dying_save
        from nanobooth.cli import main
        sys.exit(main(["train", "dreambooth-lora", *{args!r}]))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, env={**os.environ, **THREADS})
    assert proc.returncode == -signal.SIGKILL
    ckpts = list_checkpoints(run)
    assert [p.name for p in ckpts] == ["checkpoint-000002"]  # intact, not pruned for a half-written one
    visible = sorted(p.name for p in (run / "checkpoints").iterdir() if not p.name.startswith("."))
    assert visible == ["checkpoint-000002"]  # the half-written one only ever existed under a temp name
    assert {"model.safetensors", "optimizer.safetensors", "rng.safetensors", "state.json"} <= {p.name for p in ckpts[0].iterdir()}
    assert main(["train", "dreambooth-lora", *args, "resume_from_checkpoint=latest"]) == 0
    ref = tmp_path / "ref"
    assert main(["train", "dreambooth-lora", *[a.replace(str(run), str(ref)) for a in args]]) == 0
    assert same_weights(ref, run)
    assert not list((run / "checkpoints").glob(".tmp-*"))


def test_class_generation_killed_midway_resumes_without_duplicates(tiny_model, subject_dir, tmp_path):
    run = tmp_path / "run"
    args = train_args(tiny_model, subject_dir, run, "num_class_images=12", "sample_batch_size=1", "class_generation_steps=8",
                      "max_train_steps=1")
    proc = cli("train", "dreambooth-lora-prior-pre", *args)
    classes = run / "class_images"
    deadline = time.time() + 120
    while len(list(classes.glob("class-*.png"))) < 4 and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = {p.name: p.stat().st_mtime_ns for p in classes.glob("class-*.png")}
    assert 4 <= len(before) < 12, "kill did not land mid-generation"
    assert main(["train", "dreambooth-lora-prior-pre", *args, "resume_from_checkpoint=latest"]) == 0
    after = sorted(p.name for p in classes.iterdir() if p.name != PROVENANCE)
    assert after == [f"class-{i:05d}.png" for i in range(12)]  # no temp files, no duplicates
    assert all((classes / n).stat().st_mtime_ns == m for n, m in before.items())  # nothing regenerated


def test_nan_loss_stops_with_the_step_and_keeps_the_checkpoint(tiny_model, subject_dir, tmp_path, monkeypatch, capsys):
    import nanobooth.core.train as tr

    real = tr.dreambooth_loss
    calls = [0]

    def poisoned(*a, **k):
        calls[0] += 1
        loss, inst, prior = real(*a, **k)
        return (loss * float("nan"), inst, prior) if calls[0] == 3 else (loss, inst, prior)

    monkeypatch.setattr(tr, "dreambooth_loss", poisoned)
    run = tmp_path / "run"
    assert main(["train", "dreambooth-lora", *train_args(tiny_model, subject_dir, run, "max_train_steps=5", "checkpointing_steps=2")]) == 2
    err = error_lines(capsys)
    assert len(err) == 1 and "loss is nan at step 3" in err[0] and "checkpoint-000002" in err[0]
    assert [p.name for p in list_checkpoints(run)] == ["checkpoint-000002"] and not (run / LORA).exists()


def test_disk_full_while_saving_is_one_line_and_loses_nothing(tiny_model, subject_dir, tmp_path, monkeypatch, capsys):
    import nanobooth.core.checkpoint as ck

    real = ck.save_file
    calls = [0]

    def full_disk(*a, **k):
        calls[0] += 1
        if calls[0] > 3:  # the first checkpoint fits, the second does not
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*a, **k)

    monkeypatch.setattr(ck, "save_file", full_disk)
    run = tmp_path / "run"
    assert main(["train", "dreambooth-lora", *train_args(tiny_model, subject_dir, run, "max_train_steps=5", "checkpointing_steps=2")]) == 2
    err = error_lines(capsys)
    assert len(err) == 1 and "disk full" in err[0] and "resume_from_checkpoint=latest" in err[0]
    assert [p.name for p in list_checkpoints(run)] == ["checkpoint-000002"]
    assert not list((run / "checkpoints").glob(".tmp-*"))
    monkeypatch.setattr(ck, "save_file", real)
    assert main(["train", "dreambooth-lora", *train_args(tiny_model, subject_dir, run, "max_train_steps=5",
                                                         "checkpointing_steps=2", "resume_from_checkpoint=latest")]) == 0
    assert (run / LORA).exists()


def _bad_folder(tmp_path, kind):
    d = tmp_path / kind
    d.mkdir()
    if kind == "empty":
        return d
    Image.new("RGB", (40, 40), "red").save(d / "good.png")
    if kind == "corrupt":
        (d / "bad.jpg").write_bytes(b"\xff\xd8\xff\xe0 definitely not the rest of a jpeg")
    if kind == "truncated":
        Image.new("RGB", (64, 64), "blue").save(d / "t.jpg")
        data = (d / "t.jpg").read_bytes()
        (d / "t.jpg").write_bytes(data[: len(data) // 2])
    return d


BAD_INPUT = [
    # (row, overrides builder, text the one-line error must contain)
    ("missing instance dir", lambda t, m, s: [f"instance_data_dir={t / 'nope'}"], "does not exist"),
    ("empty instance dir", lambda t, m, s: [f"instance_data_dir={_bad_folder(t, 'empty')}"], "no images in"),
    ("corrupt jpeg", lambda t, m, s: [f"instance_data_dir={_bad_folder(t, 'corrupt')}"], "bad.jpg: cannot read"),
    ("truncated jpeg", lambda t, m, s: [f"instance_data_dir={_bad_folder(t, 'truncated')}"], "t.jpg: cannot read"),
    ("unknown key", lambda t, m, s: ["lora_rnak=8"], "did you mean 'lora_rank'"),
    ("wrong value type", lambda t, m, s: ["max_train_steps=many"], "'max_train_steps': expected int"),
    ("model folder not diffusers", lambda t, m, s: [f"model={t}"], "not a diffusers pipeline"),
    ("pickle checkpoint", lambda t, m, s: [f"model={(t / 'm.ckpt').write_bytes(b'x') and t / 'm.ckpt'}"], "allow_pickle=true"),
    ("missing model path", lambda t, m, s: [f"model={t / 'sd.safetensors'}"], "no such file"),
    ("no prompts, no subject.json", lambda t, m, s: ["instance_prompt=", "class_prompt="], "subject.json"),
    ("bogus resume path", lambda t, m, s: [f"resume_from_checkpoint={t}"], "not a nanobooth checkpoint"),
]


@pytest.mark.parametrize("row, build, expected", BAD_INPUT, ids=[r[0] for r in BAD_INPUT])
def test_bad_input_is_one_actionable_line_and_writes_nothing(row, build, expected, tiny_model, subject_dir, tmp_path, capsys):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    out = tmp_path / "out"
    args = train_args(tiny_model, subject_dir, out) + build(inputs, tiny_model, subject_dir)
    assert main(["train", "dreambooth-lora-prior-pre", *args]) == 2
    err = error_lines(capsys)
    assert len(err) == 1 and expected in err[0], err
    assert not out.exists()  # nothing written: no half-made run folder, no class images


def test_odd_but_usable_images_are_fixed_up_with_warnings(tiny_model, tmp_path, caplog):
    d = tmp_path / "photos"
    d.mkdir()
    Image.new("CMYK", (48, 48), (0, 255, 255, 0)).save(d / "cmyk.jpg")
    Image.fromarray(np.full((48, 48), 40000, dtype=np.uint16)).save(d / "sixteen.png")
    Image.new("RGB", (48, 48), "blue").convert("P").save(d / "palette.gif")
    Image.new("RGBA", (48, 48), (0, 255, 0, 128)).save(d / "alpha.png")
    exif = Image.Exif()
    exif[0x0112] = 8
    Image.new("RGB", (48, 24), "yellow").save(d / "rotated.jpg", exif=exif)
    Image.new("RGB", (16, 16), "white").save(d / "small.png")
    (d / "notes.pdf").write_text("not an image")
    (d / "gone.txt").write_text("a photo of dog")  # a caption whose photo is missing
    run = tmp_path / "run"
    import logging

    with caplog.at_level(logging.WARNING, logger="nanobooth"):
        assert main(["train", "dreambooth-lora", *train_args(tiny_model, d, run, "instance_prompt=a photo of dog",
                                                             "class_prompt=a photo of dog")]) == 0
    text = caplog.text
    assert text.count("notes.pdf: not an image file, skipped") == 1  # once, though the folder is listed more than once
    assert text.count("gone.txt: a caption with no photo gone.* beside it") == 1 and "gone.txt: not an image" not in text
    assert "small.png: 16x16 is smaller than resolution 32" in text
    assert "instance_prompt equals class_prompt" in text and "rare identifier" in text
    assert (run / LORA).exists()
