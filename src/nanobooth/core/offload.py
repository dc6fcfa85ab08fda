"""Block-wise offload of the frozen denoiser (`offload_blocks=N`, kohya's `blocks_to_swap`).

The last N transformer blocks (FLUX: `transformer_blocks` then `single_transformer_blocks`; SD3:
`transformer_blocks`) keep their frozen weights in CPU memory and visit the accelerator only while they
compute: a forward pre-hook brings a block in, a forward hook sends it back, and a hook on the block's
outputs brings it in again when the backward pass reaches it. Only frozen parameters and buffers move;
trained ones (LoRA/DoRA adapters) stay on the accelerator with their gradients and optimizer state, so the
optimizer never sees a parameter change device. Moves copy bits, so losses and gradients are unchanged.

Why not diffusers' `apply_group_offloading(offload_type="block_level")`: it is built for inference. Its hooks
are pre/post-forward only (the post-forward hook moves the group's weights back to the CPU, and nothing
brings them back for the backward pass, whose saved tensors are those same parameters), it moves whole
modules (adapters included, whose optimizer state would then sit on another device), and it offloads every
block group rather than N of them.
"""

from __future__ import annotations

from functools import partial

import torch
from torch.utils._pytree import tree_flatten

from .config import ConfigError

BLOCK_LISTS = ("transformer_blocks", "single_transformer_blocks")  # in the order the forward runs them


def transformer_blocks(unet: torch.nn.Module) -> list[torch.nn.Module]:
    """The denoiser's transformer blocks in forward order (empty for a UNet)."""
    return [b for name in BLOCK_LISTS for b in (getattr(unet, name, None) or [])]


def _in_backward() -> bool:
    return torch._C._current_graph_task_id() != -1


class BlockOffload:
    """Hooks that keep the frozen weights of the last `n` of `transformer_blocks(unet)` on `host` except while used.

    Raises ConfigError when the model has fewer than `n` transformer blocks (a UNet has none).
    `moves` counts the moves each way (`{"in": k, "out": k}`); `resident` is the set of offloaded block
    indices whose weights are on `device` now.
    """

    def __init__(self, unet: torch.nn.Module, n: int, device, host="cpu"):
        every = transformer_blocks(unet)
        if n and not every:  # say why, not "has 0 blocks; use at most 0"
            raise ConfigError("config key 'offload_blocks': this model has no transformer blocks (SD and SDXL's UNets have "
                              "none; offload_blocks is for SD3/FLUX); use offload_blocks=0")
        if n > len(every):
            raise ConfigError(f"config key 'offload_blocks': {n} asked, but this model has {len(every)} transformer blocks "
                              f"({' + '.join(BLOCK_LISTS)}); use at most {len(every)}")
        self.blocks = every[len(every) - n:]
        self.device, self.host = torch.device(device), torch.device(host)
        self.resident: set[int] = set()
        self.moves = {"in": 0, "out": 0}
        self._task = None  # the backward pass whose end sends every block back
        self._handles = []
        for i, b in enumerate(self.blocks):
            self._handles.append(b.register_forward_pre_hook(partial(self._before, i)))
            self._handles.append(b.register_forward_hook(partial(self._after, i)))

    def remove(self) -> None:
        for h in self._handles:
            h.remove()

    # --- placement ---------------------------------------------------------------------------------------------
    def _offloaded(self, module: torch.nn.Module) -> list[torch.Tensor]:
        return [t for t in (*module.parameters(), *module.buffers()) if not t.requires_grad]

    def _move(self, block: torch.nn.Module, to_device: bool) -> None:
        """Move `block`'s frozen parameters and buffers (tests replace this to watch where weights are)."""
        frozen = {id(t) for t in self._offloaded(block)}
        where = self.device if to_device else self.host
        # Module._apply, as .to uses it: it handles tensor subclasses (quanto's quantized weights) as .to does
        block._apply(lambda t: t.to(where) if id(t) in frozen else t)

    def place(self, unet: torch.nn.Module) -> None:
        """Move `unet` to the device except the offloaded blocks' frozen weights, which go to the host.

        Call instead of `unet.to(device)` (the full model need never fit), and again after adapters exist
        (peft creates them beside their base weights, on the host for offloaded blocks).
        """
        frozen = {id(t) for b in self.blocks for t in self._offloaded(b)}
        unet._apply(lambda t: t.to(self.host if id(t) in frozen else self.device))
        self.resident.clear()

    def _load(self, i: int) -> None:
        if _in_backward():
            # blocks run in sequence, so the backward pass is done with every block after this one
            for j in [j for j in self.resident if j > i]:
                self._unload(j)
            task = torch._C._current_graph_task_id()
            if task != self._task:
                self._task = task
                torch.autograd.Variable._execution_engine.queue_callback(self._unload_all)
        if i not in self.resident:
            self._move(self.blocks[i], True)
            self.resident.add(i)
            self.moves["in"] += 1

    def _unload(self, i: int) -> None:
        if i in self.resident:
            self._move(self.blocks[i], False)
            self.resident.discard(i)
            self.moves["out"] += 1

    def _unload_all(self) -> None:
        self._task = None
        for j in list(self.resident):
            self._unload(j)

    # --- hooks ---------------------------------------------------------------------------------------------------
    def _before(self, i: int, module, args) -> None:
        self._load(i)

    def _after(self, i: int, module, args, output) -> None:
        if _in_backward():
            return  # a gradient-checkpointing recompute: the block's backward comes next and reads these weights
        if torch.is_grad_enabled():
            for t in tree_flatten(output)[0]:
                if isinstance(t, torch.Tensor) and t.requires_grad:
                    # fires when the backward pass reaches this block's output, before any of its own backward ops
                    t.register_hook(partial(self._grad_reached, i))
        self._unload(i)

    def _grad_reached(self, i: int, grad: torch.Tensor) -> None:
        self._load(i)

    def frozen_names(self, unet: torch.nn.Module) -> list[str]:
        """Qualified names (in `unet`) of the offloaded parameters and buffers."""
        ids = {id(t) for b in self.blocks for t in self._offloaded(b)}
        return [n for n, t in (*unet.named_parameters(), *unet.named_buffers()) if id(t) in ids]
