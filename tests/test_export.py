"""`nanobooth export`: kohya LoRA files keep the trained alpha and reload identically; single-file
checkpoints have the LDM/SGM layout and load back through diffusers bit for bit; bad input is one line."""

import argparse
import hashlib
import shutil
from pathlib import Path
from unittest import mock

import pytest
import torch
from conftest import train_args
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from nanobooth.interop import export as ex
from nanobooth.interop import kohya
from nanobooth.interop import ldm
from nanobooth.cli import main


def export_cli(*argv: str) -> int:
    """`nanobooth export ...` through the real CLI entry point, whether or not cli.py registers it yet."""
    from nanobooth import cli

    build = cli.build_parser

    def with_export(train_variant=None):
        parser = build(train_variant)
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        if "export" not in sub.choices:
            ex.add_parser(sub)
        return parser

    with mock.patch.object(cli, "build_parser", with_export):
        return main(["export", *argv])


def read(path):
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def sd_pipe(model, lora=None):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(model, safety_checker=None, requires_safety_checker=False)
    if lora:
        pipe.load_lora_weights(str(lora))
    return pipe


def realign(*modules) -> None:
    """Move every weight into fresh (64-byte aligned) memory.

    Weights loaded from safetensors are views into the mmapped file, at offsets set by the file's header
    length and tensor order, so two loads of bit-identical weights (a diffusers folder, a single file)
    usually sit at different alignments. CPU GEMM kernels (oneDNN/MKL) peel an unaligned head off a
    vectorised dot product, which changes the summation order: same weights, last-bit differences in
    the outputs (up to 7e-7 in the UNet's). With both copies aligned the two forward passes run the
    same kernels in the same order, so outputs can be compared exactly."""
    for m in modules:
        for t in [*m.parameters(), *m.buffers()]:
            t.data = t.data.clone(memory_format=torch.contiguous_format)


@torch.no_grad()
def forward(pipe, added=None):
    """Text-encoder states for a prompt and the UNet's prediction on fixed noise: every trained path
    (weights realigned first, so that equal weights give bitwise equal outputs)."""
    realign(pipe.text_encoder, pipe.unet)
    ids = pipe.tokenizer(["a photo of sks dog"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    x = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    hidden = pipe.text_encoder(ids)[0]
    return hidden, pipe.unet(x, torch.tensor([400]), hidden).sample


@pytest.fixture(scope="module")
def lora_run(tiny_model, subject_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "lora"
    assert main(["train", "dreambooth-lora", *train_args(tiny_model, subject_dir, out, "train_text_encoder=true", "lora_rank=4",
                                                          "lora_alpha=8", "learning_rate=1e-2", "max_train_steps=2")]) == 0
    return out


@pytest.fixture(scope="module")
def full_run(tiny_model, subject_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "full"
    assert main(["train", "dreambooth-finetune-text-encoder", *train_args(tiny_model, subject_dir, out, "learning_rate=1e-3",
                                                                          "text_encoder_lr=1e-3", "max_train_steps=2")]) == 0
    return out


# --- kohya ------------------------------------------------------------------------------------------------------

def test_kohya_export_keeps_the_trained_alpha_and_reloads_identically(lora_run, tiny_model, tmp_path):
    out = tmp_path / "sks_dog.safetensors"
    assert export_cli(str(lora_run), "--format", "kohya", "--out", str(out)) == 0
    tensors, meta = read(out)
    alphas = {k: v for k, v in tensors.items() if k.endswith(".alpha")}
    assert alphas and all(v.item() == 8.0 for v in alphas.values())  # the trained alpha, not the rank (4)
    downs = [k for k in tensors if k.endswith(".lora_down.weight")]
    assert len(downs) == len(alphas) and all(tensors[k].shape[0] == 4 for k in downs)
    # kohya's names for SD 1.x: diffusers module paths with underscores; the text encoder under lora_te_text_model_
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight" in tensors
    assert "lora_unet_up_blocks_1_attentions_0_transformer_blocks_0_attn2_to_out_0.lora_up.weight" in tensors
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight" in tensors
    assert all(k.split(".")[0].startswith(("lora_unet_", "lora_te_")) for k in tensors)
    assert meta["ss_network_module"] == "networks.lora" and meta["ss_network_dim"] == "4"
    assert float(meta["ss_network_alpha"]) == 8.0 and meta["ss_base_model_version"] == "sd_v1"
    assert meta["ss_output_name"] == "sks_dog" and meta["ss_instance_prompt"] == "a photo of sks dog"
    assert meta["modelspec.architecture"] == "stable-diffusion-v1/lora"
    body = out.read_bytes()
    assert meta["sshs_model_hash"] == hashlib.sha256(body[8 + int.from_bytes(body[:8], "little"):]).hexdigest()

    original = forward(sd_pipe(tiny_model, lora_run / "pytorch_lora_weights.safetensors"))
    exported = forward(sd_pipe(tiny_model, out))
    base = forward(sd_pipe(tiny_model))
    for a, b, c in zip(original, exported, base):
        # bitwise equal today (weights realigned); 1e-6 leaves diffusers' kohya loader room to fold alpha/rank
        # into the weights, which rounds unless the ratio is a power of two
        torch.testing.assert_close(b, a, rtol=0, atol=1e-6)
        assert (a - c).abs().max() > 1e-3  # the LoRA does move both outputs, so the match above means something
    # the comparison sees the alpha: the same file with alpha = rank (diffusers' converter) loads at half strength
    wrong = tmp_path / "alpha_is_rank.safetensors"
    save_file({k: torch.tensor(4.0) if k.endswith(".alpha") else v for k, v in tensors.items()}, wrong)
    for a, b in zip(original, forward(sd_pipe(tiny_model, wrong))):
        assert (a - b).abs().max() > 1e-4


def test_a_lora_on_convolutions_too_reloads_whole_and_exports_to_kohya(tiny_model, subject_dir, tmp_path):
    """kohya's LoCon: LoRA on the resnets' convolutions, proj_in/out and ff as well. diffusers' loader drops the
    attention adapters of a file that mixes its names with peft's (families/sd._diffusers_or_peft), so this checks
    that the run's file, its kohya export and ComfyUI's merge formula give one model."""
    out = tmp_path / "locon"
    targets = "lora_target_modules=[to_q, to_k, to_v, to_out.0, proj_in, proj_out, ff.net.0.proj, ff.net.2, conv1, conv2]"
    assert main(["train", "dreambooth-lora", *train_args(tiny_model, subject_dir, out, "lora_rank=4", "lora_alpha=8",
                                                          "learning_rate=1e-2", "max_train_steps=2", targets)]) == 0
    run_pipe = sd_pipe(tiny_model, out / "pytorch_lora_weights.safetensors")
    adapted = {n for n, m in run_pipe.unet.named_modules() if hasattr(m, "lora_A")}
    assert any(n.endswith("attn1.to_q") for n in adapted) and any(n.endswith("resnets.0.conv1") for n in adapted)
    kohya = tmp_path / "locon.safetensors"
    assert export_cli(str(out), "--format", "kohya", "--out", str(kohya)) == 0
    tensors, _ = read(kohya)
    assert tensors["lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight"].shape[1:] == (32, 3, 3)
    names = {k.split(".")[0] for k in tensors}
    assert len(names) == len(adapted)
    comfy = sd_pipe(tiny_model)  # ComfyUI's LoRA merge (comfy/weight_adapter/lora.py): W += alpha / rank * up @ down
    modules = {"lora_unet_" + n.replace(".", "_"): m for n, m in comfy.unet.named_modules()}
    with torch.no_grad():
        for n in names:
            up, down = tensors[f"{n}.lora_up.weight"], tensors[f"{n}.lora_down.weight"]
            w = modules[n].weight
            w += tensors[f"{n}.alpha"] / down.shape[0] * (up.flatten(1) @ down.flatten(1)).reshape(w.shape)
    trained, base = forward(run_pipe)[1], forward(sd_pipe(tiny_model))[1]
    assert (trained - base).abs().max() > 1e-2
    torch.testing.assert_close(forward(sd_pipe(tiny_model, kohya))[1], trained, rtol=0, atol=1e-5)
    torch.testing.assert_close(forward(comfy)[1], trained, rtol=0, atol=1e-5)


def test_kohya_fp16_and_unet_only(tiny_model, subject_dir, tmp_path):
    run = tmp_path / "run"
    assert main(["train", "dreambooth-lora", *train_args(tiny_model, subject_dir, run, "lora_rank=2", "max_train_steps=1")]) == 0
    out = tmp_path / "k.safetensors"
    ex.export(run, "kohya", out, dtype="fp16")
    tensors, meta = read(out)
    assert all(k.startswith("lora_unet_") for k in tensors)
    assert {v.dtype for k, v in tensors.items() if not k.endswith(".alpha")} == {torch.float16}
    assert {v.item() for k, v in tensors.items() if k.endswith(".alpha")} == {4.0}  # the variant's alpha 4, at rank 2
    assert {v.shape[0] for k, v in tensors.items() if k.endswith(".lora_down.weight")} == {2}
    assert meta["ss_network_train_unet_only"] == "True"


def test_kohya_alpha_follows_peft_patterns_and_rslora():
    state = {"unet.a.to_q.lora_A.weight": torch.zeros(4, 8), "unet.a.to_q.lora_B.weight": torch.zeros(8, 4),
             "unet.a.to_k.lora_A.weight": torch.zeros(2, 8), "unet.a.to_k.lora_B.weight": torch.zeros(8, 2)}
    conf = {"unet": {"r": 4, "lora_alpha": 8, "rank_pattern": {"to_k": 2}, "alpha_pattern": {"to_k": 1}}}
    out = kohya.lora_to_kohya(state, conf)
    assert out["lora_unet_a_to_q.alpha"].item() == 8 and out["lora_unet_a_to_k.alpha"].item() == 1
    rs = kohya.lora_to_kohya(state, {"unet": {**conf["unet"], "use_rslora": True}})
    assert rs["lora_unet_a_to_q.alpha"].item() == pytest.approx(8 * 2)  # kohya alpha/r == rsLoRA alpha/sqrt(r)
    # a DoRA magnitude becomes LyCORIS's dora_scale, one value per output row
    dora = kohya.lora_to_kohya({**state, "unet.a.to_q.lora_magnitude_vector": torch.arange(8.0)}, conf)
    assert torch.equal(dora["lora_unet_a_to_q.dora_scale"], torch.arange(8.0).reshape(8, 1))
    with pytest.raises(ex.ExportError, match="DoRA magnitude"):  # a conv layer's: not exported
        kohya.lora_to_kohya({"unet.a.conv.lora_magnitude_vector": torch.zeros(1, 8, 1, 1)}, conf)


def lycoris_dora_merge(base_weight, down, up, alpha, dora_scale):
    """What a LyCORIS-layout DoRA module does to its base weight (LyCORIS's `apply_weight_decompose` with
    `wd_on_output`, written out from its source): W + (alpha / rank) up @ down, each output row then scaled
    to dora_scale (its norm taken with LyCORIS's float32 eps)."""
    merged = base_weight + (alpha / down.shape[0]) * (up @ down)
    return merged * (dora_scale / (merged.norm(dim=1, keepdim=True) + torch.finfo(torch.float32).eps))


def test_kohya_export_of_a_dora_run_is_the_lycoris_layout_and_merges_back_to_the_trained_model(tiny_model, subject_dir, tmp_path):
    run = tmp_path / "dora"
    assert main(["train", "dreambooth-dora", *train_args(tiny_model, subject_dir, run, "train_text_encoder=true", "lora_rank=4",
                                                          "lora_alpha=8", "learning_rate=1e-2", "max_train_steps=2")]) == 0
    out = tmp_path / "sks_dog_dora.safetensors"
    assert export_cli(str(run), "--format", "kohya", "--out", str(out)) == 0
    tensors, meta = read(out)
    names = {k.split(".")[0] for k in tensors}
    assert all({f"{n}.lora_down.weight", f"{n}.lora_up.weight", f"{n}.alpha", f"{n}.dora_scale"} <= tensors.keys() for n in names)
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.dora_scale" in tensors
    assert all(tensors[f"{n}.dora_scale"].shape == (tensors[f"{n}.lora_up.weight"].shape[0], 1) for n in names)
    assert {tensors[f"{n}.alpha"].item() for n in names} == {8.0}
    assert meta["ss_network_module"] == "lycoris.kohya" and '"dora_wd": "True"' in meta["ss_network_args"]

    # merge the exported file into a plain base model the way LyCORIS does, module by module
    merged = sd_pipe(tiny_model)
    modules = {"lora_unet_" + n.replace(".", "_"): m for n, m in merged.unet.named_modules()}
    modules |= {"lora_te_" + ("text_model." + n).replace(".", "_"): m for n, m in merged.text_encoder.named_modules()}
    base_norms = {}
    with torch.no_grad():
        for n in names:
            w = modules[n].weight
            base_norms[n] = w.norm(dim=1, keepdim=True)
            w.copy_(lycoris_dora_merge(w, tensors[f"{n}.lora_down.weight"], tensors[f"{n}.lora_up.weight"],
                                       tensors[f"{n}.alpha"].item(), tensors[f"{n}.dora_scale"]))
    trained = forward(sd_pipe(tiny_model, run / "pytorch_lora_weights.safetensors"))  # the run's own file, as generate loads it
    base = forward(sd_pipe(tiny_model))
    for a, b, c in zip(trained, forward(merged), base):
        # not bitwise: merged weights round differently from peft's unmerged DoRA forward
        torch.testing.assert_close(b, a, rtol=0, atol=1e-5)
        assert (a - c).abs().max() > 1e-3  # the DoRA does move both outputs
    # the magnitudes were trained (off their initial ||W|| rows), so the match above depends on dora_scale
    assert max((tensors[f"{n}.dora_scale"] - base_norms[n]).abs().max().item() for n in names) > 1e-3
    # a single-file checkpoint of a DoRA run is the model with the DoRA merged in (peft's merge)
    from diffusers import StableDiffusionPipeline

    ckpt = ex.export(run, "single-file", tmp_path / "fused.safetensors")
    loaded = StableDiffusionPipeline.from_single_file(str(ckpt), config=str(tiny_model), safety_checker=None,
                                                      requires_safety_checker=False)
    for a, b in zip(trained, forward(loaded)):  # measured 1.3e-6 against outputs moved by 0.45-1.96
        torch.testing.assert_close(b, a, rtol=0, atol=1e-5)


def comfyui_lycoris_merge(weight, t: dict, name: str):
    """ComfyUI's LoKr and LoHa merge at strength 1 (comfy/weight_adapter/lokr.py and loha.py, calculate_weight),
    written out here from the published loaders: LoKr adds kron(w1, w2) * alpha / dim, dim the rank of a
    decomposed factor (w2_b's rows, else w1_b's), and scale 1 when both factors are full; LoHa adds
    (w1_a @ w1_b) * (w2_a @ w2_b) * alpha / (w1_b's rows)."""
    alpha = t[f"{name}.alpha"].item()
    if f"{name}.hada_w1_a" in t:
        m1, m2 = (t[f"{name}.hada_w{i}_a"] @ t[f"{name}.hada_w{i}_b"] for i in (1, 2))
        return weight + (alpha / t[f"{name}.hada_w1_b"].shape[0]) * (m1 * m2).reshape(weight.shape)
    dim, factors = None, []
    for i in (1, 2):
        if f"{name}.lokr_w{i}" in t:
            factors.append(t[f"{name}.lokr_w{i}"])
        else:
            dim = t[f"{name}.lokr_w{i}_b"].shape[0]
            factors.append(t[f"{name}.lokr_w{i}_a"] @ t[f"{name}.lokr_w{i}_b"])
    return weight + (1.0 if dim is None else alpha / dim) * torch.kron(*factors).reshape(weight.shape)


LYCORIS_RUNS = {  # variant, overrides, the tensors each module must hold, the alpha they must carry
    "lokr-full": ("dreambooth-lokr", ["lokr_factor=-1", "lora_rank=4", "lora_alpha=8"], {"lokr_w1", "lokr_w2"}, 4.0),
    "lokr-small": ("dreambooth-lokr", ["lokr_factor=-1", "lora_rank=1", "lora_alpha=2"], {"lokr_w1", "lokr_w2_a", "lokr_w2_b"}, 2.0),
    "lokr-both": ("dreambooth-lokr", ["lokr_factor=-1", "lora_rank=1", "lora_alpha=3", "lokr_decompose_both=true"],
                  {"lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b"}, 3.0),
    "loha": ("dreambooth-loha", ["lora_rank=2", "lora_alpha=3"], {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"}, 3.0),
}


@pytest.mark.parametrize("kind", list(LYCORIS_RUNS))
def test_kohya_export_of_a_lokr_or_loha_run_is_the_lycoris_layout_and_merges_back_to_the_trained_model(kind, tiny_model, subject_dir, tmp_path):
    from lycoris.modules import get_module, make_module

    from nanobooth.inference.generate import load_run

    variant, extra, parts, alpha = LYCORIS_RUNS[kind]
    run = tmp_path / kind
    assert main(["train", variant, *train_args(tiny_model, subject_dir, run, "train_text_encoder=true", "learning_rate=1e-2",
                                               "max_train_steps=2", *extra)]) == 0
    out = tmp_path / f"sks_dog_{kind}.safetensors"
    assert export_cli(str(run), "--format", "kohya", "--out", str(out)) == 0
    tensors, meta = read(out)
    names = {k.split(".")[0] for k in tensors}
    assert all(n.startswith(("lora_unet_", "lora_te_")) for n in names)
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj" in names
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q" in names
    assert all({k.split(".", 1)[1] for k in tensors if k.split(".")[0] == n} == parts | {"alpha"} for n in names)
    assert {tensors[f"{n}.alpha"].item() for n in names} == {alpha}  # two full factors: scale 1 (alpha = rank)
    algo = "loha" if kind == "loha" else "lokr"
    assert meta["ss_network_module"] == "lycoris.kohya" and f'"algo": "{algo}"' in meta["ss_network_args"]

    trained = forward(load_run(str(tiny_model), str(run)))  # what `generate --weights RUN` renders
    base = forward(sd_pipe(tiny_model))
    # 1) ComfyUI's formula, module by module
    comfy = sd_pipe(tiny_model)
    modules = {"lora_unet_" + n.replace(".", "_"): m for n, m in comfy.unet.named_modules()}
    modules |= {"lora_te_" + ("text_model." + n).replace(".", "_"): m for n, m in comfy.text_encoder.named_modules()}
    with torch.no_grad():
        for n in names:
            modules[n].weight.copy_(comfyui_lycoris_merge(modules[n].weight, tensors, n))
    # 2) LyCORIS's own loader, merged into a plain base: per module what its create_network_from_weights does
    # (get_module picks the algorithm from the keys, make_module builds it from the tensors); its network class
    # itself is not built, as its default preset trips on the tiny UNet (duplicated lora_unet_time_embedding_linear_1).
    # lycoris-lora 4.1.3's LoKr merge applies alpha/dim twice (get_weight scales, get_diff_weight scales again;
    # its bypass forward, ComfyUI and A1111 scale once; its LoHa merge likewise), so it is checked where that scale is
    # 1: two full factors, the dreambooth-lokr recipe's layout.
    if kind != "lokr-full":
        for a, b, c in zip(trained, forward(comfy), base):
            torch.testing.assert_close(b, a, rtol=0, atol=1e-5)
            assert (a - c).abs().max() > 1e-3
        if kind == "loha":  # a single-file checkpoint of a LyCORIS run is the model with it merged (diffusers' fuse_lora on peft's layers)
            from diffusers import StableDiffusionPipeline

            ckpt = ex.export(run, "single-file", tmp_path / "fused.safetensors")
            loaded = StableDiffusionPipeline.from_single_file(str(ckpt), config=str(tiny_model), safety_checker=None,
                                                              requires_safety_checker=False)
            for a, b in zip(trained, forward(loaded)):  # LoKr measured 1.1e-6 against outputs moved by 0.29
                torch.testing.assert_close(b, a, rtol=0, atol=1e-5)
        return
    lyco = sd_pipe(tiny_model)
    modules = {"lora_unet_" + n.replace(".", "_"): m for n, m in lyco.unet.named_modules()}
    modules |= {"lora_te_" + ("text_model." + n).replace(".", "_"): m for n, m in lyco.text_encoder.named_modules()}
    with torch.no_grad():
        for n in names:
            algo_class, params = get_module(tensors, n)
            assert algo_class.__name__ == {"lokr": "LokrModule", "loha": "LohaModule"}[algo]
            make_module(algo_class, params, n, modules[n]).merge_to(1.0)
    for merged in (forward(comfy), forward(lyco)):
        for a, b, c in zip(trained, merged, base):
            torch.testing.assert_close(b, a, rtol=0, atol=1e-5)  # merged weights round unlike peft's unmerged forward
            assert (a - c).abs().max() > 1e-3  # the adapter does move both outputs


# --- single file ---------------------------------------------------------------------------------------------------

def test_single_file_of_a_full_run_has_ldm_keys_and_loads_back_exactly(full_run, tiny_model, tmp_path):
    from diffusers import StableDiffusionPipeline

    out = tmp_path / "dog.safetensors"
    assert export_cli(str(full_run), "--format", "single-file", "--out", str(out)) == 0
    tensors, meta = read(out)
    assert all(k.startswith(("model.diffusion_model.", "first_stage_model.", "cond_stage_model.transformer.")) for k in tensors)
    for key in ("model.diffusion_model.input_blocks.0.0.weight", "model.diffusion_model.input_blocks.1.1.proj_in.weight",
                "model.diffusion_model.input_blocks.2.0.op.weight", "model.diffusion_model.middle_block.1.transformer_blocks.0.attn2.to_k.weight",
                "model.diffusion_model.output_blocks.3.0.skip_connection.weight", "model.diffusion_model.out.2.weight",
                "first_stage_model.decoder.up.1.upsample.conv.weight", "first_stage_model.encoder.down.1.block.0.nin_shortcut.weight",
                "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"):
        assert key in tensors, key
    assert tensors["first_stage_model.encoder.mid.attn_1.q.weight"].ndim == 4  # 1x1 conv, as the LDM VAE has it
    assert meta["modelspec.architecture"] == "stable-diffusion-v1" and meta["modelspec.prediction_type"] == "epsilon"

    trained = sd_pipe(full_run)
    loaded = StableDiffusionPipeline.from_single_file(str(out), config=str(tiny_model), safety_checker=None,
                                                      requires_safety_checker=False)
    for name in ("unet", "vae", "text_encoder"):
        a, b = getattr(trained, name).state_dict(), getattr(loaded, name).state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    for a, b in zip(forward(trained), forward(loaded)):  # same weights, same alignment, same kernels: exact
        torch.testing.assert_close(b, a, rtol=0, atol=0)
    assert any(not torch.equal(a, b) for a, b in zip(forward(trained), forward(sd_pipe(tiny_model))))

    half = tmp_path / "dog-fp16.safetensors"
    ex.export(full_run, "single-file", half, dtype="fp16")
    assert {v.dtype for v in read(half)[0].values() if v.is_floating_point()} == {torch.float16}
    loaded16 = StableDiffusionPipeline.from_single_file(str(half), config=str(tiny_model), safety_checker=None,
                                                        requires_safety_checker=False, dtype=torch.float32)
    for a, b in zip(forward(trained), forward(loaded16)):  # fp16 weights (2^-11 relative rounding): measured 2.2e-3
        torch.testing.assert_close(b, a, rtol=0, atol=5e-3)


def test_single_file_of_a_lora_run_is_the_fused_model(lora_run, tiny_model, tmp_path):
    from diffusers import StableDiffusionPipeline

    out = ex.export(lora_run, "single-file", tmp_path / "fused.safetensors")
    loaded = StableDiffusionPipeline.from_single_file(str(out), config=str(tiny_model), safety_checker=None,
                                                      requires_safety_checker=False)
    assert not any("lora" in k for k in read(out)[0])
    for a, b in zip(forward(sd_pipe(tiny_model, lora_run / "pytorch_lora_weights.safetensors")), forward(loaded)):
        # not bitwise: (W + s*B@A) @ x rounds differently from W@x + s*B@(A@x); measured 1.2e-6 on outputs of order 1
        torch.testing.assert_close(b, a, rtol=0, atol=1e-5)


def test_sd2_text_encoder_is_written_in_openclip_layout(tiny_model, tmp_path):
    """OpenCLIP (gelu) text encoders go under cond_stage_model.model with fused q/k/v, as SD 2 checkpoints have them."""
    from diffusers import StableDiffusionPipeline

    sd2 = tmp_path / "tiny-sd2"
    shutil.copytree(tiny_model, sd2)
    for f, old, new in ((sd2 / "text_encoder" / "config.json", '"quick_gelu"', '"gelu"'),
                        (sd2 / "scheduler" / "scheduler_config.json", '"epsilon"', '"v_prediction"')):
        f.write_text(f.read_text().replace(old, new))
    out = ex.export(sd2, "single-file", tmp_path / "sd2.safetensors")  # any diffusers SD folder exports
    tensors, meta = read(out)
    te = {k for k in tensors if k.startswith("cond_stage_model.")}
    assert te and all(k.startswith("cond_stage_model.model.") for k in te)
    assert tensors["cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight"].shape == (96, 32)
    assert meta["modelspec.architecture"] == "stable-diffusion-v2-768-v" and meta["modelspec.prediction_type"] == "v"
    loaded = StableDiffusionPipeline.from_single_file(str(out), config=str(sd2), safety_checker=None, requires_safety_checker=False)
    original = StableDiffusionPipeline.from_pretrained(sd2).text_encoder.state_dict()
    assert all(torch.equal(v, loaded.text_encoder.state_dict()[k]) for k, v in original.items())


def _sd15_shaped_unet_and_vae():
    """SD 1.5's topology (4 levels, 2 layers each, no attention at the bottom, widths x1 x2 x4 x4) at toy width."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(block_out_channels=(8, 16, 32, 32), layers_per_block=2, norm_num_groups=4, cross_attention_dim=8,
                                attention_head_dim=2, sample_size=8)
    vae = AutoencoderKL(block_out_channels=(4, 8, 16, 16), layers_per_block=2, norm_num_groups=4, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
    return unet, vae


def test_ldm_layout_matches_real_sd15_and_sdxl_key_names_and_diffusers_reads_it_back():
    """At SD 1.5 / SDXL topology the keys are the ones real checkpoints carry, and diffusers' own
    LDM->diffusers converters invert the mapping exactly."""
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint

    unet, vae = _sd15_shaped_unet_and_vae()
    uldm = {"model.diffusion_model." + k: v for k, v in ldm.unet_to_ldm(unet.state_dict()).items()}
    for key in ("input_blocks.3.0.op.weight", "input_blocks.9.0.op.weight", "input_blocks.11.0.in_layers.2.weight",
                "input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight", "middle_block.2.emb_layers.1.weight",
                "output_blocks.2.1.conv.weight", "output_blocks.5.2.conv.weight", "output_blocks.8.2.conv.weight",
                "output_blocks.11.0.skip_connection.weight", "output_blocks.11.1.proj_out.weight", "time_embed.2.bias"):
        assert "model.diffusion_model." + key in uldm, key
    assert convert_ldm_unet_checkpoint(uldm, dict(unet.config)).keys() == unet.state_dict().keys()
    back = convert_ldm_unet_checkpoint(uldm, dict(unet.config))
    assert all(torch.equal(back[k], v) for k, v in unet.state_dict().items())

    vldm = {"first_stage_model." + k: v for k, v in ldm.vae_to_ldm(vae.state_dict()).items()}
    for key in ("encoder.down.3.block.1.conv2.weight", "encoder.down.2.downsample.conv.weight", "decoder.up.3.upsample.conv.weight",
                "decoder.up.0.block.2.conv1.weight", "decoder.up.0.block.0.nin_shortcut.weight",
                "encoder.down.1.block.0.nin_shortcut.weight", "encoder.mid.attn_1.proj_out.weight",
                "decoder.norm_out.weight", "post_quant_conv.weight"):
        assert "first_stage_model." + key in vldm, key
    vback = convert_ldm_vae_checkpoint(vldm, dict(vae.config))
    assert vback.keys() == vae.state_dict().keys() and all(torch.equal(vback[k], v) for k, v in vae.state_dict().items())

    torch.manual_seed(0)
    xl = UNet2DConditionModel(block_out_channels=(8, 16, 16), layers_per_block=2, norm_num_groups=4, cross_attention_dim=8,
                              down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                              up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                              transformer_layers_per_block=(1, 2, 2), attention_head_dim=2, use_linear_projection=True,
                              addition_embed_type="text_time", addition_time_embed_dim=4, projection_class_embeddings_input_dim=32)
    xldm = {"model.diffusion_model." + k: v for k, v in ldm.unet_to_ldm(xl.state_dict()).items()}
    for key in ("input_blocks.4.1.transformer_blocks.1.attn1.to_q.weight", "input_blocks.7.1.proj_in.weight", "label_emb.0.2.weight",
                "output_blocks.2.2.conv.weight", "output_blocks.5.2.conv.weight", "output_blocks.8.0.skip_connection.weight"):
        assert "model.diffusion_model." + key in xldm, key
    xback = convert_ldm_unet_checkpoint(xldm, dict(xl.config))
    assert xback.keys() == xl.state_dict().keys() and all(torch.equal(xback[k], v) for k, v in xl.state_dict().items())


def test_sdxl_lora_and_checkpoint_exports(subject_dir, tmp_path):
    tiny = pytest.importorskip("nanobooth.tiny")
    if not hasattr(tiny, "build_tiny_sdxl_pipeline"):
        pytest.skip("no tiny SDXL model in this build")
    from diffusers import StableDiffusionXLPipeline
    from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint, convert_open_clip_checkpoint

    model = tiny.build_tiny_sdxl_pipeline(tmp_path / "tiny-sdxl")
    run = tmp_path / "xl-lora"
    assert main(["train", "dreambooth-lora", *train_args(model, subject_dir, run, "train_text_encoder=true", "lora_rank=4",
                                                          "lora_alpha=8", "learning_rate=1e-2", "max_train_steps=1")]) == 0
    tensors, meta = read(ex.export(run, "kohya", tmp_path / "xl.safetensors"))
    assert {k.split("_text_model")[0] for k in tensors if k.startswith("lora_te")} == {"lora_te1", "lora_te2"}
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0" and {v.item() for k, v in tensors.items() if k.endswith("alpha")} == {8.0}
    # SDXL UNet modules carry SGM block names, as kohya's and civitai's SDXL LoRAs do
    unet_keys = [k for k in tensors if k.startswith("lora_unet_")]
    assert unet_keys and all(k.startswith(("lora_unet_input_blocks_", "lora_unet_middle_block_", "lora_unet_output_blocks_"))
                             for k in unet_keys)

    @torch.no_grad()
    def xl_forward(pipe):
        realign(pipe.text_encoder, pipe.text_encoder_2, pipe.unet)
        ids = pipe.tokenizer(["a photo of sks dog"], padding="max_length", max_length=77, return_tensors="pt").input_ids
        two = pipe.text_encoder_2(ids, output_hidden_states=True)
        hidden = torch.cat([pipe.text_encoder(ids, output_hidden_states=True).hidden_states[-2], two.hidden_states[-2]], -1)
        x = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
        cond = {"text_embeds": two[0], "time_ids": torch.tensor([[32.0, 32, 0, 0, 32, 32]])}
        return hidden, pipe.unet(x, torch.tensor([400]), hidden, added_cond_kwargs=cond).sample

    original, exported = StableDiffusionXLPipeline.from_pretrained(model), StableDiffusionXLPipeline.from_pretrained(model)
    original.load_lora_weights(str(run / "pytorch_lora_weights.safetensors"))
    exported.load_lora_weights(str(tmp_path / "xl.safetensors"))
    for a, b in zip(xl_forward(original), xl_forward(exported)):  # as for SD: bitwise today, 1e-6 for alpha folding
        torch.testing.assert_close(b, a, rtol=0, atol=1e-6)

    # checkpoint: SGM prefixes; diffusers' converters read each part back exactly. (from_single_file itself
    # cannot tell the tiny model's two equally wide encoders apart, so the parts are checked one by one.)
    ckpt, cmeta = read(ex.export(model, "single-file", tmp_path / "xl-ckpt.safetensors"))
    assert cmeta["modelspec.architecture"] == "stable-diffusion-xl-v1-base"
    assert all(k.startswith(("model.diffusion_model.", "first_stage_model.", "conditioner.embedders.0.transformer.",
                             "conditioner.embedders.1.model.")) for k in ckpt)
    pipe = StableDiffusionXLPipeline.from_pretrained(model)
    te1 = convert_ldm_clip_checkpoint(ckpt, "conditioner.embedders.0.transformer.")
    assert all(torch.equal(te1["text_model." + k], v) for k, v in pipe.text_encoder.state_dict().items())
    te2 = convert_open_clip_checkpoint(pipe.text_encoder_2, ckpt, prefix="conditioner.embedders.1.model.")
    assert te2.keys() == pipe.text_encoder_2.state_dict().keys()
    assert all(torch.equal(te2[k], v) for k, v in pipe.text_encoder_2.state_dict().items())


# --- diffusers format, bad input, atomic writes -----------------------------------------------------------------

def test_diffusers_format_copies_the_lora_file_and_the_pipeline_folder(lora_run, full_run, tmp_path):
    from diffusers import StableDiffusionPipeline

    f = ex.export(lora_run, "diffusers", tmp_path / "lora.safetensors")
    assert f.read_bytes() == (lora_run / "pytorch_lora_weights.safetensors").read_bytes()
    folder = ex.export(full_run, "diffusers", tmp_path / "pipe", dtype="fp16")
    assert not (folder / "train_log.jsonl").exists() and (folder / "model_index.json").is_file()
    assert {v.dtype for v in load_file(next((folder / "unet").glob("*.safetensors"))).values()} == {torch.float16}
    StableDiffusionPipeline.from_pretrained(folder, dtype=torch.float16)
    with pytest.raises(ex.ExportError, match="already exists"):
        ex.export(full_run, "diffusers", folder)
    ex.export(full_run, "diffusers", folder, overwrite=True)
    assert {v.dtype for v in load_file(next((folder / "unet").glob("*.safetensors"))).values()} == {torch.float32}
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_bad_input_is_one_line_naming_it(lora_run, full_run, tmp_path, capsys):
    nothing = tmp_path / "not-a-run"
    nothing.mkdir()
    assert export_cli(str(nothing), "--format", "kohya", "--out", str(tmp_path / "x.safetensors")) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(nothing) in err and "not a finished nanobooth run" in err
    assert export_cli(str(full_run), "--format", "kohya", "--out", str(tmp_path / "x.safetensors")) == 2
    assert "full fine-tune" in capsys.readouterr().err
    assert export_cli(str(lora_run), "--format", "kohya", "--out", str(tmp_path / "x.ckpt")) == 2
    assert "name it x.ckpt.safetensors" in capsys.readouterr().err  # newcomer54: it said "name it ....safetensors"
    assert not any(tmp_path.glob("x.*"))
    # a folder where a file goes: --overwrite cannot help, so the line names a file instead (newcomer54)
    (tmp_path / "exp").mkdir()
    for extra in ([], ["--overwrite"]):
        assert export_cli(str(lora_run), "--format", "kohya", "--out", str(tmp_path / "exp"), *extra) == 2
        err = capsys.readouterr().err
        assert "is a folder; this export writes a file: pass a file name, e.g." in err and "--overwrite" not in err


def test_existing_out_is_kept_unless_overwrite_and_writes_are_atomic(lora_run, tmp_path, capsys):
    out = tmp_path / "k.safetensors"
    out.write_bytes(b"precious")
    assert export_cli(str(lora_run), "--format", "kohya", "--out", str(out)) == 2
    assert "--overwrite" in capsys.readouterr().err and out.read_bytes() == b"precious"

    def crash(tensors, path, metadata=None):  # dies halfway through writing
        Path(path).write_bytes(b"half a file")
        raise OSError(28, "No space left on device")

    with mock.patch("safetensors.torch.save_file", crash), pytest.raises(OSError):
        ex.export(lora_run, "kohya", out, overwrite=True)
    assert out.read_bytes() == b"precious" and sorted(p.name for p in tmp_path.iterdir()) == ["k.safetensors"]
    assert export_cli(str(lora_run), "--format", "kohya", "--out", str(out), "--overwrite") == 0
    assert read(out)[0]  # a real file replaced it


def test_every_export_is_readable_like_any_other_file(lora_run, full_run, tmp_path):
    import os

    mask = os.umask(0o022)
    os.umask(mask)
    fmode, dmode = 0o666 & ~mask, 0o777 & ~mask
    assert fmode & 0o044  # others may read under the usual umask: what the test is about
    files = [ex.export(lora_run, "kohya", tmp_path / "k.safetensors"),
             ex.export(lora_run, "diffusers", tmp_path / "d.safetensors"),
             ex.export(lora_run, "diffusers", tmp_path / "d16.safetensors", dtype="fp16"),
             ex.export(full_run, "single-file", tmp_path / "s.safetensors", dtype="fp16")]
    folder = ex.export(full_run, "diffusers", tmp_path / "pipe", dtype="fp16")
    assert all(f.stat().st_mode & 0o777 == fmode for f in files)
    assert folder.stat().st_mode & 0o777 == dmode
    inside = list(folder.rglob("*"))
    assert any(p.suffix == ".safetensors" for p in inside)
    assert all(p.stat().st_mode & 0o777 == (dmode if p.is_dir() else fmode) for p in inside)


def test_sdxl_lokr_export_uses_the_sgm_names_and_both_text_encoder_prefixes(tiny_sdxl_model, subject_dir, tmp_path):
    run = tmp_path / "xl-lokr"
    assert main(["train", "sdxl/dreambooth-lokr", *train_args(tiny_sdxl_model, subject_dir, run, "train_text_encoder=true",
                                                               "lokr_factor=-1", "lora_rank=1", "lora_alpha=2", "max_train_steps=1")]) == 0
    tensors, meta = read(ex.export(run, "kohya", tmp_path / "xl-lokr.safetensors"))
    names = {k.split(".")[0] for k in tensors}
    assert {n.split("_text_model")[0] for n in names if n.startswith("lora_te")} == {"lora_te1", "lora_te2"}
    unet = [n for n in names if n.startswith("lora_unet_")]
    # the names kohya's SDXL LoRAs use (kohya.kohya_name, as for a LoRA run), which ComfyUI/A1111 map to SGM blocks
    assert unet and all(n.startswith(("lora_unet_input_blocks_", "lora_unet_middle_block_", "lora_unet_output_blocks_")) for n in unet)
    assert all({f"{n}.lokr_w1", f"{n}.lokr_w2_a", f"{n}.lokr_w2_b", f"{n}.alpha"} <= tensors.keys() for n in names)
    assert {tensors[f"{n}.alpha"].item() for n in names} == {2.0} and meta["ss_base_model_version"] == "sdxl_base_v1-0"


# --- built-in model names, FLUX/SD3 LoRAs and --out shapes (tester's findings) ---------------------------------------

def test_single_file_of_a_flux_lora_on_a_built_in_model_is_the_base_plus_the_lora(subject_dir, tmp_path, capsys):
    """model=tiny-flux (a built-in name, as a user writes it): the run fuses into the transformer, not a `unet`."""
    from diffusers import FluxTransformer2DModel
    from test_flux_keys import from_bfl_file

    from nanobooth.core.models import resolve_model

    run = tmp_path / "flux-lora"
    assert main(["train", "flux/dreambooth-lora", *train_args("tiny-flux", subject_dir, run, "gradient_checkpointing=false",
                                                               "lora_rank=4", "lora_alpha=8", "learning_rate=1e-2",
                                                               "max_train_steps=1")]) == 0
    capsys.readouterr()
    out = tmp_path / "flux_dog.safetensors"
    assert export_cli(str(run), "--format", "single-file", "--out", str(out)) == 0
    assert "double_blocks.0.img_attn.qkv.weight" in read(out)[0]  # BFL's layout, as for a full FLUX run
    base = resolve_model("tiny-flux")
    fused = from_bfl_file(out, base).state_dict()
    expected = FluxTransformer2DModel.from_pretrained(base, subfolder="transformer").state_dict()
    lora = load_file(run / "pytorch_lora_weights.safetensors")
    modules = {k[len("transformer."):-len(".lora_A.weight")] for k in lora if k.endswith(".lora_A.weight")}
    assert modules
    for m in modules:  # W + alpha/r * B @ A
        a, b = lora[f"transformer.{m}.lora_A.weight"], lora[f"transformer.{m}.lora_B.weight"]
        expected[f"{m}.weight"] = expected[f"{m}.weight"] + 2.0 * b @ a
    assert fused.keys() == expected.keys()
    for k in fused:
        torch.testing.assert_close(fused[k], expected[k], rtol=0, atol=1e-6, msg=k)
    assert any((fused[f"{m}.weight"] - FluxTransformer2DModel.from_pretrained(base, subfolder="transformer")
                .state_dict()[f"{m}.weight"]).abs().max() > 1e-4 for m in modules)  # the LoRA trained: not the base


def test_single_file_of_an_sd3_lora_is_refused_in_one_line(subject_dir, tmp_path, capsys):
    run = tmp_path / "sd3-lora"
    assert main(["train", "sd3/dreambooth-lora", *train_args("tiny-sd3", subject_dir, run, "gradient_checkpointing=false",
                                                              "max_train_steps=1")]) == 0
    capsys.readouterr()
    out = tmp_path / "sd3.safetensors"
    assert export_cli(str(run), "--format", "single-file", "--out", str(out)) == 2
    err = capsys.readouterr().err.strip()
    # the same line an SD3 full run's single-file export gets
    assert len(err.splitlines()) == 1 and "is an SD3 run: single-file" in err and "--format diffusers" in err
    assert "Traceback" not in err and not out.exists() and [p.name for p in tmp_path.iterdir()] == ["sd3-lora"]


def test_flux_lokr_kohya_is_refused_naming_the_formats_that_work_and_single_file_is_the_run(tiny_flux_model, subject_dir, tmp_path, capsys):
    from diffusers import FluxPipeline
    from test_flux_keys import flux_outputs, from_bfl_file

    from nanobooth.inference.generate import load_run

    run = tmp_path / "flokr"
    assert main(["train", "flux/dreambooth-lora", *train_args(tiny_flux_model, subject_dir, run, "gradient_checkpointing=false",
                                                               "method=lokr", "learning_rate=1e-2", "max_train_steps=1")]) == 0
    capsys.readouterr()
    for fmt in ("kohya", "comfyui"):
        assert export_cli(str(run), "--format", fmt, "--out", str(tmp_path / f"{fmt}.safetensors")) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "FLUX LoKr run" in err and f"--format {fmt}" in err
        assert "use --format diffusers or single-file" in err and "re-train" not in err
        assert not (tmp_path / f"{fmt}.safetensors").exists()
    out = ex.export(run, "single-file", tmp_path / "fused.safetensors")  # what the line offers works, and is the run
    trained = load_run(str(tiny_flux_model), str(run))
    fused = FluxPipeline.from_pretrained(tiny_flux_model)
    fused.transformer = from_bfl_file(out, tiny_flux_model)
    (_, a), (_, b) = flux_outputs(trained), flux_outputs(fused)
    torch.testing.assert_close(b, a, rtol=0, atol=1e-5)
    assert (a - flux_outputs(FluxPipeline.from_pretrained(tiny_flux_model))[1]).abs().max() > 1e-4


def test_a_run_on_built_in_tiny_sdxl_is_tagged_sdxl(subject_dir, tmp_path):
    run = tmp_path / "xl"
    assert main(["train", "dreambooth-lora", *train_args("tiny-sdxl", subject_dir, run, "max_train_steps=1")]) == 0
    meta = read(ex.export(run, "kohya", tmp_path / "xl.safetensors"))[1]
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0"
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"


def test_out_that_does_not_fit_the_format_is_one_line_saying_what_to_pass(lora_run, full_run, tmp_path, capsys):
    # a full run as diffusers is a pipeline folder: a file name is refused, nothing made
    assert export_cli(str(full_run), "--format", "diffusers", "--out", str(tmp_path / "X.safetensors")) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--out" in err and "pass a folder path, e.g. " + str(tmp_path / "X") in err
    assert not (tmp_path / "X.safetensors").exists()
    # a LoRA export is one .safetensors file: a suffix-less --out is told so (not about pickles)
    for fmt in ("kohya", "diffusers", "single-file"):
        assert export_cli(str(lora_run), "--format", fmt, "--out", str(tmp_path / "exp" / "dd")) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and f"--format {fmt} writes one .safetensors file" in err
        assert "e.g. " + str(tmp_path / "exp" / "dd.safetensors") in err and "pickle" not in err
    assert list(tmp_path.iterdir()) == []
