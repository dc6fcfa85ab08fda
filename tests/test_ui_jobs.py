"""The UI's job manager (ui/jobs.py): one job at a time, later ones queued; stop -> checkpoint; resume; a job
that crashes leaves the manager working. Real training runs on the tiny model, through api.train."""

import json

import pytest
from conftest import train_args

from nanobooth import api
from nanobooth.core.config import load_config
from nanobooth.ui.jobs import CANCELLED, DONE, FAILED, QUEUED, STOPPED, JobManager


def cfg_for(tiny_model, subject_dir, out, *extra):
    return load_config("dreambooth-lora", train_args(tiny_model, subject_dir, out, *extra))


def logged_steps(run):
    return [json.loads(x)["step"] for x in (run / "train_log.jsonl").read_text().splitlines()]


def test_a_second_job_queues_and_starts_after_the_first_ends(tiny_model, subject_dir, tmp_path):
    jm = JobManager()
    first = jm.submit(cfg_for(tiny_model, subject_dir, tmp_path / "a", "max_train_steps=6"))
    second = jm.submit(cfg_for(tiny_model, subject_dir, tmp_path / "b"))
    assert second.status == QUEUED and "queued behind a" in second.message
    assert second.finished.wait(300) and first.finished.is_set()
    assert (first.status, second.status) == (DONE, DONE), (first.message, second.message)
    assert second.started >= first.ended  # one at a time
    assert [s for s, _ in first.losses] == [1, 2, 3, 4, 5, 6] and (first.done, first.total) == (6, 6)
    assert logged_steps(tmp_path / "b") == [1, 2, 3]
    assert jm.current() is second


def test_stop_checkpoints_and_resume_finishes_the_run(tiny_model, subject_dir, tmp_path):
    from nanobooth import events

    def train(cfg, callbacks=(), **kw):  # the page's Stop button, pressed as step 2 ends
        def press(e):
            if isinstance(e, events.Step) and e.step == 2 and not cfg.resume_from_checkpoint:
                jm.stop(jm.current())
        return api.train(cfg, callbacks=[*callbacks, press], **kw)

    jm = JobManager(train=train)
    run = tmp_path / "run"
    job = jm.submit(cfg_for(tiny_model, subject_dir, run, "max_train_steps=5"))
    assert job.finished.wait(300)
    assert job.status == STOPPED, job.message
    assert job.done == 2 and job.message.endswith("press Resume to continue") and "same command" not in job.message
    assert job.checkpoint is not None and job.checkpoint.name == "checkpoint-000002" and job.checkpoint.is_dir()
    assert logged_steps(run) == [1, 2] and not (run / "pytorch_lora_weights.safetensors").exists()
    again = jm.resume(job)
    assert again.cfg.resume_from_checkpoint == "latest" and job.cfg.resume_from_checkpoint is None
    assert again.finished.wait(300) and again.status == DONE, again.message
    assert [s for s, _ in again.losses] == [3, 4, 5]
    assert logged_steps(run) == [1, 2, 3, 4, 5]
    assert (run / "pytorch_lora_weights.safetensors").is_file()


def test_a_crashing_job_leaves_the_manager_working(tiny_model, subject_dir, tmp_path):
    def train(cfg, **kw):
        if cfg.output_dir.endswith("crash"):
            raise RuntimeError("boom\nsecond line of a traceback-ish text")
        return api.train(cfg, **kw)

    jm = JobManager(train=train)
    crash = jm.submit(cfg_for(tiny_model, subject_dir, tmp_path / "crash"))
    bad = jm.submit(cfg_for(tmp_path / "no-such-model", subject_dir, tmp_path / "bad"))  # a user error: one line
    good = jm.submit(cfg_for(tiny_model, subject_dir, tmp_path / "good"))
    assert good.finished.wait(300)
    assert crash.status == FAILED and crash.message == "error: RuntimeError: boom"
    assert bad.status == FAILED and bad.message.startswith("error: ") and "\n" not in bad.message
    assert "no-such-model" in bad.message
    assert good.status == DONE, good.message
    assert logged_steps(tmp_path / "good") == [1, 2, 3]


def test_stop_on_a_queued_job_cancels_it_and_one_output_dir_takes_one_job(tiny_model, subject_dir, tmp_path):
    jm = JobManager()
    first = jm.submit(cfg_for(tiny_model, subject_dir, tmp_path / "a"))
    with pytest.raises(Exception, match="already has a job queued or running"):
        jm.submit(cfg_for(tiny_model, subject_dir, tmp_path / "a"))
    queued = jm.submit(cfg_for(tiny_model, subject_dir, tmp_path / "b"))
    jm.stop(queued)
    assert queued.status == CANCELLED and queued.finished.is_set()
    assert first.finished.wait(300) and first.status == DONE
    assert not (tmp_path / "b").exists()
