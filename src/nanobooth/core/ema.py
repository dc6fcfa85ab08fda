"""EMA (`use_ema`): an exponential moving average of the trained parameters, saved as the result.

After every optimizer step each average moves towards its parameter: `ema = d * ema + (1 - d) * p`, with
diffusers' EMAModel warm-up `d = min(ema_decay, (1 + n) / (10 + n))` at the n-th update (n from 0), so the
first updates follow the weights closely and a short DreamBooth run's average is not dominated by the
untrained start. The averages are fp32, on the parameters' device or on the CPU (`offload_ema`: no
accelerator memory, one device-to-host copy per step). Checkpoints hold them (`ema.safetensors`) and the
update count (state.json), so a resumed run averages bit-exactly as an uninterrupted one.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .errors import CheckpointError

EMA_FILE = "ema.safetensors"


class EMA:
    """Averages of `params` (the optimizer's tensors, in its order), initialised to their current values."""

    def __init__(self, params: list[torch.Tensor], decay: float, offload: bool = False):
        self.params, self.decay, self.updates = list(params), float(decay), 0
        self.shadow = [p.detach().to("cpu" if offload else p.device, torch.float32, copy=True) for p in self.params]

    def current_decay(self) -> float:
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self) -> None:
        """After an optimizer step: move every average (1 - d) of the way to its parameter."""
        d = self.current_decay()
        for s, p in zip(self.shadow, self.params):
            s.lerp_(p.detach().to(s.device, torch.float32), 1.0 - d)
        self.updates += 1

    @torch.no_grad()
    def copy_to_params(self) -> None:
        """Write the averages into the parameters (their dtype and device): the result is the average."""
        for s, p in zip(self.shadow, self.params):
            p.copy_(s.to(p.device, p.dtype))

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {f"ema.{i:05d}": s.detach().contiguous().cpu() for i, s in enumerate(self.shadow)}

    def load_state_dict(self, tensors: dict[str, torch.Tensor], updates: int) -> None:
        if len(tensors) != len(self.shadow):
            raise ValueError(f"the checkpoint holds {len(tensors)} EMA tensors, this run trains {len(self.shadow)}")
        for i, s in enumerate(self.shadow):
            s.copy_(tensors[f"ema.{i:05d}"])
        self.updates = int(updates)

    def load_checkpoint(self, folder: Path, updates: int) -> None:
        """Restore the averages a checkpoint folder holds; CheckpointError (one line) if it was saved without use_ema."""
        from safetensors.torch import load_file

        if not (folder / EMA_FILE).is_file():
            raise CheckpointError(f"{folder} holds no {EMA_FILE} (saved without use_ema); resume with use_ema=false")
        self.load_state_dict(load_file(folder / EMA_FILE), updates)
