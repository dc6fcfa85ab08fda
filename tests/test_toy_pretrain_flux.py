"""The toy FLUX twin's recipe (toy/recipes/pretrain_flux.py) at toy scale: its tokenizer covers the world, and
what it exports (its resume: test_toy_denoiser.py) is a FluxPipeline that samples as the family trains it."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from nanobooth.toy import world
from nanobooth.toy.recipes import pretrain, pretrain_flux


def test_world_captions_tokenize_to_whole_words_within_the_t5_length():
    tok = pretrain_flux.make_t5_tokenizer()
    rng = np.random.default_rng(0)
    for i in range(400):
        spec = world.sample_patterned_spec(rng, plain=bool(i % 2)) if i % 3 else world.sample_spec(rng)
        for cap in (world.caption(spec, identifier=world.IDENTIFIER), world.caption(spec, colour=False, look=True)):
            pieces = tok.tokenize(cap)
            assert [p.lstrip("\u2581") for p in pieces] == cap.split(), cap  # one piece a word: no spelling out
            assert len(tok(cap).input_ids) <= pretrain_flux.T5_LENGTH
    assert tok.tokenize("zq") == ["\u2581", "z", "q"]  # another identifier still tokenizes, letter by letter


def test_twin_exports_a_flux_pipeline_that_samples_as_trained(toy_v5_base, tmp_path):
    from diffusers import AutoencoderKL, FluxPipeline

    from nanobooth.families import FAMILIES
    from nanobooth.inference.generate import render

    base, a = toy_v5_base, tmp_path / "a"
    assert pretrain_flux.main(["--base", str(base), "--batch", "3", "--threads", "1", "--steps", "2", "--out", str(a)]) == 0
    assert pretrain_flux.main(["--out", str(a), "--export", str(tmp_path / "model")]) == 0
    pipe = FluxPipeline.from_pretrained(str(tmp_path / "model"), dtype=torch.float32)
    shipped = AutoencoderKL.from_pretrained(str(pretrain.vae_dir(base)))
    assert pipe.vae.config.scaling_factor == shipped.config.scaling_factor and pipe.vae.config.shift_factor == 0.0
    assert torch.allclose(pipe.vae.decoder.conv_out.weight, shipped.decoder.conv_out.weight.half().float())  # the same VAE
    assert pretrain.vae_dir(base).name == "vae_centred"  # recipe v5's: its latents have zero channel means
    assert torch.allclose(pipe.vae.quant_conv.bias, shipped.quant_conv.bias.half().float())
    assert pipe.vae_scale_factor == 2 and pipe.tokenizer_2.model_max_length == pretrain_flux.T5_LENGTH
    # the twin draws its batches as the base run's stage 2 does (recipe v5: patterned objects 3x as often)
    assert json.loads((a / "flux_ckpt" / "state.json").read_text())["patterned_weight"] == 3.0
    ema = load_file(str(a / "flux_ckpt" / "ema.safetensors"))
    assert torch.equal(pipe.transformer.proj_out.weight, ema["transformer.proj_out.weight"].half().float())  # EMA weights ship
    kw = FAMILIES["FluxPipeline"].sampling_kwargs(pipe, 1, 4.0)
    assert kw["max_sequence_length"] == pretrain_flux.T5_LENGTH and kw["true_cfg_scale"] == 4.0
    img = render(pipe, ["a photo of a red ball on grass"], 1, 0, 2, 4.0, 64)[0][0]
    assert img.size == (64, 64)


def test_twin_refuses_a_missing_or_unready_base_before_writing(tmp_path):
    with pytest.raises(SystemExit, match="no encoded latents"):
        pretrain_flux.main(["--base", str(tmp_path), "--out", str(tmp_path / "flux"), "--steps", "1"])
    with pytest.raises(SystemExit, match="does not exist"):
        pretrain_flux.main(["--base", str(tmp_path / "nope"), "--out", str(tmp_path / "flux"), "--steps", "1"])
    assert not (tmp_path / "flux").exists()
    with pytest.raises(SystemExit):  # too few scenes for the autoencoder's held-apart set: one line, nothing written
        pretrain.main(["--out", str(tmp_path / "unet"), "--n-images", "40"])
    assert not (tmp_path / "unet").exists()


def test_exporting_an_untrained_folder_is_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit, match="no checkpoint to export"):
        pretrain_flux.main(["--out", str(tmp_path / "flux"), "--export", str(tmp_path / "model")])
    with pytest.raises(SystemExit):
        pretrain.main(["--out", str(tmp_path / "unet"), "--export", str(tmp_path / "model")])
    assert "no stage-2 checkpoint to export" in capsys.readouterr().err
    assert not (tmp_path / "model").exists() and not (tmp_path / "unet").exists()
