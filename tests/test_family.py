"""The family contract (family.Family), checked the same way on every family's tiny model.

The formulas are written out by hand from the model's own scheduler config (betas), not taken from
diffusers' scheduler methods, so a family that trained on another noise schedule, target or weighting
than its model samples with fails here.
"""

import pytest
import torch

from nanobooth.core.config import TrainConfig
from nanobooth.families import FAMILIES, SD, SDXL, Family, cond_batch
from nanobooth.families.flux import Flux
from nanobooth.families.sd3 import SD3
from nanobooth.core.models import load_components

FAMILY_MODELS = {"sd": (SD, "tiny_model"), "sdxl": (SDXL, "tiny_sdxl_model"), "sd3": (SD3, "tiny_sd3_model"),
                 "flux": (Flux, "tiny_flux_model")}
DDPM_FAMILIES = ["sd", "sdxl"]
FLOW_FAMILIES = ["sd3", "flux"]


def test_every_family_is_checked_here():
    assert {type(f) for f in FAMILIES.values()} == {cls for cls, _ in FAMILY_MODELS.values()}
    assert all(isinstance(f, Family) for f in FAMILIES.values())


def alphas_cumprod_by_hand(config) -> torch.Tensor:
    assert config["beta_schedule"] == "scaled_linear"  # what the tiny models (and SD/SDXL) use
    betas = torch.linspace(config["beta_start"] ** 0.5, config["beta_end"] ** 0.5, config["num_train_timesteps"],
                           dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, 0)


def test_every_family_has_an_objective_test():
    assert sorted(DDPM_FAMILIES + FLOW_FAMILIES) == sorted(FAMILY_MODELS)


@pytest.mark.parametrize("name", DDPM_FAMILIES)
def test_family_contract(name, request):
    cls, fixture = FAMILY_MODELS[name]
    c = load_components(str(request.getfixturevalue(fixture)))
    fam, config = c.family, c.scheduler.config
    assert type(fam) is cls

    # latents: a VAE posterior sample, scaled; no shift_factor in these configs, so exactly z * scale
    pixels = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        z = c.vae.encode(pixels).latent_dist.sample(torch.Generator().manual_seed(1))
    assert c.vae.config.get("shift_factor") is None
    latents = fam.latents_from_vae(z, c.vae.config)
    assert torch.equal(latents, z * c.vae.config.scaling_factor)
    B, C, h, w = shape = latents.shape
    assert (C, h, w) == (c.unet.config.in_channels, 16, 16)

    # the training scheduler is DDPM over the model's own betas and timesteps
    assert type(c.noise_scheduler).__name__ == "DDPMScheduler"
    ab = alphas_cumprod_by_hand(config)
    assert torch.allclose(c.noise_scheduler.alphas_cumprod.double(), ab, rtol=1e-6)

    for kind in ("epsilon", "v_prediction"):
        obj = fam.objective(fam.training_scheduler({**config, "prediction_type": kind}))
        # sample: noise, then the noise offset, then timesteps, from the one generator, for the whole batch
        noise, t = obj.sample(shape, torch.Generator().manual_seed(2), noise_offset=0.1)
        g = torch.Generator().manual_seed(2)
        n_hand = torch.randn(shape, generator=g)
        n_hand += 0.1 * torch.randn((B, C, 1, 1), generator=g)
        assert torch.equal(noise, n_hand)
        assert torch.equal(t, torch.randint(0, config["num_train_timesteps"], (B,), generator=g))
        assert t.dtype == torch.int64

        # noisy input and target at chosen timesteps, one near each end of the schedule
        t = torch.tensor([1, 500, 999])
        a, s = (ab[t] ** 0.5).float().view(-1, 1, 1, 1), ((1 - ab[t]) ** 0.5).float().view(-1, 1, 1, 1)
        noisy = obj.noisy(latents, noise, t)
        assert noisy.shape == shape and torch.allclose(noisy, a * latents + s * noise, atol=1e-5)
        target = obj.target(latents, noise, t)
        by_hand = noise if kind == "epsilon" else a * noise - s * latents
        assert target.shape == shape and torch.allclose(target, by_hand, atol=1e-5)

        # per-example min-SNR-5: min(snr, 5) / snr for epsilon, / (snr + 1) for v; none without snr_gamma
        snr = ab[t] / (1 - ab[t])
        w = obj.weights(t, 5.0)
        assert w.shape == (B,) and w.dtype == torch.float32
        by_hand = torch.clamp(snr, max=5.0) / (snr if kind == "epsilon" else snr + 1)
        assert torch.allclose(w.double(), by_hand, rtol=1e-5)
        if kind == "epsilon":  # the low-noise end is down-weighted, the high-noise end (snr < 5) is not
            assert w[0] < 0.01 and w[2] == 1.0
        assert obj.weights(t, None) is None and obj.weights(t, 0) is None

    with pytest.raises(ValueError, match="prediction_type 'sample'"):
        fam.objective(fam.training_scheduler({**config, "prediction_type": "sample"})).target(latents, noise, t)

    # the denoiser's call: noisy latents, timesteps and the family's conditioning in; a prediction of their shape out
    ids = fam.tokenize(c.tokenizers, "a photo of a dog", "cpu")
    with torch.no_grad():
        cond = cond_batch([fam.encode(c.text_encoders, ids, 32)], [B])
        cond = fam.micro_conditioning(cond, torch.tensor([[32, 32, 0, 0]] * B), 32)
        pred = fam.denoise(c.unet, noisy, t, cond)
    assert pred.shape == shape and torch.isfinite(pred).all()

    # a VAE with a shift (FLUX's values): (z - shift) * scale, and the pipelines' decode (/ scale + shift) inverts it
    shifted = {**c.vae.config, "scaling_factor": 0.3611, "shift_factor": 0.1159}
    lat = fam.latents_from_vae(z, shifted)
    assert torch.allclose(lat, (z - 0.1159) * 0.3611)
    assert torch.allclose(lat / 0.3611 + 0.1159, z, atol=1e-6)


def flow_sigmas_by_hand(config) -> torch.Tensor:
    """The flow-matching schedule: s_i = (T - i) / T for i = 0..T-1, shifted to shift s / (1 + (shift - 1) s);
    unshifted where the sampler shifts by resolution (FLUX: use_dynamic_shifting, as the reference script trains)."""
    T, shift = config["num_train_timesteps"], 1.0 if config["use_dynamic_shifting"] else config["shift"]
    s = torch.arange(T, 0, -1, dtype=torch.float64) / T
    return shift * s / (1 + (shift - 1) * s)


@pytest.mark.parametrize("name", FLOW_FAMILIES)
def test_flow_family_contract(name, request):
    cls, fixture = FAMILY_MODELS[name]
    c = load_components(str(request.getfixturevalue(fixture)))
    fam, config = c.family, c.scheduler.config
    assert type(fam) is cls

    # latents: (z - shift_factor) * scaling_factor, both from the VAE's config (the real model's values in the tiny VAE)
    pixels = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        z = c.vae.encode(pixels).latent_dist.sample(torch.Generator().manual_seed(1))
    scale, shift = {"sd3": (1.5305, 0.0609), "flux": (0.3611, 0.1159)}[name]
    assert (c.vae.config.scaling_factor, c.vae.config.shift_factor) == (scale, shift)
    latents = fam.latents_from_vae(z, c.vae.config)
    assert torch.equal(latents, (z - shift) * scale)
    B, C, h, w = shape = latents.shape
    assert (C, h, w) == (16, 16, 16)  # FLUX's transformer packs them 2x2 into its 64 in_channels

    # the training scheduler is the model's own flow-matching schedule, shift included
    assert type(c.noise_scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
    by_hand = flow_sigmas_by_hand(config)
    assert torch.allclose(c.noise_scheduler.sigmas.double(), by_hand, atol=1e-6)

    cfg = TrainConfig(weighting_scheme="cosmap", precondition_outputs=False)
    obj = fam.objective(fam.training_scheduler(config), cfg)
    noise, t = obj.sample(shape, torch.Generator().manual_seed(2), noise_offset=0.1)
    g = torch.Generator().manual_seed(2)
    n_hand = torch.randn(shape, generator=g)
    n_hand += 0.1 * torch.randn((B, C, 1, 1), generator=g)
    assert torch.equal(noise, n_hand)
    idx = (torch.rand(B, generator=g) * 1000).long()  # cosmap draws uniformly
    assert torch.allclose(t.double(), by_hand[idx] * 1000, atol=1e-3)

    # noisy input, velocity target and cosmap weights at one index near each end and one in the middle
    idx = torch.tensor([0, 500, 999])
    t = c.noise_scheduler.timesteps[idx]
    s = by_hand[idx].float().view(-1, 1, 1, 1)
    noisy = obj.noisy(latents, noise, t)
    assert noisy.shape == shape and torch.allclose(noisy, (1 - s) * latents + s * noise, atol=1e-5)
    assert torch.equal(obj.target(latents, noise, t), noise - latents)
    s = s.flatten().double()
    assert torch.allclose(obj.weights(t, None).double(), 2 / (torch.pi * (1 - 2 * s + 2 * s ** 2)), rtol=1e-5)
    # preconditioned (the SD3 variants): the s^2 factor of comparing noisy - s * pred with x0
    pre = fam.objective(fam.training_scheduler(config), TrainConfig(weighting_scheme="none", precondition_outputs=True))
    assert torch.allclose(pre.weights(t, None).double(), s ** 2, rtol=1e-5)

    # the denoiser's call: noisy latents, timesteps s * T and the family's conditioning in; a prediction of their shape out
    ids = fam.tokenize(c.tokenizers, "a photo of a dog", "cpu")
    with torch.no_grad():
        cond = cond_batch([fam.encode(c.text_encoders, ids, 32)], [B])
        cond = fam.micro_conditioning(cond, torch.tensor([[32, 32, 0, 0]] * B), 32)
        pred = fam.denoise(c.unet, noisy, t, cond)
    assert pred.shape == shape and torch.isfinite(pred).all()


@pytest.mark.parametrize("name", ["sd", "sd3"])
def test_timestep_span_min_and_max_timestep(name):
    # kohya's min_timestep/max_timestep: DDPM families draw uniformly from the span and nowhere else; an empty or
    # out-of-range span, and any span on a flow-matching family, is refused naming the keys
    from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler

    from nanobooth.core.config import ConfigError

    fam = FAMILY_MODELS[name][0]()
    if name == "sd3":
        sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
        with pytest.raises(ConfigError, match="min_timestep'/'max_timestep'.*logit_mean"):
            fam.objective(sched, TrainConfig(max_timestep=700))
        return
    sched = DDPMScheduler(num_train_timesteps=1000)
    _, t = fam.objective(sched, TrainConfig(min_timestep=200, max_timestep=700)).sample((4000, 1, 1, 1), torch.Generator().manual_seed(0))
    assert int(t.min()) == 200 and int(t.max()) == 699 and len(t.unique()) == 500
    _, t = fam.objective(sched, TrainConfig()).sample((4000, 1, 1, 1), torch.Generator().manual_seed(0))
    assert int(t.min()) < 5 and int(t.max()) > 995
    # past the model's T: refused when the model is known (before the run folder is written)
    with pytest.raises(ConfigError, match="'min_timestep'/'max_timestep'.*0 <= min_timestep < max_timestep <= 1000"):
        fam.objective(sched, TrainConfig(max_timestep=1001))
    for lo, hi in ((700, 700), (-1, None)):  # empty spans: refused with the config
        with pytest.raises(ConfigError, match="'min_timestep'/'max_timestep'.*empty span"):
            TrainConfig(min_timestep=lo, max_timestep=hi)


@pytest.mark.parametrize("name", DDPM_FAMILIES)
def test_a_ddpm_family_refuses_the_flow_matching_weighting_keys(name):
    # session 56: weighting_scheme=logit_normal on SD trained uniform timesteps without a word (the flow families refuse
    # snr_gamma the other way round); the message names every flow key set
    from diffusers import DDPMScheduler

    from nanobooth.core.config import ConfigError

    fam, sched = FAMILY_MODELS[name][0](), DDPMScheduler(num_train_timesteps=1000)
    with pytest.raises(ConfigError, match="'weighting_scheme': weighting_scheme=logit_normal is for flow-matching models"):
        fam.objective(sched, TrainConfig(weighting_scheme="logit_normal"))
    with pytest.raises(ConfigError, match="'precondition_outputs': precondition_outputs=true and resolution_shift=true are for"):
        fam.objective(sched, TrainConfig(precondition_outputs=True, resolution_shift=True))
    fam.objective(sched, TrainConfig(snr_gamma=5.0))  # its own weighting still builds


@pytest.mark.parametrize("name", ["sd", "sdxl", "flux"])
def test_timestep_bias_draws_the_biased_timesteps_multiplier_times_as_often(name):
    # diffusers' SDXL script's timestep_bias_*: through the family's objective (what the train loop calls), within
    # kohya's span; "none" keeps the uniform draws bit for bit; flow-matching families refuse it naming the key
    from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler

    from nanobooth.core.config import ConfigError

    fam = FAMILY_MODELS[name][0]()
    if name == "flux":
        with pytest.raises(ConfigError, match="'timestep_bias_strategy'.*logit_mean"):
            fam.objective(FlowMatchEulerDiscreteScheduler(shift=3.0), TrainConfig(timestep_bias_strategy="later", timestep_bias_multiplier=2))
        return
    sched = DDPMScheduler(num_train_timesteps=1000)
    draw = lambda **kw: fam.objective(sched, TrainConfig(**kw)).sample((40000, 1, 1, 1), torch.Generator().manual_seed(0))[1]
    t = draw(timestep_bias_strategy="later", timestep_bias_multiplier=3, timestep_bias_portion=0.4, min_timestep=200)
    assert int(t.min()) == 200 and int(t.max()) == 999
    # the portion is of the trained span 200..999: 320 timesteps (680..999) at weight 3 against 480 at 1, so two thirds
    # of the draws are 680 and up, and the 480 below share the rest evenly
    assert abs(float((t >= 680).float().mean()) - 2 / 3) < 0.01
    assert abs(float((t < 440).float().mean()) - 1 / 6) < 0.01
    t = draw(timestep_bias_strategy="later", timestep_bias_multiplier=2, max_timestep=500)
    assert int(t.max()) == 499 and abs(float((t >= 375).float().mean()) - 0.4) < 0.01  # later 25% of 0..499: 250 of 625
    t = draw(timestep_bias_strategy="earlier", timestep_bias_multiplier=0.5, timestep_bias_portion=0.5)
    assert abs(float((t < 500).float().mean()) - 1 / 3) < 0.01  # below 1: drawn less often
    t = draw(timestep_bias_strategy="range", timestep_bias_multiplier=9, timestep_bias_begin=100, timestep_bias_end=200)
    assert abs(float(((t >= 100) & (t < 200)).float().mean()) - 0.5) < 0.01  # 100 at 9 against 900 at 1
    uniform = draw(min_timestep=200)
    assert torch.equal(uniform, draw(min_timestep=200, timestep_bias_strategy="none", timestep_bias_multiplier=3))
    for bad, key in ((dict(timestep_bias_multiplier=0), "'timestep_bias_multiplier'"), (dict(timestep_bias_multiplier=1), "biases nothing"),
                     (dict(timestep_bias_multiplier=float("inf")), "'timestep_bias_multiplier': must be a finite number"),
                     (dict(timestep_bias_portion=1.5), "'timestep_bias_portion'"),
                     (dict(timestep_bias_strategy="range", timestep_bias_begin=-100, timestep_bias_end=100), "'timestep_bias_begin': must be >= 0"),
                     (dict(timestep_bias_strategy="range", timestep_bias_begin=500, timestep_bias_end=500), "empty span")):
        with pytest.raises(ConfigError, match=key):
            TrainConfig(**{"timestep_bias_strategy": "later", "timestep_bias_multiplier": 2, **bad})
    # a range is read against the model's timesteps and kohya's span, which the objective knows: outside it, or all of
    # it (the defaults 0..1000), would bias nothing
    for span, (begin, end), why in (({"min_timestep": 200}, (0, 100), "reaches outside the trained timesteps 200..1000"),
                                    ({"max_timestep": 500}, (400, 600), "reaches outside the trained timesteps 0..500"),
                                    ({}, (900, 1200), "reaches outside"), ({}, (0, 1000), "is the whole trained span")):
        with pytest.raises(ConfigError, match=f"'timestep_bias_begin'/'timestep_bias_end': {begin}..{end} {why}"):
            draw(timestep_bias_strategy="range", timestep_bias_multiplier=3, timestep_bias_begin=begin, timestep_bias_end=end, **span)
    with pytest.raises(ConfigError, match=r"'timestep_bias_portion': 0.01 of the 20 trained timesteps \(200..220\) is none of them"):
        draw(timestep_bias_strategy="later", timestep_bias_multiplier=3, timestep_bias_portion=0.01, min_timestep=200, max_timestep=220)
    with pytest.raises(ConfigError, match="'timestep_bias_portion': must be in"):
        TrainConfig(timestep_bias_strategy="later", timestep_bias_multiplier=3, timestep_bias_portion=1.0)
