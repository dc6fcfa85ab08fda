"""Every variant trains through the CLI on the tiny model; the issue's correctness claims are asserted."""

import json
import logging
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from conftest import step2_resume_folder, train_args
from safetensors.torch import load_file

from nanobooth.cli import main
from nanobooth.core.config import load_config
from nanobooth.core.train import train

VARIANTS = ["dreambooth", "dreambooth-finetune-text-encoder", "dreambooth-prior-pre", "dreambooth-lora", "dreambooth-lora-prior-pre"]


def weights(folder, sub):
    return load_file(next((folder / sub).glob("*.safetensors")))


def run(variant, tiny_model, subject_dir, out, *extra):
    assert main(["train", variant, *train_args(tiny_model, subject_dir, out, *extra)]) == 0
    return out

def resumed_losses_match(full, part) -> bool:
    """The resumed run logged the same losses as steps 3.. of the uninterrupted one."""
    la = (full / "train_log.jsonl").read_text().splitlines()[2:]
    lb = (part / "train_log.jsonl").read_text().splitlines()
    return [json.loads(x)["loss"] for x in la] == [json.loads(x)["loss"] for x in lb]



@pytest.mark.parametrize("variant", VARIANTS)
def test_variant_trains_reloads_and_generates(variant, tiny_model, subject_dir, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="nanobooth")
    out = run(variant, tiny_model, subject_dir, tmp_path / "run", "validation_prompts=[a sks dog, a dog]", "validation_steps=2")
    # time to model (photos in -> weights written): printed at the end and recorded; its parts add up
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("time to model: ")]
    t = json.loads((out / "time_to_model.json").read_text())
    assert len(said) == 1 and f"class images {t['class_images_s']:.1f} s, training {t['training_s']:.1f} s, export/save" in said[0]
    assert abs(t["class_images_s"] + t["training_s"] + t["save_s"] + t["setup_s"] - t["total_s"]) < 0.01
    assert t["training_s"] > 0 and t["save_s"] > 0 and (t["class_images_s"] > 0) == ("prior" in variant)
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3]
    assert all({"loss", "instance_loss", "prior_loss", "lr"} <= set(r) for r in log)
    prior = "prior" in variant
    assert all((r["prior_loss"] is not None) == prior for r in log)
    if prior:
        assert len(list((out / "class_images").glob("class-*.png"))) == 2
        assert all(abs(r["loss"] - (r["instance_loss"] + r["prior_loss"])) < 1e-5 for r in log)
    assert sorted(p.name for p in (out / "samples").iterdir()) == ["step-000000.png", "step-000002.png", "step-000003.png"]
    assert (out / "config.yaml").is_file()
    if "lora" in variant:
        assert (out / "pytorch_lora_weights.safetensors").is_file() and not (out / "unet").exists()
    else:
        from diffusers import StableDiffusionPipeline

        StableDiffusionPipeline.from_pretrained(out)  # a real diffusers folder
    gen = tmp_path / "gen"
    assert main(["generate", "--model", str(tiny_model), "--weights", str(out), "--prompt", "a sks dog", "--prompt",
                 "a dog", "--num-images", "2", "--steps", "2", "--guidance-cutoff", "0.5", "--out", str(gen)]) == 0
    assert len(list(gen.glob("prompt*.png"))) == 4 and (gen / "grid.png").is_file()


def test_full_finetune_changes_unet_and_leaves_frozen_text_encoder_bit_identical(tiny_model, subject_dir, tmp_path):
    out = run("dreambooth", tiny_model, subject_dir, tmp_path / "r", "learning_rate=1e-3")
    base_u, new_u = weights(tiny_model, "unet"), weights(out, "unet")
    assert any(not torch.equal(base_u[k], new_u[k]) for k in base_u)
    base_t, new_t = weights(tiny_model, "text_encoder"), weights(out, "text_encoder")
    assert base_t.keys() == new_t.keys() and all(torch.equal(base_t[k], new_t[k]) for k in base_t)
    base_v, new_v = weights(tiny_model, "vae"), weights(out, "vae")
    assert all(torch.equal(base_v[k], new_v[k]) for k in base_v)


def test_train_text_encoder_really_trains_it_with_its_own_lr(tiny_model, subject_dir, tmp_path):
    base_t = weights(tiny_model, "text_encoder")
    out = run("dreambooth-finetune-text-encoder", tiny_model, subject_dir, tmp_path / "a", "text_encoder_lr=1e-3")
    changed = weights(out, "text_encoder")
    assert any(not torch.equal(base_t[k], changed[k]) for k in base_t)
    # its own learning rate: at text_encoder_lr=0 it stays put while the UNet (lr 5e-6) still moves
    out0 = run("dreambooth-finetune-text-encoder", tiny_model, subject_dir, tmp_path / "b", "text_encoder_lr=0",
               "adam_weight_decay=0")
    same = weights(out0, "text_encoder")
    assert all(torch.equal(base_t[k], same[k]) for k in base_t)
    base_u, new_u = weights(tiny_model, "unet"), weights(out0, "unet")
    assert any(not torch.equal(base_u[k], new_u[k]) for k in base_u)


def test_lora_saves_only_adapters_and_base_stays_bit_identical(tiny_model, subject_dir, tmp_path):
    from diffusers import StableDiffusionPipeline

    out = run("dreambooth-lora", tiny_model, subject_dir, tmp_path / "r", "train_text_encoder=true", "lora_rank=4",
              "lora_alpha=8", "checkpointing_steps=2", "max_train_steps=3")
    sd = load_file(out / "pytorch_lora_weights.safetensors")
    assert sd and all("lora" in k for k in sd)
    assert any(k.startswith("unet.") for k in sd) and any(k.startswith("text_encoder.") for k in sd)
    ck = load_file(out / "checkpoints" / "checkpoint-000002" / "model.safetensors")
    assert ck and all("lora" in k for k in ck)  # nothing but adapters was trainable
    assert any(not torch.all(v == 0) for k, v in sd.items() if "lora_B" in k or "lora.up" in k)  # B moved off zero
    base = StableDiffusionPipeline.from_pretrained(tiny_model)
    base_state = {k: v.clone() for k, v in base.unet.state_dict().items()}
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model)
    pipe.load_lora_weights(out, weight_name="pytorch_lora_weights.safetensors")
    for k, v in pipe.unet.state_dict().items():
        if "lora" not in k:
            assert torch.equal(v, base_state[k.replace(".base_layer", "")])
    # alpha != rank survives the reload: diffusers rebuilds the adapter with our alpha (scale 2, not 1)
    layer = pipe.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q
    assert layer.scaling["default_0"] == pytest.approx(2.0)


def test_dora_trains_magnitudes_keeps_the_base_and_resumes_bit_exact(tiny_model, subject_dir, tmp_path):
    from diffusers import StableDiffusionPipeline

    extra = ["train_text_encoder=true", "learning_rate=1e-2", "max_train_steps=4", "checkpointing_steps=2"]
    full = run("dreambooth-dora-prior-pre", tiny_model, subject_dir, tmp_path / "full", *extra)
    sd = load_file(full / "pytorch_lora_weights.safetensors")
    mags = {k: v for k, v in sd.items() if "lora_magnitude_vector" in k}
    assert any(k.startswith("unet.") for k in mags) and any(k.startswith("text_encoder.") for k in mags)
    ck = load_file(full / "checkpoints" / "checkpoint-000002" / "model.safetensors")
    assert any("lora_magnitude_vector" in k for k in ck) and all("lora_" in k for k in ck)  # adapters and magnitudes only
    base = StableDiffusionPipeline.from_pretrained(tiny_model)
    base_state = {k: v.clone() for k, v in base.unet.state_dict().items()}
    # DoRA starts each magnitude at its base weight's row norms; training moved them
    q = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    start = base_state[f"{q}.weight"].norm(dim=1)
    assert (mags[f"unet.{q}.lora_magnitude_vector"] - start).abs().max() > 1e-3
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model)
    pipe.load_lora_weights(full, weight_name="pytorch_lora_weights.safetensors")
    for k, v in pipe.unet.state_dict().items():
        if "lora_" not in k:
            assert torch.equal(v, base_state[k.replace(".base_layer", "")])  # the base weights, bit for bit
    # resume from step 2: the same magnitudes, adapters and loss curve as the uninterrupted run
    part = step2_resume_folder(full, tmp_path / "part", class_images=True)
    run("dreambooth-dora-prior-pre", tiny_model, subject_dir, part, *extra, "resume_from_checkpoint=latest")
    wb = load_file(part / "pytorch_lora_weights.safetensors")
    assert sd.keys() == wb.keys() and all(torch.equal(sd[k], wb[k]) for k in sd)
    assert resumed_losses_match(full, part)


def test_lokr_checkpoints_hold_only_its_factors_and_resume_bit_exact(tiny_model, subject_dir, tmp_path):
    extra = ["train_text_encoder=true", "learning_rate=1e-2", "max_train_steps=4", "checkpointing_steps=2",
             "lokr_factor=-1", "lora_rank=1", "lora_alpha=2"]  # w2 decomposed: lokr_w1, lokr_w2_a, lokr_w2_b
    full = run("dreambooth-lokr", tiny_model, subject_dir, tmp_path / "full", *extra)
    sd = load_file(full / "pytorch_lora_weights.safetensors")
    assert {k.rsplit(".", 1)[1] for k in sd} == {"lokr_w1", "lokr_w2_a", "lokr_w2_b"}
    ck = load_file(full / "checkpoints" / "checkpoint-000002" / "model.safetensors")
    assert ck and all(".lokr_" in k for k in ck)  # the factors only, no base weight
    part = step2_resume_folder(full, tmp_path / "part")
    run("dreambooth-lokr", tiny_model, subject_dir, part, *extra, "resume_from_checkpoint=latest")
    wb = load_file(part / "pytorch_lora_weights.safetensors")
    assert sd.keys() == wb.keys() and all(torch.equal(sd[k], wb[k]) for k in sd)
    assert resumed_losses_match(full, part)


def test_validation_does_not_change_training(tiny_model, subject_dir, tmp_path):
    common = ["learning_rate=1e-3", "tome_ratio=0.5", "max_train_steps=4", "lora_dropout=0.1"]
    a = run("dreambooth-lora-prior-pre", tiny_model, subject_dir, tmp_path / "a", *common)
    b = run("dreambooth-lora-prior-pre", tiny_model, subject_dir, tmp_path / "b", *common,
            "validation_prompts=[a sks dog, a dog]", "validation_steps=1", "num_validation_images=2",
            "validation_loss_steps=1", f"validation_images_dir={subject_dir}")  # and a validation loss after every step
    assert len(list((b / "samples").glob("*.png"))) == 5
    assert ["val_loss_heldout" in json.loads(x) for x in (b / "train_log.jsonl").read_text().splitlines()] == [True] * 5
    wa, wb = load_file(a / "pytorch_lora_weights.safetensors"), load_file(b / "pytorch_lora_weights.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_validation_sampler_dpm_renders_the_grids_with_dpm_solver(tiny_model, subject_dir, tmp_path, monkeypatch):
    from diffusers import DPMSolverMultistepScheduler

    calls = []
    step = DPMSolverMultistepScheduler.step
    monkeypatch.setattr(DPMSolverMultistepScheduler, "step", lambda self, *a, **k: calls.append(1) or step(self, *a, **k))
    grids = ["validation_prompts=[a sks dog]", "validation_steps=0", "validation_inference_steps=3"]
    a = run("dreambooth-lora", tiny_model, subject_dir, tmp_path / "a", *grids)
    assert calls == []  # the default: the model's own sampler
    b = run("dreambooth-lora", tiny_model, subject_dir, tmp_path / "b", *grids, "validation_sampler=dpm++")
    assert len(calls) == 2 * 3  # the grids at the start and the end, 3 steps each
    pixels = [np.asarray(Image.open(x / "samples" / "step-000003.png"), dtype=float) for x in (a, b)]
    assert np.abs(pixels[0] - pixels[1]).max() > 0


def test_same_seed_same_run_other_seed_other_run(tiny_model, subject_dir, tmp_path):
    a = run("dreambooth-lora", tiny_model, subject_dir, tmp_path / "a", "learning_rate=1e-3")
    b = run("dreambooth-lora", tiny_model, subject_dir, tmp_path / "b", "learning_rate=1e-3")
    c = run("dreambooth-lora", tiny_model, subject_dir, tmp_path / "c", "learning_rate=1e-3", "seed=1")
    la, lb, lc = (json.loads((x / "train_log.jsonl").read_text().splitlines()[-1])["loss"] for x in (a, b, c))
    assert la == lb and la != lc


def test_latents_and_text_embeddings_are_cached(tiny_model, subject_dir, tmp_path, monkeypatch):
    from diffusers import AutoencoderKL
    from transformers import CLIPTextModel

    calls = {"vae": 0, "te": 0}
    enc, fwd = AutoencoderKL.encode, CLIPTextModel.forward

    def count_vae(self, *a, **k):
        calls["vae"] += 1
        return enc(self, *a, **k)

    def count_te(self, *a, **k):
        calls["te"] += 1
        return fwd(self, *a, **k)

    monkeypatch.setattr(AutoencoderKL, "encode", count_vae)
    monkeypatch.setattr(CLIPTextModel, "forward", count_te)
    cfg = load_config("dreambooth-prior-pre", train_args(tiny_model, subject_dir, tmp_path / "a", "max_train_steps=6"))
    calls.update(vae=0, te=0)
    shutil.rmtree(tmp_path / "a", ignore_errors=True)
    train(cfg)
    # class image generation encodes prompts through the pipeline; training itself: 1 VAE pass per
    # image set (3 photos, 2 class images) and 1 text pass per prompt, for all 6 steps
    gen_te = 2  # the two class-image batches (cond + uncond in one call each)
    assert calls["vae"] == 2 and calls["te"] - gen_te * 2 <= 2
    calls.update(vae=0, te=0)
    train(load_config("dreambooth", train_args(tiny_model, subject_dir, tmp_path / "b", "max_train_steps=6",
                                                "center_crop=false", "train_text_encoder=true")))
    assert calls["vae"] == 6 and calls["te"] == 6  # random crops and a trained encoder: per step, by necessity


def test_tome_patches_training_and_class_generation(tiny_model, subject_dir, tmp_path):
    a = run("dreambooth-lora-prior-pre", tiny_model, subject_dir, tmp_path / "a")
    b = run("dreambooth-lora-prior-pre", tiny_model, subject_dir, tmp_path / "b", "tome_ratio=0.5")
    la = [json.loads(x)["instance_loss"] for x in (a / "train_log.jsonl").read_text().splitlines()]
    lb = [json.loads(x)["instance_loss"] for x in (b / "train_log.jsonl").read_text().splitlines()]
    assert la != lb  # merged tokens change the UNet forward in training
    from PIL import Image
    import numpy as np

    ia = np.asarray(Image.open(a / "class_images" / "class-00000.png"), dtype=float)
    ib = np.asarray(Image.open(b / "class_images" / "class-00000.png"), dtype=float)
    assert np.abs(ia - ib).max() > 0  # and class-image generation


def test_v_prediction_and_min_snr_train(tiny_vpred_model, subject_dir, tmp_path):
    out = run("dreambooth-prior-pre", tiny_vpred_model, subject_dir, tmp_path / "r", "snr_gamma=5.0")
    log = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    assert all(r["loss"] > 0 for r in log)


def test_resume_is_bit_exact(tiny_model, subject_dir, tmp_path):
    extra = ["learning_rate=1e-3", "max_train_steps=4", "checkpointing_steps=2", "random_flip=true", "tome_ratio=0.3"]
    full = run("dreambooth-lora-prior-pre", tiny_model, subject_dir, tmp_path / "full", *extra)
    part = step2_resume_folder(full, tmp_path / "part", class_images=True)
    run("dreambooth-lora-prior-pre", tiny_model, subject_dir, part, *extra, "resume_from_checkpoint=latest")
    wa, wb = load_file(full / "pytorch_lora_weights.safetensors"), load_file(part / "pytorch_lora_weights.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert resumed_losses_match(full, part)
    # time to model counts the first session up to its checkpoint too (newcomer56: a resume reported its own part)
    before = json.loads((part / "checkpoints" / "checkpoint-000002" / "state.json").read_text())["elapsed"]
    after = json.loads((part / "time_to_model.json").read_text())
    assert before["training_s"] > 0 and before["total_s"] >= before["training_s"] + before["class_images_s"]
    assert after["total_s"] > before["total_s"] and after["training_s"] > before["training_s"]
    assert after["class_images_s"] >= round(before["class_images_s"], 3)  # made in the first session, found in the second


def test_refuses_to_overwrite_a_run(tiny_model, subject_dir, tmp_path, capsys):
    out = run("dreambooth-lora", tiny_model, subject_dir, tmp_path / "r")
    before = (out / "pytorch_lora_weights.safetensors").read_bytes()
    assert main(["train", "dreambooth-lora", *train_args(tiny_model, subject_dir, out)]) == 2
    assert "output_dir" in capsys.readouterr().err and (out / "pytorch_lora_weights.safetensors").read_bytes() == before
    run("dreambooth-lora", tiny_model, subject_dir, out, "overwrite=true", "seed=5")
    assert (out / "pytorch_lora_weights.safetensors").read_bytes() != before


def test_captions_one_embedding_each_and_resume_bit_exact_with_caption_dropout(tiny_model, subject_dir, tmp_path, monkeypatch):
    from transformers import CLIPTextModel

    photos = tmp_path / "photos"
    shutil.copytree(subject_dir, photos)
    names = sorted(p.stem for p in photos.glob("*.png"))
    (photos / f"{names[0]}.txt").write_text("a photo of sks dog on the grass")
    (photos / f"{names[1]}.txt").write_text("a {identifier} {class}, close up")  # kohya's placeholders: "a sks dog, close up"
    calls = []
    fwd = CLIPTextModel.forward
    monkeypatch.setattr(CLIPTextModel, "forward", lambda self, ids, *a, **k: (calls.append(ids), fwd(self, ids, *a, **k))[1])
    extra = ["learning_rate=1e-3", "max_train_steps=4", "checkpointing_steps=2", "train_batch_size=2", "caption_dropout=0.5"]
    full = tmp_path / "full"
    assert main(["train", "dreambooth-lora", *train_args(tiny_model, photos, full, *extra)]) == 0
    # frozen text encoder: the two captions, instance_prompt (the third photo) and "" (dropout), encoded once each
    assert len(calls) == 4 and len({tuple(c[0].tolist()) for c in calls}) == 4
    monkeypatch.setattr(CLIPTextModel, "forward", fwd)
    # captions and dropout change what trains: the same run over the plain folder, and without dropout, differ
    plain = run("dreambooth-lora", tiny_model, subject_dir, tmp_path / "plain", *extra)
    no_drop = run("dreambooth-lora", tiny_model, photos, tmp_path / "nodrop", *extra[:-1])
    w = load_file(full / "pytorch_lora_weights.safetensors")
    for other in (plain, no_drop):
        wo = load_file(other / "pytorch_lora_weights.safetensors")
        assert any(not torch.equal(w[k], wo[k]) for k in w)
    # resume from step 2 (dropout draws come from a checkpointed generator): bit-exact weights and losses
    part = step2_resume_folder(full, tmp_path / "part")
    assert main(["train", "dreambooth-lora", *train_args(tiny_model, photos, part, *extra, "resume_from_checkpoint=latest")]) == 0
    wb = load_file(part / "pytorch_lora_weights.safetensors")
    assert all(torch.equal(w[k], wb[k]) for k in w)
    assert resumed_losses_match(full, part)
    # a caption edited since the checkpoint is a changed input: the resume is refused before anything is touched
    (photos / f"{names[1]}.txt").write_text("a sks dog, far away")
    shutil.rmtree(part)
    step2_resume_folder(full, part)
    assert main(["train", "dreambooth-lora", *train_args(tiny_model, photos, part, *extra, "resume_from_checkpoint=latest")]) == 2


def test_frozen_text_encoders_and_cached_vae_leave_the_device_after_encoding(tiny_flux_model, subject_dir, tmp_path, monkeypatch):
    """Once the prompts are encoded (and latents cached), the frozen text encoders and the VAE go to the CPU before
    the first step; a validation render brings them back and returns them (train.py's `idle`)."""
    import nanobooth.core.train as train_mod

    seq, load = [], train_mod.load_components

    def spy(*a, **k):  # records each .to(): "device" (accelerator.device), or the string it got ("cpu": an offload)
        c = load(*a, **k)
        for name, m in [("te0", c.text_encoders[0]), ("te1", c.text_encoders[1]), ("vae", c.vae)]:
            def to(*args, _orig=m.to, _name=name, **kw):
                where = args[0] if args else kw.get("device")
                seq.append((_name, "device" if isinstance(where, torch.device) else str(where)))
                return _orig(*args, **kw)
            m.to = to
        return c

    monkeypatch.setattr(train_mod, "load_components", spy)
    cfg = load_config("flux/dreambooth-lora", train_args(tiny_flux_model, subject_dir, tmp_path / "run", "gradient_checkpointing=false",
                                                         "validation_prompts=[a sks dog]", "validation_steps=2"))
    train(cfg, callbacks=[lambda e: seq.append(("event", type(e).__name__))])
    first_step = seq.index(("event", "Step"))
    for name in ("te0", "te1", "vae"):
        before = [d for n, d in seq[:first_step] if n == name and d != "None"]
        during = [d for n, d in seq[first_step:] if n == name and d != "None"]
        assert before[0] == "device" and before[-1] == "cpu", (name, before)  # placed, then off the device before training
        assert during == ["device", "cpu"] * 2, (name, during)  # the step-2 and final renders: there and back


@pytest.fixture
def masked_subject(subject_dir, tmp_path):
    """The subject photos as RGBA, the left 40% opaque (the subject), the rest transparent."""
    from PIL import Image

    out = tmp_path / "masked"
    out.mkdir()
    for p in sorted(subject_dir.glob("*.png")):
        img = Image.open(p).convert("RGBA")
        alpha = Image.new("L", img.size, 0)
        alpha.paste(255, (0, 0, int(img.width * 0.4), img.height))
        img.putalpha(alpha)
        img.save(out / p.name)
    return out


@pytest.mark.parametrize("variant,fixture", [("dreambooth-lora-prior-pre", "tiny_model"),
                                             ("flux/dreambooth-lora-prior-pre", "tiny_flux_model")])
def test_masked_loss_weights_instance_rows_by_their_alpha_on_the_latent_grid(variant, fixture, request, masked_subject, tmp_path,
                                                                          monkeypatch):
    import nanobooth.core.train as T

    seen = []
    real = T.dreambooth_loss

    def spy(pred, target, n_instance, *a, **k):
        seen.append((pred.shape, a[2] if len(a) > 2 else None))
        return real(pred, target, n_instance, *a, **k)

    monkeypatch.setattr(T, "dreambooth_loss", spy)
    model = request.getfixturevalue(fixture)
    extra = ["masked_loss=true", "random_flip=true", "max_train_steps=4", "train_batch_size=2", "gradient_checkpointing=false"]
    assert main(["train", variant, *train_args(model, masked_subject, tmp_path / "cached", *extra)]) == 0
    assert len(seen) == 4
    for shape, mask in seen:
        assert mask.shape == (2, 1, *shape[2:])  # the instance rows only, on the (unpacked) latent grid
        cols = mask[:, 0].amax(1)  # a vertical stripe: each column all subject or all background (or the area-averaged edge)
        assert torch.equal(mask[:, 0].amin(1), cols) and (cols == 1).any(1).all() and (cols == 0).any(1).all()
    if fixture == "tiny_model":  # masks cached with the latents are the per-step ones
        cached = [m for _, m in seen]
        seen.clear()
        assert main(["train", variant, *train_args(model, masked_subject, tmp_path / "uncached", *extra, "cache_latents=false")]) == 0
        assert all(torch.equal(a, b) for a, (_, b) in zip(cached, seen))


def test_the_last_steps_line_is_logged_when_it_is_not_a_multiple_of_log_every(tiny_model, subject_dir, tmp_path, caplog):
    # newcomer55: 12 steps at log_every 10 showed step 10 and never the final one
    with caplog.at_level(logging.INFO, logger="nanobooth"):
        assert main(["train", "dreambooth-lora", *train_args(tiny_model, subject_dir, tmp_path / "r", "max_train_steps=3",
                                                               "log_every=2")]) == 0
    steps = [r.getMessage().split()[1] for r in caplog.records if r.getMessage().startswith("step ")]
    assert steps == ["2/3", "3/3"]
