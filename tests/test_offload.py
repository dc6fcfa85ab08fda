"""offload_blocks (core/offload.py): offloaded blocks compute only with their weights resident (forward, backward,
gradient-checkpointing recompute), losses and gradients are bit-exact, adapters never move; a run on CPU says it has no effect."""

import logging

import pytest
import torch
from conftest import train_args
from safetensors.torch import load_file

from nanobooth.cli import main
from nanobooth.core.config import ConfigError, load_config
from nanobooth.core.offload import BlockOffload, transformer_blocks


class Absent(BlockOffload):
    """A host the compute cannot read: an offloaded frozen weight is an empty tensor until loaded, so any
    forward or backward op that reads it while it is 'on the host' fails. Logs (block, 'in'|'out', in backward)."""

    def __init__(self, *a, **k):
        self.stash, self.log = {}, []
        super().__init__(*a, **k)
        for b in self.blocks:
            self._move(b, False)

    def _move(self, block, to_device):
        self.log.append((next(i for i, b in enumerate(self.blocks) if b is block), "in" if to_device else "out",
                         torch._C._current_graph_task_id() != -1))
        for t in self._offloaded(block):
            if to_device:
                t.data = self.stash.pop(id(t))
            elif id(t) not in self.stash:
                self.stash[id(t)] = t.data
                t.data = torch.empty(0, dtype=t.dtype)


def _model(kind: str):
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel
    from peft import LoraConfig

    torch.manual_seed(0)
    if kind == "flux":
        m = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=8,
                                   num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32,
                                   guidance_embeds=True, axes_dims_rope=[2, 2, 4])
        targets = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out", "proj_mlp", "ff.net.2"]
    else:
        m = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=3, attention_head_dim=8,
                                  num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=16, pooled_projection_dim=32,
                                  pos_embed_max_size=16)
        targets = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]
    m.requires_grad_(False)
    m.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=targets, init_lora_weights="gaussian"))
    return m


def _inputs(kind: str) -> dict:
    g = torch.Generator().manual_seed(1)
    if kind == "flux":
        from nanobooth.families.flux import image_ids

        return dict(hidden_states=torch.randn(2, 16, 16, generator=g), encoder_hidden_states=torch.randn(2, 5, 32, generator=g),
                    pooled_projections=torch.randn(2, 32, generator=g), timestep=torch.tensor([0.3, 0.7]),
                    guidance=torch.tensor([3.5, 3.5]), txt_ids=torch.zeros(5, 3), img_ids=image_ids(8, 8))
    return dict(hidden_states=torch.randn(2, 4, 8, 8, generator=g), encoder_hidden_states=torch.randn(2, 5, 32, generator=g),
                pooled_projections=torch.randn(2, 32, generator=g), timestep=torch.tensor([300.0, 700.0]))


def _step(m, kind):
    """Loss and the LoRA gradients of one forward/backward."""
    m.zero_grad(set_to_none=True)
    loss = m(**_inputs(kind), return_dict=False)[0].square().mean()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in m.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("kind", ["flux", "sd3"])
def test_offloaded_blocks_compute_only_while_resident_and_change_nothing(kind, checkpointing):
    m = _model(kind)
    if checkpointing:
        m.enable_gradient_checkpointing()
    ref_loss, ref_grads = _step(m, kind)
    n = len(transformer_blocks(m)) - 1  # the first block stays resident, as kohya keeps the first ones
    off = Absent(m, n, "cpu")
    assert off.blocks == transformer_blocks(m)[1:]
    assert all(p.numel() == 0 for b in off.blocks for p in b.parameters() if not p.requires_grad)  # absent from the start
    off.log.clear()
    loss, grads = _step(m, kind)  # an op reading an absent weight would fail here
    assert torch.equal(loss, ref_loss)
    assert grads.keys() == ref_grads.keys() and all(torch.equal(grads[k], ref_grads[k]) for k in grads)
    # (autograd's saved views of a weight outlive its .data swap, so this backward would pass without its loads;
    # the hook sequence pins them: quanto's and other custom functions save the parameter itself)
    # each block: in and out in the forward, in again for its backward (last block first), all out when backward ends
    fwd = [e for e in off.log if not e[2]]
    assert fwd == [(i, d, False) for i in range(n) for d in ("in", "out")]
    bwd_in = [i for i, d, b in off.log if b and d == "in"]
    assert bwd_in == list(reversed(range(n)))
    assert not off.resident and all(p.numel() == 0 for b in off.blocks for p in b.parameters() if not p.requires_grad)
    # adapters never moved: still real tensors with their gradients; a no-grad forward loads and unloads too
    assert all(p.numel() > 0 and p.grad is not None for b in off.blocks for p in b.parameters() if p.requires_grad)
    with torch.no_grad():
        assert torch.equal(m(**_inputs(kind), return_dict=False)[0].square().mean(), ref_loss)
    assert not off.resident


def test_offload_composes_with_an_int8_base_and_checkpointing():
    pytest.importorskip("optimum.quanto")
    from optimum.quanto import freeze, qint8, quantize

    m = _model("flux")
    quantize(m, weights=qint8, exclude=["x_embedder", "context_embedder", "proj_out", "*lora*"])
    freeze(m)
    m.requires_grad_(False)
    for n, p in m.named_parameters():
        p.requires_grad_("lora_" in n)
    m.enable_gradient_checkpointing()
    ref_loss, ref_grads = _step(m, "flux")
    off = BlockOffload(m, 4, "cpu")  # the real mover (.to through Module._apply: quanto's tensors), CPU to CPU
    loss, grads = _step(m, "flux")
    assert off.moves == {"in": 8, "out": 8}  # forward and backward, four blocks
    assert torch.equal(loss, ref_loss) and all(torch.equal(grads[k], ref_grads[k]) for k in grads)


def test_offload_blocks_refusals(tiny_flux_model):
    for overrides, match in [({"offload_blocks": -1}, ">= 0"), ({"offload_blocks": 2, "method": "full", "gradient_checkpointing": True}, "method=lora"),
                             ({"offload_blocks": 2, "gradient_checkpointing": False}, "gradient_checkpointing=true")]:
        with pytest.raises(ConfigError, match=f"config key 'offload_blocks'.*{match}") as e:
            load_config("flux/dreambooth-lora", overrides)
        assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="config key 'offload_blocks': 9 asked, but this model has 4"):
        BlockOffload(_model("flux"), 9, "cpu")
    with pytest.raises(ConfigError, match=r"config key 'offload_blocks': this model has no transformer blocks \(SD and SDXL's UNets"):
        BlockOffload(torch.nn.Sequential(torch.nn.Linear(2, 2)), 2, "cpu")  # a UNet's place: no transformer_blocks


def test_offload_refusal_names_every_fix_in_one_line(tiny_flux_model, tiny_model):
    """Without gradient_checkpointing, with method=full and more blocks than a local model has: all three in one line
    (it refused method=full, then gradient_checkpointing, then the block count only after the model loaded)."""
    import json

    blocks = json.loads((tiny_flux_model / "transformer" / "config.json").read_text())
    blocks = blocks["num_layers"] + blocks["num_single_layers"]
    with pytest.raises(ConfigError) as e:
        load_config("flux/dreambooth-lora", {"model": str(tiny_flux_model), "offload_blocks": blocks + 5, "method": "full",
                                             "gradient_checkpointing": False})
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("config key 'offload_blocks'")
    assert "method=lora" in msg and "gradient_checkpointing=true" in msg and f"at most {blocks}" in msg
    for fixed in ({"method": "lora", "gradient_checkpointing": True, "offload_blocks": blocks},):  # all three taken: accepted
        assert load_config("flux/dreambooth-lora", {"model": str(tiny_flux_model), **fixed}).offload_blocks == blocks
    with pytest.raises(ConfigError, match=r"this model has no transformer blocks.*use offload_blocks=0$"):  # a local UNet: said now
        load_config("flux/dreambooth-lora", {"model": str(tiny_model), "offload_blocks": 2, "gradient_checkpointing": False})


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU message")
def test_a_cpu_run_with_offload_says_it_has_no_effect_and_trains_the_same(tiny_flux_model, subject_dir, tmp_path, caplog):
    extra = ["gradient_checkpointing=true", "learning_rate=1e-3", "max_train_steps=2"]
    assert main(["train", "flux/dreambooth-lora", *train_args(tiny_flux_model, subject_dir, tmp_path / "a", *extra)]) == 0
    with caplog.at_level(logging.WARNING):
        assert main(["train", "flux/dreambooth-lora", *train_args(tiny_flux_model, subject_dir, tmp_path / "b", *extra,
                                                                   "offload_blocks=2")]) == 0
    assert sum("offload_blocks=2 has no effect" in r.getMessage() for r in caplog.records) == 1
    a, b = (load_file(tmp_path / r / "pytorch_lora_weights.safetensors") for r in ("a", "b"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("quant", ["none", "nf4"])
def test_text_encoders_encode_before_the_transformer_reaches_the_device(quant, tiny_flux_model, subject_dir, tmp_path, monkeypatch):
    """Issue #21: frozen text encoders encode every prompt and go back to the CPU before the FLUX transformer is
    placed, so T5 and the transformer are never on the accelerator together (it placed all models first). nf4
    too: it is quantized on the CPU first (it was placed before encoding, to quantize on the move).
    One CPU here, so the order of the calls is what is checked: a recorder on Module.to and Flux.encode. train.py
    moves a model to the accelerator with `accelerator.device` (a torch.device) and off it with "cpu" (a str)."""
    from diffusers import FluxTransformer2DModel

    from nanobooth.families.flux import Flux

    events, to, encode = [], torch.nn.Module.to, Flux.encode

    def recording_to(self, *args, **kwargs):
        where = kwargs.get("device", next((a for a in args if isinstance(a, (str, torch.device))), None))
        who = "transformer" if isinstance(self, FluxTransformer2DModel) else type(self).__name__
        if where is not None and who in ("transformer", "CLIPTextModel", "T5EncoderModel"):
            events.append((who, "on" if isinstance(where, torch.device) else where))
        return to(self, *args, **kwargs)

    def recording_encode(self, *args, **kwargs):
        events.append(("encode", ""))
        return encode(self, *args, **kwargs)

    if quant == "nf4":
        pytest.importorskip("bitsandbytes")
    monkeypatch.setattr(torch.nn.Module, "to", recording_to)
    monkeypatch.setattr(Flux, "encode", recording_encode)
    assert main(["train", "flux/dreambooth-lora", *train_args(tiny_flux_model, subject_dir, tmp_path / "run", "max_train_steps=1",
                                                               f"base_quantization={quant}")]) == 0
    transformer_on = events.index(("transformer", "on"))
    encodes = [i for i, e in enumerate(events) if e[0] == "encode"]
    assert encodes and max(encodes) < transformer_on  # every prompt encoded before the transformer moves
    for te in ("CLIPTextModel", "T5EncoderModel"):  # each encoder on the device to encode, then off it, then the transformer
        assert events.index((te, "on")) < min(encodes) and max(encodes) < events.index((te, "cpu")) < transformer_on
