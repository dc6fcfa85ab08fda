"""The DreamBooth paper's claims on the shipped toy model, with a subject never used in tuning.

Each run trains a toy recipe end to end on CPU and scores it with `nanobooth toy eval` (base model
scored alongside). Runs are deterministic on CPU, so the measured numbers in the comments are what
this test sees; margins leave room for float differences across thread counts.
"""

import json
from importlib import resources
from pathlib import Path

import pytest

from nanobooth.cli import main

SHIPPED = (Path(str(resources.files("nanobooth"))) / "assets" / "toy_model" / "model_index.json").is_file()
pytestmark = [pytest.mark.slow, pytest.mark.skipif(not SHIPPED, reason="the pretrained toy model is not in this build")]
SUBJECT_SEED = 4242  # a green/cyan "halves" star with a black spot; recipes were tuned on subjects 0-9


@pytest.fixture(scope="module")
def subject(tmp_path_factory):
    out = tmp_path_factory.mktemp("subject")
    assert main(["toy", "subject", "--seed", str(SUBJECT_SEED), "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def scores(subject, tmp_path_factory):
    """toy_eval.json of the LoRA recipe with and without prior preservation, and with pivotal tuning."""
    out = {}
    # the two prior runs share one class-image folder (same base, class prompt and resolution: the provenance
    # check allows it), so class images are made once
    class_images = tmp_path_factory.mktemp("class")
    # the numbers below were measured on v4 with class images at 25 DPM-Solver++ steps and toy eval at 25 DDIM steps
    # (the defaults then; now 10 and 15 DPM-Solver++ steps), so this test keeps those settings
    prior = [f"class_data_dir={class_images}", "class_generation_steps=25"]
    runs = {"toy/dreambooth-lora-prior-pre": prior, "toy/dreambooth-lora": [], "pivotal": [*prior, "train_text_encoder_ti=true"]}
    for name, overrides in runs.items():
        variant = "toy/dreambooth-lora-prior-pre" if name == "pivotal" else name
        run = tmp_path_factory.mktemp("run") / "r"
        assert main(["train", variant, f"instance_data_dir={subject}", f"output_dir={run}", *overrides]) == 0
        # the base model is scored once: both twins share its settings (seed, steps, guidance and cutoff)
        again = ["--no-base"] if out else []
        assert main(["toy", "eval", str(run), "--images-per-prompt", "8", "--sampler", "model", "--steps", "25",
                     *again]) == 0  # 48 "sks" images per model
        out[name] = json.loads((run / "toy_eval.json").read_text())
    first, *others = out.values()
    for other in others:
        assert "base" not in other and first["settings"] == {**other["settings"], "model": first["settings"]["model"]}
        other["base"] = first["base"]
    return out


def test_subject_fidelity_rises_above_the_base_model(scores):
    # measured on the shipped model v4 (guidance on the first half of the steps, the LoRA twins' setting):
    # 0.845 vs base 0.724 with prior preservation, 0.860 without; the subject's own renders through the
    # model's VAE (toy eval's reference row) score 0.923
    for variant in ("toy/dreambooth-lora-prior-pre", "toy/dreambooth-lora"):
        res = scores[variant]
        assert res["tuned"]["subject_fidelity"] > res["base"]["subject_fidelity"] + 0.05, variant
    # read against what the decoder can show: the prior run closes 61% of the gap from base to reference
    # (44% with guidance on every step)
    res = scores["toy/dreambooth-lora-prior-pre"]
    gap = res["reference"]["subject_fidelity"] - res["base"]["subject_fidelity"]
    assert res["tuned"]["subject_fidelity"] - res["base"]["subject_fidelity"] > 0.3 * gap


def test_prompt_fidelity_is_kept(scores):
    # the toy model v3 never saw the instance images' plain backdrop and bound it to "sks": scenes asked
    # for in the prompt were lost (0.0 for this subject); v4 knows the backdrop (measured: 1.0 vs base 1.0)
    res = scores["toy/dreambooth-lora-prior-pre"]
    assert res["tuned"]["prompt_fidelity"] >= res["base"]["prompt_fidelity"] - 0.15


def test_subject_appears_in_the_requested_scenes(scores):
    # the task as a whole, i.e. fidelity to everything "a photo of a sks star on the beach" asks for: the
    # subject (class, pattern and mark all read right) and the scene in one image. The base model scores
    # 1.0 on the scene alone (test above) but never draws the subject (0 of 40 scene images). Measured on
    # this subject: 10 of 40 (0.250) without prior preservation, 9 of 40 (0.225) with it. With prior
    # preservation the other seven held-out subjects get 0-4 of 40, one 10 (docs/evaluation.md): the
    # binding is loose, and the margin asserted for that run is the smaller one.
    res = scores["toy/dreambooth-lora"]
    assert res["tuned"]["subject_in_context"] >= res["base"]["subject_in_context"] + 0.15
    res = scores["toy/dreambooth-lora-prior-pre"]
    assert res["tuned"]["subject_in_context"] >= res["base"]["subject_in_context"] + 0.1


def test_prior_preservation_limits_language_drift(scores):
    with_prior = scores["toy/dreambooth-lora-prior-pre"]["tuned"]
    without = scores["toy/dreambooth-lora"]["tuned"]
    # measured: prior_drift 0.774 with vs 0.966 without (base 0.722); plain "a photo of a star" is read as
    # the subject itself 0% of the time with prior preservation, 37.5% without
    assert without["prior_drift"] > with_prior["prior_drift"] + 0.05
    assert with_prior["prior_identity"] + 0.25 <= without["prior_identity"]


def test_pivotal_tuning_raises_subject_identity_above_lora(scores):
    # issue #23: the identifier becomes new tokens trained with the LoRA (train_text_encoder_ti). Measured on
    # this subject (bench/aids_toy.py, the same runs): subject_identity 0.250 vs 0.208 for plain LoRA + prior
    # (12 vs 10 of 48 images), subject_fidelity 0.917 vs 0.845. It raised identity on all four subjects of
    # docs/evaluation.md's table, and there, as here, prompt fidelity fell (0.25 vs 1.0 on this subject):
    # the trade-off that keeps the default recipe at plain LoRA + prior.
    pivotal, lora = scores["pivotal"]["tuned"], scores["toy/dreambooth-lora-prior-pre"]["tuned"]
    assert pivotal["subject_identity"] > lora["subject_identity"]
    assert pivotal["subject_fidelity"] > lora["subject_fidelity"] + 0.03
    assert pivotal["prompt_fidelity"] < lora["prompt_fidelity"] - 0.3
