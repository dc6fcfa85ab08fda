"""The console line before the first step (core/run_summary.py)."""

import torch

from nanobooth.core.config import TrainConfig
from nanobooth.core.run_summary import run_summary


def test_summary_names_what_trains_and_each_regulariser_the_config_sets():
    unet = torch.nn.Linear(200, 100)  # 20100 trainable parameters
    groups = [{"lr": 2e-3}, {"lr": 1e-3}]
    plain = run_summary({"unet": unet}, groups, TrainConfig(method="lora"), denoiser_name="transformer")
    assert plain == "training transformer (0.02M parameters) with LoRA; lr 2.0e-03 / 1.0e-03"
    cfg = TrainConfig(method="lora", with_prior_preservation=True, prior_loss_weight=0.5, num_class_images=50,
                      use_ema=True, min_timestep=200)
    line = run_summary({"unet": unet}, groups, cfg)
    assert line.startswith("training unet (0.02M parameters) with LoRA; lr 2.0e-03 / 1.0e-03; EMA of the weights")
    assert line.endswith("; prior preservation (weight 0.5, 50 class images); timesteps 200 to the last")
    assert run_summary({"unet": unet}, groups, TrainConfig(max_timestep=700)).endswith("; timesteps 0 to 699")
    later = TrainConfig(timestep_bias_strategy="later", timestep_bias_multiplier=2, timestep_bias_portion=0.6)
    assert run_summary({"unet": unet}, groups, later).endswith("; timesteps the later 60% drawn 2x as often")
    later.min_timestep = 200  # the portion is then of the trained span, and the line says so
    assert run_summary({"unet": unet}, groups, later).endswith("; timesteps 200 to the last; the later 60% of them drawn 2x as often")
    rng = TrainConfig(timestep_bias_strategy="range", timestep_bias_multiplier=3, timestep_bias_begin=100, timestep_bias_end=400)
    assert run_summary({"unet": unet}, groups, rng).endswith("; timesteps 100 to 399 drawn 3x as often")
    # newcomer50: "lr 2.0e-03 / 1.0e-03 / 1.0e-03" did not say which rate was whose; named groups (Method.param_groups)
    # are labelled, the denoiser by the family's name
    named = [{"lr": 2e-3, "name": "unet"}, {"lr": 1e-3, "name": "text_encoder"}, {"lr": 5e-4, "name": "text_encoder_ti"}]
    assert run_summary({"unet": unet}, named, TrainConfig(method="lora"), denoiser_name="transformer") == \
        "training transformer (0.02M parameters) with LoRA; lr transformer 2.0e-03, text encoder 1.0e-03, new tokens 5.0e-04"
    pairs = [{"lr": 2e-3, "name": "unet"}, {"lr": 8e-3, "name": "unet"}]  # LoRA+'s A and B groups
    assert "; lr unet 2.0e-03 / 8.0e-03; LoRA+" in run_summary({"unet": unet}, pairs, TrainConfig(method="lora", loraplus_lr_ratio=4))
    plus = run_summary({"unet": unet}, [{"lr": 2e-3}, {"lr": 8e-3}], TrainConfig(method="lora", loraplus_lr_ratio=4))
    assert plus == "training unet (0.02M parameters) with LoRA; lr 2.0e-03 / 8.0e-03; LoRA+ (B matrices at 4x)"


def test_summary_says_what_the_identifiers_new_tokens_are_and_for_how_long():
    """newcomer51: toy/dreambooth's pivotal tuning printed as "text_encoder (512 parameters)", with nothing on the new
    tokens, their start or how long they train (its rows train all the steps, the other variants' the first half)."""
    rows = torch.nn.Linear(128, 4, bias=False)  # 512 trainable parameters, as four new rows of a 128-wide table
    unet = torch.nn.Linear(200, 100)
    groups = [{"lr": 1e-4, "name": "unet"}, {"lr": 1e-3, "name": "text_encoder_ti"}]
    words = dict(instance_prompt="a photo of a sks ball", class_prompt="a photo of a ball", train_text_encoder_ti=True,
                 num_new_tokens_per_abstraction=4, initializer_concept="yellow white striped spot")
    alone = run_summary({"unet": unet, "text_encoder": rows}, groups, TrainConfig(method="full", train_text_encoder_ti_frac=1.0, **words))
    assert alone.startswith("training unet (0.02M parameters), text_encoder's new tokens (512 parameters) as a full fine-tune; lr unet 1.0e-04, new tokens 1.0e-03; ")
    assert "; 'sks' becomes <s0><s1><s2><s3> in every prompt, new tokens started from 'yellow white striped spot' and trained all the steps" in alone
    half = run_summary({"unet": unet, "text_encoder": rows}, groups, TrainConfig(method="lora", train_text_encoder=True, **words))
    assert "text_encoder (512 parameters)" in half and "trained the first 50% of the steps" in half  # the encoder trains too
    ti = run_summary({"text_encoder": rows}, [{"lr": 5e-2, "name": "text_encoder_ti"}],
                     TrainConfig(method="textual_inversion", instance_prompt="a photo of a sks ball",
                                 class_prompt="a photo of a ball", num_new_tokens_per_abstraction=1))
    assert ti.endswith("; 'sks' becomes <s0> in every prompt, new tokens started from the class noun "
                       "(initializer_concept=\"a few words of its look\" binds the subject sooner) and trained all the steps")
    one = run_summary({"text_encoder": rows}, [{"lr": 5e-2, "name": "text_encoder_ti"}],
                      TrainConfig(method="textual_inversion", instance_prompt="a photo of a sks ball", class_prompt="a photo of a ball",
                                  num_new_tokens_per_abstraction=1, initializer_concept="blue red dotted eye"))
    assert "new tokens started from 'blue red dotted eye' (its first 1 token, one a new token)" in one  # newcomer55
    assert "its first" not in alone  # four tokens, four words: every word starts one
    assert "ball" not in run_summary({"unet": unet}, groups, TrainConfig(method="full", **{**words, "train_text_encoder_ti": False}))
