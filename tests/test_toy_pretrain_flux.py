"""The toy FLUX twin's recipe (toy/recipes/pretrain_flux.py) at toy scale: its tokenizer covers the world, it
resumes bit-exactly, and what it exports is a FluxPipeline that samples as the family trains it."""
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from nanobooth.toy import world
from nanobooth.toy.recipes import autoencoder, pretrain, pretrain_flux


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


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """The UNet recipe v5 at toy scale, up to its stage 2 (the latents cache the twin reads)."""
    out = tmp_path_factory.mktemp("toy_v5") / "pre"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(autoencoder, "HELD_APART", 16)
        assert pretrain.main(["--recipe", "v5", "--out", str(out), "--n-images", "40", "--n-plain", "12", "--n-patterned", "12",
                              "--vae-steps", "2", "--vae-batch", "4", "--vae-refine-steps", "1", "--vae-refine-subjects", "2",
                              "--decoder-refine-steps", "1", "--unet-steps", "1", "--unet-batch", "2", "--threads", "1"]) == 0
    return out


def test_twin_resumes_bit_exactly_and_exports_a_flux_pipeline(base, tmp_path):
    from diffusers import AutoencoderKL, FluxPipeline

    from nanobooth.families import FAMILIES
    from nanobooth.inference.generate import render

    flags = ["--base", str(base), "--batch", "3", "--threads", "1", "--steps", "4", "--ckpt-minutes", "0"]
    a, b = tmp_path / "a", tmp_path / "b"

    def stop_at_2(step, *args):
        if step == 2:
            raise KeyboardInterrupt
        return lr_at(step, *args)

    lr_at = pretrain_flux.lr_at
    with pytest.MonkeyPatch.context() as mp, pytest.raises(KeyboardInterrupt):
        mp.setattr(pretrain_flux, "lr_at", stop_at_2)
        pretrain_flux.main(flags + ["--out", str(a)])
    assert json.loads((a / "flux_ckpt" / "state.json").read_text())["step"] == 2
    assert pretrain_flux.main(flags + ["--out", str(a)]) == 0  # stopped at 2, resumed
    assert pretrain_flux.main(flags + ["--out", str(b)]) == 0  # straight through
    for name in ("transformer", "text_encoder", "text_encoder_2", "ema"):
        x, y = (load_file(str(d / "flux_ckpt" / f"{name}.safetensors")) for d in (a, b))
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x), name
    assert json.loads((a / "flux_ckpt" / "state.json").read_text())["step"] == 4
    assert not (a / "flux_ckpt.tmp").exists() and not (a / "flux_ckpt.old").exists()
    assert "flux_seconds" in json.loads((a / "timings.json").read_text())

    assert pretrain_flux.main(["--out", str(a), "--export", str(tmp_path / "model")]) == 0
    pipe = FluxPipeline.from_pretrained(str(tmp_path / "model"), dtype=torch.float32)
    shipped = AutoencoderKL.from_pretrained(str(pretrain.vae_dir(base)))
    assert pipe.vae.config.scaling_factor == shipped.config.scaling_factor and pipe.vae.config.shift_factor == 0.0
    assert torch.allclose(pipe.vae.decoder.conv_out.weight, shipped.decoder.conv_out.weight.half().float())  # the same VAE
    assert pipe.vae_scale_factor == 2 and pipe.tokenizer_2.model_max_length == pretrain_flux.T5_LENGTH
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
