"""The training-method contract (methods/base.py), checked on every method in METHODS with the tiny models."""

import dataclasses
import re
import typing

import pytest
import safetensors.torch
import torch

from conftest import step2_resume_folder, train_args
from nanobooth.cli import main
from nanobooth.core.config import ConfigError, TrainConfig
from nanobooth.inference.generate import load_run
from nanobooth.methods import METHODS, DoRA, Full, LoHa, LoKr, LoRA, Method, TextualInversion
from nanobooth.core.models import load_components, load_pipeline

CHECKED = {"full": Full, "lora": LoRA, "dora": DoRA, "lokr": LoKr, "loha": LoHa, "textual_inversion": TextualInversion}
# textual inversion trains no weight of a module (its rows come from embeddings.attach, which needs the tokenizers):
# its contract (only the new rows train, groups, trained_modules, save -> load) is checked in test_textual_inversion.py
WEIGHTS = [n for n in CHECKED if n != "textual_inversion"]
# the tiny models' layers (32-64 wide) are small enough that LoKr's default rank 4 gives two full factors
ADAPTER = {"lora": (".lora_A.", ".lora_B."), "dora": (".lora_A.", ".lora_B.", ".lora_magnitude_vector."),
           "lokr": (".lokr_w1.", ".lokr_w2."), "loha": (".hada_w1_a.", ".hada_w1_b.", ".hada_w2_a.", ".hada_w2_b.")}
ADAPTER_PART = re.compile(r"\.(lora_|lokr_|hada_)")  # where an adapter parameter's name leaves its module's path
FIXTURES = ["tiny_model", "tiny_sdxl_model", "tiny_sd3_model", "tiny_flux_model"]
# LoKr/LoHa attach as LoRA does (methods/lycoris.py); checked on SD and SDXL only, to keep the suite short
CASES = [(n, f) for n in WEIGHTS for f in FIXTURES if n not in ("lokr", "loha") or f in FIXTURES[:2]]


def test_every_method_is_checked_here_and_configurable():
    assert METHODS == CHECKED
    assert all(issubclass(m, Method) and m.name == k for k, m in METHODS.items())
    # config's `method` accepts exactly the registry's keys
    assert set(typing.get_args(typing.get_type_hints(TrainConfig)["method"])) == set(METHODS)


def _attached(model, name, te):
    c = load_components(str(model))
    for m in (c.vae, *c.text_encoders, c.unet):
        m.requires_grad_(False)
    cfg = TrainConfig(model=str(model), method=name, train_text_encoder=te, learning_rate=1e-3, text_encoder_lr=2e-3)
    torch.manual_seed(0)
    METHODS[name]().attach(c.family, c.unet, c.text_encoders, cfg)
    return c, cfg


def _trainable(module) -> set[str]:
    return {n for n, p in module.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("te", [False, True])
@pytest.mark.parametrize("name,fixture", CASES)
def test_attach_trains_exactly_the_intended_parameters(name, te, fixture, request):
    model = request.getfixturevalue(fixture)
    base = load_components(str(model))
    c, cfg = _attached(model, name, te)
    method, fam = METHODS[name](), c.family
    unet_names = _trainable(c.unet)
    if name == "full":
        assert unet_names == {n for n, _ in c.unet.named_parameters()}
    else:  # adapters only, on the target modules only; the base weights untouched, bit for bit
        assert unet_names and all(any(a in n for a in ADAPTER[name]) for n in unet_names)
        assert all(any(a in n for n in unet_names) for a in ADAPTER[name])  # DoRA: its magnitudes train too
        assert all(any(ADAPTER_PART.split(n)[0].endswith(t) for t in cfg.lora_target_modules) for n in unet_names)
        base_sd = base.unet.state_dict()
        for k, v in c.unet.state_dict().items():
            if not ADAPTER_PART.search(k):
                assert torch.equal(v, base_sd[k.replace(".base_layer", "")]), k
    for i, t in enumerate(c.text_encoders):
        names = _trainable(t)
        if not te:
            assert not names
            continue
        read = fam.layers_read(i, t.config.num_hidden_layers)
        layers = {int(n.split("layers.")[1].split(".")[0]) for n in names if "layers." in n}
        assert layers == set(read)  # every layer the UNet reads trains, no other
        if not read:  # an encoder the denoiser reads no layer of (SD3's and FLUX's T5) trains nothing at all
            assert not names
            continue
        if name != "full":
            assert all(any(a in n for a in ADAPTER[name]) for n in names)
            assert all(any(a in n for n in names) for a in ADAPTER[name])
    # the optimizer sees each trainable parameter once, UNet group first, at the configured rates
    groups = method.param_groups(c.unet, c.text_encoders, cfg, scale=2)
    assert [g["lr"] for g in groups] == ([2e-3, 4e-3] if te else [2e-3])
    ids = [id(p) for g in groups for p in g["params"]]
    trainable = [p for m in (c.unet, *c.text_encoders) for p in m.parameters() if p.requires_grad]
    assert ids == [id(p) for p in trainable]  # module order: the optimizer state's layout in checkpoints
    trained_tes = [n for i, (n, t) in enumerate(zip(fam.text_encoder_names, c.text_encoders))
                   if fam.layers_read(i, t.config.num_hidden_layers)]  # SD3's T5: none read, never trained
    assert list(method.trained_modules(fam, c.unet, c.text_encoders, cfg)) == ["unet", *(trained_tes if te else ())]


@pytest.mark.parametrize("te", [False, True])
@pytest.mark.parametrize("name", WEIGHTS)
def test_save_then_load_for_inference_reproduces_the_trained_modules(name, te, tiny_model, tmp_path):
    c, cfg = _attached(tiny_model, name, te)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # stand-in for training: move every trainable tensor
        for m in (c.unet, *c.text_encoders):
            for p in m.parameters():
                if p.requires_grad:
                    p.add_(0.05 * torch.randn(p.shape, generator=g))
    ids = c.tokenizers[0]("a sks dog", padding="max_length", max_length=c.tokenizers[0].model_max_length, return_tensors="pt").input_ids
    x = torch.randn(1, c.unet.config.in_channels, 8, 8, generator=g)
    t = torch.tensor([500])

    def outputs(unet, text_encoder):
        with torch.no_grad():
            h = text_encoder(ids)[0]
            return h, unet(x, t, encoder_hidden_states=h).sample

    trained = outputs(c.unet, c.text_encoders[0])
    method = METHODS[name]()
    method.save(tmp_path, c, c.unet, c.text_encoders, cfg)
    pipe = method.load_for_inference(tmp_path, lambda: load_pipeline(str(tiny_model)))
    loaded = outputs(pipe.unet, pipe.text_encoder)
    via_generate = load_run(str(tiny_model), str(tmp_path))  # what `generate --weights RUN` loads: the same result
    assert all(torch.equal(a, b) for a, b in zip(loaded, outputs(via_generate.unet, via_generate.text_encoder)))
    base = load_pipeline(str(tiny_model))
    untrained = outputs(base.unet, base.text_encoder)
    for a, b in zip(trained, loaded):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-5)
    # the trained result differs from the base model's, so the check above can fail
    assert not torch.allclose(trained[1], untrained[1], atol=1e-3)
    if te:
        assert not torch.allclose(trained[0], untrained[0], atol=1e-3)
    else:
        assert torch.equal(loaded[0], untrained[0])  # a frozen text encoder comes back as the base one


ADAPTERS = [n for n in WEIGHTS if n != "full"]


def _saved_adapters(model, name, folder):
    """An adapter run's LORA_FILE (text encoder too) in `folder`, every trainable tensor moved off its init."""
    c, cfg = _attached(model, name, te=True)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # stand-in for training, as above
        for m in (c.unet, *c.text_encoders):
            for p in m.parameters():
                if p.requires_grad:
                    p.add_(0.05 * torch.randn(p.shape, generator=g))
    METHODS[name]().save(folder, c, c.unet, c.text_encoders, cfg)
    return safetensors.torch.load_file(str(folder / "pytorch_lora_weights.safetensors"))


@pytest.mark.parametrize("name", ADAPTERS)
def test_adapters_that_attach_to_nothing_or_part_of_the_model_are_refused(name, tiny_model, tiny_sd3_model, tmp_path):
    """An SD run's adapters loaded onto SD3 (another family: a transformer, no UNet) found no module for their UNet
    tensors; diffusers and peft drop those without an error, so the pipeline was the base model's."""
    from nanobooth.methods.lora import AdapterMismatch

    saved = _saved_adapters(tiny_model, name, tmp_path)
    unet_tensors = sum(k.startswith("unet.") for k in saved)
    assert 0 < unet_tensors < len(saved)  # the text encoder's are there too
    with pytest.raises(AdapterMismatch) as e:
        METHODS[name]().load_for_inference(tmp_path, lambda: load_pipeline(str(tiny_sd3_model)))
    # SD3's first text encoder is a CLIP whose layers have the tiny SD one's names: only the UNet's tensors are left out
    assert (e.value.unmatched, e.value.total) == (unet_tensors, len(saved))
    assert e.value.detail == f"{unet_tensors} of its adapter's {len(saved)} tensors matched none of the model's modules"
    file = tmp_path / "pytorch_lora_weights.safetensors"
    with safetensors.safe_open(str(file), "pt") as f:
        meta = f.metadata()  # LoKr's/LoHa's adapter configs
    unet_only = {k: v for k, v in saved.items() if k.startswith("unet.")}
    safetensors.torch.save_file(unet_only, str(file), metadata=meta)
    with pytest.raises(AdapterMismatch, match=f"none of its adapter's {len(unet_only)} tensors matched the model's modules"):
        METHODS[name]().load_for_inference(tmp_path, lambda: load_pipeline(str(tiny_sd3_model)))


@pytest.mark.parametrize("name", ADAPTERS)
def test_adapters_load_onto_another_checkpoint_of_the_same_architecture(name, tiny_model, tmp_path):
    """A run applied to another fine-tune of its base (same module names and shapes, other weights) is not refused:
    every tensor attaches, and the result differs from that checkpoint alone."""
    from nanobooth.tiny import build_tiny_pipeline

    other = build_tiny_pipeline(tmp_path / "other", seed=1)
    run = tmp_path / "run"
    run.mkdir()
    _saved_adapters(tiny_model, name, run)
    pipe = load_run(str(other), str(run))
    base = load_pipeline(str(other))
    assert not torch.equal(next(base.unet.parameters()), next(load_pipeline(str(tiny_model)).unet.parameters()))
    ids = base.tokenizer("a sks dog", padding="max_length", max_length=base.tokenizer.model_max_length, return_tensors="pt").input_ids
    x, t = torch.randn(1, base.unet.config.in_channels, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([500])

    def outputs(p):
        with torch.no_grad():
            h = p.text_encoder(ids)[0]
            return h, p.unet(x, t, encoder_hidden_states=h).sample

    for a, b in zip(outputs(pipe), outputs(base)):  # the text encoder's adapters and the UNet's both took effect
        assert not torch.allclose(a, b, atol=1e-4)


@pytest.mark.parametrize("variant,key,target,meant", [
    ("dreambooth-lora", "lora_target_modules", "down_blocks.0.resnet.0.conv1", "down_blocks.0.resnets.0.conv1"),
    ("dreambooth-loha", "lora_target_modules", "to_qq", "to_q"),
    ("dreambooth-lora", "text_encoder_lora_target_modules", "self_attn.qproj", "self_attn.q_proj"),
])
def test_a_target_that_names_no_module_is_refused_before_the_run_folder(variant, key, target, meant, tiny_model, subject_dir,
                                                                         tmp_path, capsys):
    # peft would add adapters where the other targets match and drop this one silently: fewer modules trained than asked
    default = TrainConfig.__dataclass_fields__[key].default_factory()
    out = tmp_path / "run"
    assert main(["train", variant, *train_args(tiny_model, subject_dir, out, f"{key}=[{', '.join(default + [target])}]",
                                              "train_text_encoder=true")]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if "config key" in line]  # beside the loading bars
    assert len(err) == 1 and f"config key '{key}': '{target}' matches no module" in err[0], err
    assert f"did you mean '{meant}'?" in err[0] and "Traceback" not in err[0]
    assert not out.exists()  # refused before anything was written


def test_full_module_paths_put_adapters_on_exactly_those_modules(tiny_model):
    c = load_components(str(tiny_model))
    cfg = TrainConfig(model=str(tiny_model), method="lora", lora_target_modules=["to_q", "down_blocks.0.resnets.0.conv1"])
    LoRA().check(c.family, c.unet, c.text_encoders, cfg)  # every target names a module: no error
    LoRA().attach(c.family, c.unet, c.text_encoders, cfg)
    convs = {n.rsplit(".lora_A", 1)[0] for n, _ in c.unet.named_modules() if n.endswith("lora_A") and "conv" in n}
    assert convs == {"down_blocks.0.resnets.0.conv1"}  # not down_blocks.0.resnets.0.conv2, nor another block's conv1


@pytest.mark.parametrize("name", ["lora", "dora"])
def test_loraplus_puts_each_groups_b_matrices_at_ratio_times_its_lr(name, tiny_model):
    c, cfg = _attached(tiny_model, name, te=True)
    plus = dataclasses.replace(cfg, loraplus_lr_ratio=4.0)
    groups = METHODS[name]().param_groups(c.unet, c.text_encoders, plus, scale=2)
    # UNet A, UNet B, text encoder A, text encoder B: the configured rates (x2 for scale), B's x4
    assert [g["lr"] for g in groups] == pytest.approx([2e-3, 8e-3, 4e-3, 16e-3])
    names = {id(p): n for m in (c.unet, *c.text_encoders) for n, p in m.named_parameters()}
    for g, side in zip(groups, "ABAB"):
        got = [names[id(p)] for p in g["params"]]
        b_side = [".lora_B."] + ([".lora_magnitude_vector."] if name == "dora" else [])  # peft's rule: B and 1-D
        assert got and all(any(k in n for k in b_side) == (side == "B") for n in got), (side, got[:3])
    plain = METHODS[name]().param_groups(c.unet, c.text_encoders, cfg, scale=2)
    assert sorted(id(p) for g in groups for p in g["params"]) == sorted(id(p) for g in plain for p in g["params"])


def test_loraplus_steps_b_at_ratio_times_the_lr_in_training(tiny_model, subject_dir, tmp_path):
    # Adam's first step moves each weight by about lr (m / sqrt(v) = sign(g)); B starts at zero, so after one step
    # its largest entry is B's lr: the ratio reaches the optimizer the train loop builds, not only param_groups
    def trained_b(out, *extra):
        assert main(["train", "dreambooth-lora", *train_args(tiny_model, subject_dir, out, "max_train_steps=1",
                                                             "learning_rate=1e-3", "lr_scheduler=constant", *extra)]) == 0
        sd = safetensors.torch.load_file(str(out / "pytorch_lora_weights.safetensors"))
        b = [v for k, v in sd.items() if "lora_B" in k or "lora.up" in k]
        assert b
        return max(v.abs().max().item() for v in b)
    assert trained_b(tmp_path / "plain") == pytest.approx(1e-3, rel=0.02)
    assert trained_b(tmp_path / "plus", "loraplus_lr_ratio=4") == pytest.approx(4e-3, rel=0.02)


def test_loraplus_on_an_adapter_without_b_matrices_is_refused(tiny_model):
    with pytest.raises(ConfigError, match="'loraplus_lr_ratio'.*method=lora or dora.*method=loha"):
        TrainConfig(model=str(tiny_model), method="loha", loraplus_lr_ratio=4)


def test_loraplus_resumes_bit_exact(tiny_model, subject_dir, tmp_path):
    # four optimizer groups (UNet A/B, text encoder A/B) saved and restored in the order the config rebuilds them
    def run(out, *extra):
        assert main(["train", "dreambooth-lora", *train_args(tiny_model, subject_dir, out, "learning_rate=1e-2",
                                                             "max_train_steps=4", "checkpointing_steps=2",
                                                             "train_text_encoder=true", "loraplus_lr_ratio=4", *extra)]) == 0
        return safetensors.torch.load_file(str(out / "pytorch_lora_weights.safetensors"))
    full = run(tmp_path / "full")
    resumed = run(step2_resume_folder(tmp_path / "full", tmp_path / "part"), "resume_from_checkpoint=latest")
    assert full.keys() == resumed.keys() and any("text_encoder" in k for k in full)
    assert all(torch.equal(full[k], resumed[k]) for k in full)
