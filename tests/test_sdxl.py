"""All five variants on SDXL (two text encoders, pooled embeddings, time ids), on tiny SDXL components."""

import json

import pytest
import torch
from conftest import train_args
from safetensors.torch import load_file

from nanobooth.cli import main
from nanobooth.core.config import load_config

VARIANTS = ["dreambooth", "dreambooth-finetune-text-encoder", "dreambooth-prior-pre", "dreambooth-lora", "dreambooth-lora-prior-pre"]


def test_sdxl_variants_default_to_sdxl_at_1024():
    for v in VARIANTS:
        cfg = load_config(f"sdxl/{v}")
        assert cfg.model == "stabilityai/stable-diffusion-xl-base-1.0" and cfg.resolution == 1024
    assert load_config("sdxl/dreambooth-lora-prior-pre").method == "lora"


@pytest.mark.parametrize("variant", VARIANTS)
def test_sdxl_variant_trains_and_reloads(variant, tiny_sdxl_model, subject_dir, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    out = tmp_path / "run"
    extra = ["train_text_encoder=true"] if variant == "dreambooth-lora" else []
    assert main(["train", f"sdxl/{variant}", *train_args(tiny_sdxl_model, subject_dir, out, "gradient_checkpointing=false",
                                                          "validation_prompts=[a sks dog]", "learning_rate=1e-3", *extra)]) == 0
    log = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    assert len(log) == 3 and all(r["loss"] > 0 for r in log)
    assert (out / "samples" / "step-000003.png").is_file()
    if "lora" in variant:
        sd = load_file(out / "pytorch_lora_weights.safetensors")
        assert any(k.startswith("unet.") for k in sd)
        if extra:  # both text encoders' adapters are saved
            assert any(k.startswith("text_encoder.") for k in sd) and any(k.startswith("text_encoder_2.") for k in sd)
        pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_model)
        pipe.load_lora_weights(out, weight_name="pytorch_lora_weights.safetensors")
    else:
        pipe = StableDiffusionXLPipeline.from_pretrained(out)
        base = load_file(tiny_sdxl_model / "text_encoder_2" / "model.safetensors")
        new = load_file(out / "text_encoder_2" / "model.safetensors")
        changed = any(not torch.equal(base[k], new[k]) for k in base)
        assert changed == ("text-encoder" in variant)  # trained when asked, bit-identical otherwise
    image = pipe("a sks dog", num_inference_steps=2, height=32, width=32, generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (32, 32)
    gen = tmp_path / "gen"
    assert main(["generate", "--model", str(tiny_sdxl_model), "--weights", str(out), "--prompt", "a sks dog",
                 "--num-images", "1", "--steps", "2", "--resolution", "32", "--out", str(gen)]) == 0
    assert (gen / "grid.png").is_file()


def test_sdxl_tome_reaches_the_attention_level(tiny_sdxl_model, subject_dir, tmp_path):
    # tiny SDXL, like SDXL, has no attention at its first level: ToMe at max_downsample=1 would be a no-op
    a, b = tmp_path / "a", tmp_path / "b"
    assert main(["train", "sdxl/dreambooth-lora", *train_args(tiny_sdxl_model, subject_dir, a, "gradient_checkpointing=false")]) == 0
    assert main(["train", "sdxl/dreambooth-lora", *train_args(tiny_sdxl_model, subject_dir, b, "gradient_checkpointing=false",
                                                               "tome_ratio=0.5")]) == 0
    la = [json.loads(x)["loss"] for x in (a / "train_log.jsonl").read_text().splitlines()]
    lb = [json.loads(x)["loss"] for x in (b / "train_log.jsonl").read_text().splitlines()]
    assert la != lb


# --- micro-conditioning: each example's original size and crop ------------------------------------------------

# photo -> (w, h); at resolution 32 the short side is resized to 32 (then centre-cropped):
#   a 49x40 -> 39x32, crop left (39-32)//2 = 3, or 39-32-3 = 4 once mirrored; b 40x60 -> 32x48, crop top 8;
#   c 24x24 -> 32x32, no crop. Class images are generated at 32x32.
PHOTOS = {"a": (49, 40), "b": (40, 60), "c": (24, 24)}
CENTRE_IDS = {"a": [(40, 49, 0, 3, 32, 32), (40, 49, 0, 4, 32, 32)], "b": [(60, 40, 8, 0, 32, 32)], "c": [(24, 24, 0, 0, 32, 32)]}
CLASS_IDS = (32, 32, 0, 0, 32, 32)


@pytest.fixture(scope="module")
def odd_photos(tmp_path_factory):
    import numpy as np
    from PIL import Image

    out = tmp_path_factory.mktemp("odd")
    rng = np.random.default_rng(0)  # noise: every crop and its mirror image differ
    for name, (w, h) in PHOTOS.items():
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(out / f"{name}.png")
    (out / "subject.json").write_text('{"instance_prompt": "a photo of sks dog", "class_prompt": "a photo of dog"}')
    return out


def record_training_inputs(monkeypatch):
    """time_ids of every training UNet call (rows in batch order) and the pixels of every VAE encode."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    seen = {"time_ids": [], "pixels": []}
    fwd, enc = UNet2DConditionModel.forward, AutoencoderKL.encode

    def unet_forward(self, *a, **k):
        if self.training:  # class-image generation runs the UNet in eval mode
            seen["time_ids"].append(k["added_cond_kwargs"]["time_ids"].detach().clone())
        return fwd(self, *a, **k)

    def vae_encode(self, x, *a, **k):
        seen["pixels"].append(x.detach().clone())
        return enc(self, x, *a, **k)

    monkeypatch.setattr(UNet2DConditionModel, "forward", unet_forward)
    monkeypatch.setattr(AutoencoderKL, "encode", vae_encode)
    return seen


def pixels_match_ids(row: torch.Tensor, ids: tuple, images: dict) -> bool:
    """The pixels are the crop at (top, left) of the resized photo of that original size, or the mirror
    image of the crop that a mirrored photo has at (top, left)."""
    from PIL import ImageOps

    from nanobooth.core.data import to_tensor

    h, w, top, left, _, _ = ids
    if (h, w) == (32, 32):  # a class image: any of them, uncropped
        return any(torch.equal(row, to_tensor(im)) or torch.equal(row, to_tensor(ImageOps.mirror(im))) for im in images["class"])
    img = images[(h, w)]
    plain = to_tensor(img.crop((left, top, left + 32, top + 32)))
    m = img.width - 32 - left
    mirrored = to_tensor(ImageOps.mirror(img.crop((m, top, m + 32, top + 32))))
    return torch.equal(row, plain) or torch.equal(row, mirrored)


def run_and_record(model, photos, out, monkeypatch, *extra):
    seen = record_training_inputs(monkeypatch)
    assert main(["train", "sdxl/dreambooth-lora-prior-pre", *train_args(model, photos, out, "gradient_checkpointing=false",
                                                                         "train_batch_size=2", "max_train_steps=6",
                                                                         "random_flip=true", *extra)]) == 0
    monkeypatch.undo()
    return [tuple(int(v) for v in r) for t in seen["time_ids"] for r in t], seen["pixels"]


def test_time_ids_describe_each_example(tiny_sdxl_model, odd_photos, tmp_path, monkeypatch):
    from nanobooth.core.data import load_image, resize_short_side

    cached, _ = run_and_record(tiny_sdxl_model, odd_photos, tmp_path / "cached", monkeypatch)
    per_step, ok = 4, {ids for v in CENTRE_IDS.values() for ids in v}
    assert len(cached) == 6 * per_step
    for s in range(6):  # prior preservation: 2 instance rows, then 2 class rows
        rows = cached[s * per_step:(s + 1) * per_step]
        assert all(r in ok for r in rows[:2]) and rows[2:] == [CLASS_IDS, CLASS_IDS], rows
    assert set(CENTRE_IDS["a"]) <= set(cached)  # both the plain and the mirrored crop of `a` were drawn

    # the same draws encoded per step: same ids, and each row's ids describe its pixels
    uncached, pixels = run_and_record(tiny_sdxl_model, odd_photos, tmp_path / "uncached", monkeypatch, "cache_latents=false")
    assert uncached == cached
    images = {(h, w): resize_short_side(load_image(odd_photos / f"{n}.png"), 32) for n, (w, h) in PHOTOS.items()}
    images["class"] = [load_image(p) for p in sorted((tmp_path / "uncached" / "class_images").glob("*.png"))]
    rows = torch.cat(pixels)
    assert len(rows) == len(uncached)
    assert all(pixels_match_ids(row, ids, images) for row, ids in zip(rows, uncached))

    # random crops: the crop moves, and the ids follow it
    random, pixels = run_and_record(tiny_sdxl_model, odd_photos, tmp_path / "random", monkeypatch, "center_crop=false")
    images["class"] = [load_image(p) for p in sorted((tmp_path / "random" / "class_images").glob("*.png"))]
    assert all(pixels_match_ids(row, ids, images) for row, ids in zip(torch.cat(pixels), random))
    assert len({r[3] for r in random if r[:2] == (40, 49)}) > 1 and len({r[2] for r in random if r[:2] == (60, 40)}) > 1


# --- text-encoder LoRA only where the UNet reads ----------------------------------------------------------------

def test_text_encoder_adapters_sit_only_on_layers_the_unet_reads_and_all_train(tiny_sdxl_model, subject_dir, tmp_path):
    from transformers import CLIPTextConfig

    out = tmp_path / "run"
    assert main(["train", "sdxl/dreambooth-lora", *train_args(tiny_sdxl_model, subject_dir, out, "gradient_checkpointing=false",
                                                               "train_text_encoder=true", "learning_rate=1e-3")]) == 0
    sd = load_file(out / "pytorch_lora_weights.safetensors")
    n1 = CLIPTextConfig.from_pretrained(tiny_sdxl_model / "text_encoder").num_hidden_layers
    n2 = CLIPTextConfig.from_pretrained(tiny_sdxl_model / "text_encoder_2").num_hidden_layers
    te1 = {k: v for k, v in sd.items() if k.startswith("text_encoder.")}
    te2 = {k: v for k, v in sd.items() if k.startswith("text_encoder_2.")}
    # SDXL reads the first encoder's penultimate hidden state: its last layer gets no adapter ...
    assert {int(k.split("layers.")[1].split(".")[0]) for k in te1} == set(range(n1 - 1))
    # ... while the second's pooled projection reads its last layer
    assert {int(k.split("layers.")[1].split(".")[0]) for k in te2} == set(range(n2))
    # lora_B starts at zero and moves only by gradient: every saved up-matrix is nonzero, so every adapter trained
    ups = [v for k, v in {**te1, **te2}.items() if "lora_B" in k or ".up." in k]  # peft's / diffusers' name for B
    assert len(ups) == len(te1 | te2) / 2 and all(v.abs().max() > 0 for v in ups)


def test_full_text_encoder_training_trains_exactly_the_parameters_that_get_gradients(tiny_sdxl_model):
    from nanobooth.families import cond_to
    from nanobooth.core.models import load_components, train_layers_read

    c = load_components(str(tiny_sdxl_model))
    fam = c.family
    for i, te in enumerate(c.text_encoders):
        train_layers_read(te, fam.layers_read(i, te.config.num_hidden_layers))
    cond = cond_to(fam.encode(c.text_encoders, fam.tokenize(c.tokenizers, "a sks dog", "cpu"), 32), torch.float32)
    (cond["encoder_hidden_states"].sum() + cond["added_cond_kwargs"]["text_embeds"].sum()).backward()
    for i, te in enumerate(c.text_encoders):
        trainable = {n for n, p in te.named_parameters() if p.requires_grad}
        with_grad = {n for n, p in te.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
        assert trainable == with_grad, f"text encoder {i}: trainable but never reached: {sorted(trainable - with_grad)[:3]}"
    last = c.text_encoders[0].config.num_hidden_layers - 1
    assert not any(p.requires_grad for p in c.text_encoders[0].encoder.layers[last].parameters())


def test_time_ids_carry_the_bucket_size(tiny_sdxl_model, odd_photos, tmp_path, monkeypatch):
    # enable_bucket at 32 in steps of 8: a 49x40 (log 0.203) -> 32x32: 39x32, crop left 3 (4 mirrored), as before;
    # b 40x60 (log -0.405) -> 24x40 (log -0.511): resized to 27x40, crop left 1 (27-24-1 = 2 mirrored);
    # c 24x24 -> 32x32. Class images (32x32) in b's batch: resized to 40x40, crop left 8 (8 mirrored too).
    ids, _ = run_and_record(tiny_sdxl_model, odd_photos, tmp_path / "b", monkeypatch, "enable_bucket=true", "bucket_reso_steps=8")
    square = {(40, 49, 0, 3, 32, 32), (40, 49, 0, 4, 32, 32), (24, 24, 0, 0, 32, 32)}
    tall = {(60, 40, 0, 1, 40, 24), (60, 40, 0, 2, 40, 24)}
    steps = [ids[s * 4:(s + 1) * 4] for s in range(6)]
    assert all(set(r[:2]) <= square and r[2:] == [CLASS_IDS, CLASS_IDS] or set(r[:2]) <= tall and r[2:] == [(32, 32, 0, 8, 40, 24)] * 2
               for r in steps), steps
    assert any(set(r[:2]) <= tall for r in steps) and any(set(r[:2]) <= square for r in steps)
