"""Stopping and resuming: Ctrl-C/SIGTERM checkpoint at the step boundary, renders never cost the weights,
and a resume that would lose or corrupt work is refused before anything is written."""

import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import train_args
from PIL import Image, ImageOps
from safetensors.torch import load_file

from nanobooth.core.checkpoint import list_checkpoints
from nanobooth.cli import main
from nanobooth.core.config import load_config
from nanobooth.core.stop import TrainingInterrupted
from nanobooth.core.train import train

LORA = "pytorch_lora_weights.safetensors"
THREADS = {"OMP_NUM_THREADS": str(torch.get_num_threads())}  # bit-exact needs the same reduction order


def same_weights(a: Path, b: Path) -> bool:
    wa, wb = load_file(a / LORA), load_file(b / LORA)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def losses(run: Path) -> list[float]:
    return [json.loads(x)["loss"] for x in (run / "train_log.jsonl").read_text().splitlines()]


def snapshot(folder: Path) -> dict:
    """Every path under folder with its bytes and mtime: 'nothing changed' must hold to the byte."""
    return {str(p.relative_to(folder)): (p.stat().st_mtime_ns, p.read_bytes() if p.is_file() else None)
            for p in sorted(folder.rglob("*"))}


def error_lines(capsys) -> list[str]:
    return [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("nanobooth:")]


def failing_render(fail_on: dict):
    """A stand-in for generate.render that raises fail_on[call number] on those calls."""
    import nanobooth.core.validation_grid as vg

    real, calls = vg.render, [0]

    def render(*a, **k):
        calls[0] += 1
        if calls[0] in fail_on:
            raise fail_on[calls[0]]
        return real(*a, **k)

    return render


# --- the result is written before anything optional -------------------------------------------------------------

def test_failed_renders_are_warnings_and_the_weights_are_written(tiny_model, subject_dir, tmp_path, monkeypatch, caplog):
    import nanobooth.core.validation_grid as vg

    # the "before" grid and the final grid fail (a GPU OOM, a size the sampler refuses); the step-2 grid works
    monkeypatch.setattr(vg, "render", failing_render({1: RuntimeError("CUDA out of memory"), 3: ValueError("bad size")}))
    run = tmp_path / "run"
    with caplog.at_level(logging.WARNING, logger="nanobooth"):
        assert main(["train", "dreambooth-lora", *train_args(tiny_model, subject_dir, run, "max_train_steps=4",
                                                             "validation_prompts=[a sks dog]", "validation_steps=2")]) == 0
    assert (run / LORA).is_file()
    assert sorted(p.name for p in (run / "samples").glob("*.png")) == ["step-000002.png"]
    warned = [r.getMessage() for r in caplog.records if "validation render" in r.getMessage()]
    assert len(warned) == 2 and "step 0" in warned[0] and "CUDA out of memory" in warned[0] and "step 4" in warned[1]


def test_full_finetune_writes_the_pipeline_then_renders_the_final_grid(tiny_model, subject_dir, tmp_path, caplog):
    """Saving a full pipeline moves its modules to the CPU in fp32; the final render after it must still work."""
    run = tmp_path / "run"
    with caplog.at_level(logging.WARNING, logger="nanobooth"):
        assert main(["train", "dreambooth", *train_args(tiny_model, subject_dir, run, "validation_prompts=[a sks dog]",
                                                         "tome_ratio=0.5")]) == 0
    assert (run / "model_index.json").is_file() and (run / "samples" / "step-000003.png").is_file()
    assert "validation render" not in caplog.text


def test_ctrl_c_during_the_final_render_keeps_the_weights(tiny_model, subject_dir, tmp_path, monkeypatch, capsys):
    import nanobooth.core.validation_grid as vg

    monkeypatch.setattr(vg, "render", failing_render({2: KeyboardInterrupt()}))
    run = tmp_path / "run"
    assert main(["train", "dreambooth-lora", *train_args(tiny_model, subject_dir, run, "validation_prompts=[a sks dog]")]) == 130
    err = error_lines(capsys)
    assert len(err) == 1 and "final validation render" in err[0] and "weights are saved" in err[0]
    assert (run / LORA).is_file() and (run / "samples" / "step-000000.png").is_file()


def test_ctrl_c_during_a_midrun_render_checkpoints_and_resumes_exactly(tiny_model, subject_dir, tmp_path, monkeypatch, capsys):
    import nanobooth.core.validation_grid as vg

    common = ["max_train_steps=5", "learning_rate=1e-3", "validation_prompts=[a sks dog]", "validation_steps=2"]
    ref = tmp_path / "ref"
    assert main(["train", "dreambooth-lora", *train_args(tiny_model, subject_dir, ref, *common)]) == 0
    monkeypatch.setattr(vg, "render", failing_render({2: KeyboardInterrupt()}))  # the step-2 grid
    run = tmp_path / "run"
    args = train_args(tiny_model, subject_dir, run, *common)
    assert main(["train", "dreambooth-lora", *args]) == 130
    err = error_lines(capsys)
    assert len(err) == 1 and "checkpoint-000002" in err[0] and "resume_from_checkpoint=latest" in err[0]
    assert [p.name for p in list_checkpoints(run)] == ["checkpoint-000002"] and not (run / LORA).exists()
    monkeypatch.undo()
    assert main(["train", "dreambooth-lora", *args, "resume_from_checkpoint=latest"]) == 0
    assert same_weights(ref, run) and losses(ref) == losses(run)


# --- Ctrl-C / SIGTERM during training ---------------------------------------------------------------------------

def _start(args, stderr_path: Path):
    env = {**os.environ, **THREADS}
    with stderr_path.open("w") as err:  # a file, not a pipe: progress bars could fill a pipe and block the run
        return subprocess.Popen([sys.executable, "-m", "nanobooth", "train", *args], env=env,
                                stdout=subprocess.DEVNULL, stderr=err)


def _signal_after(proc, run: Path, steps: int, sig) -> None:
    log = run / "train_log.jsonl"
    deadline = time.time() + 180
    while proc.poll() is None and time.time() < deadline:
        if log.exists() and len(log.read_text().splitlines()) >= steps:
            break
        time.sleep(0.005)
    proc.send_signal(sig)
    proc.wait(timeout=180)


@pytest.mark.slow
def test_ctrl_c_writes_a_checkpoint_without_checkpointing_steps_and_resumes_bit_exactly(tiny_model, subject_dir, tmp_path):
    variant = "dreambooth-lora-prior-pre"
    common = ["max_train_steps=20", "checkpointing_steps=0", "learning_rate=1e-3", "random_flip=true",
              "validation_prompts=[a sks dog]", "validation_steps=6"]
    ref = tmp_path / "ref"
    assert _start([variant, *train_args(tiny_model, subject_dir, ref, *common)], tmp_path / "ref.err").wait() == 0
    run = tmp_path / "run"
    args = [variant, *train_args(tiny_model, subject_dir, run, *common)]
    proc = _start(args, tmp_path / "run.err")
    _signal_after(proc, run, 7, signal.SIGINT)
    assert not (run / LORA).exists(), "the run finished before the signal; the test proves nothing"
    assert proc.returncode == 130
    err = (tmp_path / "run.err").read_text()
    ours = [ln for ln in err.splitlines() if ln.startswith("nanobooth:")]
    assert "Traceback" not in err and len(ours) == 1 and "resume_from_checkpoint=latest" in ours[0]
    ckpts = list_checkpoints(run)
    steps = len((run / "train_log.jsonl").read_text().splitlines())
    assert [p.name for p in ckpts] == [f"checkpoint-{steps:06d}"] and f"checkpoint-{steps:06d}" in ours[0]
    assert _start([*args, "resume_from_checkpoint=latest"], tmp_path / "resume.err").wait() == 0
    assert same_weights(ref, run)
    assert losses(ref) == losses(run)  # one line per step, none lost or repeated


@pytest.mark.slow
def test_sigterm_checkpoints_and_exits_143(tiny_model, subject_dir, tmp_path):
    run = tmp_path / "run"
    proc = _start(["dreambooth-lora", *train_args(tiny_model, subject_dir, run, "max_train_steps=40")], tmp_path / "err")
    _signal_after(proc, run, 3, signal.SIGTERM)
    assert proc.returncode == 143 and not (run / LORA).exists()
    err = (tmp_path / "err").read_text()
    ours = [ln for ln in err.splitlines() if ln.startswith("nanobooth:")]
    assert "Traceback" not in err and len(ours) == 1 and "SIGTERM" in ours[0]
    steps = len((run / "train_log.jsonl").read_text().splitlines())
    assert [p.name for p in list_checkpoints(run)] == [f"checkpoint-{steps:06d}"]


@pytest.mark.slow
def test_ctrl_c_under_accelerate_launch_stops_every_process_at_one_checkpoint(tiny_model, subject_dir, tmp_path):
    """A terminal's Ctrl-C reaches every process (the launcher forwards it; with some torch versions the workers
    get it from the terminal too): all stop at the same step, rank 0 writes that step's checkpoint and prints the
    one stop line, nobody hangs in a collective, and the run resumes. The launcher's own traceback (it raises on
    the SIGINT it got, whatever the workers do; README "Multi-GPU") is the only one."""
    run = tmp_path / "run"
    # port 0 = a free one: launches in parallel test workers (pytest -n) or beside other jobs never meet on 29500
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
              "--main_process_port", "0", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "nanobooth", "train", "dreambooth-lora",
              *train_args(tiny_model, subject_dir, run, "max_train_steps=60", "learning_rate=1e-3")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with (tmp_path / "err").open("w") as err:
        proc = subprocess.Popen(launch, env=env, stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)
    log = run / "train_log.jsonl"
    deadline = time.time() + 240
    while proc.poll() is None and time.time() < deadline and not (log.exists() and len(log.read_text().splitlines()) >= 3):
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGINT)  # what a terminal does: the whole foreground process group
    t0 = time.time()
    proc.wait(timeout=120)
    assert time.time() - t0 < 25, "the processes did not stop together (the launcher's 30 s kill ended them)"
    assert proc.returncode != 0 and not (run / LORA).exists()
    steps = len(log.read_text().splitlines())
    assert [p.name for p in list_checkpoints(run)] == [f"checkpoint-{steps:06d}"]
    err = (tmp_path / "err").read_text()
    ours = [ln for ln in err.splitlines() if ln.startswith("nanobooth:")]
    # "Ctrl-C at step N" from rank 0, or "stop request on another process" if rank 1's signal was seen first
    assert len(ours) == 1 and f"at step {steps}/60" in ours[0] and f"checkpoint-{steps:06d} holds step {steps}" in ours[0]
    assert ours[0].endswith("resume_from_checkpoint=latest")
    assert not re.search(r'File ".*/nanobooth/', err)  # no worker traceback: none of nanobooth's files in a frame
    assert err.count("Traceback") <= 1 and ("Traceback" not in err or "SignalException: Process" in err), err
    resume = [a if not a.startswith("max_train_steps=") else f"max_train_steps={steps + 2}" for a in launch]
    subprocess.run([*resume, "resume_from_checkpoint=latest"], env=env, check=True, capture_output=True, timeout=300)
    assert (run / LORA).exists() and len(log.read_text().splitlines()) == steps + 2


def test_a_library_caller_can_ask_for_a_stop(tiny_model, subject_dir, tmp_path, caplog):
    cfg = load_config("dreambooth-lora", train_args(tiny_model, subject_dir, tmp_path / "run", "max_train_steps=6"))
    polls = []

    def should_stop() -> bool:
        polls.append(1)
        return len(polls) > 3  # polled once before the first step, then once per step

    with caplog.at_level(logging.INFO, logger="nanobooth"), pytest.raises(TrainingInterrupted) as e:
        train(cfg, should_stop=should_stop)
    assert "step 3/6" in str(e.value) and e.value.exit_code == 130
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == ["checkpoint-000003"]
    assert "checkpoint-000003 saved" in caplog.text


def test_the_stop_message_says_how_to_continue_this_command(tiny_model, subject_dir, tmp_path):
    """'plus resume_from_checkpoint=latest' only where the command lacks it; a command naming a checkpoint
    folder is told to switch to latest once a newer checkpoint exists (else it would go back to the old one)."""
    run = tmp_path / "run"

    def stopped_at(step: int, *extra: str) -> str:
        cfg = load_config("dreambooth-lora", train_args(tiny_model, subject_dir, run, "max_train_steps=9", *extra))
        with pytest.raises(TrainingInterrupted) as e:  # polled before the first step and after each: stops at `step`
            train(cfg, should_stop=lambda: (run / "train_log.jsonl").exists() and len(losses(run)) >= step)
        return str(e.value)

    first = stopped_at(2)
    assert "checkpoint-000002 holds step 2" in first and first.endswith("continue with the same command plus resume_from_checkpoint=latest")
    named = run / "checkpoints" / "checkpoint-000002"
    second = stopped_at(3, f"resume_from_checkpoint={named}")
    assert "checkpoint-000003 holds step 3" in second
    assert second.endswith(f"continue with the same command, but resume_from_checkpoint=latest instead of {named}")
    third = stopped_at(4, "resume_from_checkpoint=latest")
    assert "checkpoint-000004 holds step 4" in third and third.endswith("continue with the same command")


def test_a_stop_during_setup_says_how_to_continue_this_command():
    from nanobooth.core.stop import StopRequest

    for resume, end in [(None, "same command plus resume_from_checkpoint=latest"), ("latest", "same command"),
                        ("runs/x/checkpoints/checkpoint-000002", "same command")]:  # nothing newer than it exists yet
        stop = StopRequest(resume_from_checkpoint=resume)
        with pytest.raises(TrainingInterrupted) as e:
            stop._handle(signal.SIGINT, None)  # a signal before the first step (stop.setup)
        assert str(e.value).startswith("Ctrl-C before the first training step") and str(e.value).endswith(end), str(e.value)


def test_a_resume_hashes_its_inputs_once_and_records_them_in_its_checkpoints(tiny_model, subject_dir, tmp_path, monkeypatch):
    import nanobooth.core.checkpoint as ckpt

    run = tmp_path / "run"
    args = train_args(tiny_model, subject_dir, run, "max_train_steps=4", "checkpointing_steps=2")
    assert main(["train", "dreambooth-lora-prior-pre", *args]) == 0
    hashed, real = [], ckpt.input_record

    def counting(files):
        hashed.append([p.name for p in files])
        return real(files)

    monkeypatch.setattr(ckpt, "input_record", counting)
    assert main(["train", "dreambooth-lora-prior-pre", *args, "max_train_steps=6", "resume_from_checkpoint=latest"]) == 0
    photos, classes = sorted(p.name for p in subject_dir.glob("*.png")), ["class-00000.png", "class-00001.png"]
    assert sorted(hashed) == sorted([photos, classes])  # once per image set (twice each before)
    state = lambda n: json.loads((run / "checkpoints" / f"checkpoint-{n:06d}" / "state.json").read_text())  # noqa: E731
    assert state(4)["inputs"] == state(2)["inputs"]


# --- resume accounting -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("steps", [2, 4])
def test_resume_that_would_train_nothing_or_replace_finished_weights_is_refused(tiny_model, subject_dir, tmp_path, capsys, steps):
    run = tmp_path / "run"
    args = train_args(tiny_model, subject_dir, run, "max_train_steps=4", "checkpointing_steps=2")
    assert main(["train", "dreambooth-lora", *args]) == 0
    before = snapshot(run)
    capsys.readouterr()
    # steps=2: the checkpoint is at 2 (nothing to train); steps=4: the run finished at 4 (would redo and replace)
    assert main(["train", "dreambooth-lora", *args, f"max_train_steps={steps}", "resume_from_checkpoint=latest"]) == 2
    err = error_lines(capsys)
    assert len(err) == 1 and ("nothing left to train" if steps == 2 else "finished at step 4") in err[0]
    assert snapshot(run) == before


def test_resume_latest_without_a_checkpoint_is_refused_when_steps_would_be_lost(tiny_model, subject_dir, tmp_path, capsys):
    run = tmp_path / "run"
    args = train_args(tiny_model, subject_dir, run, "max_train_steps=2")  # checkpointing_steps=0
    assert main(["train", "dreambooth-lora", *args]) == 0
    before = snapshot(run)
    capsys.readouterr()
    assert main(["train", "dreambooth-lora", *args, "max_train_steps=4", "resume_from_checkpoint=latest"]) == 2
    err = error_lines(capsys)
    assert len(err) == 1 and "no checkpoint" in err[0] and "overwrite=true" in err[0]
    assert snapshot(run) == before


def test_resume_with_another_config_is_refused(tiny_model, subject_dir, tmp_path, capsys):
    run = tmp_path / "run"
    args = train_args(tiny_model, subject_dir, run, "max_train_steps=4", "checkpointing_steps=2")
    assert main(["train", "dreambooth-lora", *args]) == 0
    before = snapshot(run)
    capsys.readouterr()
    assert main(["train", "dreambooth-lora", *args, "max_train_steps=6", "learning_rate=3e-4", "resume_from_checkpoint=latest"]) == 2
    err = error_lines(capsys)
    assert len(err) == 1 and "different config" in err[0] and "learning_rate" in err[0]
    assert snapshot(run) == before


# --- resume checks its inputs ----------------------------------------------------------------------------------

@pytest.fixture
def five_photos(subject_dir, tmp_path) -> Path:
    d = tmp_path / "photos"
    d.mkdir()
    for i, p in enumerate(sorted(subject_dir.glob("*.png"))):
        shutil.copy(p, d / f"a{i}.png")
        if i < 2:
            ImageOps.mirror(Image.open(p)).save(d / f"b{i}.png")
    assert len(list(d.iterdir())) == 5
    return d


@pytest.mark.parametrize("change", ["remove two", "modify one"])
def test_resume_over_changed_photos_is_refused_naming_them(tiny_model, five_photos, tmp_path, capsys, change):
    run = tmp_path / "run"
    args = train_args(tiny_model, five_photos, run, "max_train_steps=4", "checkpointing_steps=2")
    assert main(["train", "dreambooth-lora", *args]) == 0
    if change == "remove two":
        (five_photos / "a1.png").unlink(), (five_photos / "b0.png").unlink()
    else:
        Image.open(five_photos / "a2.png").rotate(90).save(five_photos / "a2.png")
    before = snapshot(run)
    capsys.readouterr()
    assert main(["train", "dreambooth-lora", *args, "max_train_steps=8", "resume_from_checkpoint=latest"]) == 2
    err = error_lines(capsys)
    want = "removed a1.png, b0.png" if change == "remove two" else "modified a2.png"
    assert len(err) == 1 and "instance_data_dir changed since checkpoint-000002" in err[0] and want in err[0]
    assert snapshot(run) == before


def test_resume_over_changed_class_images_is_refused(tiny_model, subject_dir, tmp_path, capsys):
    run = tmp_path / "run"
    args = train_args(tiny_model, subject_dir, run, "max_train_steps=4", "checkpointing_steps=2")
    assert main(["train", "dreambooth-lora-prior-pre", *args]) == 0
    (run / "class_images" / "class-00001.png").unlink()
    capsys.readouterr()
    assert main(["train", "dreambooth-lora-prior-pre", *args, "max_train_steps=6", "resume_from_checkpoint=latest"]) == 2
    err = error_lines(capsys)
    assert len(err) == 1 and "class_data_dir changed" in err[0] and "removed class-00001.png" in err[0]


def test_a_checkpoint_without_an_input_record_still_resumes_with_a_warning(tiny_model, subject_dir, tmp_path, caplog):
    run = tmp_path / "run"
    args = train_args(tiny_model, subject_dir, run, "max_train_steps=4", "checkpointing_steps=2", "learning_rate=1e-3")
    assert main(["train", "dreambooth-lora", *args]) == 0
    ref = tmp_path / "ref"
    shutil.copytree(run, ref)
    state_path = run / "checkpoints" / "checkpoint-000002" / "state.json"
    state = json.loads(state_path.read_text())
    assert state.pop("inputs")["instance_data_dir"]  # what an older nanobooth wrote: no record
    state_path.write_text(json.dumps(state))
    (run / LORA).unlink()  # as if it had stopped at step 3
    with caplog.at_level(logging.WARNING, logger="nanobooth"):
        assert main(["train", "dreambooth-lora", *args, "resume_from_checkpoint=latest"]) == 0
    assert "cannot check" in caplog.text and same_weights(ref, run)
