"""The UI's job manager (ui/jobs.py): one job at a time, later ones queued; stop -> checkpoint; resume; a job
that crashes leaves the manager working. Real training runs on the tiny model, through api.train."""

import json
from types import SimpleNamespace

import pytest
from conftest import train_args

from nanobooth import api
from nanobooth.core.config import load_config
from nanobooth.ui.jobs import CANCELLED, DONE, FAILED, QUEUED, STOPPED, Job, JobManager, logged_losses, progress_html


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
    # the plot keeps the steps before the resume (newcomer55: it began at step 3), with the losses the log holds
    assert [s for s, _ in again.losses] == [1, 2, 3, 4, 5]
    assert again.losses[:2] == logged_losses(run, before=3)
    assert [s for s, _ in job.losses] == [1, 2]
    assert [v for _, v in again.losses[:2]] == pytest.approx([v for _, v in job.losses], abs=1e-5)  # the log rounds
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


def test_a_start_that_wrote_nothing_leaves_no_empty_run_folder_and_a_failed_run_reads_failed(tiny_model, subject_dir,
                                                                                              tmp_path):
    """newcomer: a run whose model could not load (runwayml/stable-diffusion-v1-5 offline) stayed in the Runs tab as
    "incomplete, 0 steps". Its empty folder goes; one with something in it stays and reads "failed: <why>"."""
    import threading

    from nanobooth.ui.jobs import shown_status

    release = threading.Event()

    def train(cfg, **kw):
        if cfg.output_dir.endswith("wait"):
            release.wait(60)
        if cfg.output_dir.endswith("wrote"):
            (tmp_path / "wrote" / "train_log.jsonl").write_text("")
            raise RuntimeError("died in step 1")
        return api.train(cfg, **kw)

    jm = JobManager(train=train)
    folders = {n: tmp_path / n for n in ("offline", "wrote", "wait", "cancelled", "resumed")}
    for f in folders.values():
        f.mkdir()  # as the page makes them (Workspace.new_folder) before the job starts
    offline = jm.submit(cfg_for(tmp_path / "no-such-model", subject_dir, folders["offline"]))  # the real loader refuses
    wrote = jm.submit(cfg_for(tiny_model, subject_dir, folders["wrote"]))
    waiting = jm.submit(cfg_for(tiny_model, subject_dir, folders["wait"]))
    cancelled = jm.submit(cfg_for(tiny_model, subject_dir, folders["cancelled"]))
    jm.stop(cancelled)
    resumed = jm.resume(cfg_for(tmp_path / "no-such-model", subject_dir, folders["resumed"]))
    release.set()
    assert resumed.finished.wait(300) and wrote.finished.is_set()
    assert offline.status == FAILED and not folders["offline"].exists()
    assert cancelled.status == CANCELLED and not folders["cancelled"].exists()
    assert wrote.status == FAILED and (folders["wrote"] / "train_log.jsonl").is_file()
    assert shown_status(wrote, "incomplete") == "failed: RuntimeError: died in step 1"
    assert resumed.status == FAILED and folders["resumed"].is_dir()  # a resume's folder is the user's run: never removed
    assert waiting.status == DONE and shown_status(waiting, "finished") == "finished"
    assert shown_status(None, "stopped (checkpoint at step 2)") == "stopped (checkpoint at step 2)"
    running = jm.submit(cfg_for(tiny_model, subject_dir, tmp_path / "live", "max_train_steps=50"))
    assert shown_status(running, "incomplete") in ("queued", "running")
    jm.stop(running)
    assert running.finished.wait(300)


def test_the_progress_box_shows_a_failed_jobs_line_as_text_and_names_the_queue():
    """An error line may name a token such as <s0> (pivotal tuning): shown as text, not swallowed as an HTML tag."""
    job = Job(1, SimpleNamespace(output_dir="/ws/runs/dog-lora"), status=FAILED, phase="training", done=3, total=10,
              message="error: token <s0> is not in the tokenizer")
    box = progress_html(job, ["cat-lora"])
    assert 'data-status="failed"' in box and "dog-lora</b>: failed, training: 3/10 (30%)" in box
    assert "token &lt;s0&gt; is not" in box and "<s0>" not in box and "queued: cat-lora" in box
    assert 'data-status="none"' in progress_html(None)


def test_a_job_loading_its_models_shows_the_seconds_so_far():
    """newcomer57: the box sat at "loading models (0%)" for 20 s with nothing moving."""
    import time

    job = Job(1, SimpleNamespace(output_dir="/ws/runs/dog-lora"), status="running", started=time.time() - 12)
    assert "running, loading models, 12 s (0%)" in progress_html(job)
    job.status = FAILED  # a job that ended before its first phase: no clock
    assert "failed, loading models (0%)" in progress_html(job)
