"""bench/vs_diffusers.py's arithmetic: step timing from timestamps, the reference's clocked bars, the table."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import vs_diffusers as vs  # noqa: E402


def test_step_rate_is_t_last_minus_t_skip_over_the_steps_between():
    times = [10.0 + 2 * i for i in range(5)] + [18.5 + 0.5 * i for i in range(30)]  # steps 1-35 end at these times
    assert vs.step_rate(times, 5) == pytest.approx((times[34] - times[4]) / 30) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="--skip=5"):
        vs.step_rate(times[:5], 5)


def test_reference_times_reads_the_steps_and_class_image_bars():
    events = [["Generating class images", "start", 100.0], ["Generating class images", "update", 101.0],
              ["Generating class images", "close", 103.5], ["Steps", "start", 110.0], ["Steps", "update", 111.0],
              ["Steps", "update", 112.5], ["Steps", "close", 113.0]]
    assert vs.reference_times(events) == ([111.0, 112.5], 3.5)
    assert vs.reference_times(events[3:]) == ([111.0, 112.5], None)  # class images already there: none generated


def test_summary_gives_medians_per_tool_and_their_ratio():
    rows = [{"tool": t, "s_per_step": s, "peak_rss_mb": 1000.0 * m, "class_s": 10.0 * m, "total_s": 100.0 * m}
            for t, s, m in [("diffusers", 0.6, 1), ("nanobooth", 0.2, 0.5), ("diffusers", 0.8, 1), ("nanobooth", 0.3, 0.5),
                            ("diffusers", 0.7, 1), ("nanobooth", 0.25, 0.5)]]
    lines = vs.summarize(rows)
    assert lines[0] == ["s/step", "0.700", "0.250", "0.36"]
    assert [ln[3] for ln in lines[1:]] == ["0.50", "0.50", "0.50"]


def test_issue_24_targets_read_the_right_sections_and_margins():
    import aids_toy

    def res(ident, ctx, prompt, drift, base_prompt=0.9, base_drift=0.1):
        return {"tuned": {"subject_identity": ident, "subject_in_context": ctx, "prompt_fidelity": prompt, "prior_drift": drift},
                "base": {"prompt_fidelity": base_prompt, "prior_drift": base_drift}}

    prior = {1: res(0.7, 0.6, 0.88, 0.2), 2: res(0.5, 0.5, 0.86, 0.3)}
    no_prior = {1: res(0.8, 0.4, 0.7, 0.4), 2: res(0.8, 0.4, 0.7, 0.5)}
    assert [ok for _, ok in aids_toy.targets(prior, no_prior, prior)] == [True, True, True, True, True]
    prior[2] = res(0.25, 0.3, 0.80, 0.4)  # identity 0.475, context 0.45, a subject below 0.3, prompt 0.84 < 0.85, 0.3 > 0.7 * 0.4
    assert [ok for _, ok in aids_toy.targets(prior, no_prior, prior)] == [False, False, False, False, False]
    # drift counts from the base model's: 0.75 vs 0.9 is 0.05 vs 0.2 above a base of 0.7 (met), though 0.75 > 0.7 * 0.9
    prior = {1: res(0.7, 0.6, 0.88, 0.75, base_drift=0.7)}
    assert aids_toy.targets(prior, {1: res(0.8, 0.4, 0.7, 0.9)}, prior)[-1][1]
    assert not aids_toy.targets(prior, {1: res(0.8, 0.4, 0.7, 0.76)}, prior)[-1][1]  # 0.05 > 0.7 * 0.06
    # a no-prior run below the base model's drift: the prior run must not be above it
    assert not aids_toy.targets(prior, {1: res(0.8, 0.4, 0.7, 0.65)}, prior)[-1][1]
    below = {1: res(0.7, 0.6, 0.88, 0.69, base_drift=0.7)}
    assert aids_toy.targets(below, {1: res(0.8, 0.4, 0.7, 0.65)}, below)[-1][1]


def test_aids_toy_reuses_a_runs_scores_only_at_the_same_eval_settings(tmp_path):
    import json

    import aids_toy

    def scores(sampler, steps, n):
        return {"settings": {"sampler": sampler, "steps": steps, "images_per_prompt": n}, "tuned": {"subject_fidelity": steps}}

    (tmp_path / "toy_eval.json").write_text(json.dumps(scores("model", 25, 8)))
    assert aids_toy.cached(tmp_path, 8, "model", 25)["tuned"]["subject_fidelity"] == 25
    assert aids_toy.cached(tmp_path, 4, "model", 25) is None and aids_toy.cached(tmp_path, 8, "dpm++", 15) is None
    # a later eval at other settings overwrote toy_eval.json; the earlier one is still found under its own name
    (tmp_path / "toy_eval-model-25-8.json").write_text((tmp_path / "toy_eval.json").read_text())
    (tmp_path / "toy_eval.json").write_text(json.dumps(scores("dpm++", 15, 8)))
    assert aids_toy.cached(tmp_path, 8, "dpm++", 15)["tuned"]["subject_fidelity"] == 15
    assert aids_toy.cached(tmp_path, 8, "model", 25)["tuned"]["subject_fidelity"] == 25
    # scores from before toy eval recorded its sampler were the model's own
    (tmp_path / "toy_eval.json").write_text(json.dumps({"settings": {"steps": 25, "images_per_prompt": 4}}))
    assert aids_toy.cached(tmp_path, 4, "model", 25) is not None


def test_every_aids_toy_arm_is_a_packaged_variant_with_valid_overrides():
    import aids_toy

    from nanobooth.core.config import load_config, parse_overrides

    for arm, (variant, _) in aids_toy.ARMS.items():
        overrides = aids_toy.arm_overrides(arm, 9101)  # with a subject's words where an arm takes them
        cfg = load_config(variant, overrides)  # an unknown key or a bad value raises, naming it
        for key, value in parse_overrides(overrides).items():
            got = getattr(cfg, key)  # YAML reads "2e-3" as text; the config makes it the key's number
            assert got == (float(value) if isinstance(got, float) else value), arm
    # 9101 is an orange/red two-tone ball with a spot
    assert "initializer_concept=orange red two-tone spot" in aids_toy.arm_overrides("lora-prior-ti-words", 9101)


def test_aids_toy_refuses_a_run_folder_trained_otherwise_than_its_arm_trains_now(tmp_path):
    import aids_toy

    from nanobooth.core.config import load_config, save_config

    run_dir = tmp_path / "runs" / "full-9101"
    run_dir.mkdir(parents=True)
    before = aids_toy.arm_overrides("full-ti0", 9101)  # toy/dreambooth before session 51
    save_config(load_config("toy/dreambooth", before + [f"output_dir={run_dir}", "instance_prompt=a sks ball"]),
                run_dir / "config.yaml")
    assert aids_toy.stale_keys(run_dir, "toy/dreambooth", before) == []
    stale = aids_toy.stale_keys(run_dir, "toy/dreambooth", aids_toy.arm_overrides("full", 9101))
    assert any(s.startswith("train_text_encoder_ti=False (now True)") for s in stale), stale
    (run_dir / "toy_eval.json").write_text("{}")  # its scores are not read as the arm's
    with pytest.raises(SystemExit, match="full-9101 was trained otherwise than arm full trains now"):
        aids_toy.score(tmp_path, "full", 9101, 8, base=False)


@pytest.mark.skipif(not (Path(__file__).resolve().parents[1] / "src/nanobooth/assets/toy_model/model_index.json").is_file(),
                    reason="toy model not shipped")
def test_toy_model_reads_described_subjects_one_by_one_and_their_mean(tmp_path, monkeypatch):
    import json

    import toy_model

    from nanobooth.toy import metrics

    out = tmp_path / "readings.json"
    monkeypatch.setattr(sys, "argv", ["toy_model.py", "toy", "--captions", "0", "--subjects", "10423", "9181",
                                      "--images-per-subject", "2", "--json", str(out)])
    toy_model.main()
    row = json.loads(out.read_text())["toy"]
    per = row["per_subject"]
    assert sorted(per) == ["10423", "9181"]
    for k in ("class", "pattern", "mark", "identity"):
        assert row["described"][k] == pytest.approx((per["10423"][k] + per["9181"][k]) / 2)
    alone = metrics.described_subject_accuracy("toy", subject_seeds=[10423], images_per_subject=2)
    assert {k: per["10423"][k] for k in ("class", "pattern", "mark")} == {k: alone[k] for k in ("class", "pattern", "mark")}
