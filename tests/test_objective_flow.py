"""FlowMatchObjective (objective.py): noise levels, noisy input, target and loss weights, by hand and
against diffusers' training_utils and the reference SD3 script's steps under the same generator."""

import math

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3

from nanobooth.families.objective import FlowMatchObjective, time_shift

SHAPE = (4, 16, 8, 8)


def sched(**kw):
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, **kw)


def sigma_by_hand(index: torch.Tensor, shift: float = 3.0) -> torch.Tensor:
    """The scheduler's sigma at index i: s = (T - i) / T, shifted to shift s / (1 + (shift - 1) s)."""
    s = (1000 - index).double() / 1000
    return shift * s / (1 + (shift - 1) * s)


@pytest.mark.parametrize("scheme", ["none", "sigma_sqrt", "cosmap", "logit_normal", "mode"])
def test_sample_matches_the_sd3_script(scheme):
    """noise first, then u from diffusers' density, index u * T, timesteps and sigmas from the scheduler."""
    obj = FlowMatchObjective(sched(), scheme, logit_mean=0.3, logit_std=1.2, mode_scale=1.29)
    noise, t = obj.sample(SHAPE, torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)
    assert torch.equal(noise, torch.randn(SHAPE, generator=g))
    u = compute_density_for_timestep_sampling(scheme, SHAPE[0], logit_mean=0.3, logit_std=1.2, mode_scale=1.29, generator=g)
    ref = sched()
    idx = (u * 1000).long()
    assert torch.equal(t, ref.timesteps[idx]) and t.dtype == torch.float32
    assert torch.equal(obj.sigmas(t), ref.sigmas[idx])  # looked up, as the script's get_sigmas
    assert torch.allclose(obj.sigmas(t).double(), sigma_by_hand(idx), atol=1e-6)


def test_density_by_hand():
    """logit_normal: sigmoid of a normal draw; mode: 1 - u - scale (cos^2(pi u / 2) - 1 + u); uniform: u."""
    g = torch.Generator().manual_seed(0)
    u = torch.rand(5, generator=torch.Generator().manual_seed(0))
    assert torch.equal(FlowMatchObjective(sched(), "none").density(5, g), u)
    mode = FlowMatchObjective(sched(), "mode", mode_scale=1.29).density(5, torch.Generator().manual_seed(0))
    assert torch.allclose(mode, 1 - u - 1.29 * (torch.cos(math.pi * u / 2) ** 2 - 1 + u))
    # mode_scale 0 is uniform mirrored; at u = 0.5 any scale leaves 0.5 (cos^2(pi/4) - 1 + 0.5 = 0)
    assert torch.allclose(FlowMatchObjective(sched(), "mode", mode_scale=0.0).density(5, torch.Generator().manual_seed(0)), 1 - u)
    z = torch.randn(5, generator=torch.Generator().manual_seed(0))
    ln = FlowMatchObjective(sched(), "logit_normal", logit_mean=0.5, logit_std=2.0).density(5, torch.Generator().manual_seed(0))
    assert torch.allclose(ln, 1 / (1 + torch.exp(-(0.5 + 2.0 * z))), atol=1e-6)


def test_noisy_and_target_by_hand():
    obj = FlowMatchObjective(sched(), "none")
    ref = sched()
    t = ref.timesteps[torch.tensor([0, 500, 999])]  # s = 1, 0.75 (3 * 0.5 / 2), 0.003 (3 * 0.001 / 1.002)
    x0, eps = torch.randn(3, 16, 4, 4), torch.randn(3, 16, 4, 4)
    s = torch.tensor([1.0, 0.75, 0.003 / 1.002]).view(-1, 1, 1, 1)
    assert torch.allclose(obj.noisy(x0, eps, t), (1 - s) * x0 + s * eps, atol=1e-6)
    assert torch.equal(obj.noisy(x0, eps, t)[0], eps[0])  # s = 1: pure noise
    assert torch.equal(obj.target(x0, eps, t), eps - x0)


def test_weights_by_hand_and_as_diffusers():
    ref = sched()
    idx = torch.tensor([0, 500, 900])
    t, s = ref.timesteps[idx], ref.sigmas[idx]
    assert FlowMatchObjective(sched(), "none").weights(t, None) is None  # all ones: a plain mean
    assert FlowMatchObjective(sched(), "logit_normal").weights(t, None) is None
    w = FlowMatchObjective(sched(), "sigma_sqrt").weights(t, None)
    assert torch.allclose(w, torch.tensor([1.0, 1 / 0.75 ** 2, 1 / (0.3 / 1.2) ** 2]), rtol=1e-5)  # s^-2
    assert torch.allclose(w, compute_loss_weighting_for_sd3("sigma_sqrt", s))
    w = FlowMatchObjective(sched(), "cosmap").weights(t, None)
    assert torch.allclose(w[0], torch.tensor(2 / math.pi))  # s = 1: 2 / (pi (1 - 2 + 2))
    assert torch.allclose(w[1], torch.tensor(2 / (math.pi * (1 - 1.5 + 2 * 0.5625))))
    assert torch.allclose(w, compute_loss_weighting_for_sd3("cosmap", s))
    assert w.shape == (3,) and w.dtype == torch.float32
    with pytest.raises(ValueError, match="snr_gamma"):
        FlowMatchObjective(sched(), "none").weights(t, 5.0)
    with pytest.raises(ValueError, match="weighting_scheme 'bogus'"):
        FlowMatchObjective(sched(), "bogus")


@pytest.mark.parametrize("scheme", ["none", "sigma_sqrt", "cosmap"])
def test_precondition_outputs_is_the_sd3_scripts_loss(scheme):
    """The script: pred' = pred * (-s) + noisy, target x0, weighting by scheme; here: target eps - x0 and
    weights times s^2. Same per-example loss."""
    obj = FlowMatchObjective(sched(), scheme, precondition_outputs=True)
    noise, t = obj.sample(SHAPE, torch.Generator().manual_seed(3))
    x0, pred = torch.randn(SHAPE), torch.randn(SHAPE)
    noisy = obj.noisy(x0, noise, t)
    s = obj.sigmas(t).view(-1, 1, 1, 1)
    script = (compute_loss_weighting_for_sd3(scheme, s) * (pred * (-s) + noisy - x0) ** 2).flatten(1).mean(1)
    ours = obj.weights(t, None) * ((pred - obj.target(x0, noise, t)) ** 2).flatten(1).mean(1)
    assert torch.allclose(ours, script, rtol=1e-4, atol=1e-6)


def test_resolution_shift_as_flux_dynamic_shifting():
    """mu linear in the 2x2-patch count (256 -> 0.5, 4096 -> 1.15), s = e^mu / (e^mu + 1/u - 1): the
    shift the FLUX pipeline samples with (diffusers' calculate_shift and the scheduler's time_shift)."""
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    s = sched(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15)
    obj = FlowMatchObjective(s, "logit_normal", resolution_shift=True)
    assert obj.mu(256) == pytest.approx(0.5) and obj.mu(4096) == pytest.approx(1.15)
    assert obj.mu(1024) == pytest.approx(0.5 + 0.65 * 768 / 3840) == pytest.approx(calculate_shift(1024))
    assert time_shift(0.0, torch.tensor(0.3)) == pytest.approx(0.3)
    assert float(time_shift(0.63, torch.tensor(0.5))) == pytest.approx(1 / (1 + math.exp(-0.63)))  # sigmoid(mu) at u = 0.5
    shape = (2, 16, 64, 64)  # 32 x 32 patches = 1024 tokens
    noise, t = obj.sample(shape, torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(1)
    torch.randn(shape, generator=g)
    u = torch.sigmoid(torch.randn(2, generator=g))
    mu = calculate_shift(1024)
    by_hand = math.exp(mu) / (math.exp(mu) + 1 / u - 1)
    assert torch.allclose(obj.sigmas(t), by_hand, atol=1e-6)
    assert torch.allclose(obj.sigmas(t), s.time_shift(mu, 1.0, u), atol=1e-6)
    assert (obj.sigmas(t) > u).all()  # mu > 0 moves every draw towards noise


def test_same_generator_same_draws_resume():
    """All randomness comes from the generator passed: a restored generator state redraws the same batch."""
    obj = FlowMatchObjective(sched(), "logit_normal")
    g = torch.Generator().manual_seed(9)
    obj.sample(SHAPE, g)
    state = g.get_state()
    a = obj.sample(SHAPE, g)
    torch.manual_seed(123)  # the global RNG plays no part
    g.set_state(state)
    b = obj.sample(SHAPE, g)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
