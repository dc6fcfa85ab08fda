"""Aspect-ratio buckets (core/buckets.py): the bucket list and assignment by hand, batches from one bucket,
and in training: every batch one shape (instance and class rows), resume bit-exact."""

import json
import shutil

import numpy as np
import pytest
import torch
from conftest import train_args
from PIL import Image
from safetensors.torch import load_file

from nanobooth.cli import main
from nanobooth.core.buckets import BucketSampler, bucket_sizes, cover_size, nearest_bucket

# resolution 32, steps of 8: widths 16..64; height = min(64, 1024 // w rounded down to 8), and the transposes
BUCKETS_32 = [(16, 48), (16, 56), (16, 64), (24, 40), (32, 32), (40, 24), (48, 16), (56, 16), (64, 16)]


def test_bucket_sizes_and_nearest_bucket_by_hand():
    assert bucket_sizes(32, 8) == BUCKETS_32
    assert all(w * h <= 512 * 512 and w % 64 == 0 and h % 64 == 0 for w, h in bucket_sizes(512, 64))
    assert (512, 512) in bucket_sizes(512, 64) and (640, 384) in bucket_sizes(512, 64)
    assert bucket_sizes(32, 8, min_side=24, max_side=40) == [(24, 40), (32, 32), (40, 24)]
    # |log(w/h) - log(bw/bh)|: 48x36 (log 4/3 = 0.288) is nearer 40x24 (|0.288 - 0.511| = 0.223) than 32x32 (0.288)
    assert nearest_bucket((48, 36), BUCKETS_32) == (40, 24) and nearest_bucket((36, 48), BUCKETS_32) == (24, 40)
    assert nearest_bucket((49, 40), BUCKETS_32) == (32, 32)  # log 1.225 = 0.203 < |0.203 - 0.511|
    assert nearest_bucket((100, 20), BUCKETS_32) == (64, 16)  # ratio 5: the widest
    assert cover_size((40, 60), (24, 40)) == (27, 40) and cover_size((32, 32), (24, 40)) == (40, 40)


def test_bucket_sampler_batches_never_mix_buckets_and_resume_continues_the_order():
    groups = [[0, 3, 4], [1], [2, 5, 6, 7, 8]]
    bucket_of = {i: b for b, g in enumerate(groups) for i in g}
    s = BucketSampler(groups, seed=3)
    batches = [s.take(2) for _ in range(12)]
    assert all(len(b) == 2 and len({bucket_of[i] for i in b}) == 1 for b in batches)
    # one epoch = ceil(3/2) + 1 + ceil(5/2) = 6 batches, covering every image
    assert set().union(*batches[:6]) == set(range(9)) and set().union(*batches[6:]) == set(range(9))
    assert batches[:6] != batches[6:]  # reshuffled each epoch
    again = BucketSampler(groups, seed=3)
    assert [again.take(2) for _ in range(12)] == batches  # a function of the seed
    mid = BucketSampler(groups, seed=3)
    [mid.take(2) for _ in range(4)]
    state = json.loads(json.dumps({"order": mid.order, "pos": mid.pos}))  # as state.json holds it
    resumed = BucketSampler(groups, seed=3)
    resumed.load_state_dict({**state, "generator": mid.generator.get_state()})
    assert [resumed.take(2) for _ in range(8)] == batches[4:]


@pytest.fixture(scope="module")
def wide_and_tall(tmp_path_factory):
    """Noise photos of four aspect ratios: 48x36, 50x36 and 64x32 (-> bucket 40x24), 36x48 (-> 24x40), 40x40 (-> 32x32)."""
    out = tmp_path_factory.mktemp("aspect")
    rng = np.random.default_rng(0)
    for name, (w, h) in {"a": (48, 36), "b": (50, 36), "c": (36, 48), "d": (40, 40), "e": (64, 32)}.items():
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(out / f"{name}.png")
    (out / "subject.json").write_text('{"instance_prompt": "a photo of sks dog", "class_prompt": "a photo of dog"}')
    return out


def test_training_batches_one_bucket_each_with_class_rows_alike_and_resume_is_bit_exact(tiny_model, wide_and_tall, tmp_path,
                                                                                     monkeypatch):
    from diffusers import UNet2DConditionModel

    shapes = []
    fwd = UNet2DConditionModel.forward

    def spy(self, sample, *a, **k):
        if self.training:
            shapes.append(tuple(sample.shape))
        return fwd(self, sample, *a, **k)

    monkeypatch.setattr(UNet2DConditionModel, "forward", spy)
    extra = ["enable_bucket=true", "bucket_reso_steps=8", "train_batch_size=2", "max_train_steps=6", "checkpointing_steps=3",
             "random_flip=true", "learning_rate=1e-3"]
    full = tmp_path / "full"
    assert main(["train", "dreambooth-lora-prior-pre", *train_args(tiny_model, wide_and_tall, full, *extra)]) == 0
    # latents are 1/2 of the pixels (tiny VAE): 40x24 -> (12, 20), 24x40 -> (20, 12), 32x32 -> (16, 16);
    # every forward is 2 instance + 2 class rows of one bucket's shape
    assert len(shapes) == 6 and {s[2:] for s in shapes} == {(12, 20), (20, 12), (16, 16)}
    assert all(s[0] == 4 for s in shapes)
    part = tmp_path / "part"
    part.mkdir()
    shutil.copy(full / "config.yaml", part / "config.yaml")
    shutil.copytree(full / "checkpoints" / "checkpoint-000003", part / "checkpoints" / "checkpoint-000003")
    shutil.copytree(full / "class_images", part / "class_images")
    shapes.clear()
    assert main(["train", "dreambooth-lora-prior-pre", *train_args(tiny_model, wide_and_tall, part, *extra,
                                                                    "resume_from_checkpoint=latest")]) == 0
    wa, wb = load_file(full / "pytorch_lora_weights.safetensors"), load_file(part / "pytorch_lora_weights.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    la = [json.loads(x) for x in (full / "train_log.jsonl").read_text().splitlines()][3:]
    lb = [json.loads(x) for x in (part / "train_log.jsonl").read_text().splitlines()]
    assert [(r["loss"], r["prior_loss"]) for r in la] == [(r["loss"], r["prior_loss"]) for r in lb]


def test_bucket_steps_the_model_cannot_render_are_refused(wide_and_tall, tmp_path, capsys):
    # the toy model renders multiples of 16: 8-pixel bucket sides would fail mid-run; refused before the run folder exists
    out = tmp_path / "run"
    assert main(["train", "toy/dreambooth-lora", f"instance_data_dir={wide_and_tall}", f"output_dir={out}", "enable_bucket=true",
                 "bucket_reso_steps=8"]) != 0
    err = capsys.readouterr().err
    assert "bucket_reso_steps" in err and "multiple of 16" in err and "Traceback" not in err and not out.exists()
    # at 32 in steps of 8, no bucket has both sides in [40, 48]
    assert main(["train", "toy/dreambooth-lora", f"instance_data_dir={wide_and_tall}", f"output_dir={out}", "enable_bucket=true",
                 "resolution=32", "bucket_reso_steps=8", "min_bucket_reso=40", "max_bucket_reso=48"]) != 0
    err = capsys.readouterr().err
    assert "min_bucket_reso" in err and "widen" in err and "Traceback" not in err and not out.exists()


def test_flux_trains_on_a_non_square_bucket_with_its_image_ids(tiny_flux_model, wide_and_tall, tmp_path, monkeypatch):
    from diffusers import FluxTransformer2DModel

    grids = []
    fwd = FluxTransformer2DModel.forward

    def spy(self, *a, **k):
        if self.training:
            grids.append((int(k["img_ids"][:, 1].max()) + 1, int(k["img_ids"][:, 2].max()) + 1, k["hidden_states"].shape[1]))
        return fwd(self, *a, **k)

    monkeypatch.setattr(FluxTransformer2DModel, "forward", spy)
    # resolution 32 in steps of 16: 64x32 (log 2 = 0.693) is nearer 48x16 (log 3 = 1.099) than 32x32
    assert main(["train", "flux/dreambooth-lora", *train_args(tiny_flux_model, wide_and_tall, tmp_path / "run", "enable_bucket=true",
                                                               "bucket_reso_steps=16", "max_train_steps=5",
                                                               "gradient_checkpointing=false")]) == 0
    assert all(rows * cols == tokens for rows, cols, tokens in grids)  # one id per packed patch
    assert any(cols == 3 * rows for rows, cols, _ in grids)  # the 48x16 bucket: 3:1 patches


def test_a_single_bucket_is_named_in_a_warning(wide_and_tall, tmp_path, caplog):
    # 64x64 in steps of 64 leaves only the square: buckets would silently change nothing
    import logging

    from nanobooth.core.config import load_config
    from nanobooth.core.train import prepare_run

    cfg = load_config("toy/dreambooth-lora", [f"instance_data_dir={wide_and_tall}", f"output_dir={tmp_path / 'run'}",
                                              "enable_bucket=true", "resolution=64", "bucket_reso_steps=64"])
    with caplog.at_level(logging.WARNING, logger="nanobooth"):
        prepare_run(cfg)
    assert any("leaves one bucket, 64x64" in r.getMessage() for r in caplog.records)
    cfg.bucket_reso_steps = 16
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="nanobooth"):
        prepare_run(cfg)
    assert not any("one bucket" in r.getMessage() for r in caplog.records)


def test_toy_variants_bucket_in_steps_the_toy_model_renders(wide_and_tall, tmp_path, caplog):
    """newcomer12: the toy variants kept SD's bucket_reso_steps=64, so enable_bucket=true on a 64x64 toy run left one
    bucket, the square. They step by 16, a multiple of what the toy model renders, and a wide photo gets a wide bucket."""
    import json
    import logging
    from importlib import resources
    from types import SimpleNamespace

    from nanobooth.core.config import check_resolution, load_config, variant_names
    from nanobooth.core.train import prepare_run

    toy = resources.files("nanobooth") / "assets" / "toy_model"
    vae, unet = (SimpleNamespace(**json.loads((toy / d / "config.json").read_text())) for d in ("vae", "unet"))
    step = check_resolution(64, vae, unet)  # the multiple train() checks bucket sides against once the model loads
    for name in (n for n in variant_names() if n.startswith("toy/")):
        assert load_config(name).bucket_reso_steps == 16 and 16 % step == 0, name
    cfg = load_config("toy/dreambooth-lora", [f"instance_data_dir={wide_and_tall}", f"output_dir={tmp_path / 'run'}",
                                              "enable_bucket=true"])
    with caplog.at_level(logging.WARNING, logger="nanobooth"):
        _, instance = prepare_run(cfg)
    assert not any("one bucket" in r.getMessage() for r in caplog.records)
    # e.png is 64x32 (2:1): a wide bucket, not the 64x64 square that steps of 64 leave
    wide = instance.sizes[4]
    assert wide[0] > wide[1] and wide[0] % 16 == 0 and wide[1] % 16 == 0
    assert instance.sizes[2][0] < instance.sizes[2][1]  # c.png, 36x48: a tall bucket


def test_a_bucket_step_above_the_resolution_names_that_key(tiny_model, subject_dir, tmp_path, capsys):
    # newcomer55: a FLUX variant's bucket_reso_steps 64 at resolution 32 read "both sides in [None, None]; widen them"
    out = tmp_path / "run"
    assert main(["train", "dreambooth-lora", *train_args(tiny_model, subject_dir, out, "resolution=32", "enable_bucket=true",
                                                           "bucket_reso_steps=64")]) == 2
    err = capsys.readouterr().err
    assert "'bucket_reso_steps': 64 is above resolution 32" in err and "None" not in err
    assert main(["train", "dreambooth-lora", *train_args(tiny_model, subject_dir, out, "resolution=32", "enable_bucket=true",
                                                           "bucket_reso_steps=8", "min_bucket_reso=48")]) == 2
    assert "both sides in [48, 64]" in capsys.readouterr().err  # the defaults filled in, not None
