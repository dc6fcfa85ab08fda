"""SD3 (families.sd3.SD3) end to end on the tiny SD3 pipeline: the five variants train, save and reload."""

import json

import pytest
import torch
from conftest import train_args
from safetensors.torch import load_file

from nanobooth.cli import main
from nanobooth.core.config import ConfigError, TrainConfig, load_config
from nanobooth.families import FAMILIES
from nanobooth.families.sd3 import SD3
from nanobooth.core.models import load_components, make_pipeline

VARIANTS = ["dreambooth", "dreambooth-finetune-text-encoder", "dreambooth-prior-pre", "dreambooth-lora", "dreambooth-lora-prior-pre"]
SD3_ARGS = ["gradient_checkpointing=false", "learning_rate=1e-3", "validation_inference_steps=2"]


def test_sd3_variants_default_to_sd35_medium_with_the_reference_objective():
    for v in VARIANTS:
        cfg = load_config(f"sd3/{v}")
        assert cfg.model == "stabilityai/stable-diffusion-3.5-medium" and cfg.resolution == 1024
        assert (cfg.weighting_scheme, cfg.precondition_outputs, cfg.class_sampler) == ("logit_normal", True, "model")
    lora = load_config("sd3/dreambooth-lora-prior-pre")
    assert lora.method == "lora" and lora.with_prior_preservation and lora.learning_rate == 1e-4
    assert {"attn.add_q_proj", "attn.to_add_out", "attn.to_out.0"} <= set(lora.lora_target_modules)


def test_sd3_is_detected_and_encodes_as_its_pipeline(tiny_sd3_model):
    c = load_components(str(tiny_sd3_model))
    assert isinstance(c.family, SD3) and FAMILIES["StableDiffusion3Pipeline"] is c.family
    assert type(c.unet).__name__ == "SD3Transformer2DModel"  # the denoiser, whatever the pipeline calls it
    ids = c.family.tokenize(c.tokenizers, "a photo of sks dog", "cpu")
    assert [i.shape for i in ids] == [(1, 77), (1, 77), (1, 256)]
    with torch.no_grad():
        cond = c.family.encode(c.text_encoders, ids, 32)
        pe, _, pooled, _ = make_pipeline(c).encode_prompt("a photo of sks dog", None, None, do_classifier_free_guidance=False)
    # the pipeline's own encode_prompt: CLIP-L | CLIP-G hidden states padded to T5's width, then T5; pooled side by side
    assert torch.equal(cond["encoder_hidden_states"], pe) and torch.equal(cond["pooled_projections"], pooled)
    assert pe.shape == (1, 77 + 256, 64) and pooled.shape == (1, 64)


def test_sd3_refuses_ddpm_only_settings_in_one_line(tiny_sd3_model):
    fam = FAMILIES["StableDiffusion3Pipeline"]
    sched = fam.training_scheduler(load_components(str(tiny_sd3_model)).scheduler.config)
    for bad, key in ((dict(snr_gamma=5.0), "snr_gamma"), (dict(tome_ratio=0.5), "tome_ratio"),
                     (dict(with_prior_preservation=True, class_sampler="dpm++"), "class_sampler"),
                     (dict(validation_prompts=["a sks dog"], validation_sampler="dpm++"), "validation_sampler")):
        with pytest.raises(ConfigError, match=f"config key '{key}'"):
            fam.objective(sched, TrainConfig(**bad))


def _transformer_state(path):
    return load_file(path / "transformer" / "diffusion_pytorch_model.safetensors")


@pytest.mark.parametrize("variant", VARIANTS)
def test_sd3_variant_trains_and_reloads(variant, tiny_sd3_model, subject_dir, tmp_path):
    from diffusers import StableDiffusion3Pipeline

    out = tmp_path / "run"
    extra = ["train_text_encoder=true"] if variant == "dreambooth-lora" else []
    before = _transformer_state(tiny_sd3_model)
    assert main(["train", f"sd3/{variant}", *train_args(tiny_sd3_model, subject_dir, out, *SD3_ARGS,
                                                         "validation_prompts=[a sks dog]", *extra)]) == 0
    log = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    assert len(log) == 3 and all(r["loss"] > 0 and r["loss"] < 1e3 for r in log)
    if "prior" in variant:
        assert all(r["prior_loss"] is not None for r in log)
    assert (out / "samples" / "step-000003.png").is_file()
    # the base model on disk is untouched by any run
    assert all(torch.equal(v, _transformer_state(tiny_sd3_model)[k]) for k, v in before.items())
    if "lora" in variant:
        sd = load_file(out / "pytorch_lora_weights.safetensors")
        assert sd and all("lora" in k for k in sd)  # adapters only, no base weight
        assert any(k.startswith("transformer.") and "add_q_proj" in k for k in sd)  # the text stream's projections too
        # text-encoder adapters: both CLIPs when asked, never T5
        assert {k.split(".")[0] for k in sd} == ({"transformer", "text_encoder", "text_encoder_2"} if extra else {"transformer"})
        pipe = StableDiffusion3Pipeline.from_pretrained(tiny_sd3_model)
        x = torch.randn(1, 16, 16, 16, generator=torch.Generator().manual_seed(0))
        cond = dict(encoder_hidden_states=torch.randn(1, 20, 64), pooled_projections=torch.randn(1, 64))
        with torch.no_grad():
            base_out = pipe.transformer(hidden_states=x, timestep=torch.tensor([500.0]), **cond)[0]
            pipe.load_lora_weights(out, weight_name="pytorch_lora_weights.safetensors")
            # every adapter in the file reaches its module (diffusers skips keys it does not recognise, silently)
            for prefix, module in (("transformer", pipe.transformer), ("text_encoder", pipe.text_encoder), ("text_encoder_2", pipe.text_encoder_2)):
                saved = {k.split(".lora")[0].removeprefix(prefix + ".") for k in sd if k.split(".")[0] == prefix}
                assert {n.split(".lora")[0] for n, _ in module.named_parameters() if ".lora_" in n} == saved, prefix
            lora_out = pipe.transformer(hidden_states=x, timestep=torch.tensor([500.0]), **cond)[0]
        assert not torch.allclose(base_out, lora_out, atol=1e-4)  # the adapters trained and load in diffusers
    else:
        pipe = StableDiffusion3Pipeline.from_pretrained(out)
        new = _transformer_state(out)
        assert any(not torch.equal(before[k], new[k]) for k in before)
        base_te = load_file(tiny_sd3_model / "text_encoder_2" / "model.safetensors")
        new_te = load_file(out / "text_encoder_2" / "model.safetensors")
        assert any(not torch.equal(base_te[k], new_te[k]) for k in base_te) == ("text-encoder" in variant)
        t5 = load_file(out / "text_encoder_3" / "model.safetensors")
        base_t5 = load_file(tiny_sd3_model / "text_encoder_3" / "model.safetensors")
        assert all(torch.equal(base_t5[k], t5[k]) for k in base_t5)  # T5 never trains
    gen = tmp_path / "gen"
    assert main(["generate", "--model", str(tiny_sd3_model), "--weights", str(out), "--prompt", "a sks dog",
                 "--num-images", "1", "--steps", "2", "--resolution", "32", "--out", str(gen)]) == 0
    assert (gen / "grid.png").is_file()


def test_a_ddpm_only_key_on_sd3_is_one_line_before_anything_is_written(tiny_sd3_model, subject_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "sd3/dreambooth-lora", *train_args(tiny_sd3_model, subject_dir, out, "snr_gamma=5", prior=False)]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip() and "Loading" not in ln and "%" not in ln]
    assert len(err) == 1 and "snr_gamma" in err[0] and "Traceback" not in err[0]
    assert not out.exists()
