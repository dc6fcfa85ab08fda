import pytest
import torch
from diffusers import DDPMScheduler

from nanobooth.core.losses import dreambooth_loss
from nanobooth.families.objective import DDPMObjective


def sched(kind="epsilon"):
    return DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, prediction_type=kind)


def test_prior_loss_splits_along_batch_not_channels():
    # Two instance rows with error 1 everywhere, two class rows with error 0.
    target = torch.zeros(4, 4, 8, 8)
    pred = torch.zeros(4, 4, 8, 8)
    pred[:2] = 1.0
    loss, inst, prior = dreambooth_loss(pred, target, n_instance=2, prior_loss_weight=0.5)
    assert inst.item() == 1.0 and prior.item() == 0.0  # a channel split (mmagic) gives 0.5 and 0.5
    assert loss.item() == 1.0
    pred2 = torch.zeros(4, 4, 8, 8)
    pred2[2:] = 2.0
    loss2, inst2, prior2 = dreambooth_loss(pred2, target, n_instance=2, prior_loss_weight=0.5)
    assert inst2.item() == 0.0 and prior2.item() == 4.0 and loss2.item() == 2.0


def test_without_prior_the_loss_is_plain_mse():
    pred, target = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    loss, inst, prior = dreambooth_loss(pred, target, n_instance=3)
    assert prior is None and torch.allclose(loss, torch.nn.functional.mse_loss(pred, target))


def test_min_snr_weights_each_half_by_its_own_timesteps():
    w = DDPMObjective(sched()).weights
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(4, 4, 8, 8, generator=g), torch.randn(4, 4, 8, 8, generator=g)
    t = torch.tensor([5, 900, 50, 700])
    loss, inst, prior = dreambooth_loss(pred, target, 2, 1.0, w(t, 5.0))
    _, inst_alone, _ = dreambooth_loss(pred[:2], target[:2], 2, 1.0, w(t[:2], 5.0))
    _, prior_alone, _ = dreambooth_loss(pred[2:], target[2:], 2, 1.0, w(t[2:], 5.0))
    assert torch.allclose(inst, inst_alone) and torch.allclose(prior, prior_alone)
    # changing the class timesteps must not change the instance half's weighting (no batch-wide SNR)
    _, inst_b, prior_b = dreambooth_loss(pred, target, 2, 1.0, w(torch.tensor([5, 900, 999, 1]), 5.0))
    assert torch.equal(inst, inst_b) and not torch.allclose(prior, prior_b)
    # and the prior half is weighted at all
    _, _, prior_unweighted = dreambooth_loss(pred, target, 2, 1.0)
    assert not torch.allclose(prior, prior_unweighted)


# --- masked_loss ------------------------------------------------------------------------------------------------

def test_masked_loss_is_the_hand_computed_weighted_mse_and_the_prior_half_is_unmasked():
    # one instance row, one class row; C=1, 2x2 latents
    pred = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]], [[[1.0, 1.0], [1.0, 1.0]]]])
    target = torch.zeros_like(pred)
    mask = torch.tensor([[[[1.0, 0.0], [0.5, 0.0]]]])  # (n_instance, 1, h, w)
    loss, inst, prior = dreambooth_loss(pred, target, n_instance=1, prior_loss_weight=0.5, mask=mask)
    # clamp(mask, 0, 1) * se, averaged over all 4 pixels: (1*1 + 0*4 + 0.5*9 + 0*16) / 4
    assert inst.item() == pytest.approx((1 + 4.5) / 4)
    assert prior.item() == 1.0  # the class row: plain MSE whatever the mask
    assert loss.item() == pytest.approx((1 + 4.5) / 4 + 0.5)
    # unmasked_weight floors the weight: (1*1 + 0.2*4 + 0.5*9 + 0.2*16) / 4
    _, inst2, _ = dreambooth_loss(pred, target, 1, mask=mask, unmasked_weight=0.2)
    assert inst2.item() == pytest.approx((1 + 0.8 + 4.5 + 3.2) / 4)
    # an all-ones mask is the unmasked loss
    _, inst3, _ = dreambooth_loss(pred, target, 1, mask=torch.ones(1, 1, 2, 2))
    assert inst3.item() == dreambooth_loss(pred, target, 1)[1].item()


def test_pixels_outside_the_mask_get_no_gradient_with_floor_zero():
    pred = torch.randn(2, 4, 8, 8, requires_grad=True)
    target = torch.randn(2, 4, 8, 8)
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., 2:5, 3:7] = 1.0
    loss, _, _ = dreambooth_loss(pred, target, 1, mask=mask, weights=torch.tensor([2.0, 0.5]))
    loss.backward()
    g = pred.grad
    outside = (mask[0, 0] == 0).expand(4, 8, 8)
    assert torch.all(g[0][outside] == 0) and torch.all(g[0][~outside] != 0)
    assert torch.all(g[1] != 0)  # the class row trains everywhere
    pred.grad = None
    dreambooth_loss(pred, target, 1, mask=mask, unmasked_weight=0.1)[0].backward()
    assert torch.all(pred.grad[0][outside] != 0)
