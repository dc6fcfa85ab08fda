import json

import pytest
import torch
from safetensors.torch import load_file

from nanobooth.toy.recipes import autoencoder, carry, pretrain

TINY = ["--recipe", "v5", "--n-images", "30", "--n-plain", "10", "--n-patterned", "20", "--vae-steps", "1",
        "--vae-batch", "4", "--vae-refine-steps", "1", "--vae-refine-subjects", "1", "--decoder-refine-steps", "1",
        "--unet-batch", "2"]


def test_a_carried_run_continues_where_it_stopped(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(autoencoder, "HELD_APART", 16)  # as in test_toy_pretrain
    run, box, again = tmp_path / "run", tmp_path / "carry", tmp_path / "again"
    assert pretrain.main(TINY + ["--out", str(run), "--unet-steps", "2"]) == 0
    info = carry.pack(run, box)
    assert info["autoencoders"] == ["vae", "vae_refined", "vae_refined_dec", "vae_centred"]
    assert info["stage2_steps"] == {"unet_ckpt": 2}
    assert not list(box.glob("*.npy")) and not list(box.glob("latents*")) and not (box / "unet_ckpt" / "ema.safetensors").exists()
    assert carry.main(["unpack", str(box), str(again)]) == 0
    # the autoencoders bit for bit (stage 2's latent space), the weights to fp16, AdamW's second moments to bf16
    for f in ("vae_centred/diffusion_pytorch_model.safetensors", "vae_refined_dec/config.json", "args_all.json"):
        assert (again / f).read_bytes() == (run / f).read_bytes()
    was, now = (load_file(str(d / "unet_ckpt" / "unet.safetensors")) for d in (run, again))
    assert now.keys() == was.keys() and all(now[k].dtype == torch.float32 for k in now)
    assert all(torch.equal(now[k], was[k].half().float()) for k in now)
    assert any(not torch.equal(now[k], was[k]) for k in now)
    was, now = (load_file(str(d / "unet_ckpt" / "optim.safetensors")) for d in (run, again))
    assert now.keys() == was.keys()
    moments = [k for k in now if k.endswith(".exp_avg_sq")]
    assert moments and all(torch.equal(now[k], was[k].bfloat16().float()) for k in moments)
    assert all(not now[k[:-3]].any() and was[k[:-3]].any() for k in moments)  # first moments restart at zero
    assert all(torch.equal(now[k], was[k]) for k in now if k.endswith(".step"))
    assert "unet stage continued at step 2 from a carry" in json.loads((again / "history.json").read_text())[-1]
    # no EMA until the run continues: the export says so in one line
    with pytest.raises(SystemExit):
        pretrain.main(["--out", str(again), "--export", str(tmp_path / "model")])
    assert "has no EMA yet" in capsys.readouterr().err
    # the run's own command continues it: renders and latents rebuilt, stage 1 skipped, the EMA restarted
    assert pretrain.main(TINY + ["--out", str(again), "--unet-steps", "3"]) == 0
    state = json.loads((again / "unet_ckpt" / "state.json").read_text())
    assert state["step"] == 3
    assert (again / "latents_centred.safetensors").is_file() and not (again / "vae_ckpt").exists()
    ema, weights = load_file(str(again / "unet_ckpt" / "ema.safetensors")), load_file(str(again / "unet_ckpt" / "unet.safetensors"))
    assert all(torch.allclose(ema[f"unet.{k}"], weights[k], atol=1e-2) for k in weights if f"unet.{k}" in ema)
    assert pretrain.main(["--out", str(again), "--export", str(tmp_path / "model")]) == 0
    # a carry replaces an older carry, and never a run
    assert carry.pack(again, box)["stage2_steps"] == {"unet_ckpt": 3}
    assert carry.main(["unpack", str(box), str(again)]) == 2
    assert "is not empty" in capsys.readouterr().err
    assert carry.main(["pack", str(box), str(tmp_path / "c2")]) == 2
    assert "is a carry, not a run" in capsys.readouterr().err
    assert carry.main(["pack", str(tmp_path / "model"), str(tmp_path / "c2")]) == 2
    assert "holds no toy pretraining run" in capsys.readouterr().err
    assert carry.main(["pack", str(again), str(run)]) == 2
    assert "holds no carry; pass a new folder" in capsys.readouterr().err
