"""A quantized frozen base (`base_quantization`): the denoiser's linear weights stored in 8 or 4 bits.

Only the frozen base is quantized; LoRA/DoRA adapters added afterwards stay fp32 and train as usual
(peft wraps a quantized Linear like any other). int8 and fp8 are weight-only optimum-quanto (CPU, CUDA,
MPS); nf4 is bitsandbytes' 4-bit NormalFloat (CUDA, and the CPU with a recent bitsandbytes: 0.50.2 is tested). The saved LoRA holds adapters only, so it loads
on the unquantized base.
"""

from __future__ import annotations

import fnmatch

import torch

from .config import ConfigError

# The layers that read the input and write the output (patch and text embedders, timestep/guidance/pooled
# embedders, the final norm and projection) stay in full precision, as SimpleTuner and the quanto FLUX
# examples keep them: their error is not averaged away by later layers, and they are a small share of the
# weights. Names of FluxTransformer2DModel and SD3Transformer2DModel (fnmatch patterns on module names).
EXCLUDE = ["x_embedder", "context_embedder", "pos_embed*", "time_text_embed*", "norm_out*", "proj_out"]


def quantize_base(unet: torch.nn.Module, cfg, dtype: torch.dtype, device: torch.device) -> None:
    """Quantize `unet`'s linear weights in place per `cfg.base_quantization` (`none`: nothing happens).

    Called once, on the frozen base before it moves to `device` (so the full-precision weights never land
    on the accelerator) and before `method.attach` adds adapters. The unquantized weights are first cast to
    `dtype` (the run's compute dtype): a quantized weight's dtype is fixed once quantized. Every parameter
    is left with requires_grad=False (quanto's freeze makes new Parameters, trainable by default).

    Raises ConfigError: nf4 on a device other than CUDA or the CPU, without bitsandbytes, or with a
    bitsandbytes that cannot quantize on the CPU; int8/fp8 without optimum-quanto.
    """
    kind = cfg.base_quantization
    if kind == "none":
        return
    unet.to(dtype)
    if kind == "nf4":
        _nf4(unet, dtype, device)
    else:
        try:
            from optimum.quanto import freeze, qfloat8, qint8, quantize
        except ImportError:
            raise ConfigError(f"config key 'base_quantization': {kind} needs optimum-quanto: pip install optimum-quanto "
                              "(or pip install 'nanobooth[quant]')") from None
        quantize(unet, weights={"int8": qint8, "fp8": qfloat8}[kind], exclude=EXCLUDE)
        freeze(unet)  # replaces the float weights by their quantized tensors (until then both are held)
    unet.requires_grad_(False)


def _nf4(unet: torch.nn.Module, dtype: torch.dtype, device: torch.device) -> None:
    """bitsandbytes Linear4bit (NF4) in place of each nn.Linear not in EXCLUDE, quantized here on the CPU
    (bitsandbytes quantizes a Params4bit when it first moves to a device). The quantized base then moves to
    the accelerator when train.py places it, after the text encoders have encoded the prompts and left: on
    the accelerator, T5-XXL and the transformer are never resident together."""
    if device.type not in ("cuda", "cpu"):
        raise ConfigError("config key 'base_quantization': nf4 (bitsandbytes) runs on CUDA GPUs and CPUs, not on "
                          f"{device.type.upper()}; use base_quantization=int8 or fp8 (optimum-quanto) or none")
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise ConfigError("config key 'base_quantization': nf4 needs bitsandbytes: pip install bitsandbytes") from None
    try:  # bitsandbytes before its CPU backend quantizes on CUDA only: ask this one rather than parse versions
        ok = bnb.nn.Params4bit(torch.ones(8, 64, dtype=dtype), requires_grad=False, quant_type="nf4").to("cpu").dtype == torch.uint8
    except Exception:  # noqa: BLE001 - any failure means the same thing to the user
        ok = False
    if not ok:
        raise ConfigError("config key 'base_quantization': this bitsandbytes cannot quantize to nf4 on the CPU (nanobooth "
                          "quantizes there, then moves the base); pip install -U bitsandbytes, or use base_quantization=int8")
    for name, parent in list(unet.named_modules()):
        for child_name, child in list(parent.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if type(child) is not torch.nn.Linear or any(fnmatch.fnmatch(full, p) for p in EXCLUDE):
                continue
            q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None, compute_dtype=dtype,
                                  quant_type="nf4", device="meta")
            q.weight = bnb.nn.Params4bit(child.weight.data, requires_grad=False, quant_type="nf4")
            if child.bias is not None:
                q.bias = torch.nn.Parameter(child.bias.data, requires_grad=False)
            setattr(parent, child_name, q)
    unet.to("cpu")  # quantizes every Params4bit now, on the CPU, so the float weights never reach the accelerator
