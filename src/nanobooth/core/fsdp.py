"""The result of an FSDP run: whole copies of the sharded trained models, for the ordinary save.

Under FSDP each process holds a shard of every trained parameter (FSDP2: DTensors in the model itself; FSDP1:
views of a flat local shard), which the ordinary `save_pretrained` would write as they are. accelerate's
`get_state_dict` gathers the full weights (a collective: every process calls it) onto the CPU; the main process
loads them into a plain model of the same class and config, which the methods save as any other.
"""

from __future__ import annotations

import torch


def _plain_class(module: torch.nn.Module) -> type:
    # FSDP2's fully_shard swaps the class for a generated FSDP<Name>(FSDPModule, Name)
    return next(k for k in type(module).__mro__ if not k.__name__.startswith("FSDP"))


def unsharded(accelerator, wrapped: torch.nn.Module) -> torch.nn.Module | None:
    """A plain fp32 copy of the FSDP-prepared `wrapped` on the CPU (main process; None elsewhere). Every process must call."""
    state = accelerator.get_state_dict(wrapped)
    if not accelerator.is_main_process:
        return None
    base = accelerator.unwrap_model(wrapped)
    cls = _plain_class(base)
    with torch.device("meta"):
        plain = cls.from_config(base.config) if hasattr(cls, "from_config") else cls(base.config)
    # copies: on a CPU world the gathered tensors can share storage with FSDP's buffers, freed when it reshards
    plain.load_state_dict({k: v.detach().to("cpu", torch.float32, copy=True) for k, v in state.items()}, assign=True)
    named = dict(plain.named_buffers())
    for name, buf in base.named_buffers():  # non-persistent buffers (not in a state dict) are replicated, not sharded
        if named.get(name) is not None and named[name].is_meta:
            parent, _, leaf = name.rpartition(".")
            plain.get_submodule(parent)._buffers[leaf] = buf.detach().to("cpu")
    left = [n for n, t in (*plain.named_parameters(), *plain.named_buffers()) if t.is_meta]
    if left:
        raise RuntimeError(f"FSDP save: no gathered weight for {left[:3]}")
    return plain.train(base.training)
