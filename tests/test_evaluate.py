"""The DreamBooth evaluation protocol: prompt lists, metric maths, metric models loaded by path, the CLIs."""

import argparse
import json
import os
import sys

import numpy as np
import pytest
import torch
from conftest import train_args
from PIL import Image

from nanobooth.eval import metrics as M
from nanobooth.eval import cli as EC
from nanobooth.eval import evaluate as E
from nanobooth.cli import main
from nanobooth.core.data import DataError
from nanobooth.core.models import ModelError

DINO_MEAN_STD = ([0.4, 0.5, 0.6], [0.2, 0.25, 0.3])  # not ImageNet's, so the test sees which one is used


@pytest.fixture(scope="module")
def metric_models(tmp_path_factory):
    """Tiny random DINO-shaped ViT and CLIP, saved and then loaded by path exactly as users load real ones."""
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer, ViTConfig, ViTModel

    from nanobooth.tiny import tokenizer_dir

    root = tmp_path_factory.mktemp("metric-models")
    torch.manual_seed(0)
    ViTModel(ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
                       intermediate_size=37), add_pooling_layer=False).save_pretrained(root / "dino")
    (root / "dino" / "preprocessor_config.json").write_text(json.dumps(
        {"image_processor_type": "ViTImageProcessor", "image_mean": DINO_MEAN_STD[0], "image_std": DINO_MEAN_STD[1], "resample": 2}))
    torch.manual_seed(0)
    text = dict(vocab_size=49408, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=2,
                max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)
    vision = dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=2)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).save_pretrained(root / "clip")
    CLIPTokenizer.from_pretrained(tokenizer_dir()).save_pretrained(root / "clip")
    return root


@pytest.fixture(scope="module")
def backends(metric_models):
    return M.load_backends("real", str(metric_models / "dino"), str(metric_models / "clip"))


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tiny_model, subject_dir):
    out = tmp_path_factory.mktemp("runs") / "dog"
    assert main(["train", "dreambooth-lora", *train_args(tiny_model, subject_dir, out, "max_train_steps=2")]) == 0
    return out


def cli(argv):
    p = argparse.ArgumentParser()
    EC.add_parser(p.add_subparsers(dest="command", required=True))  # the torch-free parsers
    args = p.parse_args(argv)
    return args.func(args)


def noise(seed, size=40):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size + 8, 3), dtype=np.uint8))


def solid(rgb):
    return Image.new("RGB", (32, 32), rgb)


class ColourBackend(M.FeatureBackend):
    """Features = normalised mean RGB: cosines of solid colours are known in closed form."""

    def image_features(self, images):
        f = torch.tensor(np.stack([np.asarray(im, np.float32).reshape(-1, 3).mean(0) for im in images]))
        return torch.nn.functional.normalize(f, dim=1)


# ------------------------------------------------------------------ prompts
def test_protocol_file_gives_the_papers_prompts_and_classes():
    classes, sets = E.read_protocol()
    assert len(classes) == 30 and classes["dog"] == "dog" and classes["bear_plushie"] == "stuffed animal"
    assert classes["cat2"] == "cat" and classes["pink_sunglasses"] == "glasses"
    assert len(sets["object"]) == len(sets["live"]) == 25
    assert all("{0} {1}" in t for t in sets["object"] + sets["live"])
    assert "a {0} {1} wearing a santa hat" in sets["live"] and "a {0} {1} wearing a santa hat" not in sets["object"]
    assert E.fill(sets["object"][2], "sks", "stuffed animal") == "a sks stuffed animal on the beach"
    dino = M.FeatureBackend()
    assert E.choose_prompts(None, "dog", dino) == ("live", sets["live"])
    assert E.choose_prompts(None, "cat", dino)[0] == "live"
    assert E.choose_prompts(None, "backpack", dino) == ("object", sets["object"])


def test_prompt_file_and_bad_spec(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("# my prompts\n\na {0} {1} in the snow\n  a {identifier} {class} on {mars}  \n")
    name, templates = E.choose_prompts(str(f), "dog", M.FeatureBackend())
    assert templates == ["a {0} {1} in the snow", "a {identifier} {class} on {mars}"]
    assert E.fill(templates[1], "zwx", "cat") == "a zwx cat on {mars}"  # other braces survive
    with pytest.raises(DataError, match="--prompts"):
        E.choose_prompts(str(tmp_path / "nope.txt"), "dog", M.FeatureBackend())


def test_identifier_is_removed_for_clip_t():
    assert M.strip_identifier("a sks dog on the beach", "sks") == "a dog on the beach"
    assert M.strip_identifier("sks dog", "sks") == "dog"
    assert M.strip_identifier("a sksy dog near sks", "sks") == "a sksy dog near"
    assert M.strip_identifier("a <v*> dog", "<v*>") == "a dog"


# ------------------------------------------------------------------ maths
def test_lpips_style_distance_closed_form():
    a = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])  # one image, two positions
    b = torch.tensor([[[0.0, 1.0], [0.0, 1.0]]])  # position 0 orthogonal, position 1 equal
    assert M.lpips_style_distance([torch.cat([a, a, 3 * a])]) == pytest.approx(0.0, abs=1e-7)  # per-position scale is normalised away
    assert M.lpips_style_distance([torch.cat([a, b])]) == pytest.approx(0.5)
    assert M.lpips_style_distance([torch.cat([a, b]), torch.cat([a, a])]) == pytest.approx(0.25)  # layers averaged
    assert M.lpips_style_distance([a]) is None


def test_per_prompt_and_mean_aggregation_with_known_features():
    red, green, blue = solid((255, 0, 0)), solid((0, 255, 0)), solid((0, 0, 255))
    gen = [[red, red], [green, blue], [red]]
    res = E.score(gen, ["a sks a", "a sks b", "a sks c"], [red], [[green], [red]], {"dino": ColourBackend(), "clip": None}, "sks")
    rows = res["per_prompt"]
    assert [r["dino"] for r in rows] == pytest.approx([1.0, 0.0, 1.0], abs=1e-6)
    assert rows[0]["div"] == pytest.approx(0.0, abs=1e-6) and rows[1]["div"] == pytest.approx(1.0, abs=1e-6)
    assert rows[2]["div"] is None  # one image has no pairs
    assert res["mean"]["dino"] == pytest.approx(2 / 3, abs=1e-6)
    assert res["mean"]["div"] == pytest.approx(0.5, abs=1e-6)  # prompts without pairs are not counted as 0
    assert res["mean"]["pres"] == pytest.approx(0.5, abs=1e-6)  # green (0) and red (1) class images
    assert res["mean"]["clip_i"] is None and res["mean"]["clip_t"] is None and res["real"]["dino"] is None


# ------------------------------------------------------------------ real (tiny) metric models, loaded by path
def test_identical_images_score_one_and_no_diversity(backends):
    img, other = noise(1), noise(2)
    res = E.score([[img, img, img]], ["a sks dog"], [img, img], [], backends, "sks")
    row = res["per_prompt"][0]
    assert row["dino"] == pytest.approx(1.0, abs=1e-5) and row["clip_i"] == pytest.approx(1.0, abs=1e-5)
    assert row["div"] == pytest.approx(0.0, abs=1e-6)
    assert res["real"]["dino"] == pytest.approx(1.0, abs=1e-5) and res["real"]["clip_i"] == pytest.approx(1.0, abs=1e-5)
    assert res["mean"]["pres"] is None  # no class images rendered
    diff = E.score([[img, other]], ["a sks dog"], [img], [], backends, "sks")["per_prompt"][0]
    assert diff["dino"] < 1 - 1e-4 and diff["clip_i"] < 1 - 1e-4 and diff["div"] > 1e-4


def test_clip_t_scores_the_prompt_without_identifier(backends):
    clip, imgs = backends["clip"], [noise(3), noise(4)]
    row = E.score([imgs], ["a sks dog on the beach"], [noise(5)], [], backends, "sks")["per_prompt"][0]
    assert row["text"] == "a dog on the beach"
    f = clip.image_features(imgs)
    assert row["clip_t"] == pytest.approx(float((f @ clip.text_features(["a dog on the beach"]).T).mean()), abs=1e-6)
    assert row["clip_t"] != pytest.approx(float((f @ clip.text_features(["a sks dog on the beach"]).T).mean()), abs=1e-6)


def test_pres_is_dino_between_class_images_and_subject(backends):
    real, cls = [noise(6), noise(7)], [noise(8), noise(9)]
    res = E.score([cls], ["a sks dog"], real, [cls[:1], cls[1:]], backends, "sks")
    dino = backends["dino"]
    assert res["mean"]["pres"] == pytest.approx(res["per_prompt"][0]["dino"], abs=1e-6)
    assert res["mean"]["pres"] == pytest.approx(M.cross_similarity(dino.image_features(cls), dino.image_features(real)), abs=1e-6)


def test_dino_backend_uses_the_models_normalisation_and_lpips_layers(metric_models, backends):
    dino = backends["dino"]
    assert list(dino.mean_std[0]) == DINO_MEAN_STD[0] and list(dino.mean_std[1]) == DINO_MEAN_STD[1]
    assert backends["clip"].mean_std == M.CLIP_MEAN_STD  # no preprocessor_config.json: CLIP's own
    x = M.preprocess([Image.new("RGB", (50, 40), (102, 51, 204))], 32, dino.mean_std)
    assert x.shape == (1, 3, 32, 32)
    assert x[0, :, 5, 5].tolist() == pytest.approx([(0.4 - 0.4) / 0.2, (0.2 - 0.5) / 0.25, (0.8 - 0.6) / 0.3], abs=1e-5)
    assert dino.layers == [1, 2, 3, 4]
    layers = dino.patch_features([noise(1), noise(2)])
    assert len(layers) == 4 and all(t.shape == (2, 16, 32) for t in layers)  # CLS dropped: (32/8)^2 patches


def test_metric_models_refuse_what_cannot_load(tmp_path, monkeypatch):
    with pytest.raises(ModelError, match="--dino '.*nothing'"):
        M.DinoBackend(str(tmp_path / "nothing"))
    with pytest.raises(ModelError, match="--clip '.*nothing'.*--clip-revision"):  # the eval CLI names its own flags
        M.ClipBackend(str(tmp_path / "nothing"))
    monkeypatch.setitem(sys.modules, "nanobooth.toy.probe", None)  # the module is absent
    with pytest.raises(ModelError, match="--backend toy needs"):
        M.load_backends("toy", "", None)


def test_metric_models_off_the_hub_name_it_at_once(metric_models, tmp_path, monkeypatch):
    """No network and no HF_HUB_OFFLINE: an uncached DINO is one line naming --dino and the hub at once (the hub
    client retried for about 30 s first); a cached one loads from the cache (newcomer54)."""
    import shutil
    import time

    from huggingface_hub import constants

    from nanobooth.core import models

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(models, "hub_reachable", lambda timeout=3.0: False)
    start = time.perf_counter()
    with pytest.raises(ModelError, match="--dino 'someone/dino': .* cannot be reached .* not in the hub cache"):
        M.DinoBackend("someone/dino")
    assert time.perf_counter() - start < 5
    repo = tmp_path / "hub" / "models--someone--dino"  # huggingface_hub's cache layout
    shutil.copytree(metric_models / "dino", repo / "snapshots" / ("0" * 40))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    assert M.DinoBackend("someone/dino").model.config.image_size > 0


# ------------------------------------------------------------------ command lines, end to end on the tiny SD model
def test_eval_cli_end_to_end(lora_run, tiny_model, subject_dir, metric_models, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a {0} {1} in the snow\na {0} {1} on the beach\n")
    out = tmp_path / "eval"
    cli(["eval", "--model", str(tiny_model), "--weights", str(lora_run), "--subject-dir", str(subject_dir),
         "--class-noun", "dog", "--prompts", str(prompts), "--images-per-prompt", "1", "--steps", "2",
         "--pres-prompts", "1", "--dino", str(metric_models / "dino"), "--clip", str(metric_models / "clip"), "--out", str(out)])
    res = json.loads((out / "eval.json").read_text())
    rows = res["per_prompt"]
    assert [r["prompt"] for r in rows] == ["a sks dog in the snow", "a sks dog on the beach"]
    assert [r["text"] for r in rows] == ["a dog in the snow", "a dog on the beach"]
    for r in rows:
        assert all(-1 <= r[k] <= 1 for k in ("dino", "clip_i", "clip_t")) and r["div"] is None
    assert res["mean"]["dino"] == pytest.approx(np.mean([r["dino"] for r in rows]))
    assert -1 <= res["mean"]["pres"] <= 1 and res["class_images"] == 1 and res["real"]["n"] == 3
    assert res["settings"]["images_per_prompt"] == 1 and res["settings"]["class_prompt"] == "a dog"
    assert res["settings"]["weights"] == str(lora_run.resolve())
    assert res["settings"]["metric_models"] == {"dino": str(metric_models / "dino"), "clip": str(metric_models / "clip")}
    sheet = Image.open(out / "contact_sheet.png")
    assert sheet.size[1] == 16 + 4 * (128 + 14)  # title + 2 prompts + class row + real row
    table = capsys.readouterr().out
    assert "paper: DreamBooth (Stable Diffusion) | 0.668 | 0.803 | 0.305" in table and "real images of" in table


def test_eval_dataset_summarises_subjects_and_reuses_finished_ones(lora_run, tiny_model, subject_dir, metric_models,
                                                                 tmp_path, monkeypatch):
    data, runs = tmp_path / "dataset", tmp_path / "runs"
    data.mkdir()
    runs.mkdir()
    for s in ("dog", "backpack", "teapot"):
        os.symlink(subject_dir, data / s)
    os.symlink(lora_run, runs / "dog")
    os.symlink(lora_run, runs / "teapot")  # backpack has no run
    prompts = tmp_path / "p.txt"
    prompts.write_text("a {0} {1} on the beach\n")
    argv = ["eval-dataset", "--model", str(tiny_model), "--runs-root", str(runs), "--dataset-root", str(data),
            "--prompts", str(prompts), "--images-per-prompt", "2", "--steps", "2", "--dino", str(metric_models / "dino"),
            "--clip", str(metric_models / "clip"), "--out", str(tmp_path / "out")]
    summary = cli(argv)
    assert sorted(summary["subjects"]) == ["dog", "teapot"] and summary["missing"] == ["backpack"]
    assert summary["subjects"]["teapot"]["class"] == "teapot"
    assert json.loads((tmp_path / "out" / "dog" / "eval.json").read_text())["class_images"] == 2  # default: every prompt's seeds
    per = [summary["subjects"][s]["mean"] for s in ("dog", "teapot")]
    for k in ("dino", "clip_i", "clip_t", "pres", "div"):
        assert summary["mean"][k] == pytest.approx(np.mean([p[k] for p in per]))
    teapot = json.loads((tmp_path / "out" / "teapot" / "eval.json").read_text())
    assert teapot["per_prompt"][0]["text"] == "a teapot on the beach" and teapot["per_prompt"][0]["div"] >= 0
    md = (tmp_path / "out" / "summary.md").read_text()
    assert "| dog (dog) |" in md and "mean over 2 subjects" in md and "backpack" in md
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["mean"] == summary["mean"]
    # each run's own sampling settings where no flag is given (train_args: resolution 32), recorded per subject
    assert summary["subjects"]["dog"]["sampling"] == {"steps": 2, "guidance": 7.5, "guidance_cutoff": 1.0, "resolution": 32,
                                                      "sampler": "model"}
    assert summary["settings"]["steps"] == 2 and summary["settings"]["backend"] == "real" and summary["paper"] == M.PAPER

    def no_render(*a, **k):
        raise AssertionError("finished subjects must not be rendered again")

    monkeypatch.setattr(E, "load_run", no_render)
    assert cli(argv)["mean"] == summary["mean"]
    with pytest.raises(AssertionError, match="rendered again"):
        cli(argv + ["--seed", "1"])  # other settings: scored afresh


@pytest.fixture(scope="module")
def toy_probe(tmp_path_factory):
    """A random probe in load_probe's on-disk format: the toy backend's plumbing, independent of the shipped one."""
    probe = pytest.importorskip("nanobooth.toy.probe")
    from safetensors.torch import save_file

    path = tmp_path_factory.mktemp("probe")
    torch.manual_seed(0)
    labels = probe.label_space()
    net = probe.ProbeNet(labels, width=8, dim=16)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps({"labels": labels, "width": 8, "dim": 16}))
    return path


def test_toy_backend_scores_with_the_probe(tiny_model, subject_dir, toy_probe, tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a photo of a {0} {1} on the beach\n")
    res = cli(["eval", "--model", str(tiny_model), "--subject-dir", str(subject_dir), "--class-noun", "ball",
               "--prompts", str(prompts), "--images-per-prompt", "2", "--steps", "2", "--backend", "toy",
               "--toy-probe", str(toy_probe), "--out", str(tmp_path / "toy")])
    row = res["per_prompt"][0]
    assert row["clip_i"] is None and row["clip_t"] is None
    assert row["prompt_acc"] in (0.0, 0.5, 1.0) and row["div"] >= 0 and -1 <= row["dino"] <= 1
    assert res["settings"]["class_prompt"] == "a photo of a ball" and res["settings"]["backend"] == "toy"
    backend = M.ProbeBackend(str(toy_probe))
    name, templates = E.choose_prompts(None, "ball", backend)  # the toy world's own scenes by default
    assert name == "toy" and templates[0] == "a photo of a {0} {1}" and "a photo of a {0} {1} on grass" in templates
    assert len(templates) == 1 + len([s for s in backend.probe.labels["scene"] if s != "plain"])


def test_toy_prompt_match_judges_only_what_the_prompt_names():
    class FakeProbe:
        labels = {"class": ["ball", "cube"], "scene": ["on grass", "on the beach", "plain"]}

        def predict(self, images):
            return {"class": ["ball", "ball", "cube", "cube"], "scene": ["on grass", "on the beach", "on grass", "plain"]}

    match = M.ProbeBackend(probe=FakeProbe()).prompt_match([None] * 4, [
        "a photo of a sks ball on grass",  # both right
        "a photo of a sks ball on grass",  # wrong scene
        "a photo of a sks cube",  # no scene named: class only
        "a photo of a sks ball",  # wrong class
    ])
    assert match.tolist() == [1.0, 0.0, 1.0, 0.0]


# ------------------------------------------------------------------ defaults: the toy model's backend, the run's sampling
def test_the_embedded_toy_model_is_recognised_by_name_and_folder(tiny_model, tmp_path):
    from nanobooth.core.builtin_models import shipped_folder
    from nanobooth.eval import defaults as D

    assert D.toy_model("toy") and D.toy_model("toy-flux")
    if shipped_folder("toy") is not None:  # this build ships it: its folder, however the path is spelt, is the toy model
        assert D.toy_model(str(shipped_folder("toy"))) and D.toy_model(str(shipped_folder("toy")) + "/")
    assert not D.toy_model(str(tiny_model)) and not D.toy_model("tiny") and not D.toy_model(str(tmp_path / "toy"))
    assert D.choose_backend("toy", None) == "toy" and D.choose_backend(str(tiny_model), None) == "real"
    assert D.choose_backend("toy", "real") == "real" and D.choose_backend(str(tiny_model), "toy") == "toy"  # a flag wins


def test_eval_of_the_toy_model_scores_with_the_probe_by_default(tiny_model, subject_dir, toy_probe, tmp_path, monkeypatch,
                                                                 caplog, capsys):
    """The newcomer's command, without --backend: the toy backend (said in one line), its own column names, no paper rows."""
    load_run = E.load_run
    monkeypatch.setattr(E, "load_run", lambda model, weights, **kw: load_run(str(tiny_model), weights, **kw))  # speed only
    prompts = tmp_path / "p.txt"
    prompts.write_text("a photo of a {0} {1} on the beach\n")
    with caplog.at_level("INFO", logger="nanobooth"):
        res = cli(["eval", "--model", "toy", "--subject-dir", str(subject_dir), "--class-noun", "star", "--prompts", str(prompts),
                   "--images-per-prompt", "2", "--steps", "1", "--pres-prompts", "1", "--toy-probe", str(toy_probe),
                   "--out", str(tmp_path / "e")])
    assert res["settings"]["backend"] == "toy" and res["settings"]["metric_models"] == {"dino": str(toy_probe)}
    assert res["mean"]["prompt_acc"] is not None and res["mean"]["clip_i"] is None  # the probe, not DINO/CLIP
    said = [r.getMessage() for r in caplog.records if "--backend toy" in r.getMessage()]
    assert len(said) == 1 and "embedded toy model" in said[0]
    written = json.loads((tmp_path / "e" / "eval.json").read_text())
    assert written["paper"] is None and written["columns"]["dino"] == "probe" and "clip_i" not in written["columns"]
    assert written["mean"].keys() == {"dino", "clip_i", "clip_t", "pres", "div", "prompt_acc"}  # keys stay as they were
    out = capsys.readouterr().out
    head = out.splitlines()[0]
    assert "| probe |" in head and "DINO" not in head and "CLIP" not in head
    assert "paper:" not in out and "0.668" not in out


def test_toy_model_with_the_real_backend_names_the_toy_backend_when_dino_fails(subject_dir, tmp_path):
    with pytest.raises(ModelError, match=r"--dino '.*nothing'.*--backend toy"):  # an explicit --backend real is kept
        cli(["eval", "--model", "toy", "--backend", "real", "--dino", str(tmp_path / "nothing"), "--subject-dir",
             str(subject_dir), "--class-noun", "star", "--out", str(tmp_path / "e")])
    with pytest.raises(ModelError, match=r"--dino '.*nothing'") as e:  # other models: the toy probe is no fix
        M.load_backends("real", str(tmp_path / "nothing"), None)
    assert "--backend toy" not in str(e.value)


def test_real_backend_table_keeps_the_papers_rows_and_toy_table_drops_them():
    row = {"dino": 0.5, "clip_i": 0.6, "clip_t": 0.3, "pres": 0.4, "div": 0.1, "prompt_acc": 1.0}
    real, toy = E.format_table([("run", row)], "real"), E.format_table([("run", row)], "toy")
    assert "| | DINO | CLIP-I | CLIP-T |" in real and "paper: DreamBooth (Stable Diffusion) | 0.668" in real
    assert toy.splitlines()[0] == "| | probe | PRES (probe, lower=better) | DIV (probe) | prompt acc (probe) |"
    assert "paper" not in toy and "0.600" not in toy  # no CLIP column: the probe measures none


def test_eval_sampling_defaults(lora_run):
    """No run config: eval's own defaults (50 steps, guidance 7.5); a run: its validation settings (generate's sampling_settings); a flag wins."""
    from nanobooth.eval.defaults import eval_sampling

    assert eval_sampling(None) == {"steps": 50, "guidance": 7.5, "guidance_cutoff": 1.0, "resolution": None, "sampler": "model"}
    assert eval_sampling(None, steps=3, sampler="dpm++")["steps"] == 3 and eval_sampling(None, sampler="dpm++")["sampler"] == "dpm++"
    run = eval_sampling(lora_run)
    assert run["steps"] == 2 and run["resolution"] == 32  # train_args' validation_inference_steps and resolution
    assert eval_sampling(lora_run, steps=7, resolution=48) == {**run, "steps": 7, "resolution": 48}


@pytest.fixture
def dpm_run(lora_run, tmp_path):
    """lora_run with the sampling settings of the newcomer's run: 3 DPM-Solver++ steps at guidance 4."""
    import shutil

    import yaml

    run = tmp_path / "run"
    shutil.copytree(lora_run, run)
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg.update(validation_inference_steps=3, validation_guidance_scale=4.0, validation_sampler="dpm++")
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    return run


def test_eval_samples_with_the_runs_settings_unless_flags_say_otherwise(dpm_run, tiny_model, subject_dir, metric_models,
                                                                        tmp_path, monkeypatch, capsys):
    seen = []
    render = E.render

    def spy(pipe, prompts, *a, **kw):
        seen.append({"scheduler": type(pipe.scheduler).__name__, **kw})
        return render(pipe, prompts, *a, **kw)

    monkeypatch.setattr(E, "render", spy)
    prompts = tmp_path / "p.txt"
    prompts.write_text("a {0} {1} on the beach\n")
    argv = ["eval", "--model", str(tiny_model), "--weights", str(dpm_run), "--subject-dir", str(subject_dir), "--class-noun",
            "dog", "--prompts", str(prompts), "--images-per-prompt", "1", "--pres-prompts", "0", "--dino",
            str(metric_models / "dino"), "--clip", "none"]
    res = cli(argv + ["--out", str(tmp_path / "run")])
    s = res["settings"]
    assert (s["steps"], s["guidance"], s["sampler"], s["guidance_cutoff"], s["resolution"]) == (3, 4.0, "dpm++", 1.0, 32)
    assert seen[-1]["scheduler"] == "DPMSolverMultistepScheduler"
    assert (seen[-1]["steps"], seen[-1]["guidance"], seen[-1]["resolution"]) == (3, 4.0, 32)
    assert json.loads((tmp_path / "run" / "eval.json").read_text())["settings"]["sampler"] == "dpm++"
    out = capsys.readouterr().out
    assert "sampling: steps 3, guidance 4.0, guidance cutoff 1.0, resolution 32, sampler dpm++ (the run's config.yaml)" in out

    res = cli(argv + ["--steps", "2", "--guidance", "6", "--sampler", "model", "--guidance-cutoff", "0.5",
                      "--out", str(tmp_path / "flags")])  # explicit flags win
    s = res["settings"]
    assert (s["steps"], s["guidance"], s["sampler"], s["guidance_cutoff"], s["resolution"]) == (2, 6.0, "model", 0.5, 32)
    assert seen[-1]["scheduler"] != "DPMSolverMultistepScheduler"
    assert (seen[-1]["steps"], seen[-1]["guidance"], seen[-1]["guidance_cutoff"]) == (2, 6.0, 0.5)
    assert "(--steps --guidance --guidance-cutoff --sampler as given, the rest from the run's config.yaml)" in capsys.readouterr().out


def test_eval_takes_the_model_from_the_weights_run_as_generate_does(monkeypatch, tmp_path):
    """newcomer57: generate --weights RUN found the run's model, eval still required --model beside it."""
    from nanobooth.core.config import load_config, save_config
    from nanobooth.core.errors import ConfigError

    run = tmp_path / "run"
    run.mkdir()
    save_config(load_config("toy/dreambooth-lora", [f"output_dir={run}"]), run / "config.yaml")
    (run / "pytorch_lora_weights.safetensors").write_bytes(b"")
    seen = {}
    monkeypatch.setattr(E, "eval_cli", lambda args: seen.setdefault("model", args.model))
    monkeypatch.setattr(EC, "check_weights", lambda weights: None)  # the LoRA file above is a stand-in
    assert cli(["eval", "--weights", str(run), "--subject-dir", "example:dog", "--out", str(tmp_path / "e")]) == "toy"
    with pytest.raises(ConfigError, match="--model: pass the base model"):  # no run to name it: said, not guessed
        cli(["eval", "--subject-dir", "example:dog", "--out", str(tmp_path / "e")])

