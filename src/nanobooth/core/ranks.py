"""Which process of an `accelerate launch` (torchrun) this one is, and keeping the others' consoles quiet.

Every process of a launch runs the whole command, so each would print every log line and progress bar.
As diffusers' scripts do (accelerate's get_logger, `is_main_process`), rank 0 speaks for the run and the
others print only errors: their warnings are rank 0's too (the same code on the same config and photos),
while an error may be theirs alone (a node without the data folder) and must not be lost. The rank comes
from the launcher's environment, set before torch or accelerate load, so the CLI can decide before a
line is printed; it equals accelerate's process_index once that exists.

No heavy imports here: the CLI calls this before torch is loaded.
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Iterator


def launch_rank() -> int:
    """This process's global rank under a launcher (RANK; LOCAL_RANK where only that is set); 0 otherwise."""
    for name in ("RANK", "LOCAL_RANK"):
        value = os.environ.get(name, "").strip()
        if value.isdigit():
            return int(value)
    return 0


def rank_tag(rank: int | None = None) -> str:
    """' (rank N)' on a rank other than 0, to mark the lines it still prints; '' on rank 0 or alone."""
    rank = launch_rank() if rank is None else rank
    return f" (rank {rank})" if rank else ""


class _ErrorsOnly(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR


@contextlib.contextmanager
def errors_only_off_main(main: bool, logger: str = "nanobooth") -> Iterator[None]:
    """While inside, `logger`'s own records below ERROR are dropped unless `main`: train() called from a
    script under a launcher, whose logging nanobooth does not configure (the CLI quiets its ranks itself)."""
    if main:
        yield
        return
    log, only = logging.getLogger(logger), _ErrorsOnly()
    log.addFilter(only)
    try:
        yield
    finally:
        log.removeFilter(only)
