"""The DreamBooth paper's claims on the shipped toy model, with a subject never used in tuning.

Each run trains a toy recipe end to end on CPU and scores it with `nanobooth toy eval` (base model
scored alongside). Margins are modest and one claim is a known gap (see the xfail): on this world the
LoRA recipe binds the subject and keeps the class prior, but also binds the instance backdrop.
"""

import json
from importlib import resources
from pathlib import Path

import pytest

from nanobooth.cli import main

SHIPPED = (Path(str(resources.files("nanobooth"))) / "assets" / "toy_model" / "model_index.json").is_file()
pytestmark = [pytest.mark.slow, pytest.mark.skipif(not SHIPPED, reason="the pretrained toy model is not in this build")]
SUBJECT_SEED = 4242  # recipes were tuned on subjects 0-9


@pytest.fixture(scope="module")
def subject(tmp_path_factory):
    out = tmp_path_factory.mktemp("subject")
    assert main(["toy", "subject", "--seed", str(SUBJECT_SEED), "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def scores(subject, tmp_path_factory):
    """toy_eval.json of the LoRA recipe with and without prior preservation."""
    out = {}
    for variant in ("toy/dreambooth-lora-prior-pre", "toy/dreambooth-lora"):
        run = tmp_path_factory.mktemp("run") / "r"
        assert main(["train", variant, f"instance_data_dir={subject}", f"output_dir={run}"]) == 0
        assert main(["toy", "eval", str(run)]) == 0
        out[variant] = json.loads((run / "toy_eval.json").read_text())
    return out


def test_subject_fidelity_rises_above_the_base_model(scores):
    res = scores["toy/dreambooth-lora-prior-pre"]
    # measured on the shipped model: 0.830 vs 0.744 for this subject (0.87 vs 0.62 for subject 1)
    assert res["tuned"]["subject_fidelity"] > res["base"]["subject_fidelity"] + 0.05


def test_prior_preservation_limits_language_drift(scores):
    with_prior = scores["toy/dreambooth-lora-prior-pre"]["tuned"]["prior_drift"]
    without = scores["toy/dreambooth-lora"]["tuned"]["prior_drift"]
    # measured: 0.862 with vs 0.901 without for this subject (0.680 vs 0.901 for subject 1)
    assert without > with_prior + 0.02


@pytest.mark.xfail(strict=True, reason="known gap (issue 3): instance images are all on a plain backdrop and the LoRA "
                   "recipe that binds the subject also binds the backdrop; scenes in the prompt are ignored (0.0)")
def test_prompt_fidelity_is_kept(scores):
    res = scores["toy/dreambooth-lora-prior-pre"]
    assert res["tuned"]["prompt_fidelity"] >= min(0.6, res["base"]["prompt_fidelity"] - 0.15)
