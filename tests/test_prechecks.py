"""core/prechecks.py: the CLI's, the UI's and train()'s pre-checks are one function."""

import pytest
from conftest import train_args

import nanobooth.core.train as train_mod
from nanobooth.core.config import load_config
from nanobooth.core.data import DataError


def test_a_library_train_runs_the_cli_prechecks_before_loading_a_model(tiny_model, subject_dir, tmp_path, monkeypatch):
    """train() called from Python refuses a class_data_dir that is a file before it loads the model, in the CLI's
    words (the CLI's checks lived in cli.py only)."""
    def no_load(*a, **k):
        raise AssertionError("the model was loaded before the pre-checks")

    monkeypatch.setattr(train_mod, "load_components", no_load)
    a_file = tmp_path / "class.txt"
    a_file.write_text("not a folder")
    cfg = load_config("dreambooth-lora-prior-pre", train_args(tiny_model, subject_dir, tmp_path / "run", f"class_data_dir={a_file}"))
    with pytest.raises(DataError, match=f"class_data_dir={a_file}: this is a file, not a folder"):
        train_mod.train(cfg)
    assert not (tmp_path / "run").exists()
