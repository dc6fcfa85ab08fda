"""base_quantization (core/quantize.py): a LoRA on a quantized frozen FLUX base trains, leaves the quantized base
bit for bit as quantized, and its file loads on the unquantized base in diffusers."""

import json

import pytest
import torch
from conftest import step2_resume_folder, train_args
from safetensors.torch import load_file

import nanobooth.core.train as train_mod
from nanobooth.cli import main
from nanobooth.core import quantize
from nanobooth.core.config import ConfigError, TrainConfig, load_config
from nanobooth.families.flux import image_ids

pytest.importorskip("optimum.quanto")


def _quantized(unet) -> dict:
    """name -> (quantized data, scale) of every quanto-quantized weight, or (packed nf4 bytes, absmax) of every
    bitsandbytes 4-bit one."""
    from optimum.quanto import QModuleMixin

    out = {n: (m.weight._data.clone(), m.weight._scale.clone()) for n, m in unet.named_modules() if isinstance(m, QModuleMixin)}
    try:
        import bitsandbytes as bnb
    except ImportError:
        return out
    for n, m in unet.named_modules():
        if isinstance(m, bnb.nn.Linear4bit):
            assert m.weight.dtype == torch.uint8, n  # quantized, not a float weight in a 4-bit module's clothes
            out[n] = (m.weight.data.clone(), m.weight.quant_state.absmax.clone())
    return out


@pytest.mark.parametrize("kind", ["int8", "fp8", "nf4"])
def test_lora_on_quantized_flux_base_trains_and_loads_unquantized(kind, tiny_flux_model, subject_dir, tmp_path, monkeypatch):
    from diffusers import FluxPipeline

    if kind == "nf4":
        pytest.importorskip("bitsandbytes")

    seen = {}

    def spy(unet, cfg, dtype, device):  # the loop's quantized base, as quantized (before adapters exist)
        quantize.quantize_base(unet, cfg, dtype, device)
        seen["unet"], seen["before"] = unet, _quantized(unet)  # nf4 too: quantized on the CPU, here

    monkeypatch.setattr(train_mod, "quantize_base", spy)
    out = tmp_path / "run"
    assert main(["train", "flux/dreambooth-lora", *train_args(tiny_flux_model, subject_dir, out, f"base_quantization={kind}",
                                                               "gradient_checkpointing=true", "learning_rate=1e-3")]) == 0
    before, unet = seen["before"], seen["unet"]
    # the attention and feed-forward projections are quantized; the embedders and the output layer are not
    assert "transformer_blocks.0.attn.to_q" in before and "single_transformer_blocks.0.proj_mlp" in before
    assert not {"x_embedder", "context_embedder", "proj_out"} & set(before)
    after = _quantized(unet)  # peft's wrappers keep the quantized layer as base_layer
    assert {n.replace(".base_layer", "") for n in after} == set(before)
    for n, (data, scale) in after.items():
        b = before[n.replace(".base_layer", "")]
        assert torch.equal(data, b[0]) and torch.equal(scale, b[1]), n
    assert not any(p.requires_grad for n, p in unet.named_parameters() if "lora_" not in n)
    assert unet.is_gradient_checkpointing  # gradient_checkpointing=true reaches the transformer
    log = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    assert len(log) == 3 and all(0 < r["loss"] < 1e3 for r in log)
    sd = load_file(out / "pytorch_lora_weights.safetensors")
    assert sd and all("lora" in k for k in sd)
    assert any(k.endswith("lora_B.weight") and v.abs().max() > 0 for k, v in sd.items())  # lora_B starts at 0: it trained
    # the file loads on the unquantized base (diffusers), every adapter reaching its module, and changes the output
    pipe = FluxPipeline.from_pretrained(tiny_flux_model)
    x = torch.randn(1, 64, 64, generator=torch.Generator().manual_seed(0))
    kw = dict(timestep=torch.tensor([0.5]), guidance=torch.tensor([3.5]), pooled_projections=torch.randn(1, 32),
              encoder_hidden_states=torch.randn(1, 7, 32), txt_ids=torch.zeros(7, 3), img_ids=image_ids(16, 16))
    with torch.no_grad():
        base_out = pipe.transformer(hidden_states=x, **kw)[0]
        pipe.load_lora_weights(out, weight_name="pytorch_lora_weights.safetensors")
        saved = {k.split(".lora")[0].removeprefix("transformer.") for k in sd}
        assert {n.split(".lora")[0] for n, _ in pipe.transformer.named_parameters() if ".lora_" in n} == saved
        assert not torch.allclose(base_out, pipe.transformer(hidden_states=x, **kw)[0], atol=1e-4)
        image = pipe("a sks dog", num_inference_steps=2, height=32, width=32, output_type="np").images[0]
    assert image.shape == (32, 32, 3) and bool(torch.isfinite(torch.from_numpy(image)).all())


def test_quantize_none_leaves_the_model_alone(tiny_flux_model):
    from nanobooth.core.models import load_components

    unet = load_components(str(tiny_flux_model)).unet
    ref = {k: v.clone() for k, v in unet.state_dict().items()}
    quantize.quantize_base(unet, TrainConfig(method="lora"), torch.bfloat16, torch.device("cpu"))
    assert all(torch.equal(ref[k], v) for k, v in unet.state_dict().items())


def test_base_quantization_refuses_full_fine_tune():
    with pytest.raises(ConfigError, match="config key 'base_quantization'.*method=lora") as e:
        load_config("flux/dreambooth", {"base_quantization": "int8"})
    assert "\n" not in str(e.value)
    assert load_config("flux/dreambooth-lora", {"base_quantization": "int8"}).base_quantization == "int8"


def test_nf4_with_a_bitsandbytes_that_cannot_quantize_on_the_cpu_is_one_line_before_the_run_folder(
        tiny_flux_model, subject_dir, tmp_path, capsys, monkeypatch):
    bnb = pytest.importorskip("bitsandbytes")

    def cuda_only(self, device=None, *a, **k):  # what bitsandbytes before CPU support does on a CPU
        raise RuntimeError("CUDA Setup failed")

    monkeypatch.setattr(bnb.nn.Params4bit, "to", cuda_only)
    out = tmp_path / "run"
    assert main(["train", "flux/dreambooth-lora", *train_args(tiny_flux_model, subject_dir, out, "base_quantization=nf4")]) != 0
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("nanobooth: error:")]
    assert len(lines) == 1 and "config key 'base_quantization'" in lines[0] and "pip install -U bitsandbytes" in lines[0]
    assert "Traceback" not in err
    assert not out.exists()


def test_resume_on_quantized_base_is_bit_exact(tiny_flux_model, subject_dir, tmp_path):
    """Quantizing is deterministic and checkpoints hold the adapters only, so a resumed run re-quantizes the same base."""
    extra = ["base_quantization=int8", "gradient_checkpointing=false", "learning_rate=1e-3", "max_train_steps=4", "checkpointing_steps=2"]
    full = tmp_path / "full"
    assert main(["train", "flux/dreambooth-lora", *train_args(tiny_flux_model, subject_dir, full, *extra)]) == 0
    part = step2_resume_folder(full, tmp_path / "part")
    assert main(["train", "flux/dreambooth-lora", *train_args(tiny_flux_model, subject_dir, part, *extra,
                                                               "resume_from_checkpoint=latest")]) == 0
    wa, wb = load_file(full / "pytorch_lora_weights.safetensors"), load_file(part / "pytorch_lora_weights.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    la = [json.loads(x)["loss"] for x in (full / "train_log.jsonl").read_text().splitlines()[2:]]
    assert la == [json.loads(x)["loss"] for x in (part / "train_log.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("method", ["lokr", "loha"])
def test_lycoris_on_an_int8_base_trains_with_the_base_frozen(method, tiny_flux_model, subject_dir, tmp_path, monkeypatch):
    """LoKr and LoHa wrap quanto's int8 layers like LoRA does: the quantized base stays bit for bit, only the adapters
    train, and the fixed-noise validation loss falls."""
    seen = {}

    def spy(unet, cfg, dtype, device):
        quantize.quantize_base(unet, cfg, dtype, device)
        seen["unet"], seen["before"] = unet, _quantized(unet)

    monkeypatch.setattr(train_mod, "quantize_base", spy)
    out = tmp_path / "run"
    assert main(["train", "flux/dreambooth-lora", *train_args(tiny_flux_model, subject_dir, out, f"method={method}",
                                                               "base_quantization=int8", "learning_rate=1e-2", "max_train_steps=8",
                                                               "validation_loss_steps=8")]) == 0
    before, unet = seen["before"], seen["unet"]
    after = _quantized(unet)
    assert before and {n.replace(".base_layer", "") for n in after} == set(before)
    for n, (data, scale) in after.items():
        b = before[n.replace(".base_layer", "")]
        assert torch.equal(data, b[0]) and torch.equal(scale, b[1]), n
    trained = [n for n, p in unet.named_parameters() if p.requires_grad]
    assert trained and all(("lokr_" if method == "lokr" else "hada_") in n for n in trained)
    val = [r["val_loss"] for r in map(json.loads, (out / "train_log.jsonl").read_text().splitlines()) if "val_loss" in r]
    assert len(val) == 2 and val[-1] < 0.99 * val[0], val  # the fixed-noise loss, steps 0 and 8
