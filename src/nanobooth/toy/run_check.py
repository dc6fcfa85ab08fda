"""toy eval's RUN_DIR, checked torch-free: a wrong path answers at once, before the models load."""

from __future__ import annotations

from pathlib import Path

from ..core.data import DataError, resolve_data_dir
from ..core.errors import ModelError
from ..core.run_folder import CONFIG, load_run_config, result_kind


def finished_run(run_dir: str | Path):
    """(run folder, its TrainConfig, its subject's photo folder) of a finished run. ModelError for a folder that is
    missing or holds no finished run; DataError when the run's photos are not where its config says."""
    run = Path(run_dir)
    if not run.exists():
        raise ModelError(f"RUN_DIR '{run}' does not exist; pass the output_dir of a completed `nanobooth train`")
    cfg = load_run_config(run)
    if cfg is None or result_kind(run) is None:  # result_kind also refuses a folder mixing two runs
        raise ModelError(f"RUN_DIR '{run}' is not a finished nanobooth run (no {CONFIG}, or no trained weights); "
                         "pass the output_dir of a completed `nanobooth train`")
    try:
        instance_dir = resolve_data_dir(cfg.instance_data_dir)
    except DataError as e:  # the run remembers the path as typed: relative to the folder training ran in
        hint = (f"; it is relative to the folder the run was trained from: run toy eval there, or set an absolute "
                f"instance_data_dir in {run / CONFIG}") if not Path(cfg.instance_data_dir).is_absolute() else ""
        raise DataError(f"{e} (the run's subject photos){hint}") from None
    return run, cfg, instance_dir
