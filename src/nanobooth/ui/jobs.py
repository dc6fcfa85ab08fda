"""The UI's training jobs: one worker thread runs `api.train` for one job at a time; later jobs queue.

No gradio here: the page polls `JobManager.snapshot()` (so a reloaded or reopened page shows the live
run: the state lives in the manager, not in a browser session). A stop is `train(should_stop=...)`: the
run checkpoints at the next step boundary (or ends setup at once) and `TrainingInterrupted` arrives,
which marks the job "stopped"; `resume(job)` queues the same config with resume_from_checkpoint=latest.
A job that raises is "failed" with a one-line message; the worker goes on with the next job. A fresh start
that wrote nothing (failed loading its model, or cancelled in the queue) takes its empty run folder with it.
"""

from __future__ import annotations

import contextlib
import copy
import html
import itertools
import json
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

log = logging.getLogger("nanobooth")

# states a job passes through; the last four are final
QUEUED, RUNNING, STOPPING, DONE, STOPPED, FAILED, CANCELLED = (
    "queued", "running", "stopping", "done", "stopped", "failed", "cancelled")
FINAL = (DONE, STOPPED, FAILED, CANCELLED)


def one_line(e: BaseException) -> str:
    """The CLI's one-line form: a user error's own message, else 'TypeName: text' (never a traceback)."""
    from ..cli import _user_errors

    if isinstance(e, _user_errors(load=False)):
        return f"error: {e}"
    if isinstance(e, KeyboardInterrupt):
        return f"interrupted: {e}"
    return f"error: {type(e).__name__}: {e}".splitlines()[0]


def shown_status(job: Job | None, on_disk: str) -> str:
    """A run's status for the Runs tab: the live job's, "failed: <its line>" for a job that failed in this session
    (its folder would read "incomplete"), else what the run folder says (`on_disk`, workspace.run_status)."""
    if job is not None and job.status == FAILED:
        return f"failed: {job.message.removeprefix('error: ')}"
    return job.status if job is not None and job.status not in FINAL else on_disk


def progress_html(job: Job | None, queued: list[str] = ()) -> str:
    """The Train tab's progress box for `job` (None: none yet): status, phase, percent and ETA, a bar, the job's
    message and the names of the jobs `queued` behind it. The message is escaped: an error line may hold `<token>`."""
    waiting = f'<div id="nb-queued">queued: {", ".join(queued)}</div>' if queued else ""
    if job is None:
        return '<div id="nb-progress" data-status="none">no training run yet</div>'
    pct = round(100 * job.fraction())
    eta = f", ETA {job.eta_s:.0f} s" if job.eta_s is not None and job.status not in FINAL else ""
    loading = "loading models"
    if job.started and job.status == RUNNING:  # the seconds say it is not stuck (newcomer57: "(0%)" for 20 s)
        loading += f", {time.time() - job.started:.0f} s"
    phase = f"{job.phase}: {job.done}/{job.total}" if job.phase else loading
    return (f'<div id="nb-progress" data-status="{job.status}" data-pct="{pct}">'
            f"<b>{job.name}</b>: {job.status}, {phase} ({pct}%){eta}"
            f'<div style="background:#ddd;height:12px"><div style="background:#4a7;height:12px;width:{pct}%"></div></div>'
            f'<div id="nb-message">{html.escape(job.message)}</div>{waiting}</div>')


def _drop_if_empty(job: Job) -> None:
    """Remove a fresh start's run folder if nothing was written in it (only an empty folder goes: os.rmdir)."""
    if not job.cfg.resume_from_checkpoint:
        with contextlib.suppress(OSError):
            job.output_dir.rmdir()


def logged_losses(run_dir: Path, before: int) -> list[tuple[int, float]]:
    """(step, loss) of the run's train_log.jsonl for the steps before `before` (newcomer55: after Stop and Resume the
    loss plot began at the resumed step, the history gone). [] for no log; unreadable lines are skipped."""
    from ..core.run_folder import TRAIN_LOG

    out = []
    path = Path(run_dir) / TRAIN_LOG
    for line in path.read_text().splitlines() if path.is_file() else []:
        with contextlib.suppress(ValueError, KeyError, TypeError):
            rec = json.loads(line)
            if int(rec["step"]) < before and rec.get("loss") is not None:
                out.append((int(rec["step"]), float(rec["loss"])))
    return out


@dataclass
class Job:
    """One training run. Progress fields are written by the worker thread and read by the page; each is
    a plain value replaced whole (no lock needed for a snapshot that may be one event old)."""

    id: int
    cfg: object  # TrainConfig
    status: str = QUEUED
    phase: str = ""  # "class images", "training"
    done: int = 0  # of `total` in the current phase
    total: int = 0
    started: float = 0.0
    ended: float = 0.0
    phase_started: float = 0.0
    eta_s: float | None = None
    losses: list = field(default_factory=list)  # (step, loss)
    grids: list = field(default_factory=list)  # (step, Path) of each validation grid written
    checkpoint: Path | None = None
    message: str = ""
    stop_flag: threading.Event = field(default_factory=threading.Event)
    finished: threading.Event = field(default_factory=threading.Event)

    @property
    def output_dir(self) -> Path:
        return Path(self.cfg.output_dir)

    @property
    def name(self) -> str:
        return self.output_dir.name

    def fraction(self) -> float:
        return self.done / self.total if self.total else (1.0 if self.status == DONE else 0.0)

    def on_event(self, e) -> None:
        from ..core import events

        now = time.time()
        if isinstance(e, events.ClassImagesProgress):
            if self.phase != "class images":
                self.phase, self.phase_started, self._phase_from = "class images", now, e.done
            self.done, self.total = e.done, e.total
            made = e.done - getattr(self, "_phase_from", 0)
            self.eta_s = (now - self.phase_started) / made * (e.total - e.done) if made > 0 else None
        elif isinstance(e, events.Step):
            if self.phase != "training":
                self.phase, self.phase_started = "training", now
            self.done, self.total = e.step, e.total
            if not self.losses and self.cfg.resume_from_checkpoint:  # a resumed run's plot keeps the steps before it
                self.losses = logged_losses(self.output_dir, before=e.step)
            self.losses = self.losses + [(e.step, e.loss)]
            recent = getattr(self, "_recent", [])[-9:] + [e.seconds_per_step]
            self._recent = recent
            self.eta_s = sum(recent) / len(recent) * (e.total - e.step)
        elif isinstance(e, events.SampleGrid):
            self.grids = self.grids + [(e.step, Path(e.path))]
        elif isinstance(e, events.CheckpointSaved):
            self.checkpoint = Path(e.path)
        elif isinstance(e, events.Done):
            self.eta_s = 0.0
        elif isinstance(e, events.Stopped):
            self.checkpoint = e.checkpoint or self.checkpoint


class JobManager:
    """Runs training jobs one at a time in a daemon worker thread.

    `submit(cfg)` -> Job (queued; the worker starts it when the previous one ends). `stop(job)`: a running
    job checkpoints and stops, a queued one is cancelled. `resume(job)` -> a new Job continuing the run
    from its latest checkpoint. `train` is api.train unless given (a test's stand-in).
    """

    def __init__(self, train: Callable | None = None):
        self._train = train
        self._jobs: dict[int, Job] = {}
        self._ids = itertools.count(1)
        self._queue: queue.Queue = queue.Queue()
        self._lock = threading.Lock()
        self._worker = threading.Thread(target=self._work, name="nanobooth-ui-jobs", daemon=True)
        self._worker.start()

    # --- what the page calls ---------------------------------------------------------------------------------
    def submit(self, cfg) -> Job:
        with self._lock:
            busy = [j for j in self._jobs.values() if j.status not in FINAL]
            if any(j.output_dir.resolve() == Path(cfg.output_dir).resolve() for j in busy):
                from ..core.config import ConfigError

                raise ConfigError(f"output_dir '{cfg.output_dir}' already has a job queued or running; stop it first")
            job = Job(next(self._ids), cfg)
            if busy:
                job.message = f"queued behind {busy[-1].name}: starts when it ends"
            self._jobs[job.id] = job
        self._queue.put(job)
        return job

    def stop(self, job: Job) -> None:
        job.stop_flag.set()
        if job.status == QUEUED:
            job.status, job.message = CANCELLED, "cancelled before it started"
            _drop_if_empty(job)
            job.finished.set()
        elif job.status == RUNNING:
            job.status, job.message = STOPPING, "stopping: a checkpoint is written at the next step"

    def resume(self, job_or_cfg) -> Job:
        """Queue a run again with resume_from_checkpoint=latest (a stopped job, or a run's saved config)."""
        cfg = copy.deepcopy(getattr(job_or_cfg, "cfg", job_or_cfg))
        cfg.resume_from_checkpoint = "latest"
        return self.submit(cfg)

    def jobs(self) -> list[Job]:
        with self._lock:
            return list(self._jobs.values())

    def get(self, job_id: int) -> Job | None:
        return self._jobs.get(job_id)

    def current(self) -> Job | None:
        """The running job, else the newest one (what a freshly loaded page shows)."""
        jobs = self.jobs()
        running = [j for j in jobs if j.status in (RUNNING, STOPPING)]
        return running[0] if running else (jobs[-1] if jobs else None)

    def for_dir(self, run_dir: Path) -> Job | None:
        found = [j for j in self.jobs() if j.output_dir.resolve() == Path(run_dir).resolve()]
        return found[-1] if found else None

    # --- the worker ---------------------------------------------------------------------------------------------
    def _work(self) -> None:
        while True:
            job = self._queue.get()
            if job.status != QUEUED:  # cancelled while waiting
                continue
            try:
                self._run(job)
            except BaseException as e:  # noqa: BLE001 - whatever one job does, the next one runs
                job.status, job.message = FAILED, one_line(e)
                log.warning("ui job %s failed: %s", job.name, job.message)
                _drop_if_empty(job)
            finally:
                job.ended = time.time()
                job.finished.set()

    def _run(self, job: Job) -> None:
        from ..core.stop import TrainingInterrupted

        train = self._train
        if train is None:
            from .. import api

            train = api.train
        job.status, job.message, job.started = RUNNING, "", time.time()
        try:
            train(job.cfg, should_stop=job.stop_flag.is_set, callbacks=[job.on_event])
        except TrainingInterrupted as e:
            # the message ends in the CLI's "continue with the same command ..."; on the page that is Resume
            said = str(e).split("; continue with")[0]
            job.status, job.message = STOPPED, f"{said}; press Resume to continue"
            job.checkpoint = getattr(e, "checkpoint", None) or job.checkpoint
            return
        job.status, job.message = DONE, f"finished: {job.output_dir}"
