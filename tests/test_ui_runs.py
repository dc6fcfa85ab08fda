"""The Runs tab's table (ui/runs.py): a workspace of several runs reads newest first, each row naming when it
started, its subject and its scores once measured; a broken file in a run folder blanks a cell, not the table."""

import json
import os
import time
from types import SimpleNamespace

import yaml

from nanobooth.eval.evaluate import columns
from nanobooth.ui import runs as R
from nanobooth.ui import workspace as W

DAY = 24 * 3600
T0 = time.mktime((2025, 3, 14, 9, 30, 0, 0, 0, -1))  # local time, as the table shows it


def fake_run(ws, name, started, subject=None, steps=0, finished=False, files=None):
    """A run folder as training leaves it: config.yaml (written at the start, its time set to `started`),
    `steps` train_log.jsonl lines, the LoRA file when finished, and `files` (relative path -> text) beside them."""
    run = ws.runs / name
    run.mkdir()
    if subject is not None:
        cfg = {"instance_data_dir": str(subject), "method": "lora", "model": "toy", "max_train_steps": 20}
        (run / "config.yaml").write_text(yaml.safe_dump(cfg))
        os.utime(run / "config.yaml", (started, started))
    (run / "train_log.jsonl").write_text("".join(json.dumps({"step": s + 1, "loss": 0.1, "time": s}) + "\n"
                                                 for s in range(steps)))
    if finished:
        (run / "pytorch_lora_weights.safetensors").write_bytes(b"")
    for rel, text in (files or {}).items():
        (run / rel).parent.mkdir(parents=True, exist_ok=True)
        (run / rel).write_text(text)
    return run


def test_runs_read_newest_first_with_their_start_subject_and_scores(tmp_path):
    ws = W.Workspace(tmp_path / "ws")
    dog = ws.example_dog()  # no subject.json until a run names its words
    toy = ws.toy_subject(3)  # subject.json: sks + its class noun
    photos = ws.save_uploads(sorted(str(p) for p in dog.iterdir())[:3])[0]
    W.remember_names(photos, "zwx", "teapot")
    from nanobooth.toy import world

    noun = world.make_subject(3).class_noun
    toy_eval = {"settings": {"steps": 25}, "base": {"subject_identity": 0.0, "prompt_fidelity": 0.9},
                "tuned": {"subject_fidelity": 0.81, "subject_identity": 0.75, "prompt_fidelity": 0.95,
                          "subject_in_context": 0.7, "prior_drift": 0.4}}
    real_eval = {"per_prompt": [], "mean": {"dino": 0.612, "clip_i": 0.784, "clip_t": 0.301, "pres": 0.5, "div": 0.2},
                 "columns": dict(columns("real"))}
    probe_eval = {"mean": {"dino": 0.5, "clip_i": None, "clip_t": None, "pres": 0.3}, "columns": dict(columns("toy"))}
    # names sort the other way round from their start times: the table follows the times
    fake_run(ws, "a-toy-run", T0, toy, steps=20, finished=True, files={"toy_eval.json": json.dumps(toy_eval)})
    fake_run(ws, "b-dog-run", T0 - DAY, dog, steps=5, files={"eval/eval.json": json.dumps(real_eval)})
    fake_run(ws, "c-cli-eval", T0 - 2 * DAY, photos, steps=20, finished=True,
             files={"eval.json": json.dumps(probe_eval)})
    # half-written and not-an-object files, a subject folder since deleted: the row stays, without scores
    fake_run(ws, "d-broken", T0 - 3 * DAY, tmp_path / "gone" / "my-cat", steps=2,
             files={"toy_eval.json": '{"tuned": {"subject_identity": 0.7', "eval/eval.json": "[1, 2]"})
    loading = ws.runs / "e-loading"  # made by Start, its model still loading: no config.yaml yet
    loading.mkdir()
    os.utime(loading, (T0 + 60, T0 + 60))

    rows = R.runs_rows(ws.runs)
    assert all(len(row) == len(R.HEADERS) for row in rows)
    table = {row[0]: dict(zip(R.HEADERS, row)) for row in rows}
    assert [row[0] for row in rows] == ["e-loading", "a-toy-run", "b-dog-run", "c-cli-eval", "d-broken"]
    assert R.newest_first(ws.runs) == [row[0] for row in rows]  # the dropdowns open on the same newest run
    assert table["a-toy-run"]["started"] == "2025-03-14 09:30"
    assert table["b-dog-run"]["started"] == "2025-03-13 09:30"
    assert table["e-loading"]["started"] == "2025-03-14 09:31"
    assert table["a-toy-run"]["subject"] == f"sks {noun} ({toy.name})"
    assert table["b-dog-run"]["subject"] == dog.name
    assert table["c-cli-eval"]["subject"] == f"zwx teapot ({photos.name})"
    assert table["d-broken"]["subject"] == "my-cat"
    assert table["a-toy-run"]["scores"] == "identity 0.75 · in context 0.70 · prompt 0.95"
    assert table["b-dog-run"]["scores"] == "DINO 0.61 · CLIP-I 0.78 · CLIP-T 0.30"
    assert table["c-cli-eval"]["scores"] == "probe 0.50"  # the toy probe measured it: not called DINO
    assert table["d-broken"]["scores"] == table["e-loading"]["scores"] == ""
    assert (table["a-toy-run"]["status"], table["a-toy-run"]["steps"]) == ("finished", 20)
    assert (table["d-broken"]["status"], table["d-broken"]["steps"]) == ("incomplete", 2)
    assert table["a-toy-run"]["method"] == "lora" and table["a-toy-run"]["model"] == "toy"
    assert table["e-loading"]["subject"] == table["e-loading"]["method"] == ""
    assert W.run_status(ws.runs / "d-broken")["toy_eval"] is None  # the Runs tab's config view reads it too
    # the last trained step, not the line count: a step-0 validation-loss record, a resume's redone step, a torn line
    with open(ws.runs / "d-broken" / "train_log.jsonl", "a") as log:
        log.write('{"step": 0, "val_loss": 0.2}\n{"step": 2, "loss": 0.1, "time": 9}\n{"step": 3, "lo')
    assert W.run_status(ws.runs / "d-broken")["steps"] == 2


def test_a_run_the_page_is_training_shows_its_live_status_and_a_broken_subject_json_its_folder(tmp_path):
    ws = W.Workspace(tmp_path / "ws")
    subject = ws.example_dog()
    (subject / "subject.json").write_text('{"identifier": "sks", "class_')  # a crash while remember_names wrote it
    run = fake_run(ws, "dog-run", T0, subject, steps=3)
    (run / "config.yaml").write_text("just a string\n")  # hand-edited into something that is not a config
    jobs = {run: SimpleNamespace(status="running", message="")}
    manager = SimpleNamespace(for_dir=lambda folder: jobs.get(folder))
    (row,) = R.runs_rows(ws.runs, manager)
    got = dict(zip(R.HEADERS, row))
    assert got["status"] == "running" and got["steps"] == 3 and got["subject"] == got["method"] == ""
    assert R.subject_label({"instance_data_dir": str(subject)}) == subject.name
    assert R.subject_label({"instance_data_dir": "example:dog"}) == "sks dog (dog)"  # its subject.json (session 57)
