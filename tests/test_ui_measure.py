"""The Measure tab (ui/app.py, on_eval) through gradio's own queue, as the page calls it (gradio_client, no browser)."""

import socket
import threading
import time

import pytest
from PIL import Image

pytest.importorskip("gradio", reason="gradio is not installed (pip install -e '.[ui]')")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_measure_tab_shows_the_evaluations_progress_with_counts(tmp_path, monkeypatch):
    """newcomer: the Measure tab showed only gradio's spinner ("processing | 15.1s") for the ~50 s a toy eval takes.
    toy_eval and evaluate count their images in tqdm bars (tests/test_cli.py: test_toy_eval_score_advances_its_bar_per_
    image, the eval's "eval: rendering 12/12"); the page shows such a bar's counts as the eval's progress. The stand-in
    toy_eval below moves its bar only when the test says, so no count can be missed however busy the machine is."""
    from gradio_client import Client
    from tqdm.auto import tqdm

    from nanobooth import api
    from nanobooth.core.config import load_config, save_config
    from nanobooth.ui.app import serve
    from nanobooth.ui.workspace import Workspace

    ws = Workspace(tmp_path / "ws")
    run = ws.runs / "toy-run"
    run.mkdir()
    save_config(load_config("toy/dreambooth-lora", [f"instance_data_dir={ws.toy_subject(7)}", f"output_dir={run}"]),
                run / "config.yaml")
    go = [threading.Event() for _ in range(4)]  # one a count, then one to finish (a closed bar is no longer shown)

    def toy_eval(run_dir):
        with tqdm(total=3, desc="toy eval", unit="img") as bar:  # as toy_eval's own bar: one count an image
            for event in go[:3]:
                event.wait(60)
                bar.update(1)
            go[3].wait(60)
        Image.new("RGB", (8, 8)).save(run_dir / "toy_eval.png")
        return {"tuned": {"subject_identity": 0.5}}

    monkeypatch.setattr(api, "toy_eval", toy_eval)
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(ws.root / ".gradio"))  # serve sets it; restored after the test
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    page, url = serve(str(ws.root), port=free_port(), block=False)
    try:
        job = Client(url, verbose=False).submit("toy-run", api_name="/on_eval")
        for k, event in enumerate(go[:3], 1):
            event.set()
            deadline, seen = time.time() + 60, None
            while time.time() < deadline:
                units = job.status().progress_data or []
                if (seen := [(u.index, u.length, u.unit, u.desc) for u in units]) == [(k, 3, "img", "toy eval")]:
                    break
                time.sleep(0.05)
            assert seen == [(k, 3, "img", "toy eval")]
        go[3].set()
        table, sheet = job.result(timeout=60)
        assert "| tuned | 0.500 |" in table and sheet.endswith("toy_eval.png")
    finally:
        for event in go:  # a failed check leaves no eval waiting
            event.set()
        page.close()
