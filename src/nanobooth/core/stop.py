"""Stopping a run on request: Ctrl-C, SIGTERM (schedulers, `kill`), or a library caller's flag.

A signal only sets a flag; the training loop reads it at the step boundary, where every piece of state
(weights, optimizer, LR schedule, generators, data order, log) describes the same finished step, and
writes a checkpoint there. Raising from the handler instead would land mid-step, where no consistent
checkpoint exists. Two phases do want an immediate stop: setup (models loading, class images; nothing
trained yet, nothing to save) and a validation render (minutes on a big model; its grid is optional).
A second Ctrl-C stops at once, without a checkpoint, in a single process. Under `accelerate launch`
a repeated signal is no escalation: the launcher forwards the terminal's Ctrl-C to every worker, which
may have got it from the terminal too (torch 2.13's torchrun starts workers in their own session; not
every version does), so the workers keep heading for the checkpoint (the launcher kills them 30 s later
at the latest, which checkpoints of DreamBooth-sized models fit in). The launcher then prints its own
traceback (README, "Multi-GPU"): it raises on the signal it got, whatever the workers do.
"""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path
from typing import Callable

NAMES = {signal.SIGINT: "Ctrl-C", signal.SIGTERM: "SIGTERM"}


def how_to_continue(resume_from_checkpoint: str | None, saved_now: bool = True) -> str:
    """The end of the stop message: how to continue, for a command run with `resume_from_checkpoint`.
    `saved_now`: this run wrote a newer checkpoint than the one it resumed (so a command naming that
    checkpoint's folder would go back to it)."""
    if not resume_from_checkpoint:
        return "continue with the same command plus resume_from_checkpoint=latest"
    if resume_from_checkpoint == "latest" or not saved_now:
        return "continue with the same command"
    return f"continue with the same command, but resume_from_checkpoint=latest instead of {resume_from_checkpoint}"


class TrainingInterrupted(KeyboardInterrupt):
    """The run stopped before max_train_steps on request. The message says what was saved and how to
    continue; `exit_code` is the shell's convention for the signal (130 SIGINT, 143 SIGTERM)."""

    def __init__(self, message: str, signum: int = signal.SIGINT, step: int = 0, checkpoint: Path | None = None):
        super().__init__(message)
        self.exit_code = 128 + int(signum)
        self.step, self.checkpoint = step, checkpoint  # steps done; the checkpoint of that step, if written


class StopRequest:
    """Signal handlers for SIGINT/SIGTERM (main thread only) plus an optional `should_stop()` callable.

    `raising`: True while an immediate stop is wanted (setup, rendering): the handler raises
    KeyboardInterrupt (TrainingInterrupted during setup). False during training steps: flag only.
    Use as a context manager; the previous handlers come back on exit.
    """

    def __init__(self, should_stop: Callable[[], bool] | None = None, resume_from_checkpoint: str | None = None):
        self.should_stop = should_stop
        self.resume_from_checkpoint = resume_from_checkpoint  # the run's own: the message says how to continue it
        self.signum: int | None = None
        self.source = ""  # what asked: "Ctrl-C", "SIGTERM" or "stop request"
        self.raising = True
        self.setup = True  # before the first training step: an interrupt has nothing to save
        self._old: dict = {}
        self.escalate = int(os.environ.get("WORLD_SIZE", "1")) <= 1  # see the module docstring

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():  # Python allows handlers only there
            for s in NAMES:
                self._old[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, old in self._old.items():
            signal.signal(s, old)
        self._old.clear()

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:  # already stopping
            if signum == signal.SIGINT and self.escalate:
                raise TrainingInterrupted(f"{NAMES[signum]} again: stopped at once, without saving a checkpoint", signum)
            return
        self.signum, self.source = signum, NAMES[signum]
        if self.setup:
            raise self._setup_stop()
        if self.raising:
            raise KeyboardInterrupt

    def _setup_stop(self) -> TrainingInterrupted:
        # torchrun answers one worker's failure with SIGTERM to the others: that process's error is the story
        why = " (a launcher also sends it when another process failed: see that error)" \
            if self.signum == signal.SIGTERM and not self.escalate else ""
        return TrainingInterrupted(f"{self.source} before the first training step{why}: nothing trained, nothing to save "
                                   "(class images made so far are kept); "
                                   f"{how_to_continue(self.resume_from_checkpoint, saved_now=False)}", self.signum)

    def request(self, signum: int = signal.SIGINT, source: str | None = None) -> None:
        """Stop at the next step boundary (a callback's STOP, an interrupted render): a flag, as a first signal sets."""
        if self.signum is None:
            self.signum, self.source = signum, source or NAMES[signum]

    def stop_during_setup(self) -> None:
        """Between setup chunks (class-image batches): raise TrainingInterrupted now if a stop was asked, as
        a signal during setup does. Single process only: the other ranks wait for rank 0 in a barrier."""
        if self.setup and self.requested():
            raise self._setup_stop()

    def requested(self) -> bool:
        if self.signum is None and self.should_stop is not None and self.should_stop():
            self.signum, self.source = signal.SIGINT, "stop request"
        return self.signum is not None
