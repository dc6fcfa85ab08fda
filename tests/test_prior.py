from pathlib import Path

import numpy as np
from PIL import Image

from nanobooth.core.models import load_pipeline
from nanobooth.core.prior import PROVENANCE, generate_class_images, missing_indices


def test_missing_indices_counts_user_images(tmp_path):
    assert missing_indices(tmp_path / "none", 3) == [0, 1, 2]
    Image.new("RGB", (8, 8)).save(tmp_path / "class-00001.png")
    Image.new("RGB", (8, 8)).save(tmp_path / "my_own_dog.jpg")
    assert missing_indices(tmp_path, 4) == [0, 2]
    assert missing_indices(tmp_path, 2) == []


def test_class_images_resume_without_regenerating(tiny_model, tmp_path):
    pipe = load_pipeline(str(tiny_model))
    args = dict(prompt="a photo of dog", seed=7, steps=2, resolution=32)
    assert generate_class_images(pipe, tmp_path, num_class_images=2, batch_size=2, **args) == 2
    first = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in tmp_path.glob("class-*.png")}
    # a run killed midway: top up to 5 with another batch size; old files untouched, no duplicates
    assert generate_class_images(pipe, tmp_path, num_class_images=5, batch_size=3, **args) == 3
    names = sorted(p.name for p in tmp_path.iterdir() if p.name != PROVENANCE)
    assert names == [f"class-{i:05d}.png" for i in range(5)]
    for name, (data, mtime) in first.items():
        assert (tmp_path / name).read_bytes() == data and (tmp_path / name).stat().st_mtime_ns == mtime
    assert generate_class_images(pipe, tmp_path, num_class_images=5, batch_size=3, **args) == 0
    arrays = [np.asarray(Image.open(tmp_path / n), dtype=float) for n in names]
    assert all(np.abs(arrays[0] - a).max() > 0 for a in arrays[1:])  # distinct seeds, distinct images
    # image i depends on its index only, not on the batch it was drawn in
    other = tmp_path.parent / "other"
    generate_class_images(pipe, other, num_class_images=5, batch_size=1, **args)
    for n in names:
        a = np.asarray(Image.open(tmp_path / n), dtype=float)
        b = np.asarray(Image.open(other / n), dtype=float)
        assert np.abs(a - b).max() <= 2


def test_dpm_sampler_is_used_for_class_images_and_leaves_the_pipeline_alone(tiny_model, tmp_path, monkeypatch):
    from diffusers import DPMSolverMultistepScheduler

    pipe = load_pipeline(str(tiny_model))
    own = pipe.scheduler
    calls = [0]
    real = DPMSolverMultistepScheduler.step

    def counting(self, *a, **k):
        calls[0] += 1
        return real(self, *a, **k)

    monkeypatch.setattr(DPMSolverMultistepScheduler, "step", counting)
    args = dict(prompt="a photo of dog", num_class_images=1, seed=0, batch_size=1, steps=3, resolution=32)
    generate_class_images(pipe, tmp_path / "dpm", sampler="dpm++", **args)
    assert calls[0] == 3 and pipe.scheduler is own
    generate_class_images(pipe, tmp_path / "own", sampler="model", **args)
    assert calls[0] == 3  # the model's own sampler (DDIM here) did the second set
    a = np.asarray(Image.open(tmp_path / "dpm" / "class-00000.png"), dtype=float)
    b = np.asarray(Image.open(tmp_path / "own" / "class-00000.png"), dtype=float)
    assert np.abs(a - b).max() > 0


def test_class_images_of_another_prompt_or_model_are_refused(tiny_model, subject_dir, tmp_path, capsys):
    from conftest import train_args

    from nanobooth.cli import main

    shared = tmp_path / "dogs"
    args = train_args(tiny_model, subject_dir, tmp_path / "a", f"class_data_dir={shared}")
    assert main(["train", "dreambooth-prior-pre", *args]) == 0
    before = sorted(p.name for p in shared.iterdir())
    # the same folder reused for another class: refused before anything is written or regenerated
    other = train_args(tiny_model, subject_dir, tmp_path / "b", f"class_data_dir={shared}", "class_prompt=a photo of cat",
                       "instance_prompt=a photo of sks cat")
    assert main(["train", "dreambooth-prior-pre", *other]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if "error" in ln]
    assert len(err) == 1 and "class_prompt='a photo of dog'" in err[0] and str(shared) in err[0]
    assert not (tmp_path / "b").exists() and sorted(p.name for p in shared.iterdir()) == before
    # the same class and model reuse them
    assert main(["train", "dreambooth-prior-pre", *train_args(tiny_model, subject_dir, tmp_path / "c", f"class_data_dir={shared}")]) == 0
    assert sorted(p.name for p in shared.iterdir()) == before


def test_class_image_set_uses_exactly_num_class_images_first_by_name(tmp_path, caplog):
    from nanobooth.core.prior import class_image_set

    for i, name in enumerate(["e.png", "b.png", "d.png", "a.png", "c.png"]):
        Image.new("RGB", (40, 40), (i * 50, 0, 0)).save(tmp_path / name)
    with caplog.at_level("INFO", logger="nanobooth"):
        s = class_image_set(tmp_path, 2, "a photo of dog", 32)
    assert len(s) == 2 and s.prompt == "a photo of dog"
    assert [im.getpixel((0, 0))[0] for im in s.images] == [150, 50]  # a.png, b.png
    assert f"found 5 class images in {tmp_path}, using 2" in caplog.text


def test_training_uses_num_class_images_of_a_bigger_shared_folder(tiny_model, subject_dir, tmp_path, caplog, monkeypatch):
    from conftest import train_args

    from nanobooth.core import train as T
    from nanobooth.cli import main

    shared = tmp_path / "dogs"
    shared.mkdir()
    for i in range(5):
        Image.new("RGB", (40, 40), (i * 50, 100, 0)).save(shared / f"photo{i}.png")
    seen = []
    real = T.LatentSource.__init__

    def spy(self, images, *a, **k):
        seen.append(len(images))
        real(self, images, *a, **k)

    monkeypatch.setattr(T.LatentSource, "__init__", spy)
    with caplog.at_level("INFO", logger="nanobooth"):
        assert main(["train", "dreambooth-prior-pre", *train_args(tiny_model, subject_dir, tmp_path / "run",
                                                                   f"class_data_dir={shared}")]) == 0
    assert seen == [3, 2]  # instance images, then exactly num_class_images=2 of the 5 class images
    assert f"found 5 class images in {shared}, using 2" in caplog.text


# --- the shared class-image cache ----------------------------------------------------------------------------
def _count_generated(monkeypatch):
    """Patch train's generate_class_images to record how many images each run generated."""
    import nanobooth.core.train as train_mod

    made, real = [], train_mod.generate_class_images
    monkeypatch.setattr(train_mod, "generate_class_images", lambda *a, **k: made.append(real(*a, **k)) or made[-1])
    return made


def test_a_later_run_of_the_same_class_reuses_the_cache_and_tops_it_up(tiny_model, subject_dir, tmp_path, monkeypatch):
    from conftest import train_args

    from nanobooth.cli import main
    from nanobooth.core.config import load_config
    from nanobooth.core.run_folder import class_images_dir

    made = _count_generated(monkeypatch)
    cache = tmp_path / "cache"

    def run(out, *extra):
        args = train_args(tiny_model, subject_dir, tmp_path / out, f"class_image_cache={cache}", "max_train_steps=1", *extra)
        assert main(["train", "dreambooth-lora-prior-pre", *args]) == 0
        return class_images_dir(load_config("dreambooth-lora-prior-pre", args), tmp_path / out)

    first = run("a")
    assert made == [2] and first.parent == cache and not (tmp_path / "a" / "class_images").exists()
    before = {p.name: p.read_bytes() for p in first.glob("class-*.png")}
    # a second subject of the same class, asking for one more image: only the missing one is generated
    assert run("b", "num_class_images=3") == first and made == [2, 1]
    assert {n: (first / n).read_bytes() for n in before} == before and len(list(first.glob("class-*.png"))) == 3
    # another class prompt is another prior: its own folder, generated afresh; the first is untouched
    cat = run("c", "class_prompt=a photo of cat", "instance_prompt=a photo of sks cat")
    assert cat != first and cat.parent == cache and made == [2, 1, 2] and len(list(first.glob("class-*.png"))) == 3


def test_every_provenance_key_names_its_own_cache_folder(tiny_model, tmp_path, monkeypatch):
    from nanobooth.core.config import TrainConfig
    from nanobooth.core.run_folder import CACHE_KEYS, class_images_dir

    base = dict(model=str(tiny_model), method="lora", class_image_cache=str(tmp_path / "cache"))
    first = class_images_dir(TrainConfig(**base), tmp_path / "run")
    assert first.parent == tmp_path / "cache" and class_images_dir(TrainConfig(**base), tmp_path / "other run") == first
    changed = dict(class_prompt="a photo of cat", model=str(tmp_path / "copy"), resolution=256, revision="v2",
                   pretrained_vae_model_name_or_path="vae", base_quantization="int8", mixed_precision="bf16",
                   class_sampler="model", class_generation_steps=50, seed=1)
    assert set(changed) == set(CACHE_KEYS)
    dirs = {k: class_images_dir(TrainConfig(**{**base, k: v}), tmp_path / "run") for k, v in changed.items()}
    assert len(set(dirs.values()) | {first}) == len(changed) + 1
    # class_data_dir wins; none (or a run folder that already has class_images/) keeps them in the run
    assert class_images_dir(TrainConfig(**base, class_data_dir=str(tmp_path / "mine")), tmp_path / "run") == tmp_path / "mine"
    assert class_images_dir(TrainConfig(**{**base, "class_image_cache": "none"}), tmp_path / "run") == tmp_path / "run" / "class_images"
    (tmp_path / "old" / "class_images").mkdir(parents=True)
    assert class_images_dir(TrainConfig(**base), tmp_path / "old") == tmp_path / "old" / "class_images"
    # auto: $NANOBOOTH_CLASS_IMAGE_CACHE, else $NANOBOOTH_CACHE/class_images, else $XDG_CACHE_HOME/nanobooth/class_images
    auto = dict(model=str(tiny_model))
    monkeypatch.setenv("NANOBOOTH_CLASS_IMAGE_CACHE", str(tmp_path / "env"))
    assert class_images_dir(TrainConfig(**auto), tmp_path / "run").parent == tmp_path / "env"
    monkeypatch.delenv("NANOBOOTH_CLASS_IMAGE_CACHE")
    monkeypatch.setenv("NANOBOOTH_CACHE", str(tmp_path / "nb"))
    assert class_images_dir(TrainConfig(**auto), tmp_path / "run").parent == tmp_path / "nb" / "class_images"
    monkeypatch.delenv("NANOBOOTH_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert class_images_dir(TrainConfig(**auto), tmp_path / "run").parent == tmp_path / "xdg" / "nanobooth" / "class_images"


def test_other_weights_under_the_same_name_get_their_own_cache_folder(tiny_model, tmp_path, monkeypatch):
    """The shipped `toy` changed from v4 to v5 under one name, and the cache handed v5 the class images v4 had made:
    the key holds a fingerprint of the weights, for a folder trained again in place as for a built-in name."""
    import shutil

    from nanobooth.core import builtin_models
    from nanobooth.core.config import TrainConfig
    from nanobooth.core.run_folder import class_cache_provenance, class_images_dir

    def retrain(folder):  # one byte of the UNet's last tensor, as another training run would leave it
        unet = next((folder / "unet").glob("*.safetensors"))
        data = bytearray(unet.read_bytes())
        data[-1] ^= 1
        unet.write_bytes(bytes(data))

    folder = shutil.copytree(tiny_model, tmp_path / "model")
    cfg = TrainConfig(model=str(folder), method="lora", class_image_cache=str(tmp_path / "cache"))
    first = class_images_dir(cfg, tmp_path / "run")
    assert class_images_dir(cfg, tmp_path / "other run") == first  # the same weights: the same folder
    (folder / "toy_eval.json").write_text("{}")  # a run folder's scores are not the model
    assert class_images_dir(cfg, tmp_path / "run") == first
    retrain(folder)
    assert class_images_dir(cfg, tmp_path / "run") not in (first, None)
    # a built-in name is keyed by its shipped folder's weights, not by where this build is installed
    shipped = shutil.copytree(tiny_model, tmp_path / "shipped")
    monkeypatch.setattr(builtin_models, "shipped_folder", lambda m: shipped if m == "toy" else None)
    toy = TrainConfig(model="toy", method="lora", class_image_cache=str(tmp_path / "cache"))
    v4 = class_images_dir(toy, tmp_path / "run")
    assert class_cache_provenance(toy)["model"] == "toy" and class_cache_provenance(toy)["weights"]
    retrain(shipped)
    assert class_images_dir(toy, tmp_path / "run") != v4
    assert "weights" not in class_cache_provenance(TrainConfig(model="org/hub-model", method="lora"))


def test_a_run_killed_while_writing_the_cache_leaves_nothing_half_written(tiny_model, subject_dir, tmp_path, monkeypatch):
    from conftest import train_args

    from nanobooth.cli import main
    from nanobooth.core.config import load_config
    from nanobooth.core.run_folder import class_images_dir

    args = train_args(tiny_model, subject_dir, tmp_path / "a", f"class_image_cache={tmp_path / 'cache'}", "max_train_steps=1",
                      "sample_batch_size=1")
    folder = class_images_dir(load_config("dreambooth-lora-prior-pre", args), tmp_path / "a")
    real_save, saves = Image.Image.save, []

    def dying_save(self, fp, *a, **k):  # the second image dies half-way through its bytes
        saves.append(fp)
        if len(saves) == 2:
            Path(fp).write_bytes(b"\x89PNG\r\n\x1a\n half")
            raise KeyboardInterrupt
        return real_save(self, fp, *a, **k)

    monkeypatch.setattr(Image.Image, "save", dying_save)
    assert main(["train", "dreambooth-lora-prior-pre", *args]) != 0
    monkeypatch.setattr(Image.Image, "save", real_save)
    assert [p.name for p in folder.glob("class-*.png")] == ["class-00000.png"]  # the broken one is not an image here
    made = _count_generated(monkeypatch)
    # the next run of this class (another output folder) finds one good image and makes the other
    args_b = [a if not a.startswith("output_dir=") else f"output_dir={tmp_path / 'b'}" for a in args]
    assert main(["train", "dreambooth-lora-prior-pre", *args_b]) == 0 and made == [1]
    for p in folder.glob("class-*.png"):
        Image.open(p).load()
