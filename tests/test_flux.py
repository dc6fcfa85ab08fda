"""FLUX.1 (families.flux.Flux) on the tiny FLUX pipeline: packing, ids, guidance, encoding as FluxPipeline, and
the five variants training, saving and reloading."""

import json
import logging
import warnings

import pytest
import torch
from conftest import train_args
from safetensors.torch import load_file

from nanobooth.cli import main
from nanobooth.core.config import load_config
from nanobooth.families import FAMILIES, cond_batch
from nanobooth.families.flux import TRAIN_GUIDANCE, Flux, image_ids, pack, unpack
from nanobooth.core.models import load_components, make_pipeline

VARIANTS = ["dreambooth", "dreambooth-finetune-text-encoder", "dreambooth-prior-pre", "dreambooth-lora", "dreambooth-lora-prior-pre"]


def test_flux_variants_default_to_flux_dev_at_1024():
    for v in VARIANTS:
        cfg = load_config(f"flux/{v}")
        assert cfg.model == "black-forest-labs/FLUX.1-dev" and cfg.resolution == 1024
        assert (cfg.weighting_scheme, cfg.precondition_outputs, cfg.class_sampler) == ("none", False, "model")
    lora = load_config("flux/dreambooth-lora")
    assert lora.lora_rank == 16 and {"ff.net.0.proj", "ff_context.net.2", "attn.to_add_out"} <= set(lora.lora_target_modules)


def test_packing_by_hand():
    """Token (i, j) of the packed sequence is the 2x2 patch at rows 2i..2i+1, columns 2j..2j+1; its 4C channels
    are channel-major, then the patch's row, then column; its id is (0, i, j)."""
    x = torch.arange(2 * 3 * 4 * 6, dtype=torch.float32).view(2, 3, 4, 6)
    p = pack(x)
    assert p.shape == (2, 2 * 3, 3 * 4)
    i, j = 1, 2  # token 1 * 3 + 2
    assert torch.equal(p[1, i * 3 + j], x[1, :, 2 * i : 2 * i + 2, 2 * j : 2 * j + 2].reshape(-1))
    assert torch.equal(unpack(p, 4, 6), x)
    ids = image_ids(4, 6)
    assert ids.shape == (6, 3) and ids[i * 3 + j].tolist() == [0.0, i, j]


def test_flux_matches_its_pipeline(tiny_flux_model):
    c = load_components(str(tiny_flux_model))
    fam = c.family
    assert isinstance(fam, Flux) and FAMILIES["FluxPipeline"] is fam
    pipe = make_pipeline(c)
    x = torch.randn(2, 16, 8, 12, generator=torch.Generator().manual_seed(0))
    assert torch.equal(pack(x), pipe._pack_latents(x, 2, 16, 8, 12))
    assert torch.equal(image_ids(8, 12), pipe._prepare_latent_image_ids(2, 4, 6, "cpu", torch.float32))
    ids = fam.tokenize(c.tokenizers, "a photo of sks dog", "cpu")
    assert [i.shape for i in ids] == [(1, 77), (1, 512)]
    with torch.no_grad():
        cond = fam.encode(c.text_encoders, ids, 32)
        pe, pooled, text_ids = pipe.encode_prompt("a photo of sks dog", None)
        assert torch.equal(cond["encoder_hidden_states"], pe) and torch.equal(cond["pooled_projections"], pooled)
        # denoise = the pipeline's transformer call (t / 1000, guidance for the distilled model), unpacked
        t = torch.tensor([700.0, 20.0])
        ours = fam.denoise(c.unet, x, t, cond_batch([cond], [2]))
        theirs = c.unet(hidden_states=pipe._pack_latents(x, 2, 16, 8, 12), timestep=t / 1000,
                        guidance=torch.full((2,), TRAIN_GUIDANCE), pooled_projections=pooled.expand(2, -1),
                        encoder_hidden_states=pe.expand(2, -1, -1), txt_ids=text_ids,
                        img_ids=pipe._prepare_latent_image_ids(2, 4, 6, "cpu", torch.float32), return_dict=False)[0]
        assert torch.equal(ours, pipe._unpack_latents(theirs, 8 * 2, 12 * 2, 2))
        # the guidance really reaches a distilled model
        other = dict(cond_batch([cond], [2]), guidance=torch.full((2,), 1.0))
        assert not torch.allclose(ours, fam.denoise(c.unet, x, t, other))


@pytest.mark.parametrize("variant", VARIANTS)
def test_flux_variant_trains_and_reloads(variant, tiny_flux_model, subject_dir, tmp_path, caplog):
    from diffusers import FluxPipeline

    out = tmp_path / "run"
    extra = ["train_text_encoder=true"] if variant == "dreambooth-lora" else []
    with caplog.at_level(logging.INFO, logger="nanobooth"):
        assert main(["train", f"flux/{variant}", *train_args(tiny_flux_model, subject_dir, out, "gradient_checkpointing=false",
                                                              "learning_rate=1e-3", "validation_prompts=[a sks dog]",
                                                              "validation_inference_steps=2", *extra)]) == 0
    # the console names FLUX's denoiser as what it is (a newcomer read "training unet" on a FLUX run)
    (summary,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("training ")]
    assert summary.startswith("training transformer (") and "unet" not in summary
    assert ("text_encoder (" in summary) == bool(extra or variant == "dreambooth-finetune-text-encoder")
    log = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    assert len(log) == 3 and all(0 < r["loss"] < 1e3 for r in log)
    assert (out / "samples" / "step-000003.png").is_file()
    before = load_file(tiny_flux_model / "transformer" / "diffusion_pytorch_model.safetensors")
    if "lora" in variant:
        sd = load_file(out / "pytorch_lora_weights.safetensors")
        assert sd and all("lora" in k for k in sd)
        assert any("ff_context.net.2" in k for k in sd)
        assert {k.split(".")[0] for k in sd} == ({"transformer", "text_encoder"} if extra else {"transformer"})
        pipe = FluxPipeline.from_pretrained(tiny_flux_model)
        x = torch.randn(1, 64, 64, generator=torch.Generator().manual_seed(0))
        kw = dict(timestep=torch.tensor([0.5]), guidance=torch.tensor([3.5]), pooled_projections=torch.randn(1, 32),
                  encoder_hidden_states=torch.randn(1, 7, 32), txt_ids=torch.zeros(7, 3), img_ids=image_ids(16, 16))
        with torch.no_grad():
            base_out = pipe.transformer(hidden_states=x, **kw)[0]
            pipe.load_lora_weights(out, weight_name="pytorch_lora_weights.safetensors")
            # every adapter in the file reaches its module (diffusers skips keys it does not recognise, silently)
            for prefix, module in (("transformer", pipe.transformer), ("text_encoder", pipe.text_encoder)):
                saved = {k.split(".lora")[0].removeprefix(prefix + ".") for k in sd if k.split(".")[0] == prefix}
                assert {n.split(".lora")[0] for n, _ in module.named_parameters() if ".lora_" in n} == saved, prefix
            assert not torch.allclose(base_out, pipe.transformer(hidden_states=x, **kw)[0], atol=1e-4)
    else:
        FluxPipeline.from_pretrained(out)
        new = load_file(out / "transformer" / "diffusion_pytorch_model.safetensors")
        assert any(not torch.equal(before[k], new[k]) for k in before)
        t5, base_t5 = (load_file(p / "text_encoder_2" / "model.safetensors") for p in (out, tiny_flux_model))
        assert all(torch.equal(base_t5[k], t5[k]) for k in base_t5)  # T5 never trains
    gen = tmp_path / "gen"
    assert main(["generate", "--model", str(tiny_flux_model), "--weights", str(out), "--prompt", "a sks dog",
                 "--num-images", "1", "--steps", "2", "--resolution", "32", "--out", str(gen)]) == 0
    assert (gen / "grid.png").is_file()


def test_flux_without_guidance_embedding_samples_with_true_cfg_at_its_t5_length(tiny_flux_model, tmp_path):
    """A FLUX transformer without a guidance embedding (schnell, the toy twin) ignores guidance_scale: nanobooth
    samples it with true CFG (an empty negative prompt), which changes the image, and refuses a guidance cutoff
    it could not honour; the T5 length follows a tokenizer shorter than 512, in training and sampling alike."""
    from diffusers import FluxPipeline, FluxTransformer2DModel

    from nanobooth.core.config import ConfigError
    from nanobooth.inference.generate import render

    pipe = FluxPipeline.from_pretrained(tiny_flux_model)
    fam = FAMILIES["FluxPipeline"]
    assert fam.sampling_kwargs(pipe, 2, 4.0) == {"max_sequence_length": 512}  # FLUX.1-dev: distilled guidance
    config = dict(pipe.transformer.config)
    config["guidance_embeds"] = False
    torch.manual_seed(0)
    pipe.transformer = FluxTransformer2DModel.from_config(config)
    pipe.tokenizer_2.model_max_length = 24
    kw = fam.sampling_kwargs(pipe, 2, 4.0)
    assert kw == {"max_sequence_length": 24, "true_cfg_scale": 4.0, "negative_prompt": ["", ""]}
    assert "true_cfg_scale" not in fam.sampling_kwargs(pipe, 2, 1.0)
    assert fam.tokenize([pipe.tokenizer, pipe.tokenizer_2], "a sks dog", "cpu")[1].shape == (1, 24)
    guided, plain = (render(pipe, ["a sks dog"], 1, 0, 2, g, 32)[0][0] for g in (4.0, 1.0))
    assert guided.tobytes() != plain.tobytes()
    with pytest.raises(ValueError, match="guidance_cutoff=1"):
        render(pipe, ["a sks dog"], 1, 0, 2, 4.0, 32, guidance_cutoff=0.5)
    cfg = load_config("toy-flux/dreambooth-lora", ["validation_guidance_cutoff=0.5"])
    with pytest.raises(ConfigError, match="validation_guidance_cutoff"):
        fam.check_sampling(cfg, pipe.transformer.config)
    fam.check_sampling(load_config("toy-flux/dreambooth-lora"), pipe.transformer.config)


def test_toy_flux_variants_are_cpu_sized_twins_of_the_flux_ones():
    for v in VARIANTS:
        toy, real = load_config(f"toy-flux/{v}"), load_config(f"flux/{v}")
        assert (toy.model, toy.resolution, toy.validation_guidance_cutoff) == ("toy-flux", 64, 1.0)
        assert (toy.method, toy.with_prior_preservation) == (real.method, real.with_prior_preservation)
        # the one measured departure: the twin's LoRA + prior trains CLIP-L's LoRA too, without which its transformer's
        # LoRA bound no subject (docs/evaluation.md, session 36); the real variant keeps diffusers' script's default
        twin_trains_clip = v == "dreambooth-lora-prior-pre"
        assert toy.train_text_encoder == (real.train_text_encoder or twin_trains_clip), v
        assert (toy.weighting_scheme, toy.class_sampler) == (real.weighting_scheme, real.class_sampler)
        if toy.method == "lora":
            assert toy.lora_target_modules == real.lora_target_modules


# The tester's FLUX runs printed these; families/flux.py says why the first is harmless. torch warns it once a process,
# so set_warn_always makes every forward say it: an earlier test cannot hide it coming back.
RMS_NORM_MISMATCH = "Mismatch dtype between input and weight"
CHECKPOINTING_DEPRECATED = "gradient_checkpointing_enable` is deprecated"


def _train_recording_warnings(tiny_flux_model, subject_dir, out, *extra) -> list[str]:
    from accelerate.state import AcceleratorState

    was = torch.is_warn_always_enabled()
    torch.set_warn_always(True)
    # accelerate keeps one mixed precision a process: the earlier tests' "no" would refuse bf16, and bf16 theirs after
    AcceleratorState._reset_state(reset_partial_state=True)
    try:
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            # torch still takes its unfused path for bf16 activations on fp32 norm weights: else this test proves nothing
            torch.nn.RMSNorm(4)(torch.ones(1, 4, dtype=torch.bfloat16))
            assert any(RMS_NORM_MISMATCH in str(w.message) for w in seen)
            seen.clear()
            assert main(["train", "flux/dreambooth", *train_args(tiny_flux_model, subject_dir, out, "mixed_precision=bf16",
                                                                  "gradient_checkpointing=true", "max_train_steps=1",
                                                                  "validation_prompts=[a sks dog]", "validation_steps=1",
                                                                  *extra)]) == 0
    finally:
        torch.set_warn_always(was)
        AcceleratorState._reset_state(reset_partial_state=True)
    return [f"{w.category.__name__}: {w.message}" for w in seen]


def test_a_bf16_flux_fine_tune_does_not_warn_about_its_norms_dtype(tiny_flux_model, subject_dir, tmp_path):
    """A full fine-tune in bf16 (fp32 trained weights under autocast), its "before" validation render included."""
    said = _train_recording_warnings(tiny_flux_model, subject_dir, tmp_path / "run")
    assert not [w for w in said if RMS_NORM_MISMATCH in w or CHECKPOINTING_DEPRECATED in w], said


def test_checkpointing_a_trained_text_encoder_does_not_warn_of_a_deprecated_call(tiny_flux_model, subject_dir, tmp_path):
    said = _train_recording_warnings(tiny_flux_model, subject_dir, tmp_path / "run", "train_text_encoder=true")
    assert not [w for w in said if RMS_NORM_MISMATCH in w or CHECKPOINTING_DEPRECATED in w], said
