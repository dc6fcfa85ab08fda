"""The toy pretraining recipe's pieces that run in seconds (the recipe itself takes hours)."""
import numpy as np
import pytest
import torch

from nanobooth import cli
from nanobooth.toy.recipes import autoencoder, data
from nanobooth.toy import world


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


def test_recipe_runs_every_stage_resumes_and_exports(tmp_path, monkeypatch):
    """The whole recipe at toy scale: render, VAE, decoder, refinement, UNet/TE, export, load, sample."""
    import json

    from diffusers import StableDiffusionPipeline
    from safetensors.torch import load_file, save_file

    from nanobooth.toy.recipes import pretrain

    # 16 held-apart scenes, not 512: encoding and decoding 512 images after each of the 4 autoencoder
    # stages was most of this test's time; the stages, their caches and resumes are the same
    monkeypatch.setattr(autoencoder, "HELD_APART", 16)
    out = tmp_path / "pre"
    tiny = ["--recipe", "v4", "--out", str(out), "--n-images", "60", "--n-plain", "40", "--vae-steps", "2", "--vae-batch", "4", "--decoder-steps", "2",
            "--vae-refine-steps", "2", "--vae-refine-subjects", "2", "--decoder-refine-steps", "2", "--unet-batch", "2",
            "--threads", "1"]
    assert pretrain.main(tiny + ["--unet-steps", "2"]) == 0
    for d in ("vae", "vae_dec", "vae_refined", "vae_refined_dec"):
        assert (out / d / "config.json").is_file()
    assert json.loads((out / "unet_ckpt" / "state.json").read_text())["step"] == 2
    lat = load_file(str(out / "latents_refined.safetensors"))
    assert lat["mean"].shape[0] == 100  # the scenes, then the plain-backdrop images
    imgs, specs = data.load_or_render_data(out, 60, 0, 40)
    assert specs[59].scene is not None and all(s.scene is None for s in specs[60:])
    # images added to the data later are encoded on top of the cached prefix, not from scratch
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(str(out / "vae_refined"))
    save_file({k: v[:90].contiguous() for k, v in lat.items()}, str(out / "latents_refined.safetensors"))
    mean, _ = data.encode_latents(out, vae, imgs)
    assert mean.shape[0] == 100 and torch.equal(mean[:90], lat["mean"][:90])
    assert torch.allclose(mean[90:].float(), lat["mean"][90:].float(), atol=1e-2)
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


def test_centring_shifts_the_latents_and_leaves_the_round_trip_alone():
    torch.manual_seed(0)
    vae = autoencoder.make_vae(2).eval()
    with torch.no_grad():  # a trained VAE's convs have biases; the fresh one's quant convs start near zero
        for p in vae.parameters():
            p.add_(0.05 * torch.randn_like(p))
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.mean).sample
        mu = torch.tensor([0.7, -1.3, 0.2, 2.0])
        autoencoder.centre_vae(vae, mu)
        post2 = vae.encode(x).latent_dist
        rec2 = vae.decode(post2.mean).sample
    assert torch.allclose(post2.mean, post.mean - mu.view(1, 4, 1, 1), atol=1e-5)
    assert torch.allclose(post2.std, post.std)
    assert torch.allclose(rec2, rec, atol=1e-4) and not torch.allclose(rec, torch.zeros_like(rec), atol=1e-2)
    from diffusers import AutoencoderKL

    with pytest.raises(ValueError, match="quant_conv"):
        autoencoder.centre_vae(AutoencoderKL(use_quant_conv=False, use_post_quant_conv=False), mu)


def test_training_caption_draws_once_for_plain_objects():
    # v4's data stream: a plain object's caption must consume exactly one random number, so that adding
    # patterned objects (recipe v5) leaves every v4 batch as it was
    from nanobooth.toy.recipes.denoiser import training_caption

    spec = world.Spec("star", "blue", "on the beach", 12, 32, 32)
    for seed in range(40):
        a, b = np.random.default_rng(seed), np.random.default_rng(seed)
        training_caption(spec, a)
        b.random()
        assert a.random() == b.random()
    pat = world.sample_patterned_spec(np.random.default_rng(0))
    caps = {training_caption(pat, np.random.default_rng(s)) for s in range(300)}
    assert world.caption(pat) in caps and world.caption(pat, colour=False, look=True) in caps
    assert world.caption(pat, colour=False) in caps and "" in caps


def test_v5_model_fits_the_size_budget():
    # issue #24: the shipped model stays under ~40 MB in fp16 (tokenizer files: 1.5 MB)
    from nanobooth.toy.recipes import pretrain

    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    unet, te, vae = pretrain.make_unet("v5"), pretrain.make_text_encoder(), autoencoder.make_vae(2)
    assert 2 * (n(unet) + n(te) + n(vae)) + 1.5e6 < 40e6
    assert n(unet) > n(pretrain.make_unet("v4"))  # more capacity, not less
    z = vae.encode(torch.zeros(1, 3, 64, 64)).latent_dist.mean
    assert z.shape == (1, 4, 32, 32) and unet.config.sample_size == 32
    assert unet(torch.zeros(1, 4, 32, 32), 10, torch.zeros(1, 77, 128)).sample.shape == (1, 4, 32, 32)
    with pytest.raises(ValueError, match="factor"):
        autoencoder.make_vae(8)


def test_recipe_v5_runs_resumes_and_exports_a_32x32_latent_model(tmp_path, monkeypatch):
    import json

    from diffusers import StableDiffusionPipeline
    from safetensors.torch import load_file

    from nanobooth.toy.recipes import pretrain

    monkeypatch.setattr(autoencoder, "HELD_APART", 16)  # as in the v4 test above
    out = tmp_path / "pre"
    tiny = ["--recipe", "v5", "--out", str(out), "--n-images", "30", "--n-plain", "10", "--n-patterned", "20",
            "--vae-steps", "1", "--vae-batch", "4", "--vae-refine-steps", "1", "--vae-refine-subjects", "1",
            "--decoder-refine-steps", "1", "--unet-batch", "2"]
    from nanobooth.families.objective import DDPMObjective

    offsets = []
    sample = DDPMObjective.sample
    monkeypatch.setattr(DDPMObjective, "sample", lambda self, shape, g, offset=0.0: offsets.append(offset)
                        or sample(self, shape, g, offset))
    from nanobooth.toy.recipes import denoiser

    biased = []
    later = denoiser.later_biased_timesteps
    monkeypatch.setattr(denoiser, "later_biased_timesteps", lambda *a: biased.append(a[:4]) or later(*a))
    assert pretrain.main(tiny + ["--unet-steps", "1", "--no-centre-latents", "--noise-offset", "0",
                                 "--timestep-bias", "0", "1"]) == 0
    assert offsets == [0.0] and biased == []
    args = json.loads((out / "args_all.json").read_text())
    assert args["vae_factor"] == 2 and args["unet_arch"] == "v5" and args["unet_steps"] == 1  # flags beat the recipe
    assert not (out / "vae_centred").exists()
    assert args["threads"] == 1 and not (out / "vae_dec").exists()  # the recipe's own defaults (no stage 1b)
    imgs, specs = data.load_or_render_data(out, 30, 0, 10, 20)
    assert len(imgs) == 60 and all(s.pattern is not None for s in specs[40:])
    assert all(s.pattern is None for s in specs[:40])
    assert load_file(str(out / "latents_refined.safetensors"))["mean"].shape == (60, 4, 32, 32)
    assert json.loads((out / "unet_ckpt" / "unet_config.json").read_text())["sample_size"] == 32
    assert pretrain.main(tiny + ["--unet-steps", "2"]) == 0  # resumes the v5 UNet
    state = json.loads((out / "unet_ckpt" / "state.json").read_text())
    assert state["step"] == 2 and state["noise_offset"] == 0.1 and offsets == [0.0, 0.1]  # the recipe's objective
    assert (state["timestep_bias_portion"], state["timestep_bias_multiplier"]) == (0.15, 3.0)
    assert biased == [(1000, 2, 0.15, 3.0)]
    # stage 1e: the recipe's default centres the latents (zero channel means over the data); stage 2
    # continues on them, and history.json says where the latent space changed under it
    from diffusers import AutoencoderKL

    raw, centred = (load_file(str(out / f))["mean"].float() for f in ("latents_refined.safetensors", "latents_centred.safetensors"))
    assert raw.mean((0, 2, 3)).abs().max() > 0.01 and centred.mean((0, 2, 3)).abs().max() < 2e-3
    vae = AutoencoderKL.from_pretrained(str(out / "vae_centred"))
    assert pretrain.vae_dir(out) == out / "vae_centred" and vae.config.scaling_factor != json.loads(
        (out / "vae_refined_dec" / "config.json").read_text())["scaling_factor"]
    x = torch.from_numpy(imgs[:2]).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        assert torch.allclose(vae.encode(x).latent_dist.mean, centred[:2], atol=2e-3)
        before = AutoencoderKL.from_pretrained(str(out / "vae_refined_dec")).decode(raw[:2]).sample
        assert torch.allclose(vae.decode(centred[:2]).sample, before, atol=1e-2)
    centring, offset = json.loads((out / "history.json").read_text())
    assert "steps 0-1 on uncentred latents (vae_refined_dec)" in centring and "continued from step 1 on centred ones" in centring
    assert "up to step 1 with noise_offset 0, timestep_bias_portion 0, timestep_bias_multiplier 1;" in offset
    assert "from step 1 with noise_offset 0.1, timestep_bias_portion 0.15, timestep_bias_multiplier 3" in offset
    assert state["patterned_weight"] == 3.0 and "patterned_weight" not in offset  # the recipe's, from step 0
    # a resume with other draws continues with them, and says so
    assert pretrain.main(tiny + ["--unet-steps", "3", "--patterned-weight", "1"]) == 0
    assert json.loads((out / "unet_ckpt" / "state.json").read_text())["patterned_weight"] == 1.0
    assert json.loads((out / "history.json").read_text())[2] == (
        "stage 2 trained up to step 2 with patterned_weight 3; the recipe changed then, and stage 2 continued from "
        "step 2 with patterned_weight 1")
    assert pretrain.main(["--out", str(out), "--export", str(tmp_path / "model")]) == 0
    pipe = StableDiffusionPipeline.from_pretrained(str(tmp_path / "model"), torch_dtype=torch.float32)
    assert pipe.vae_scale_factor == 2 and pipe.unet.config.block_out_channels == [32, 96, 160, 192]
    img = pipe("a photo of a red and blue striped cube with an eye", num_inference_steps=1,
               generator=torch.Generator().manual_seed(0)).images[0]
    assert img.size == (64, 64)


def test_rendering_resumes_from_saved_parts(tmp_path, monkeypatch):
    # rendering the v5 data takes an hour on a busy core: a stopped run must not start it over
    monkeypatch.setattr(data, "RENDER_PART", 4)
    path = tmp_path / "data.npy"
    full, specs = data._render_set(path, 10, np.random.default_rng(1), False, "t", patterned=True)
    assert full.shape == (10, 64, 64, 3) and sorted(p.name for p in tmp_path.glob("*.npy")) == ["data.npy"]
    path.unlink()
    np.save(tmp_path / "data.part1.npy", np.zeros_like(full[4:8]))  # a part a stopped run left: kept as is
    again, specs2 = data._render_set(path, 10, np.random.default_rng(1), False, "t", patterned=True)
    assert specs2 == specs and np.array_equal(again[:4], full[:4]) and np.array_equal(again[8:], full[8:])
    assert not again[4:8].any() and not list(tmp_path.glob("*.part*"))


def test_resuming_with_another_architecture_is_one_error_line(tmp_path, capsys):
    import json

    from nanobooth.toy.recipes import pretrain

    out = tmp_path / "pre"
    out.mkdir()
    (out / "args_all.json").write_text(json.dumps({"out": str(out), "unet_steps": 7200}))  # a v4 run's, pre-v5
    with pytest.raises(SystemExit) as e:
        pretrain.main(["--recipe", "v5", "--out", str(out)])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "--vae-factor 4 --unet-arch v4" in err and "args_all.json" in err
    assert sorted(p.name for p in out.iterdir()) == ["args_all.json"]  # nothing rendered, nothing overwritten


def test_later_biased_timesteps_weight_the_noisiest_portion():
    from nanobooth.toy.recipes.denoiser import later_biased_timesteps

    g = torch.Generator().manual_seed(0)
    t = later_biased_timesteps(1000, 20000, 0.15, 3.0, g)
    assert t.min() >= 0 and t.max() <= 999
    # 150 of 1000 timesteps at weight 3: 450 / (850 + 450) = 34.6% of the draws, vs 15% uniform
    assert abs((t >= 850).float().mean().item() - 450 / 1300) < 0.01
    assert abs((later_biased_timesteps(1000, 20000, 0.15, 1.0, g) >= 850).float().mean().item() - 0.15) < 0.01


def test_init_from_continues_an_exported_model_in_its_latent_space(tmp_path, capsys):
    # `--init-from`: stage 2 continues a shipped model (its UNet, text encoder and VAE) with a fresh optimizer,
    # instead of the hours of stages 1-1e and a random init
    import json
    from importlib import resources
    from pathlib import Path

    from diffusers import StableDiffusionPipeline
    from safetensors.torch import load_file

    from nanobooth.toy.recipes import pretrain

    model = Path(str(resources.files("nanobooth"))) / "assets" / "toy_model"
    if not (model / "model_index.json").is_file():
        pytest.skip("the pretrained toy model is not in this build")
    out = tmp_path / "cont"
    flags = ["--out", str(out), "--init-from", str(model), "--n-images", "20", "--n-plain", "4", "--n-patterned", "8",
             "--unet-batch", "2", "--seed", "3"]
    assert pretrain.main(flags + ["--unet-steps", "1", "--lr", "0"]) == 0
    # lr 0: the checkpoint holds the exported weights exactly (fp16 upcast), not a random init
    for ck_file, src in (("unet", "unet/diffusion_pytorch_model"), ("text_encoder", "text_encoder/model")):
        ck, exported = load_file(str(out / "unet_ckpt" / f"{ck_file}.safetensors")), load_file(str(model / f"{src}.safetensors"))
        assert exported and all(torch.equal(ck[k], v.float()) for k, v in exported.items())
    vae, exported = (load_file(str(d / "diffusion_pytorch_model.safetensors")) for d in (out / "vae_centred", model / "vae"))
    assert all(torch.equal(vae[k], v.float()) for k, v in exported.items())
    assert not any((out / d).exists() for d in ("vae", "vae_refined", "vae_ckpt"))  # no autoencoder stage ran
    assert load_file(str(out / "latents_centred.safetensors"))["mean"].shape == (32, 4, 32, 32)
    (line,) = json.loads((out / "history.json").read_text())
    assert f"started from the exported model {model} (12000 steps, EMA weights in fp16)" in line and "seed 3" in line
    # resumed at a real lr it trains on from its checkpoint (the init is not loaded again) and exports; a resume
    # that leaves --init-from off continues what the run started from, with no autoencoder stage either
    resume = [f for f in flags if f != str(model) and f != "--init-from"]
    assert pretrain.main(resume + ["--unet-steps", "3", "--lr", "1e-3"]) == 0
    assert not any((out / d).exists() for d in ("vae", "vae_refined", "vae_ckpt"))
    ck = load_file(str(out / "unet_ckpt" / "unet.safetensors"))
    exported = load_file(str(model / "unet" / "diffusion_pytorch_model.safetensors"))
    assert json.loads((out / "unet_ckpt" / "state.json").read_text())["step"] == 3
    # (warm-up: steps 1-2 at lr 2e-5 and 3e-5, an Adam update of about lr each)
    assert max((ck[k] - v.float()).abs().max().item() for k, v in exported.items()) > 3e-5
    assert pretrain.main(["--out", str(out), "--export", str(tmp_path / "m"), "--no-ema"]) == 0
    pipe = StableDiffusionPipeline.from_pretrained(str(tmp_path / "m"), torch_dtype=torch.float32)
    assert torch.equal(pipe.unet.conv_in.weight, ck["conv_in.weight"].half().float())
    # a folder that holds no exported pipeline: one line, nothing written
    with pytest.raises(SystemExit) as e:
        pretrain.main(["--out", str(tmp_path / "x"), "--init-from", str(tmp_path)])
    assert e.value.code == 2 and "--init-from" in capsys.readouterr().err.splitlines()[-1]
    assert not (tmp_path / "x").exists()
    # a missing folder, a model of another layout, a --stage that stops before stage 2: refused before anything runs
    for bad, says in ((["--init-from", str(tmp_path / "nothing")], "no such folder"),
                      (["--init-from", str(model), "--recipe", "v4"], "pass --recipe v5"),
                      (["--init-from", str(model), "--unet-arch", "v4"], "pass --recipe v5"),
                      (["--init-from", str(model), "--vae-factor", "4"], "drop --vae-factor"),
                      (["--init-from", str(model), "--stage", "decoder"], "drop --stage")):
        with pytest.raises(SystemExit) as e:
            pretrain.main(["--out", str(tmp_path / "x")] + bad)
        assert e.value.code == 2 and says in capsys.readouterr().err.splitlines()[-1]
        assert not (tmp_path / "x").exists()
    # a run started from scratch has its own latent space: --init-from does not continue it
    (tmp_path / "y").mkdir()
    (tmp_path / "y" / "args_all.json").write_text(json.dumps({"vae_factor": 2, "unet_arch": "v5", "init_from": None}))
    with pytest.raises(SystemExit):
        pretrain.main(["--out", str(tmp_path / "y"), "--init-from", str(model)])
    assert "holds a run started without --init-from" in capsys.readouterr().err.splitlines()[-1]
    assert [f.name for f in (tmp_path / "y").iterdir()] == ["args_all.json"]


def test_vae_from_trains_a_new_unet_in_an_exported_models_latent_space(tmp_path, capsys):
    # `--vae-from`: a recipe that changes only stage 2 (v6's wider UNet) takes an exported model's VAE in place of
    # stages 1-1e, and trains its UNet and text encoder from a random init, not from the model's
    import json
    from importlib import resources
    from pathlib import Path

    from safetensors.torch import load_file

    from nanobooth.toy.recipes import pretrain

    model = Path(str(resources.files("nanobooth"))) / "assets" / "toy_model"
    if not (model / "model_index.json").is_file():
        pytest.skip("the pretrained toy model is not in this build")
    out = tmp_path / "v6"
    flags = ["--recipe", "v6", "--out", str(out), "--n-images", "20", "--n-plain", "4", "--n-patterned", "8",
             "--unet-batch", "2", "--seed", "3"]
    assert pretrain.main(flags + ["--vae-from", str(model), "--unet-steps", "1", "--lr", "0"]) == 0
    vae, exported = (load_file(str(d / "diffusion_pytorch_model.safetensors")) for d in (out / "vae_centred", model / "vae"))
    assert all(torch.equal(vae[k], v.float()) for k, v in exported.items())
    assert not any((out / d).exists() for d in ("vae", "vae_refined", "vae_ckpt"))  # no autoencoder stage ran
    assert json.loads((out / "unet_ckpt" / "unet_config.json").read_text())["block_out_channels"] == [64, 96, 160, 192]
    # lr 0: the checkpoint holds stage 2's own random init (seeded as a run from scratch), not the model's weights
    torch.manual_seed(3 + 1)
    unet, te = pretrain.make_unet("v6"), pretrain.make_text_encoder()
    ck = {name: load_file(str(out / "unet_ckpt" / f"{name}.safetensors")) for name in ("unet", "text_encoder")}
    for name, fresh in (("unet", unet), ("text_encoder", te)):
        assert ck[name].keys() == fresh.state_dict().keys()
        assert all(torch.equal(ck[name][k], v) for k, v in fresh.state_dict().items())
    ck_te = ck["text_encoder"]
    exported_te = load_file(str(model / "text_encoder" / "model.safetensors"))
    pos = next(k for k in ck_te if k.endswith("position_embedding.weight"))
    assert not torch.equal(ck_te[pos], next(v.float() for k, v in exported_te.items() if k.endswith("position_embedding.weight")))
    (line,) = json.loads((out / "history.json").read_text())
    assert f"stages 1-1e skipped: the VAE is the exported model {model}'s" in line and "random init" in line
    # a resume without --vae-from continues the run as it was started: no autoencoder stage, stage 2 from its checkpoint
    assert pretrain.main(flags + ["--unet-steps", "2", "--lr", "1e-3"]) == 0
    assert json.loads((out / "unet_ckpt" / "state.json").read_text())["step"] == 2
    assert not any((out / d).exists() for d in ("vae", "vae_refined", "vae_ckpt"))
    # refused before anything runs, in one line
    (tmp_path / "novae").mkdir()
    for bad, says in ((["--vae-from", str(tmp_path / "nothing")], "no such folder"),
                      (["--vae-from", str(tmp_path / "novae")], "(needs vae/)"),
                      (["--vae-from", str(model), "--init-from", str(model)], "pass one of them"),
                      (["--vae-from", str(model), "--vae-factor", "4"], "drop --vae-factor"),
                      (["--vae-from", str(model), "--stage", "decoder"], "drop --stage")):
        with pytest.raises(SystemExit) as e:
            pretrain.main(["--recipe", "v6", "--out", str(tmp_path / "x")] + bad)
        assert e.value.code == 2 and says in capsys.readouterr().err.splitlines()[-1]
        assert not (tmp_path / "x").exists()
    # a run started from scratch made its own latent space: --vae-from does not swap another one in
    (tmp_path / "y").mkdir()
    (tmp_path / "y" / "args_all.json").write_text(json.dumps({"vae_factor": 2, "unet_arch": "v6", "vae_from": None}))
    with pytest.raises(SystemExit):
        pretrain.main(["--recipe", "v6", "--out", str(tmp_path / "y"), "--vae-from", str(model)])
    assert "holds a run started without --vae-from" in capsys.readouterr().err.splitlines()[-1]
