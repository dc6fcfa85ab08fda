"""What each training aid buys, measured on the embedded toy model (issue #23's table).

For each held-out subject seed and each arm (a packaged toy variant plus `key=value` overrides), train
through the CLI and score with `nanobooth toy eval`; print one markdown table of the means over subjects
and one row per (arm, subject). Runs already scored are reused, so an interrupted bench resumes.

    python bench/aids_toy.py --out /tmp/aids --seeds 4242 5000 5001 7001
    python bench/aids_toy.py --out /tmp/aids --arms lora-prior dora-prior --seeds 4242
    python bench/aids_toy.py --out /tmp/v5 --model toy_v5_export --arms lora-prior lora full-prior --targets --seeds ...
    python bench/aids_toy.py --out /tmp/v5 ... --eval-sampler model --eval-steps 25   # the same runs, scored at DDIM 25

Every arm shares one class-image folder per subject (same base, class prompt and resolution: the
provenance check allows it), so class images are generated once per subject, not once per arm.
Seconds per run are wall time on whatever the machine is doing: compare arms by the scores only.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import yaml

# arm -> (packaged variant, overrides); every arm keeps the variant's steps, lr and guidance cutoff
ARMS: dict[str, tuple[str, list[str]]] = {
    "lora-prior": ("toy/dreambooth-lora-prior-pre", []),
    # the shipped recipe before session 30 (the UNet's LoRA alone): every row measured before then
    "lora-prior-unet": ("toy/dreambooth-lora-prior-pre", ["train_text_encoder=false"]),
    "lora-prior+ema": ("toy/dreambooth-lora-prior-pre", ["use_ema=true"]),
    # session 46, on v5 (spent subjects): DoRA binds as the recipe's LoRA does, LoHa less, LoKr least (docs/evaluation.md)
    "dora-prior": ("toy/dreambooth-dora-prior-pre", []),
    "lokr-prior": ("toy/dreambooth-lokr-prior-pre", []),
    "loha-prior": ("toy/dreambooth-loha-prior-pre", []),
    "pivotal-prior": ("toy/dreambooth-lora-prior-pre", ["train_text_encoder_ti=true"]),
    "lora": ("toy/dreambooth-lora", []),
    # issue #25: fewer sampler steps for the class images vs the prior they keep (own class folder each)
    "lora-prior-cls10": ("toy/dreambooth-lora-prior-pre", ["class_generation_steps=10"]),
    "lora-prior-cls15": ("toy/dreambooth-lora-prior-pre", ["class_generation_steps=15"]),
    # offset noise in the fine-tune too, as toy recipe v5's stage 2 trained with it (toy/recipes/pretrain.train_unet)
    "lora-prior-offset": ("toy/dreambooth-lora-prior-pre", ["noise_offset=0.1"]),
    "lora-offset": ("toy/dreambooth-lora", ["noise_offset=0.1"]),
    # issue #24's targets: the full fine-tunes, and the FLUX twin's recipes (a family per --out: the first
    # arm scores the base model for all)
    # lr 3e-4, 600 steps since session 28, the EMA of its weights since session 29: full-prior-lr3e4-s600-ema; the
    # text encoder trained too since session 31: full-prior-te; pivotal tuning from the subject's words since session 48:
    # full-prior-ti-words
    "full-prior": ("toy/dreambooth-prior-pre", []),
    "full-prior-lr1e4-s400": ("toy/dreambooth-prior-pre", ["learning_rate=1e-4", "max_train_steps=400",
                              "use_ema=false"]),  # the setting before session 28
    "full": ("toy/dreambooth", []),
    "full-te": ("toy/dreambooth-finetune-text-encoder", []),
    # tuning on toy model v5 (subjects 1-4, not the pre-registered ones): the LoRA twins at twice their lr, the full
    # fine-tune at 2x / 5x its lr (tuned on v4, where it bound slower than LoRA already)
    "lora-prior-lr2e3": ("toy/dreambooth-lora-prior-pre", ["learning_rate=2e-3", "prior_loss_weight=1.0"]),
    "lora-lr2e3": ("toy/dreambooth-lora", ["learning_rate=2e-3"]),
    # LoRA on the resnets' convolutions and the transformer blocks' projections too (kohya's LoCon), at 2e-3: v5's
    # 32x32 level has no attention, so attention-only LoRA leaves where patterns and marks are drawn untouched
    "lora-prior-conv": ("toy/dreambooth-lora-prior-pre", ["learning_rate=2e-3", "lora_target_modules=[to_q, to_k, to_v, "
                        "to_out.0, proj_in, proj_out, ff.net.0.proj, ff.net.2, conv1, conv2]"]),
    # prompt fidelity, the target lora-prior-lr2e3 missed on the step-5959 export (0.906 vs base 1.000): a lower lr, or
    # the prior's loss weighted up
    "lora-prior-lr15e4": ("toy/dreambooth-lora-prior-pre", ["learning_rate=1.5e-3"]),
    "lora-prior-lr2e3-plw2": ("toy/dreambooth-lora-prior-pre", ["learning_rate=2e-3", "prior_loss_weight=2.0"]),
    "full-prior-lr2e4": ("toy/dreambooth-prior-pre", ["learning_rate=2e-4", "use_ema=false"]),
    "full-prior-lr5e4": ("toy/dreambooth-prior-pre", ["learning_rate=5e-4", "use_ema=false"]),
    # on the v5 step-9480 export: prompt fidelity (scenes kept) at fewer steps, and the full fine-tune at an lr between
    "lora-prior-lr2e3-s200": ("toy/dreambooth-lora-prior-pre", ["learning_rate=2e-3", "max_train_steps=200"]),
    "full-prior-lr3e4": ("toy/dreambooth-prior-pre", ["learning_rate=3e-4", "use_ema=false"]),
    # the full fine-tune, which at 3e-4 stayed short of LoRA's identity (0.44 vs 0.69 on subjects 1-4) and at 5e-4
    # lost the scenes (prompt fidelity 0.39): the higher lr for fewer steps, the lower one for more, and a warm-up
    "full-prior-lr5e4-s200": ("toy/dreambooth-prior-pre", ["learning_rate=5e-4", "max_train_steps=200", "use_ema=false"]),
    "full-prior-lr3e4-s600": ("toy/dreambooth-prior-pre", ["learning_rate=3e-4", "max_train_steps=600", "use_ema=false"]),
    # full-prior-lr3e4-s600 came within 0.1 of the LoRA's identity on subjects 1-4: the other full variants there
    "full-lr3e4-s600": ("toy/dreambooth", ["learning_rate=3e-4", "max_train_steps=600"]),
    "full-te-lr3e4-s600": ("toy/dreambooth-finetune-text-encoder", ["learning_rate=3e-4", "max_train_steps=600"]),
    # session 28: the prior variant past 600 steps, and at the LoRA twin's prior weight 0.5
    "full-prior-lr3e4-s900": ("toy/dreambooth-prior-pre", ["learning_rate=3e-4", "max_train_steps=900", "use_ema=false"]),
    "full-prior-plw05-lr3e4-s600": ("toy/dreambooth-prior-pre", ["learning_rate=3e-4", "max_train_steps=600",
                                    "prior_loss_weight=0.5", "use_ema=false"]),
    # the full fine-tune at 3e-4 leaves grain in the backdrops of its samples: an EMA of its weights (decay warmed up,
    # about 0.985 at step 600) averages the last steps' noise out
    "full-prior-lr3e4-s600-ema": ("toy/dreambooth-prior-pre", ["learning_rate=3e-4", "max_train_steps=600", "use_ema=true"]),
    "full-prior-lr5e4-warmup": ("toy/dreambooth-prior-pre", ["learning_rate=5e-4", "lr_scheduler=constant_with_warmup",
                                "lr_warmup_steps=100", "use_ema=false"]),
    # the pre-registered subjects lost scenes to the instance images' plain backdrop (prompt fidelity 0.725 on 9202):
    # LoRA on the cross-attention only, whose keys and values read the prompt (Custom Diffusion, Kumari et al. 2023,
    # tunes just those), not the self-attention that lays out the whole image, backdrop included
    "lora-prior-xattn": ("toy/dreambooth-lora-prior-pre", ["learning_rate=2e-3", "lora_target_modules=[attn2.to_q, "
                         "attn2.to_k, attn2.to_v, attn2.to_out.0]"]),
    "lora-xattn": ("toy/dreambooth-lora", ["learning_rate=2e-3", "lora_target_modules=[attn2.to_q, attn2.to_k, "
                   "attn2.to_v, attn2.to_out.0]"]),
    "lora-prior-xattn-kv": ("toy/dreambooth-lora-prior-pre", ["learning_rate=2e-3", "lora_target_modules=[attn2.to_k, "
                            "attn2.to_v]"]),
    # identity grew from 200 to 300 steps on subjects 1-4 (0.58 -> 0.69): whether it keeps growing, and at what cost in scenes
    "lora-prior-lr2e3-s500": ("toy/dreambooth-lora-prior-pre", ["learning_rate=2e-3", "max_train_steps=500"]),
    # the pre-registered subjects' lost scenes came back as the plain backdrop (9202 "on the beach": 6 of 8), and
    # only with prior preservation: 50 class images, mostly on the plain backdrop or the rug, overfitted? or weighed
    # too much?
    "lora-prior-cls150": ("toy/dreambooth-lora-prior-pre", ["learning_rate=2e-3", "num_class_images=150"]),
    "lora-prior-plw05": ("toy/dreambooth-lora-prior-pre", ["learning_rate=2e-3", "prior_loss_weight=0.5"]),
    # weight 0.5 beat 1.0 on subjects 1-8 and the pre-registered eight: whether less is better still
    "lora-prior-plw035": ("toy/dreambooth-lora-prior-pre", ["learning_rate=2e-3", "prior_loss_weight=0.35"]),
    # on the fresh subjects (session 27) scenes held (0.938 vs base 0.956) and identity fell short (0.451): more steps
    "lora-prior-s400": ("toy/dreambooth-lora-prior-pre", ["max_train_steps=400"]),
    "lora-prior-plw025": ("toy/dreambooth-lora-prior-pre", ["learning_rate=2e-3", "prior_loss_weight=0.25"]),
    # masked loss (kohya's masked_loss) on the toy subjects' exact masks: the lost scenes came back as the instance
    # photos' plain backdrop, which the identifier cannot bind to when the backdrop carries no (or little) loss
    "lora-prior-masked": ("toy/dreambooth-lora-prior-pre", ["masked_loss=true", "unmasked_weight=0.0"]),
    "lora-prior-masked-uw02": ("toy/dreambooth-lora-prior-pre", ["masked_loss=true", "unmasked_weight=0.2"]),
    "lora-prior-masked-uw02-plw025": ("toy/dreambooth-lora-prior-pre", ["masked_loss=true", "unmasked_weight=0.2",
                                      "prior_loss_weight=0.25"]),
    # timesteps capped (kohya's max_timestep): the steps where the sampler lays out the scene stay untrained
    "lora-prior-tmax700": ("toy/dreambooth-lora-prior-pre", ["max_timestep=700"]),
    # the opposite of Custom Diffusion: no LoRA on the cross-attention's keys and values, so every prompt word (the
    # scene's too) is read exactly as the base model reads it; the identifier acts through the queries and outputs
    "lora-prior-nokv": ("toy/dreambooth-lora-prior-pre", ["lora_target_modules=[attn1.to_q, attn1.to_k, attn1.to_v, "
                        "attn1.to_out.0, attn2.to_q, attn2.to_out.0]"]),
    # the full fine-tune with the text encoder bound the fresh subjects most (session 29: identity 0.596 vs the LoRA's
    # 0.451): a text-encoder LoRA too, at a fraction of the UNet LoRA's lr (v4 lost scenes with it at the same lr)
    "lora-prior-te-lr2e4": ("toy/dreambooth-lora-prior-pre", ["train_text_encoder=true", "text_encoder_lr=2e-4"]),
    "lora-prior-te-lr1e3": ("toy/dreambooth-lora-prior-pre", ["train_text_encoder=true", "text_encoder_lr=1e-3"]),
    "lora-te-lr1e3": ("toy/dreambooth-lora", ["train_text_encoder=true", "text_encoder_lr=1e-3"]),
    # the text-encoder LoRA lifted LoRA + prior's identity (session 30): the full + prior fine-tune with the text
    # encoder too, at the lr of toy/dreambooth-finetune-text-encoder's
    "full-prior-te": ("toy/dreambooth-prior-pre", ["train_text_encoder=true", "text_encoder_lr=1e-4"]),
    # the no-prior full fine-tunes fell short of LoRA + prior's identity (session 31): EMA (which lifted the full + prior
    # one, session 29), and the text encoder at the UNet's lr (the LoRA recipe's text encoder binds at its UNet's lr)
    "full-ema": ("toy/dreambooth", ["use_ema=true"]),
    "full-te-telr3e4": ("toy/dreambooth-finetune-text-encoder", ["text_encoder_lr=3e-4"]),
    # the toy model was pretrained with Min-SNR weighting at gamma 5 (toy/recipes/pretrain.py); these fine-tune with it
    "full-snr5": ("toy/dreambooth", ["snr_gamma=5"]),
    "full-te-telr3e4-snr5": ("toy/dreambooth-finetune-text-encoder", ["text_encoder_lr=3e-4", "snr_gamma=5"]),
    # the LoRA + prior recipe missed #24's targets on the third fresh set (session 32): Min-SNR 5 (which lifted both
    # no-prior full fine-tunes there) and the text encoder's LoRA at the UNet's lr (1e-3 -> 2e-3 lifted it before)
    "lora-prior-snr5": ("toy/dreambooth-lora-prior-pre", ["train_text_encoder=true", "snr_gamma=5"]),
    "lora-prior-telr2e3": ("toy/dreambooth-lora-prior-pre", ["train_text_encoder=true", "text_encoder_lr=2e-3"]),
    # more adapter capacity (rank 16 -> 32 on the UNet's and the text encoder's attention; alpha = rank, so the same scale)
    "lora-prior-r32": ("toy/dreambooth-lora-prior-pre", ["train_text_encoder=true", "lora_rank=32", "lora_alpha=32"]),
    # LoCon in the recipe as shipped (text-encoder LoRA kept): the UNet's 32x32 level, where subjects' dots, checkers
    # and marks are drawn, has no attention, so the recipe's LoRA cannot reach it; the full fine-tunes, which can, bound
    # the coarse-patterned subjects of set E the LoRA missed (session 35; "small" in its notes, corrected in session 40)
    "lora-prior-conv-te": ("toy/dreambooth-lora-prior-pre", ["train_text_encoder=true", "lora_target_modules=[to_q, to_k, "
                           "to_v, to_out.0, proj_in, proj_out, ff.net.0.proj, ff.net.2, conv1, conv2]"]),
    # the full fine-tunes that train the text encoder bound set E's coarse-patterned subjects where the LoRA did not (session 35);
    # what they train that the recipe's text-encoder LoRA cannot is chiefly the identifier's embedding: pivotal tuning
    # (new tokens from the class noun's row, at the text encoder's 1e-3 for the first half of the steps) beside it
    "lora-prior-te-ti": ("toy/dreambooth-lora-prior-pre", ["train_text_encoder=true", "train_text_encoder_ti=true"]),
    # the same pivotal tuning on the recipe as shipped since session 41 (min_timestep 200), rescored in session 42 after the
    # fix of toy eval's DPM-Solver++ copy, which had dropped the identifier's rewrite: the rows of lora-prior-te-ti and
    # pivotal-prior rendered the untrained "sks" (docs/evaluation.md)
    "lora-prior-ti": ("toy/dreambooth-lora-prior-pre", ["train_text_encoder=true", "min_timestep=200",
                                                         "train_text_encoder_ti=true"]),
    # the text encoder's MLPs too (kohya's text-encoder LoRA targets CLIPAttention and CLIPMLP; diffusers' the attention
    # alone): with the embeddings (lora-prior-ti) ruled out, the rest of what the full text-encoder fine-tunes train
    "lora-prior-te-mlp": ("toy/dreambooth-lora-prior-pre", ["train_text_encoder=true", "min_timestep=200",
                                                             "text_encoder_lora_target_modules=[q_proj, k_proj, v_proj, "
                                                             "out_proj, fc1, fc2]"]),
    # the second continuation of v5 (session 36's pre-registered rule, docs/evaluation.md "Continuing v5"): the
    # recipe's UNet lr was tuned to v5, so a continued model is tuned at 2e-3 (lora-prior) against 3e-3
    "lora-prior-lr3e3": ("toy/dreambooth-lora-prior-pre", ["train_text_encoder=true", "learning_rate=3e-3"]),
    "lora-lr3e3": ("toy/dreambooth-lora", ["learning_rate=3e-3"]),  # its no-prior twin (issue #24's drift target)
    # session 40: on the subjects the recipe binds least, the probe reads the class and mark but not the pattern (a checker
    # drawn as camouflage, in the subject's colours); max_timestep 700 lost identity, so the pattern's layout is learnt at
    # high noise: train the LoRA on the noisier 80% of the timesteps only
    "lora-prior-tmin200": ("toy/dreambooth-lora-prior-pre", ["train_text_encoder=true", "min_timestep=200"]),
    # ... which the recipe adopted in session 41: the recipe of sessions 30-40 (the rows labelled lora-prior before then)
    "lora-prior-tmin0": ("toy/dreambooth-lora-prior-pre", ["train_text_encoder=true", "min_timestep=0"]),
    # session 43: the recipe's misses over sets G and H are mostly a spot read wrong, which the full fine-tunes bind; the
    # UNet's 32x32 level (no attention on v5) is what they train and the attention-only LoRA cannot reach. A LoRA on that
    # level's resnets alone (down_blocks.0, up_blocks.3: their conv1/conv2 by full module path), not session 35's LoCon
    # on every level's convs and transformer projections
    "lora-prior-l32": ("toy/dreambooth-lora-prior-pre", ["train_text_encoder=true", "min_timestep=200",
                       "lora_target_modules=[to_q, to_k, to_v, to_out.0, down_blocks.0.resnets.0.conv1, "
                       "down_blocks.0.resnets.0.conv2, up_blocks.3.resnets.0.conv1, up_blocks.3.resnets.0.conv2, "
                       "up_blocks.3.resnets.1.conv1, up_blocks.3.resnets.1.conv2]"]),
    # session 44: toy/dreambooth (full, no prior) is the one full variant under the recipe's identity on most sets;
    # min_timestep 200 lifted the LoRA's identity and scenes together (session 41), so the same on the full fine-tune
    "full-tmin200": ("toy/dreambooth", ["min_timestep=200"]),
    # session 46: the same variant between its 1e-4 and the 3e-4 x 600 steps that bound subjects 1-2 but lost half the
    # scenes (session 27): the lr axis of the no-prior full fine-tune on v5. Failed: more identity, fewer scenes (0.881)
    "full-lr2e4": ("toy/dreambooth", ["learning_rate=2e-4"]),
    # session 44: LoRA+ (the B matrices, which start at zero, at 4x the lr; kohya users' common ratio) on the recipe
    "lora-prior-lp4": ("toy/dreambooth-lora-prior-pre", ["train_text_encoder=true", "min_timestep=200",
                       "loraplus_lr_ratio=4"]),
    # session 45: min_timestep 200 was the one recipe lever that moved identity past its noise; two points further along it.
    # Both failed (300 in tuning; 400 on set L, where it kept 0.875 of the scenes against the base's 0.959)
    "lora-prior-tmin300": ("toy/dreambooth-lora-prior-pre", ["train_text_encoder=true", "min_timestep=300"]),
    "lora-prior-tmin400": ("toy/dreambooth-lora-prior-pre", ["train_text_encoder=true", "min_timestep=400"]),
    # session 47: pivotal tuning whose four new tokens start from the subject's own words (colour, colour, pattern,
    # mark: "blue purple dotted eye"), as a user types a few words of what the subject looks like ("{words}": the
    # subject's, filled in per seed); prompted with sks as the recipe is
    "lora-prior-ti-words": ("toy/dreambooth-lora-prior-pre", ["train_text_encoder=true", "min_timestep=200",
                            "train_text_encoder_ti=true", "initializer_concept={words}", "num_new_tokens_per_abstraction=4"]),
    "lora-prior-ti0": ("toy/dreambooth-lora-prior-pre", ["train_text_encoder=true", "min_timestep=200",
                       "train_text_encoder_ti=false"]),  # the recipe of sessions 41-46
    # The full fine-tunes with the recipe's identifier (session 48): pivotal tuning from the subject's words (four new
    # tokens, trained for the first half of the steps at the variant's text_encoder_lr, 1e-4), prompted with sks
    # full-prior-ti-words is `full-prior` as shipped since session 48; full-prior-ti0 the variant of sessions 31-47
    "full-prior-ti0": ("toy/dreambooth-prior-pre", ["train_text_encoder=true", "train_text_encoder_ti=false"]),
    "full-prior-ti-words": ("toy/dreambooth-prior-pre", ["train_text_encoder=true", "train_text_encoder_ti=true",
                            "initializer_concept={words}", "num_new_tokens_per_abstraction=4"]),
    # full-te-ti-words is `full-te` as shipped since session 49; full-te-ti0 the variant before
    "full-te-ti0": ("toy/dreambooth-finetune-text-encoder", ["train_text_encoder_ti=false"]),
    "full-te-ti-words": ("toy/dreambooth-finetune-text-encoder", ["train_text_encoder_ti=true", "initializer_concept={words}",
                         "num_new_tokens_per_abstraction=4"]),
    "full-ti-words": ("toy/dreambooth", ["train_text_encoder_ti=true", "initializer_concept={words}",
                      "num_new_tokens_per_abstraction=4"]),
    # the UNet alone keeps its text encoder frozen, so the new rows are all the text side can move: at the variant's lr
    # (1e-4) they stay near the words; -telr1e3 trains them at the LoRA + prior recipe's text_encoder_lr (session 49)
    "full-ti-words-telr1e3": ("toy/dreambooth", ["train_text_encoder_ti=true", "initializer_concept={words}",
                              "num_new_tokens_per_abstraction=4", "text_encoder_lr=1e-3"]),
    # the recipe as shipped with another training seed (weights init, data order, noise; the class images are the
    # subject's shared folder): how much of a subject's identity is the run's draw (session 49)
    "lora-prior-seed1": ("toy/dreambooth-lora-prior-pre", ["seed=1"]),
    # session 50: the new rows train beside the LoRAs for all the steps (the recipe pivots at half, diffusers' default)
    "lora-prior-tifrac1": ("toy/dreambooth-lora-prior-pre", ["train_text_encoder=true", "min_timestep=200",
                           "train_text_encoder_ti=true", "initializer_concept={words}", "num_new_tokens_per_abstraction=4",
                           "train_text_encoder_ti_frac=1.0"]),
    # the recipe as shipped (the subject's words bound) with session 43's LoRA on the 32x32 level's resnets too, where the
    # subject's mark and dots are drawn
    "lora-prior-l32-ti": ("toy/dreambooth-lora-prior-pre", ["train_text_encoder=true", "min_timestep=200",
                          "train_text_encoder_ti=true", "initializer_concept={words}", "num_new_tokens_per_abstraction=4",
                          "lora_target_modules=[to_q, to_k, to_v, to_out.0, down_blocks.0.resnets.0.conv1, "
                          "down_blocks.0.resnets.0.conv2, up_blocks.3.resnets.0.conv1, up_blocks.3.resnets.0.conv2, "
                          "up_blocks.3.resnets.1.conv1, up_blocks.3.resnets.1.conv2]"]),
    # session 52: the recipe as shipped with the LoRAs on every timestep again. min_timestep 200 (session 41) was tuned
    # before the words bound the pattern's layout (session 47); the misses left are marks and dots drawn at the wrong size
    # or as blotches, which the full fine-tunes (every timestep) draw right. Failed its tuning step (docs/evaluation.md)
    "lora-prior-ti-tmin0": ("toy/dreambooth-lora-prior-pre", ["train_text_encoder=true", "min_timestep=0",
                            "train_text_encoder_ti=true", "initializer_concept={words}", "num_new_tokens_per_abstraction=4"]),
    # session 54: the recipe as shipped publishing the EMA of its trained weights (adapters, text-encoder LoRA, new rows):
    # are the blotched dots of its floor subjects the last steps' weight noise at 2e-3? No: failed step 1 (docs/evaluation.md)
    "lora-prior-ema": ("toy/dreambooth-lora-prior-pre", ["train_text_encoder=true", "min_timestep=200",
                       "train_text_encoder_ti=true", "initializer_concept={words}", "num_new_tokens_per_abstraction=4",
                       "use_ema=true"]),
    # the UNet alone at 2e-4 (more identity, fewer scenes in session 46) with the EMA that kept the full + prior
    # variant's scenes (session 29), and the rows at 1e-3
    "full-ti-words-lr2e4-ema": ("toy/dreambooth", ["train_text_encoder_ti=true", "initializer_concept={words}",
                                "num_new_tokens_per_abstraction=4", "text_encoder_lr=1e-3", "learning_rate=2e-4",
                                "use_ema=true"]),
    # the UNet alone: its rows (its whole text side) at the recipe's 1e-3 for all 400 steps
    "full-ti-words-frac1": ("toy/dreambooth", ["train_text_encoder_ti=true", "initializer_concept={words}",
                            "num_new_tokens_per_abstraction=4", "text_encoder_lr=1e-3", "train_text_encoder_ti_frac=1.0"]),
    # toy/dreambooth before it shipped with full-ti-words-frac1 (session 51): "sks", no new rows
    "full-ti0": ("toy/dreambooth", []),
    "flux-lora-prior": ("toy-flux/dreambooth-lora-prior-pre", []),
    "flux-lora": ("toy-flux/dreambooth-lora", []),
    "flux-full-prior": ("toy-flux/dreambooth-prior-pre", []),
    # the FLUX twin's LoRA at the UNet twin's 1e-3 moved subject 1's colours but bound no pattern or mark
    # the twin was pretrained on logit-normal noise levels shifted by the image size (toy/recipes/pretrain_flux.py);
    # flux/dreambooth draws them uniformly, unshifted, as diffusers' FLUX script does
    "flux-lora-prior-ln": ("toy-flux/dreambooth-lora-prior-pre", ["weighting_scheme=logit_normal", "resolution_shift=true"]),
    "flux-lora-prior-lr4e3": ("toy-flux/dreambooth-lora-prior-pre", ["learning_rate=4e-3"]),
    # ... which leaves the four single-stream blocks' MLPs (proj_mlp, proj_out: most of the twin's weights) frozen;
    # SimpleTuner's and ai-toolkit's FLUX LoRAs train them too
    "flux-lora-prior-mlp": ("toy-flux/dreambooth-lora-prior-pre", ["lora_target_modules=[attn.to_q, attn.to_k, attn.to_v, "
                            "attn.to_out.0, attn.add_q_proj, attn.add_k_proj, attn.add_v_proj, attn.to_add_out, ff.net.0.proj, "
                            "ff.net.2, ff_context.net.0.proj, ff_context.net.2, proj_mlp, proj_out]"]),
    # session 35: the full fine-tune binds (0.25) where every LoRA above reads as the base model; what it trains that
    # they freeze is chiefly the AdaLN modulation (norm1.linear, norm1_context.linear, norm.linear: the timestep and
    # the pooled CLIP vector's path into every block), which BFL's and fal's FLUX LoRAs target too
    "flux-lora-prior-mod": ("toy-flux/dreambooth-lora-prior-pre", ["lora_target_modules=[attn.to_q, attn.to_k, attn.to_v, "
                            "attn.to_out.0, attn.add_q_proj, attn.add_k_proj, attn.add_v_proj, attn.to_add_out, ff.net.0.proj, "
                            "ff.net.2, ff_context.net.0.proj, ff_context.net.2, proj_mlp, proj_out, norm1.linear, "
                            "norm1_context.linear, norm.linear]"]),
    # ... and CLIP-L's LoRA (diffusers' --train_text_encoder for FLUX), as the UNet twin's recipe trains its text encoder
    "flux-lora-prior-te": ("toy-flux/dreambooth-lora-prior-pre", ["train_text_encoder=true", "text_encoder_lr=1e-3"]),
    "flux-lora-prior-te3e4": ("toy-flux/dreambooth-lora-prior-pre", ["train_text_encoder=true", "text_encoder_lr=3e-4"]),
    # the twin's recipe before session 36 (the transformer's LoRA alone): the flux-lora-prior rows measured before then
    "flux-lora-prior-transformer": ("toy-flux/dreambooth-lora-prior-pre", ["train_text_encoder=false"]),
}
# Settings that joined a variant after arms were tuned on it: (variant, the arm that runs it as shipped, key, the value
# before). Every other arm on that variant that does not set the key keeps the value before, so it still reproduces its
# rows in docs/evaluation.md: the text-encoder LoRA of toy/dreambooth-lora-prior-pre (session 30), the full + prior
# fine-tune's text encoder (session 31), CLIP-L's LoRA in the FLUX twin's recipe (session 36), and min_timestep 200 in
# the LoRA + prior recipe (session 41; lora-prior-tmin200 is now the recipe as shipped), and pivotal tuning from the
# subject's words in it (session 47; lora-prior-ti-words is now the recipe as shipped, lora-prior-ti0 the recipe of
# sessions 41-46; a toy subject's subject.json fills initializer_concept, so the arms that tuned embeddings before
# start them from the class noun, as then), and the same pivotal tuning in the full + prior fine-tune (session 48) and
# the full + text-encoder fine-tune (session 49), and in the UNet alone, its rows at 1e-3 for the whole run (session 51;
# full-ti-words-frac1 is now toy/dreambooth as shipped, full-ti0 the variant before).
_JOINED_LATER = [("toy/dreambooth-lora-prior-pre", "lora-prior", "train_text_encoder", "false"),
                 ("toy/dreambooth-prior-pre", "full-prior", "train_text_encoder", "false"),
                 ("toy-flux/dreambooth-lora-prior-pre", "flux-lora-prior", "train_text_encoder", "false"),
                 ("toy/dreambooth-lora-prior-pre", "lora-prior", "min_timestep", "0"),
                 ("toy/dreambooth-lora-prior-pre", "lora-prior", "train_text_encoder_ti", "false"),
                 ("toy/dreambooth-lora-prior-pre", "lora-prior", "num_new_tokens_per_abstraction", "2"),
                 ("toy/dreambooth-lora-prior-pre", "lora-prior", "initializer_concept", "{class}"),
                 ("toy/dreambooth-prior-pre", "full-prior", "train_text_encoder_ti", "false"),
                 ("toy/dreambooth-finetune-text-encoder", "full-te", "train_text_encoder_ti", "false"),
                 *(("toy/dreambooth", "full", key, before) for key, before in (
                     ("train_text_encoder_ti", "false"), ("num_new_tokens_per_abstraction", "2"),
                     ("text_encoder_lr", "null"), ("train_text_encoder_ti_frac", "0.5")))]
for _variant, _shipped, _key, _before in _JOINED_LATER:
    for _arm, (_arm_variant, _overrides) in ARMS.items():
        # the shipped arm and its reruns at another training seed (<shipped>-seedN) follow the variant as shipped
        if _arm_variant == _variant and _arm.split("-seed")[0] != _shipped \
                and not any(o.startswith(f"{_key}=") for o in _overrides):
            _overrides.append(f"{_key}={_before}")
METRICS = ("subject_fidelity", "subject_identity", "prompt_fidelity", "subject_in_context", "prior_drift")


def arm_overrides(arm: str, seed: int) -> list[str]:
    """The arm's overrides for one subject: "{words}" in a value becomes the subject's look in words
    (world.look_words: "blue purple dotted eye"), "{class}" its class noun."""
    from nanobooth.toy import world

    s = world.make_subject(seed)
    return [o.replace("{words}", world.look_words(s)).replace("{class}", s.cls) for o in ARMS[arm][1]]


def run(cmd: list[str]) -> None:
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def class_dir(out: Path, seed: int, overrides: list[str]) -> Path:
    """One class-image folder per subject, shared by the arms; an arm that changes how class images are made
    (class_generation_steps, num_class_images) gets its own, as the provenance-keyed cache would."""
    name = str(seed)
    for key, tag in (("class_generation_steps", "steps"), ("num_class_images", "n")):
        name += "".join(f"-{tag}{o.split('=', 1)[1]}" for o in overrides if o.startswith(f"{key}="))
    return out / "class" / name


def eval_name(sampler: str, steps: int, images_per_prompt: int, cutoff: float | None) -> str:
    return f"toy_eval-{sampler}-{steps}-{images_per_prompt}" + ("" if cutoff is None else f"-gc{cutoff:g}") + ".json"


def cached(run_dir: Path, images_per_prompt: int, sampler: str, steps: int, cutoff: float | None = None) -> dict | None:
    """The run's scores at these eval settings, if it has them: toy_eval.json holds the latest eval only, so each
    is also kept as toy_eval-SAMPLER-STEPS-N[-gcCUTOFF].json. `cutoff` None: the run's validation_guidance_cutoff."""
    if cutoff is None and (run_dir / "config.yaml").is_file():
        cutoff = yaml.safe_load((run_dir / "config.yaml").read_text()).get("validation_guidance_cutoff")
    for f in (run_dir / "toy_eval.json", run_dir / eval_name(sampler, steps, images_per_prompt, cutoff)):
        if f.is_file():
            result = json.loads(f.read_text())
            st = result.get("settings", {})
            if (st.get("sampler", "model"), st.get("steps"), st.get("images_per_prompt")) == (sampler, steps, images_per_prompt) \
                    and (cutoff is None or st.get("guidance_cutoff") == cutoff):
                return result
    return None


# keys a run's saved config.yaml holds filled in for its subject (or its place), not as the arm sets them
_PER_RUN_KEYS = {"instance_data_dir", "output_dir", "class_data_dir", "instance_prompt", "class_prompt", "initializer_concept",
                 "resume_from_checkpoint", "overwrite"}


def stale_keys(run_dir: Path, variant: str, overrides: list[str]) -> list[str]:
    """The scalar keys where the run in `run_dir` (its config.yaml) was trained otherwise than `variant` with
    `overrides` trains now, as "key=saved (now new)": a variant that shipped a change since (toy/dreambooth in
    session 51) would otherwise have its old runs' scores read as the arm's."""
    import dataclasses

    from nanobooth.core.config import load_config

    if not (run_dir / "config.yaml").is_file():
        return []
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    now = dataclasses.asdict(load_config(variant, overrides))
    return [f"{k}={saved[k]} (now {v})" for k, v in now.items() if k not in _PER_RUN_KEYS and k in saved
            and isinstance(v, (int, float, bool, str, type(None))) and saved[k] != v]


def score(out: Path, arm: str, seed: int, images_per_prompt: int, base: bool, model: str | None = None,
          sampler: str = "dpm++", steps: int = 15, cutoff: float | None = None) -> dict:
    variant, overrides = ARMS[arm]
    overrides = arm_overrides(arm, seed) + ([f"model={model}"] if model else [])
    subj, run_dir = out / "subjects" / str(seed), out / "runs" / f"{arm}-{seed}"
    scores = run_dir / "toy_eval.json"
    if stale := stale_keys(run_dir, variant, overrides):
        sys.exit(f"{run_dir} was trained otherwise than arm {arm} trains now ({', '.join(stale)}): "
                 f"move it away or pass another --out")
    if (result := cached(run_dir, images_per_prompt, sampler, steps, cutoff)) is not None:
        return result
    if not subj.is_dir():
        run([sys.executable, "-m", "nanobooth", "toy", "subject", "--seed", str(seed), "--out", str(subj)])
    t0 = time.perf_counter()
    if not (run_dir / "config.yaml").is_file() or not any(run_dir.glob("*.safetensors")):
        # an interrupted run continues from its last checkpoint (train refuses to reuse its folder otherwise); one
        # stopped before its first checkpoint is trained again from step 0, which train does only when told to
        resume = []
        if (run_dir / "config.yaml").is_file():
            resume = ["resume_from_checkpoint=latest"] if any((run_dir / "checkpoints").glob("checkpoint-*/state.json")) \
                else ["overwrite=true"]
        run([sys.executable, "-m", "nanobooth", "train", variant, f"instance_data_dir={subj}", f"output_dir={run_dir}",
             f"class_data_dir={class_dir(out, seed, overrides)}", *overrides, *resume])
    run([sys.executable, "-m", "nanobooth", "toy", "eval", str(run_dir), "--images-per-prompt", str(images_per_prompt),
         "--sampler", sampler, "--steps", str(steps), *([] if base else ["--no-base"]),
         *([] if cutoff is None else ["--guidance-cutoff", str(cutoff)])])
    result = json.loads(scores.read_text())
    result["_seconds"] = time.perf_counter() - t0
    for f in (scores, run_dir / eval_name(sampler, steps, images_per_prompt, cutoff)):
        f.write_text(json.dumps(result, indent=2))
    return result


def pick(result: dict, key: str, section: str = "tuned") -> float | None:
    """A metric of toy_eval.json's "tuned" (the run), "base" or "reference" section."""
    value = result.get(section, {}).get(key)
    return float(value) if isinstance(value, (int, float)) else None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, type=Path,
                   help="the bench's folder: subjects/SEED, class/..., runs/ARM-SEED (finished runs are reused, not retrained)")
    p.add_argument("--arms", nargs="+", default=["lora-prior", "lora-prior+ema", "dora-prior", "lokr-prior", "pivotal-prior"],
                   choices=sorted(ARMS), metavar="ARM",
                   help="the ARMS table at the top of this file: a variant and its overrides, each commented there; "
                        "lora-prior is the README's toy recipe as shipped, lora its no-prior twin")
    p.add_argument("--seeds", nargs="+", type=int, default=[4242, 5000, 5001, 7001],
                   help="toy subject seeds, each trained once per arm (docs/evaluation.md names its sets: G, H, ... O)")
    p.add_argument("--images-per-prompt", type=int, default=8,
                   help="toy eval's --images-per-prompt (8, as in the recent tables of docs/evaluation.md; toy eval alone uses 4)")
    p.add_argument("--model", default=None, help="every arm on this model (a candidate toy model's folder) instead of the variant's")
    p.add_argument("--targets", action="store_true", help="check issue #24's targets (the --target-arms needed)")
    p.add_argument("--target-arms", nargs=2, default=["lora-prior", "lora"], choices=sorted(ARMS), metavar=("PRIOR", "NO_PRIOR"),
                   help="the arms --targets reads: the shipped recipe's twins with and without prior preservation")
    p.add_argument("--eval-sampler", choices=["model", "dpm++"], default="dpm++",
                   help="toy eval's --sampler (dpm++: its default on the UNet; model for the FLUX twin)")
    p.add_argument("--eval-steps", type=int, default=15, help="toy eval's --steps (15: its default for dpm++)")
    p.add_argument("--eval-guidance-cutoff", type=float, default=None,
                   help="toy eval's --guidance-cutoff (default: each run's validation_guidance_cutoff)")
    a = p.parse_args()
    if a.targets and not set(a.target_arms) <= set(a.arms):
        p.error(f"--targets reads arms {' and '.join(a.target_arms)}: add them to --arms")
    # the base model's scores depend on the subject only: the first arm of each subject scores them
    rows = {(arm, s): score(a.out, arm, s, a.images_per_prompt, arm == a.arms[0], a.model, a.eval_sampler, a.eval_steps,
                              a.eval_guidance_cutoff)
            for s in a.seeds for arm in a.arms}
    # a cached run scored beside another first arm may lack the base section: any arm's base of the subject will do
    with_base = {s: next((rows[arm, s] for arm in a.arms if "base" in rows[arm, s]), rows[a.arms[0], s]) for s in a.seeds}
    head = "| arm | " + " | ".join(METRICS) + " |\n|---|" + "---|" * len(METRICS)
    print(f"\nmeans over subjects {a.seeds} ({a.images_per_prompt} images per prompt, {a.eval_steps} {a.eval_sampler} "
          f"sampler steps{'' if a.eval_guidance_cutoff is None else f', guidance cutoff {a.eval_guidance_cutoff:g}'})\n\n{head}")
    table = [("base model", "base", with_base), *((arm, "tuned", {s: rows[arm, s] for s in a.seeds}) for arm in a.arms)]
    for label, section, by_seed in table:
        vals = [[pick(by_seed[s], m, section) for s in a.seeds] for m in METRICS]
        print(f"| {label} | " + " | ".join(f"{sum(v) / len(v):.3f}" if None not in v else "–" for v in vals) + " |")
    print("\nper subject (identity read part by part: class / pattern / mark, toy eval since session 40)\n\n| arm | seed | "
          + " | ".join(METRICS) + " | identity parts |\n|---|---|" + "---|" * (len(METRICS) + 1))
    for (arm, s), r in rows.items():
        parts = [pick(r, f"identity_{k}") for k in ("class", "pattern", "mark")]
        print(f"| {arm} | {s} | " + " | ".join(f"{pick(r, m):.3f}" if pick(r, m) is not None else "–" for m in METRICS)
              + " | " + (" / ".join(f"{v:.2f}" for v in parts) if None not in parts else "–") + " |")
    if a.targets:
        prior, no_prior = a.target_arms
        print(f"\nissue #24's targets ({prior}, drift vs {no_prior})\n")
        for line, ok in targets({s: rows[prior, s] for s in a.seeds}, {s: rows[no_prior, s] for s in a.seeds},
                                with_base):
            print(f"- {'PASS' if ok else 'FAIL'}: {line}")


def targets(prior: dict, no_prior: dict, with_base: dict) -> list[tuple[str, bool]]:
    """Issue #24's per-recipe targets from toy_eval.json results by subject seed: (what, met)."""
    ident = {s: pick(r, "subject_identity") for s, r in prior.items()}
    ctx = {s: pick(r, "subject_in_context") for s, r in prior.items()}
    mean = lambda d: sum(d.values()) / len(d)  # noqa: E731
    prompt = mean({s: pick(r, "prompt_fidelity") for s, r in prior.items()})
    base_prompt = mean({s: pick(r, "prompt_fidelity", "base") for s, r in with_base.items()})
    # drift is measured from the base model's own (its plain class images already resemble the subject: 0.3-0.7 on v4),
    # so perfect prior preservation scores 0 and "0.7x the no-prior run's" is reachable on every subject; where the
    # no-prior run did not drift above the base model either, the prior run must not
    base_drift = {s: pick(r, "prior_drift", "base") for s, r in with_base.items()}
    drift = {s: (pick(r, "prior_drift") - base_drift[s], pick(no_prior[s], "prior_drift") - base_drift[s]) for s, r in prior.items()}
    return [(f"subject identity mean {mean(ident):.3f} >= 0.6", mean(ident) >= 0.6),
            (f"subject-in-context mean {mean(ctx):.3f} >= 0.5", mean(ctx) >= 0.5),
            (f"no subject's identity below 0.3 (lowest {min(ident.values()):.3f})", min(ident.values()) >= 0.3),
            (f"prompt fidelity {prompt:.3f} within 0.05 of the base model's {base_prompt:.3f}", prompt >= base_prompt - 0.05),
            ("prior drift above the base model's <= 0.7x the no-prior run's on every subject (with/without prior): "
             + ", ".join(f"{s} {d:+.3f}/{n:+.3f}" for s, (d, n) in drift.items()), all(d <= max(0.7 * n, 0.0) for d, n in drift.values()))]


if __name__ == "__main__":
    main()
