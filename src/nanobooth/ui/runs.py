"""The Runs tab's table: one row per run folder, newest first, with what tells ten runs apart at a glance (when
each started, on which subject, and its scores once measured).

Everything is read from the run folder on every refresh (the page polls once a second), and a file that is
missing, half-written or not what it should be leaves its cell blank instead of breaking the table: a toy eval
or an eval may be writing its json while the table reads it.

"started" is config.yaml's modification time: `train` writes it once when training starts (again on a resume,
so a resumed run reads as started then), while train_log.jsonl's records hold only seconds since their session
began and a folder's name is the user's to choose. A folder without config.yaml yet (a run still loading its
model, or queued) reads its own modification time: the moment the page made it.
"""

from __future__ import annotations

import time
from pathlib import Path

from .jobs import shown_status
from .workspace import read_json, run_status

HEADERS = ["run", "started", "subject", "status", "steps", "scores", "method", "model"]
# the columns' shares of the table, long cells wrapping: without them the long names pushed the scores out of view
WIDTHS = ["20%", "10%", "17%", "9%", "5%", "23%", "7%", "9%"]
# toy_eval.json's "tuned" keys (nanobooth toy eval) and the words the table gives them, in the order shown
TOY_SCORES = [("subject_identity", "identity"), ("subject_in_context", "in context"), ("prompt_fidelity", "prompt")]
# eval.json's "mean" keys (nanobooth eval) with their heads where eval.json's own "columns" does not name them
EVAL_SCORES = [("dino", "DINO"), ("clip_i", "CLIP-I"), ("clip_t", "CLIP-T")]
# where an eval.json of a run is found: the page's Measure tab writes RUN/eval/, `nanobooth eval --out RUN` writes RUN/
EVAL_FILES = ("eval/eval.json", "eval.json")


def started(run: Path) -> float:
    """When `run` started training, in seconds since the epoch (see the module's note on why config.yaml's time)."""
    from ..core.run_folder import CONFIG

    for path in (run / CONFIG, run):
        try:
            return path.stat().st_mtime
        except OSError:
            continue
    return 0.0  # the folder went away while listed: sorted last, dropped on the next refresh


def newest_first(runs: Path) -> list[str]:
    """The run folders' names under `runs`, the most recently started first (ties: by name, for a stable order)."""
    folders = [p for p in runs.iterdir() if p.is_dir()]
    return [p.name for p in sorted(folders, key=lambda p: (started(p), p.name), reverse=True)]


def subject_label(cfg: dict) -> str:
    """The subject a run trained on: its subject.json's identifier and class noun with the folder's name
    ("sks dog (dog-20250101-120000)"), else the folder's name; "" when the config names none."""
    from ..core.data import DataError, read_subject_meta, resolve_data_dir

    where = cfg.get("instance_data_dir")
    if not where or not isinstance(where, str):
        return ""
    name = where.split(":", 1)[1] if where.startswith("example:") else Path(where).name
    try:
        meta = read_subject_meta(resolve_data_dir(where))
    except (DataError, OSError, ValueError):  # a deleted folder, a broken subject.json: the folder's name still tells it
        return name
    words = " ".join(str(meta[k]) for k in ("identifier", "class_noun") if isinstance(meta, dict) and meta.get(k))
    return f"{words} ({name})" if words else name


def _scored(values, keys: list[tuple[str, str]], labels: dict | None = None) -> list[str]:
    """'label 0.75' for each of `keys` that `values` holds as a number, two decimals."""
    if not isinstance(values, dict):
        return []
    labels = labels if isinstance(labels, dict) else {}
    return [f"{labels.get(k, head)} {values[k]:.2f}" for k, head in keys
            if isinstance(values.get(k), (int, float)) and not isinstance(values.get(k), bool)]


def scores_label(run: Path, toy_eval: dict | None) -> str:
    """The run's scores, compactly ("identity 0.75 · in context 0.70 · prompt 0.95"): its toy eval's (toy_eval.json,
    the tuned model's), then its eval's means (eval.json; the toy probe's own column name where it measured them);
    "" for a run never measured, or whose files cannot be read. `toy_eval`: its toy_eval.json as run_status read it
    (None: none, or unreadable), so the page's once-a-second refresh reads it once."""
    parts = _scored((toy_eval or {}).get("tuned"), TOY_SCORES)
    for name in EVAL_FILES:
        res = read_json(run / name)
        if res:
            parts += _scored(res.get("mean"), EVAL_SCORES, res.get("columns"))
            break  # the first found: the page's own eval, else the CLI's
    return " · ".join(parts)


def runs_rows(runs: Path, manager=None) -> list[list]:
    """The table's rows (HEADERS' columns), newest first. With the page's job manager (jobs.JobManager), a run it is
    training shows the live status (jobs.shown_status)."""
    rows = []
    for name in newest_first(runs):
        run = runs / name
        st = run_status(run)
        cfg = st["config"]
        job = manager.for_dir(run) if manager is not None else None
        rows.append([name, time.strftime("%Y-%m-%d %H:%M", time.localtime(started(run))), subject_label(cfg),
                     shown_status(job, st["status"]), st["steps"], scores_label(run, st["toy_eval"]), cfg.get("method", ""),
                     cfg.get("model", "")])
    return rows
