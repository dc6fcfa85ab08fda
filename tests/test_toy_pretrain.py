"""The toy pretraining recipe's pieces that run in seconds (the recipe itself takes hours)."""
import numpy as np
import pytest
import torch

from nanobooth import cli
from nanobooth.toy import autoencoder, world


def test_pretrain_cli_takes_its_own_flags(capsys):
    # argparse.REMAINDER used to reject a leading "--out": the README's recipe command failed
    with pytest.raises(SystemExit) as e:
        cli.main(["toy", "pretrain", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "--vae-refine-steps" in out and "--unet-steps" in out


def test_object_weight_covers_the_object_only():
    w = autoencoder.object_weight(np.array([[20.0, 40.0, 10.0]], np.float32), fg=4.0)
    assert w.shape == (1, 1, 64, 64)
    assert w[0, 0, 40, 20] == 5.0  # object centre (row y, column x)
    assert w[0, 0, 40, 31] == 5.0  # inside 1.25 r (pixel centres are at +0.5)
    assert w[0, 0, 5, 60] == 1.0  # far corner
    assert 0.05 < (w == 5.0).float().mean() < 0.2  # about pi (12.5)^2 / 64^2


def test_subject_pool_is_seeded_and_geometry_matches_render():
    a, geo = autoencoder.subject_pool(2, poses=2)
    b, _ = autoencoder.subject_pool(2, poses=2)
    assert a.shape == (4, 64, 64, 3) and np.array_equal(a, b)
    bg_only = np.asarray(world.render_subject(world.make_subject(autoencoder.SUBJECT_SEED0), 0, None))
    assert np.array_equal(a[0], bg_only)
    # the weight disc must sit on the subject: pixels inside differ from the plain background far more
    w = autoencoder.object_weight(geo[:1])[0, 0].numpy() > 1
    bg = world.background(None, world.subject_pose(world.make_subject(autoencoder.SUBJECT_SEED0), 0)["bg_seed"])
    diff = np.abs(a[0].astype(np.float32) - bg).sum(-1)
    assert diff[w].mean() > 10 * diff[~w].mean()
    assert autoencoder.SUBJECT_SEED0 > 100_000  # disjoint from test/demo subject seeds


def test_recipe_runs_every_stage_resumes_and_exports(tmp_path):
    """The whole recipe at toy scale: render, VAE, decoder, refinement, UNet/TE, export, load, sample."""
    import json

    from diffusers import StableDiffusionPipeline
    from safetensors.torch import load_file, save_file

    from nanobooth.toy import pretrain

    out = tmp_path / "pre"
    tiny = ["--out", str(out), "--n-images", "560", "--n-plain", "40", "--vae-steps", "2", "--vae-batch", "4", "--decoder-steps", "2",
            "--vae-refine-steps", "2", "--vae-refine-subjects", "2", "--decoder-refine-steps", "2", "--unet-batch", "2",
            "--threads", "1"]
    assert pretrain.main(tiny + ["--unet-steps", "2"]) == 0
    for d in ("vae", "vae_dec", "vae_refined", "vae_refined_dec"):
        assert (out / d / "config.json").is_file()
    assert json.loads((out / "unet_ckpt" / "state.json").read_text())["step"] == 2
    lat = load_file(str(out / "latents_refined.safetensors"))
    assert lat["mean"].shape[0] == 600  # the scenes, then the plain-backdrop images
    imgs, specs = pretrain.load_or_render_data(out, 560, 0, 40)
    assert specs[559].scene is not None and all(s.scene is None for s in specs[560:])
    # images added to the data later are encoded on top of the cached prefix, not from scratch
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(str(out / "vae_refined"))
    save_file({k: v[:590].contiguous() for k, v in lat.items()}, str(out / "latents_refined.safetensors"))
    mean, _ = pretrain.encode_latents(out, vae, imgs)
    assert mean.shape[0] == 600 and torch.equal(mean[:590], lat["mean"][:590])
    assert torch.allclose(mean[590:].float(), lat["mean"][590:].float(), atol=1e-2)
    refined = json.loads((out / "vae_refined" / "config.json").read_text())["scaling_factor"]
    assert refined != json.loads((out / "vae" / "config.json").read_text())["scaling_factor"]  # re-measured
    before = (out / "unet_ckpt" / "unet.safetensors").read_bytes()
    assert pretrain.main(tiny + ["--unet-steps", "3"]) == 0  # resumes: only the UNet stage has work left
    assert json.loads((out / "unet_ckpt" / "state.json").read_text())["step"] == 3
    assert (out / "unet_ckpt" / "unet.safetensors").read_bytes() != before
    t = json.loads((out / "timings.json").read_text())
    assert {"vae_seconds", "decoder_seconds", "vae_refine_seconds", "decoder_refine_seconds", "unet_seconds"} <= set(t)
    assert pretrain.main(["--out", str(out), "--export", str(tmp_path / "model")]) == 0
    pipe = StableDiffusionPipeline.from_pretrained(str(tmp_path / "model"), torch_dtype=torch.float32)
    assert pipe.vae.config.scaling_factor == pytest.approx(refined, rel=1e-3)  # the refined VAE is what ships
    shipped = pipe.vae.decoder.conv_out.weight.detach()
    dec = AutoencoderKL.from_pretrained(str(out / "vae_refined_dec")).decoder.conv_out.weight.detach()
    assert torch.allclose(shipped, dec.half().float())  # ... with stage 1d's decoder
    a, b = (AutoencoderKL.from_pretrained(str(out / d)).encoder.state_dict() for d in ("vae_refined", "vae_refined_dec"))
    assert all(torch.equal(a[k], b[k]) for k in a)  # 1d leaves the encoder, hence stage 2's latents, alone
    img = pipe("a photo of a red ball on grass", num_inference_steps=2, generator=torch.Generator().manual_seed(0)).images[0]
    assert img.size == (64, 64)
