import pytest
import torch
from safetensors.torch import save_file

from nanobooth.core.models import ModelError, apply_tome, load_components, load_pipeline, tome_active


def test_loads_a_diffusers_folder_with_77_token_tokenizer(tiny_model):
    c = load_components(str(tiny_model))
    assert c.tokenizer.model_max_length == 77
    assert c.tokenizer.tokenize("a photo of sks dog") == ["a</w>", "photo</w>", "of</w>", "sks</w>", "dog</w>"]
    assert c.tokenizer("sks").input_ids == [49406, 48136, 49407]  # the real CLIP vocabulary
    assert type(c.noise_scheduler).__name__ == "DDPMScheduler"


def test_tiny_builtin_model_builds_and_loads():
    pipe = load_pipeline("tiny")
    assert pipe.unet.config.sample_size == 16


def test_builtin_names_resolve_to_their_familys_pipeline(caplog, monkeypatch):
    """tiny-sdxl / tiny-sd3 / tiny-flux build the tiny model of that family; toy-flux is the shipped FLUX twin, or (in a
    build without it) tiny-flux with a warning that says so, once a process."""
    import json
    import logging
    from pathlib import Path

    from nanobooth.core import builtin_models
    from nanobooth.core import models
    from nanobooth.core.models import resolve_model

    monkeypatch.setattr(models, "_WARNED", set())
    for name in ("tiny", "tiny-sdxl", "tiny-sd3", "tiny-flux", "toy-flux", "toy-flux"):
        with caplog.at_level(logging.WARNING, logger="nanobooth"):
            folder = Path(resolve_model(name))
        assert json.loads((folder / "model_index.json").read_text())["_class_name"] == builtin_models.PIPELINES[name]
    shipped = builtin_models.shipped_folder("toy-flux")
    said = [r.getMessage() for r in caplog.records if "toy-flux" in r.getMessage()]
    assert (said == []) if shipped else (len(said) == 1 and "model=tiny-flux" in said[0] and "noise" in said[0])
    assert builtin_models.is_toy("toy-flux") and not builtin_models.is_toy("tiny-flux")


def test_pickle_checkpoints_are_refused(tmp_path):
    f = tmp_path / "model.ckpt"
    f.write_bytes(b"\x80\x04not really")
    with pytest.raises(ModelError, match="pickle.*allow_pickle=true"):
        load_pipeline(str(f))
    (tmp_path / "model.bin").write_bytes(b"x")
    with pytest.raises(ModelError, match="pickle"):
        load_pipeline(str(tmp_path / "model.bin"))


def test_folder_that_is_not_a_pipeline(tmp_path):
    (tmp_path / "readme.txt").write_text("x")
    with pytest.raises(ModelError, match="not a diffusers pipeline"):
        load_pipeline(str(tmp_path))


def test_missing_path_and_offline_hub_id_are_one_line(tmp_path):
    with pytest.raises(ModelError, match="no such file"):
        load_pipeline(str(tmp_path / "nope.safetensors"))
    with pytest.raises(ModelError) as e:
        load_pipeline("nobody-at-all/no-such-model-xyz")
    assert "\n" not in str(e.value) and "nobody-at-all/no-such-model-xyz" in str(e.value)


def test_an_unreachable_hub_is_named_at_once_and_a_cached_model_still_loads(tiny_model, tmp_path, monkeypatch):
    """No network and no HF_HUB_OFFLINE: the hub client retried for about 30 s and then blamed the id (newcomer54).
    Now an uncached id fails at once naming the hub, and a cached one loads from the cache alone."""
    import shutil
    import time

    from huggingface_hub import constants

    from nanobooth.core import models

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(models, "hub_reachable", lambda timeout=3.0: False)
    start = time.perf_counter()
    with pytest.raises(ModelError) as e:
        load_pipeline("someone/not-cached")
    assert time.perf_counter() - start < 5  # no retries
    assert "model 'someone/not-cached': https://huggingface.co cannot be reached (no network?) and it is not in the hub cache" in str(e.value)
    assert "\n" not in str(e.value) and "check the id" not in str(e.value)
    # the hub cache's own layout (huggingface_hub): refs/main names the snapshot folder that holds the files
    repo = tmp_path / "hub" / "models--someone--cached"
    shutil.copytree(tiny_model, repo / "snapshots" / ("0" * 40))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    pipe = load_pipeline("someone/cached")
    assert pipe.unet.config.sample_size == 16


def test_hub_reachable_defers_to_a_proxy(monkeypatch):
    import socket

    from nanobooth.core import models

    def no_network(*a, **k):
        raise OSError("unreachable")

    monkeypatch.setattr(socket, "create_connection", no_network)
    for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(k, raising=False)
    assert models.hub_reachable() is False
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy:3128")  # the proxy decides: the hub client tries
    assert models.hub_reachable() is True


def test_single_file_without_config_offline_explains(tmp_path):
    f = tmp_path / "m.safetensors"
    save_file({"x": torch.zeros(1)}, f)
    with pytest.raises(ModelError, match="m.safetensors"):
        load_pipeline(str(f))


def test_tome_patch_and_unpatch(tiny_model):
    c = load_components(str(tiny_model))
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([10, 10])
    cond = torch.randn(2, 77, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = c.unet(x, t, cond).sample
        apply_tome(c.unet, 0.5)
        assert tome_active(c.unet)
        merged = c.unet(x, t, cond).sample
        apply_tome(c.unet, 0.0)
        assert not tome_active(c.unet)
        back = c.unet(x, t, cond).sample
    assert not torch.allclose(ref, merged) and torch.equal(ref, back)


def test_trains_from_a_single_file_checkpoint(tiny_model, subject_dir, tmp_path):
    """model= takes an original-layout .safetensors (what A1111/civitai users have); offline it needs the
    diffusers configs that describe it (single_file_config)."""
    from conftest import train_args
    from safetensors.torch import load_file

    from nanobooth.cli import main
    from nanobooth.interop.export import export

    full = tmp_path / "full"
    assert main(["train", "dreambooth", *train_args(tiny_model, subject_dir, full, "learning_rate=1e-3")]) == 0
    ckpt = export(full, "single-file", tmp_path / "model.safetensors")
    assert any(k.startswith("model.diffusion_model.") for k in load_file(ckpt))
    pipe = load_pipeline(str(ckpt), single_file_config=str(tiny_model))
    run_unet = load_pipeline(str(full)).unet.state_dict()
    assert all(torch.equal(v, run_unet[k]) for k, v in pipe.unet.state_dict().items())
    # a built-in name describes it too (newcomer55: `--single-file-config toy` was "no such file or folder")
    named = load_pipeline(str(ckpt), single_file_config="tiny").unet.state_dict()  # the builder tiny_model comes from
    assert all(torch.equal(v, run_unet[k]) for k, v in named.items())
    # offline without it: one line naming the flag as each command spells it
    with pytest.raises(ModelError) as e:
        load_pipeline(str(ckpt))
    assert "--single-file-config (generate, eval) or the config key single_file_config (train)" in str(e.value)
    lora = tmp_path / "lora"
    assert main(["train", "dreambooth-lora", *train_args(str(ckpt), subject_dir, lora), f"single_file_config={tiny_model}"]) == 0
    assert (lora / "pytorch_lora_weights.safetensors").is_file()


def test_a_checkpoint_with_its_identifiers_embeddings_beside_it_says_the_identifier_needs_them(tmp_path, caplog):
    from nanobooth.core.models import _warn_unbound_identifier

    ckpt = tmp_path / "mine.safetensors"
    ckpt.write_bytes(b"")
    with caplog.at_level("WARNING", logger="nanobooth"):
        _warn_unbound_identifier(ckpt)
    assert caplog.text == ""  # no embeddings beside it: nothing to say
    (tmp_path / "mine_emb.safetensors").write_bytes(b"")
    with caplog.at_level("WARNING", logger="nanobooth"):
        _warn_unbound_identifier(ckpt)
    assert "mine_emb.safetensors" in caplog.text and "--weights RUN_DIR" in caplog.text and "'mine_emb'" in caplog.text


def test_an_unsupported_pipeline_is_refused_naming_every_family_nanobooth_trains(tmp_path):
    (tmp_path / "model_index.json").write_text('{"_class_name": "PixArtAlphaPipeline"}')
    with pytest.raises(ModelError, match="is a PixArtAlphaPipeline") as e:
        load_pipeline(str(tmp_path))
    for family in ("StableDiffusionPipeline", "StableDiffusionXLPipeline", "StableDiffusion3Pipeline", "FluxPipeline"):
        assert family in str(e.value)


def test_a_local_model_loads_without_the_libraries_loading_bars(tiny_model, capsys):
    # newcomer55: the demo's output held half-drawn "Loading weights: 0/68" lines of nested loading bars
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    capsys.readouterr()
    load_pipeline(str(tiny_model))
    err = capsys.readouterr().err
    assert "Loading pipeline components" not in err and "Loading weights" not in err
    assert dlog.is_progress_bar_enabled() and tlog.is_progress_bar_enabled()  # back on: a hub model's download shows its bar


def test_building_a_tiny_model_on_first_use_leaves_the_runs_random_draws_alone(tmp_path, monkeypatch):
    # newcomer55: the first run on a fresh cache built the model after its set_seed, and the builders reseed torch,
    # so its LoRA init and noise differed from every later run of the same command (weights up to 1.19 apart)
    from nanobooth.core.models import resolve_model

    monkeypatch.setenv("NANOBOOTH_CACHE", str(tmp_path))
    torch.manual_seed(123)
    expected = torch.rand(4)
    torch.manual_seed(123)
    resolve_model("tiny")  # built now: the cache is empty
    assert (tmp_path / "tiny-v1" / "model_index.json").is_file()
    assert torch.equal(torch.rand(4), expected)
