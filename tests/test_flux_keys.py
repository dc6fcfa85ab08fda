"""`nanobooth export --format kohya|comfyui` of FLUX and SD3 LoRAs (interop/flux_keys.py, export.py): FLUX LoRAs
get kohya's BFL names with q/k/v fused and reload through diffusers' own kohya-FLUX converter to the run's
outputs; SD3 LoRAs keep diffusers' names and refuse kohya's format in one line."""

import inspect
from unittest import mock

import pytest
import torch
from conftest import train_args
from safetensors.torch import load_file

from nanobooth.cli import main
from nanobooth.families.flux import image_ids
from nanobooth.interop import export as ex
from nanobooth.interop import flux_keys

DIM = 32  # the tiny FLUX's width (2 heads x 16); its single blocks' linear1 is 3 * 32 + 4 * 32 wide


@pytest.fixture(scope="module")
def flux_lora_run(tiny_flux_model, subject_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("flux-export") / "lora"
    assert main(["train", "flux/dreambooth-lora", *train_args(tiny_flux_model, subject_dir, out, "gradient_checkpointing=false",
                                                               "train_text_encoder=true", "lora_rank=4", "lora_alpha=8",
                                                               "learning_rate=1e-2", "text_encoder_lr=1e-2")]) == 0
    return out


def tiny_width_kohya_converter():
    """diffusers' `_convert_kohya_flux_lora_to_diffusers`, unchanged but for the one thing the tiny model cannot
    match: the function hard-codes FLUX.1's single-block linear1 split [3072, 3072, 3072, 12288] (and asserts
    the LoRA's rows add up to it). The same source with the tiny model's widths in that literal."""
    from diffusers.loaders import lora_conversion_utils as lcu

    src = inspect.getsource(lcu._convert_kohya_flux_lora_to_diffusers)
    literal = "dims=[3072, 3072, 3072, 12288]"
    assert src.count(literal) == 1  # if diffusers changes this, the shim must be revisited
    scope = dict(vars(lcu))
    exec(src.replace(literal, f"dims=[{DIM}, {DIM}, {DIM}, {4 * DIM}]"), scope)
    return scope["_convert_kohya_flux_lora_to_diffusers"]


@torch.no_grad()
def flux_outputs(pipe):
    """CLIP-L's pooled output for a prompt and the transformer's prediction on fixed inputs (every trained path)."""
    ids = pipe.tokenizer(["a photo of sks dog"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    g = torch.Generator().manual_seed(0)
    pooled = pipe.text_encoder(ids).pooler_output
    x = torch.randn(1, 64, 64, generator=g)
    out = pipe.transformer(hidden_states=x, timestep=torch.tensor([0.5]), guidance=torch.tensor([3.5]), pooled_projections=pooled,
                           encoder_hidden_states=torch.randn(1, 7, 32, generator=g), txt_ids=torch.zeros(7, 3),
                           img_ids=image_ids(16, 16), return_dict=False)[0]
    return pooled, out


def test_flux_kohya_export_is_bfl_layout_and_diffusers_kohya_loader_reproduces_the_run(flux_lora_run, tiny_flux_model, tmp_path):
    from diffusers import FluxPipeline
    from diffusers.loaders import lora_pipeline

    out = tmp_path / "sks_dog_flux.safetensors"
    assert main(["export", str(flux_lora_run), "--format", "kohya", "--out", str(out)]) == 0
    tensors = load_file(out)
    names = {k.split(".")[0] for k in tensors}
    unet = {n for n in names if n.startswith("lora_unet_")}
    # kohya's lora_flux / ComfyUI names: the BFL module path with underscores, q/k/v fused
    assert unet == {f"lora_unet_double_blocks_0_{m}" for m in ("img_attn_qkv", "txt_attn_qkv", "img_attn_proj", "txt_attn_proj",
                                                                 "img_mlp_0", "img_mlp_2", "txt_mlp_0", "txt_mlp_2")} | {
        "lora_unet_single_blocks_0_linear1"}
    assert names - unet and all(n.startswith("lora_te1_text_model_encoder_layers_") for n in names - unet)  # CLIP-L
    assert all({f"{n}.lora_down.weight", f"{n}.lora_up.weight", f"{n}.alpha"} <= tensors.keys() for n in names)
    qkv, linear1 = "lora_unet_double_blocks_0_img_attn_qkv", "lora_unet_single_blocks_0_linear1"
    assert tensors[f"{qkv}.lora_down.weight"].shape == (12, DIM) and tensors[f"{qkv}.lora_up.weight"].shape == (3 * DIM, 12)
    assert tensors[f"{linear1}.lora_up.weight"].shape == (7 * DIM, 12)
    assert tensors[f"{linear1}.lora_up.weight"][3 * DIM:].abs().max() == 0  # proj_mlp was not trained: its rows stay zero
    # alpha / rank is the run's 8 / 4 everywhere: 24 on the rank-12 fused modules
    assert {tensors[f"{n}.alpha"].item() / tensors[f"{n}.lora_down.weight"].shape[0] for n in names} == {2.0}
    assert tensors[f"{qkv}.alpha"].item() == 24.0
    comfy = tmp_path / "comfy.safetensors"
    ex.export(flux_lora_run, "comfyui", comfy)
    again = load_file(comfy)
    assert again.keys() == tensors.keys() and all(torch.equal(again[k], v) for k, v in tensors.items())
    meta = ex._load(out)[1]
    assert meta["ss_base_model_version"] == "flux1" and meta["modelspec.architecture"] == "flux-1-dev/lora"

    native = FluxPipeline.from_pretrained(tiny_flux_model)
    native.load_lora_weights(flux_lora_run, weight_name="pytorch_lora_weights.safetensors")
    kohya = FluxPipeline.from_pretrained(tiny_flux_model)
    with mock.patch.object(lora_pipeline, "_convert_kohya_flux_lora_to_diffusers", tiny_width_kohya_converter()):
        kohya.load_lora_weights(str(out))
    # every module of the run got its adapter back from the kohya file (diffusers drops unknown keys silently)
    for part in ("transformer", "text_encoder"):
        wanted = {n.split(".lora")[0] for n, _ in getattr(native, part).named_parameters() if ".lora_" in n}
        got = {n.split(".lora")[0] for n, _ in getattr(kohya, part).named_parameters() if ".lora_" in n}
        assert wanted and wanted <= got, part  # the converter also gives proj_mlp an adapter, with zero up weights
    base = flux_outputs(FluxPipeline.from_pretrained(tiny_flux_model))
    for a, b, c in zip(flux_outputs(native), flux_outputs(kohya), base):
        # measured: CLIP bitwise equal, transformer 2.4e-7 (the fused rank-12 product sums in another order)
        torch.testing.assert_close(b, a, rtol=0, atol=1e-5)
        assert (a - c).abs().max() > 1e-3  # the LoRA moves both outputs, so the match means something


def test_every_flux_kohya_module_names_a_bfl_weight_of_its_shape(flux_lora_run, tiny_flux_model, tmp_path):
    """ComfyUI's rule (comfy/lora.py model_lora_keys_unet: `lora_unet_` + each `diffusion_model.<path>.weight` of
    the BFL model, dots as underscores; CLIP-L's layers as `lora_te1_text_model_encoder_layers_<i>_<proj>`), checked
    on the BFL key set of the tiny model (which the single-file test loads back through diffusers): every module
    of the file resolves and its up @ down has the weight's shape, or ComfyUI would skip it."""
    from diffusers import FluxTransformer2DModel

    tensors = load_file(ex.export(flux_lora_run, "comfyui", tmp_path / "c.safetensors"))
    bfl = flux_keys.transformer_to_bfl(FluxTransformer2DModel.from_pretrained(tiny_flux_model, subfolder="transformer").state_dict())
    comfy = {"lora_unet_" + k.removesuffix(".weight").replace(".", "_"): v.shape for k, v in bfl.items() if k.endswith(".weight")}
    clip = {f"lora_te1_text_model_encoder_layers_{i}_{p}" for i in range(2)
            for p in ("self_attn_q_proj", "self_attn_k_proj", "self_attn_v_proj", "self_attn_out_proj", "mlp_fc1", "mlp_fc2")}
    for name in {k.split(".")[0] for k in tensors}:
        assert name in comfy or name in clip, name
        if name in comfy:
            assert (tensors[f"{name}.lora_up.weight"] @ tensors[f"{name}.lora_down.weight"]).shape == comfy[name], name


def test_fused_parts_trained_at_different_scales_and_the_final_layer():
    g = torch.Generator().manual_seed(0)
    q, k = (torch.randn(2, DIM, generator=g), torch.randn(DIM, 2, generator=g)), (torch.randn(3, DIM, generator=g), torch.randn(DIM, 3, generator=g))
    out = flux_keys.flux_lora_to_kohya({"transformer_blocks.3.attn.to_q": (*q, 4.0), "transformer_blocks.3.attn.to_k": (*k, 0.5)})
    name = "lora_unet_double_blocks_3_img_attn_qkv"
    delta = out[f"{name}.lora_up.weight"] @ out[f"{name}.lora_down.weight"] * out[f"{name}.alpha"] / 5
    torch.testing.assert_close(delta, torch.cat([4.0 * q[1] @ q[0], 0.5 * k[1] @ k[0], torch.zeros(DIM, DIM)]))
    # diffusers' final norm emits (scale, shift), BFL's final layer (shift, scale)
    up = torch.arange(8.0).reshape(8, 1)
    final = flux_keys.flux_lora_to_kohya({"norm_out.linear": (torch.ones(1, 4), up, 1.0)})
    assert final["lora_unet_final_layer_adaLN_modulation_1.lora_up.weight"][:, 0].tolist() == [4, 5, 6, 7, 0, 1, 2, 3]
    with pytest.raises(ex.ExportError, match="'transformer_blocks.0.attn.norm_q'.*--format diffusers"):
        flux_keys.flux_lora_to_kohya({"transformer_blocks.0.attn.norm_q": (torch.ones(1, 4), up, 1.0)})
    # a FLUX DoRA has no place in the fused layout: refused, naming the key
    with pytest.raises(ex.ExportError, match="to_q.lora_magnitude_vector' is a DoRA magnitude.*--format diffusers"):
        flux_keys.flux_run_to_kohya({"transformer.transformer_blocks.0.attn.to_q.lora_magnitude_vector": torch.ones(DIM)},
                                    {"transformer": {"r": 4, "lora_alpha": 4}})


def test_sd3_lora_exports_for_comfyui_in_diffusers_layout_and_refuses_kohya(tiny_sd3_model, subject_dir, tmp_path, capsys):
    run = tmp_path / "sd3"
    assert main(["train", "sd3/dreambooth-lora", *train_args(tiny_sd3_model, subject_dir, run, "gradient_checkpointing=false",
                                                              "max_train_steps=1")]) == 0
    capsys.readouterr()
    assert main(["export", str(run), "--format", "kohya", "--out", str(tmp_path / "k.safetensors")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "SD3" in err and "--format comfyui" in err
    assert not (tmp_path / "k.safetensors").exists()
    out = ex.export(run, "comfyui", tmp_path / "c.safetensors")
    assert out.read_bytes() == (run / "pytorch_lora_weights.safetensors").read_bytes()
    assert all(k.startswith("transformer.transformer_blocks.") for k in load_file(out))
    with pytest.raises(ex.ExportError, match="SD3 run: single-file"):
        ex.export(run, "single-file", tmp_path / "s.safetensors")
    assert not (tmp_path / "s.safetensors").exists()


def tiny_width_single_file_converter():
    """diffusers' `convert_flux_transformer_checkpoint_to_diffusers` with FLUX.1's hard-coded width
    (`inner_dim = 3072`, used to split linear1) replaced by the tiny model's; otherwise its own source."""
    from diffusers.loaders import single_file_utils as sfu

    src = inspect.getsource(sfu.convert_flux_transformer_checkpoint_to_diffusers)
    assert src.count("inner_dim = 3072") == 1
    scope = dict(vars(sfu))
    exec(src.replace("inner_dim = 3072", f"inner_dim = {DIM}"), scope)
    return scope["convert_flux_transformer_checkpoint_to_diffusers"]


def from_bfl_file(path, config):
    from diffusers import FluxTransformer2DModel
    from diffusers.loaders import single_file_model as sfm

    entry = dict(sfm.SINGLE_FILE_LOADABLE_CLASSES["FluxTransformer2DModel"], checkpoint_mapping_fn=tiny_width_single_file_converter())
    with mock.patch.dict(sfm.SINGLE_FILE_LOADABLE_CLASSES, {"FluxTransformer2DModel": entry}):
        return FluxTransformer2DModel.from_single_file(str(path), config=str(config), subfolder="transformer")


def test_single_file_of_a_full_flux_run_is_bfl_layout_and_loads_back_exactly(tiny_flux_model, subject_dir, tmp_path):
    from diffusers import FluxPipeline

    run = tmp_path / "full"
    assert main(["train", "flux/dreambooth", *train_args(tiny_flux_model, subject_dir, run, "gradient_checkpointing=false",
                                                          "learning_rate=1e-3")]) == 0
    out = tmp_path / "flux_dog.safetensors"
    assert main(["export", str(run), "--format", "single-file", "--out", str(out)]) == 0
    tensors = load_file(out)
    for key in ("double_blocks.0.img_attn.qkv.weight", "double_blocks.0.txt_attn.qkv.bias", "double_blocks.0.img_attn.norm.query_norm.scale",
                "double_blocks.0.txt_mod.lin.weight", "single_blocks.0.linear1.weight", "single_blocks.0.norm.key_norm.scale",
                "single_blocks.0.modulation.lin.weight", "img_in.weight", "txt_in.bias", "guidance_in.out_layer.weight",
                "vector_in.in_layer.weight", "final_layer.adaLN_modulation.1.weight", "final_layer.linear.weight"):
        assert key in tensors, key
    assert tensors["single_blocks.0.linear1.weight"].shape == (7 * DIM, DIM)
    assert ex._load(out)[1]["modelspec.architecture"] == "flux-1-dev"

    trained = FluxPipeline.from_pretrained(run).transformer
    loaded = from_bfl_file(out, run)
    a, b = trained.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    base = FluxPipeline.from_pretrained(tiny_flux_model).transformer.state_dict()
    assert any(not torch.equal(a[k], base[k]) for k in a)  # the run trained: the round trip is not of the base


def test_single_file_of_a_flux_lora_run_is_the_fused_transformer(flux_lora_run, tiny_flux_model, tmp_path):
    from diffusers import FluxPipeline

    out = ex.export(flux_lora_run, "single-file", tmp_path / "fused.safetensors")
    assert not any("lora" in k for k in load_file(out))
    native = FluxPipeline.from_pretrained(tiny_flux_model)
    native.load_lora_weights(flux_lora_run, weight_name="pytorch_lora_weights.safetensors")
    fused = FluxPipeline.from_pretrained(tiny_flux_model)
    fused.transformer = from_bfl_file(out, tiny_flux_model)
    fused.text_encoder = native.text_encoder  # the BFL file holds the transformer only
    (_, a), (_, b) = flux_outputs(native), flux_outputs(fused)
    # not bitwise (W + s*B@A rounds differently from W@x + s*B@(A@x)): measured 4.8e-7
    torch.testing.assert_close(b, a, rtol=0, atol=1e-5)
    base = FluxPipeline.from_pretrained(tiny_flux_model)
    base.text_encoder = native.text_encoder
    assert (a - flux_outputs(base)[1]).abs().max() > 1e-3  # the transformer LoRA moves the output
