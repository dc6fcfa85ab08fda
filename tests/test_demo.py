"""The README's main command, shortened: `nanobooth demo` end to end on the shipped toy model."""
import json
import re
from importlib import resources
from pathlib import Path

import pytest

from nanobooth.cli import main

SHIPPED = (Path(str(resources.files("nanobooth"))) / "assets" / "toy_model" / "model_index.json").is_file()


@pytest.mark.skipif(not SHIPPED, reason="the pretrained toy model is not in this build")
def test_speed_times_the_text_encoder_where_the_recipe_trains_it(monkeypatch):
    """The plan's step time: the recipe's text-encoder LoRA runs forward (once per prompt: instance and class) and
    backward inside every timed step, as in training; a frozen text encoder encodes once, before the timing."""
    import nanobooth.demo as demo_mod
    from nanobooth.families import SD

    calls = []
    encode = SD.encode
    monkeypatch.setattr(SD, "encode", lambda self, *a: calls.append(a) or encode(self, *a))
    cfg = demo_mod.load_config("toy/dreambooth-lora-prior-pre", {})
    assert cfg.train_text_encoder and cfg.with_prior_preservation
    assert min(demo_mod.speed(cfg, sample_batch=2, repeats=2)) > 0
    assert len(calls) == 1 + 2 * (1 + 2)  # before the timing, then instance and class in the warm-up and 2 timed steps
    te = calls[-1][0][0]
    lora_b = [p for n, p in te.named_parameters() if "lora_B" in n]
    assert lora_b and all(p.abs().sum() > 0 for p in lora_b)  # zeros when attached: the steps' gradients reached them
    calls.clear()
    assert min(demo_mod.speed(demo_mod.load_config("toy/dreambooth-lora-prior-pre", ["train_text_encoder=false"]),
                              sample_batch=2, repeats=2)) > 0
    assert len(calls) == 1


@pytest.mark.slow
@pytest.mark.skipif(not SHIPPED, reason="the pretrained toy model is not in this build")
def test_demo_writes_grids_scores_and_says_where(tmp_path, capsys):
    # 4 class images, not the recipe's 50 (a minute of sampling that nothing below reads)
    assert main(["demo", "--out", str(tmp_path / "demo"), "--steps", "4", "--num-class-images", "4"]) == 0
    run = tmp_path / "demo" / "run"
    assert len(list((run / "class_images").glob("*.png"))) == 4
    samples = sorted((run / "samples").glob("step-*.png"))
    assert [p.name for p in samples] == ["step-000000.png", "step-000004.png"]  # before and after
    res = json.loads((run / "toy_eval.json").read_text())
    assert {"base", "tuned", "reference"} <= set(res) and "subject_fidelity" in res["tuned"]
    assert "outside_toy_world" not in res["settings"]  # a toy subject: the probe's numbers measure it
    # 4 steps barely move the LoRA: the subject's own renders (through the VAE) are far more like it
    assert res["reference"]["subject_fidelity"] > res["tuned"]["subject_fidelity"] + 0.05
    assert (run / "pytorch_lora_weights.safetensors").is_file()
    # the LoRA twins guide the first half of the sampling steps only, and toy eval scores with the run's setting
    assert res["settings"]["guidance_cutoff"] == 0.5
    out = capsys.readouterr().out
    assert str(samples[0]) in out and str(samples[-1]) in out and str(run / "toy_eval.json") in out
    assert (run / "toy_eval.png").is_file() and str(run / "toy_eval.png") in out  # base vs tuned, side by side
    assert out.index("demo: about") < out.index("demo finished")  # the plan and its estimate come first
    assert re.search(r"demo finished in (\d+ min )?\d+ s\n", out)  # measured to the second, not rounded to minutes
    assert "4 class images, 4 LoRA steps on the denoiser and the text encoder" in out
    from nanobooth.toy import world  # pivotal tuning from the subject's words, which its subject.json names
    assert f"sks as new tokens from '{world.look_words(world.make_subject(0))}'" in out
    # step 0's grid already draws the words, so it is not called the base model (newcomer54); the sheet's base rows are
    assert f"sample grid before training (sks already the words '{world.look_words(world.make_subject(0))}')" in out
    assert (run / "run_emb.safetensors").is_file()
    # toy eval's default on the UNet: 15 DPM-Solver++ steps (toy/evaluate.EVAL_STEPS), as the demo's estimate counts
    assert (res["settings"]["sampler"], res["settings"]["steps"]) == ("dpm++", 15)
    from nanobooth import demo
    from nanobooth.toy.evaluate import EVAL_STEPS
    assert demo.EVAL_STEPS == {"toy": EVAL_STEPS["dpm++"], "toy-flux": EVAL_STEPS["model"]}
    assert main(["toy", "eval", str(run), "--images-per-prompt", "2", "--no-base", "--guidance-cutoff", "1",
                 "--sampler", "dpm++", "--steps", "10"]) == 0
    assert "sampling: dpm++ 10 steps, guidance 4, seed 1234, 2 images a prompt (guidance from the run's config)\n" in capsys.readouterr().out
    settings = json.loads((run / "toy_eval.json").read_text())["settings"]
    assert settings["guidance_cutoff"] == 1.0 and settings["sampler"] == "dpm++" and settings["steps"] == 10


def test_demo_plan_counts_cached_class_images_as_done(tmp_path, monkeypatch, capsys):
    """The plan's class prompt is the subject's (subject.json), so a complete cached class set is estimated at 0 s
    (it was estimated for a class prompt of None: the whole set, minutes, on every rerun)."""
    from PIL import Image

    import nanobooth.core.train as core_train
    import nanobooth.demo as demo_mod
    import nanobooth.toy.evaluate as toy_evaluate
    from nanobooth.core.subject_prompts import fill_prompts
    from nanobooth.core.data import read_subject_meta
    from nanobooth.core.run_folder import class_images_dir

    monkeypatch.setenv("NANOBOOTH_CLASS_IMAGE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(demo_mod, "speed", lambda *a: (0.01, 0.1))
    monkeypatch.setattr(toy_evaluate, "toy_eval", lambda run: None)

    def fake_train(cfg):  # what a real run leaves in the cache: the whole class set, under the run's provenance
        fill_prompts(cfg, read_subject_meta(Path(cfg.instance_data_dir)), "subject.json")
        folder = class_images_dir(cfg, cfg.output_dir)
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(cfg.num_class_images):
            Image.new("RGB", (8, 8)).save(folder / f"class-{i:05d}.png")
        return Path(cfg.output_dir)

    monkeypatch.setattr(core_train, "train", fake_train)
    demo_mod.demo(str(tmp_path / "demo"))
    first = capsys.readouterr().out
    demo_mod.demo(str(tmp_path / "demo"))
    second = capsys.readouterr().out
    assert "class images ~10 s" in first  # 50 images x 10 steps (the toy variants' class_generation_steps) x 2 forwards x 0.01 s
    assert "class images ~0 s" in second


def test_demo_rerun_writes_a_fresh_folder_and_keeps_the_first(tmp_path, monkeypatch, capsys):
    """A second `nanobooth demo --out X` writes X-2 and leaves X's subject, run and scores as they were
    (it retrained into X/run with overwrite=true, deleting the first run)."""
    import nanobooth.core.train as core_train
    import nanobooth.demo as demo_mod
    import nanobooth.toy.evaluate as toy_evaluate

    monkeypatch.setenv("NANOBOOTH_CLASS_IMAGE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(demo_mod, "speed", lambda *a: (0.01, 0.1))
    monkeypatch.setattr(toy_evaluate, "toy_eval", lambda run: None)
    runs = []

    def fake_train(cfg):  # stands for a run: refuses a non-empty output_dir unless overwrite, then writes weights
        out = Path(cfg.output_dir)
        assert not cfg.overwrite and not out.exists()
        out.mkdir(parents=True)
        (out / "pytorch_lora_weights.safetensors").write_text(f"run {len(runs)}")
        runs.append(out)
        return out

    monkeypatch.setattr(core_train, "train", fake_train)
    first = demo_mod.demo(str(tmp_path / "demo"))
    second = demo_mod.demo(str(tmp_path / "demo"))
    assert first == tmp_path / "demo" / "run" and second == tmp_path / "demo-2" / "run"
    assert (first / "pytorch_lora_weights.safetensors").read_text() == "run 0"
    assert (second / "pytorch_lora_weights.safetensors").read_text() == "run 1"
    assert f"this one writes to {tmp_path / 'demo-2'}" in capsys.readouterr().out
    (tmp_path / "empty").mkdir()  # an empty folder is used as it is
    assert demo_mod.fresh_folder(tmp_path / "empty") == tmp_path / "empty"


def test_demo_on_the_flux_twin_trains_its_recipe(tmp_path, monkeypatch, capsys):
    """`nanobooth demo --model toy-flux`: the FLUX twin's variant, its denoiser timed for the plan (through the
    family's denoise call), a LoRA run of the FLUX family (random tiny-flux weights where this build does not
    ship the twin, with the warning that says so)."""
    import nanobooth.demo as demo_mod
    import nanobooth.toy.evaluate as toy_evaluate
    from nanobooth.core.run_folder import load_run_config

    monkeypatch.setenv("NANOBOOTH_CLASS_IMAGE_CACHE", str(tmp_path / "cache"))
    scored = []
    monkeypatch.setattr(toy_evaluate, "toy_eval", scored.append)
    assert min(demo_mod.speed(demo_mod.load_config("toy-flux/dreambooth-lora-prior-pre", {}), sample_batch=2, repeats=1)) > 0
    monkeypatch.setattr(demo_mod, "speed", lambda *a: (0.01, 0.1))
    load_config = demo_mod.load_config  # 2 sampler steps, not 25: the test is about which recipe runs on which model
    monkeypatch.setattr(demo_mod, "load_config", lambda variant, over: load_config(
        variant, {**over, "validation_inference_steps": 2, "class_generation_steps": 2, "num_validation_images": 1}))
    run = demo_mod.demo(str(tmp_path / "demo"), steps=2, num_class_images=2, model="toy-flux")
    out = capsys.readouterr().out
    # the recipe, and what its after row usually shows (a newcomer read a colours-only row as a broken run)
    assert "toy-flux/dreambooth-lora-prior-pre" in out and demo_mod.EXPECT["toy-flux"] in out
    cfg = load_run_config(run)
    assert (cfg.model, cfg.method, cfg.with_prior_preservation, cfg.train_text_encoder) == ("toy-flux", "lora", True, True)
    assert (run / "pytorch_lora_weights.safetensors").is_file() and scored == [run]
    assert len(sorted((run / "samples").glob("step-*.png"))) == 2  # before and after
