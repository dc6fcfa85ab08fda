"""The toy recipes' shared stage-2 loop (toy/recipes/denoiser.py) at toy scale: both recipes, the UNet's and the
FLUX twin's, continue a stopped run bit-exactly, swap checkpoints in whole and move their weights."""
import json
import os
import shutil
import signal

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import TOY_V5_FLAGS
from nanobooth import cli as nanobooth_cli
from nanobooth.toy import world
from nanobooth.toy.recipes import autoencoder, denoiser, pretrain, pretrain_flux


def run_unet(base, out, steps, extra=(), cli=False):
    """Stage 2 of the UNet recipe alone on a copy of base (its autoencoder stages are done and resume as no-ops).
    cli: through `nanobooth toy pretrain` (its exit code and one-line errors), else the recipe's main()."""
    if not out.exists():
        shutil.copytree(base, out)
        shutil.rmtree(out / "unet_ckpt")
        (out / "timings.json").unlink()
    argv = TOY_V5_FLAGS + ["--out", str(out), "--unet-steps", str(steps), "--ckpt-minutes", "0", *extra]
    return nanobooth_cli.main(["toy", "pretrain", *argv]) if cli else pretrain.main(argv)


def run_flux(base, out, steps, extra=(), cli=False):
    argv = ["--base", str(base), "--out", str(out), "--batch", "3", "--threads", "1", "--steps", str(steps), "--ckpt-minutes", "0",
            *extra]
    return nanobooth_cli.main(["toy", "pretrain-flux", *argv]) if cli else pretrain_flux.main(argv)


RECIPES = {"unet": (run_unet, ("unet", "text_encoder", "ema")),
           "flux": (run_flux, ("transformer", "text_encoder", "text_encoder_2", "ema"))}


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_a_stopped_run_resumes_bit_exactly(name, toy_v5_base, tmp_path, monkeypatch):
    run, files = RECIPES[name]
    monkeypatch.setattr(autoencoder, "HELD_APART", 16)  # as toy_v5_base was made
    a, b = tmp_path / "a", tmp_path / "b"
    lr_at = denoiser.lr_at

    def stop_at_2(step, *args):
        if step == 2:
            raise KeyboardInterrupt
        return lr_at(step, *args)

    with monkeypatch.context() as mp, pytest.raises(KeyboardInterrupt):
        mp.setattr(denoiser, "lr_at", stop_at_2)
        run(toy_v5_base, a, 4)
    ck = f"{name}_ckpt"
    assert json.loads((a / ck / "state.json").read_text())["step"] == 2
    first = load_file(str(a / ck / f"{files[0]}.safetensors"))
    assert run(toy_v5_base, a, 4) == 0  # stopped at 2, resumed
    assert run(toy_v5_base, b, 4) == 0  # straight through
    for f in files:
        x, y = (load_file(str(d / ck / f"{f}.safetensors")) for d in (a, b))
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x), f
    last = load_file(str(a / ck / f"{files[0]}.safetensors"))
    assert any(not torch.equal(first[k], last[k]) for k in first)  # the resumed steps trained the denoiser
    assert json.loads((a / ck / "state.json").read_text())["step"] == 4
    assert not (a / f"{ck}.tmp").exists() and not (a / f"{ck}.old").exists()
    t = json.loads((a / "timings.json").read_text())
    assert t[f"{name}_steps_done"] == 4 and t[f"{name}_seconds"] > 0



def sigterm_at(step_to_stop: int, lr_at):
    """An lr_at that sends this process SIGTERM while step `step_to_stop` (0-based) runs, as `kill` would."""
    def patched(step, *args):
        if step == step_to_stop:
            os.kill(os.getpid(), signal.SIGTERM)
        return lr_at(step, *args)
    return patched


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_sigterm_finishes_the_step_checkpoints_it_and_exits_143(name, toy_v5_base, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(autoencoder, "HELD_APART", 16)
    a = tmp_path / "a"
    run = RECIPES[name][0]
    ck = a / f"{name}_ckpt"
    with monkeypatch.context() as mp:
        mp.setattr(denoiser, "lr_at", sigterm_at(1, denoiser.lr_at))
        # an hour between checkpoints: the one at step 2 is the stop's
        assert run(toy_v5_base, a, 5, ["--ckpt-minutes", "60"], cli=True) == 143
    err = capsys.readouterr().err.strip().splitlines()
    assert f"SIGTERM at {name} step 2/5: checkpoint saved in {ck}" in err[-1] and "same command again" in err[-1]
    assert not any("Traceback" in ln for ln in err)
    assert json.loads((ck / "state.json").read_text())["step"] == 2
    assert json.loads((a / "timings.json").read_text())[f"{name}_steps_done"] == 2
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the recipe's handler is gone with it
    trained, lr_at = [], denoiser.lr_at
    monkeypatch.setattr(denoiser, "lr_at", lambda step, *args: trained.append(step) or lr_at(step, *args))
    assert run(toy_v5_base, a, 5, ["--ckpt-minutes", "60"]) == 0
    assert trained == [2, 3, 4] and json.loads((ck / "state.json").read_text())["step"] == 5


def test_sigterm_in_an_autoencoder_stage_checkpoints_that_step(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(autoencoder, "HELD_APART", 16)
    monkeypatch.setattr(autoencoder, "lr_at", sigterm_at(0, autoencoder.lr_at))
    out = tmp_path / "run"
    flags = list(TOY_V5_FLAGS)
    flags[flags.index("--vae-steps") + 1] = "3"
    assert nanobooth_cli.main(["toy", "pretrain", *flags, "--out", str(out), "--ckpt-minutes", "60"]) == 143
    assert "SIGTERM at vae step 1/3" in capsys.readouterr().err
    assert json.loads((out / "vae_ckpt" / "state.json").read_text())["step"] == 1
    assert not (out / "vae").exists()  # the stage is not done, and nothing after it ran


def test_a_run_stopped_between_the_checkpoint_renames_resumes(toy_v5_base, tmp_path, monkeypatch):
    monkeypatch.setattr(autoencoder, "HELD_APART", 16)
    a = tmp_path / "a"
    assert run_flux(toy_v5_base, a, 2) == 0
    (a / "flux_ckpt").rename(a / "flux_ckpt.old")  # stopped after the first rename, before the second
    trained, lr_at = [], denoiser.lr_at
    monkeypatch.setattr(denoiser, "lr_at", lambda step, *args: trained.append(step) or lr_at(step, *args))
    assert run_flux(toy_v5_base, a, 3) == 0
    assert trained == [2]  # resumed at 2, not from scratch
    assert not (a / "flux_ckpt.old").exists()


def test_ema_of_the_unet_recipe_before_the_shared_loop_still_loads(toy_v5_base, tmp_path):
    # its checkpoints named the text encoder "te" in the EMA file; the shipped v4 model was exported from one
    ck = tmp_path / "unet_ckpt"
    shutil.copytree(toy_v5_base / "unet_ckpt", ck)
    ema = load_file(str(ck / "ema.safetensors"))
    from safetensors.torch import save_file

    save_file({("te." + k[len("text_encoder."):] if k.startswith("text_encoder.") else k): v for k, v in ema.items()},
              str(ck / "ema.safetensors"))
    te = pretrain.make_text_encoder()
    denoiser.load_weights({"unet": pretrain.make_unet("v5"), "text_encoder": te}, ck, use_ema=True)
    w = "text_encoder.embeddings.token_embedding.weight"  # random at init: a fresh one differs
    assert torch.equal(te.embeddings.token_embedding.weight, ema[w])



def test_bf16_autocast_only_where_the_cpu_has_bf16_instructions(tmp_path):
    # emulated bf16 (an AVX2 CPU) made a v5 UNet step 13x slower than fp32: 42 s instead of 3.1 s
    from nanobooth.core.threads import native_bf16

    info = tmp_path / "cpuinfo"
    info.write_text("flags\t\t: fpu sse2 avx2 fma avx512f avx512bw\n")
    assert not native_bf16(info)
    info.write_text("flags\t\t: fpu sse2 avx2 avx512f avx512_bf16\n")
    assert native_bf16(info)
    assert not native_bf16(tmp_path / "missing")


@pytest.mark.parametrize("native", [False, True])
def test_the_recipes_take_bf16_from_the_cpu_unless_told(native, toy_v5_base, tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr(denoiser, "train", lambda *args: seen.append(args[-1]))
    monkeypatch.setattr(autoencoder, "HELD_APART", 16)
    for mod in (pretrain, pretrain_flux):
        monkeypatch.setattr(mod, "native_bf16", lambda: native)
    for flag in ([], ["--bf16"], ["--no-bf16"]):
        run_unet(toy_v5_base, tmp_path / f"unet{len(seen)}", 2, flag)
        run_flux(toy_v5_base, tmp_path / f"flux{len(seen)}", 2, flag)
    assert seen == [native, native, True, True, False, False]


def test_patterned_weight_draws_patterned_objects_more_often():
    plain = [world.sample_spec(np.random.default_rng(i)) for i in range(30)]
    specs = plain + [world.sample_patterned_spec(np.random.default_rng(i)) for i in range(10)]
    assert denoiser.draw_probabilities(specs, 1.0) is None  # rng.choice's draws as before the option
    p = denoiser.draw_probabilities(specs, 3.0)
    assert p.sum() == pytest.approx(1.0) and p[30] == pytest.approx(3 * p[0]) and p[0] == pytest.approx(p[29])
    rng = np.random.default_rng(0)
    share = np.mean([(rng.choice(40, 8, replace=False, p=p) >= 30).mean() for _ in range(400)])
    assert 0.4 < share < 0.55  # a quarter of the images, drawn as about half of each batch (uniform: 0.25)
