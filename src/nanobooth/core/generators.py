"""The training loop's random generators: one per purpose, each in every checkpoint.

Data order, augmentation, noise and timesteps, ToMe's merges and caption dropout each draw from their own
torch.Generator, seeded from the config's `seed`, so a resumed run draws exactly what the uninterrupted run
would have (bit-exact resume) and a validation render, which forks the global RNG, cannot perturb training.
"""

from __future__ import annotations

import dataclasses

import torch

from .buckets import Sampler, make_sampler


@dataclasses.dataclass
class Generators:
    samplers: dict[str, Sampler]  # image set ("instance", "class") -> its shuffled order
    noise: torch.Generator  # posterior samples' eps, the diffusion noise and the timesteps
    aug: torch.Generator  # random_flip, random crops
    tome: torch.Generator  # tomesd's merge choices; on the denoiser's device (tomesd wants it there)
    caption: torch.Generator  # caption_dropout's draws

    @classmethod
    def seeded(cls, sets: dict, seed: int, device: torch.device) -> "Generators":
        """The generators of a run with config `seed` (seed + 4 is the validation grid's ToMe, seed + 6 validation loss's)."""
        return cls(samplers={k: make_sampler(s, seed + 17 * (i + 1)) for i, (k, s) in enumerate(sets.items())},
                   noise=torch.Generator().manual_seed(seed + 1), aug=torch.Generator().manual_seed(seed + 2),
                   tome=torch.Generator(device).manual_seed(seed + 3), caption=torch.Generator().manual_seed(seed + 5))

    def rng_state(self) -> dict[str, torch.Tensor]:
        """Every generator's state, and the global torch RNG's: a checkpoint's rng file."""
        out = {"noise": self.noise.get_state(), "aug": self.aug.get_state(), "tome": self.tome.get_state(),
               "caption": self.caption.get_state(), "torch": torch.get_rng_state()}
        out.update({f"sampler.{k}": s.generator.get_state() for k, s in self.samplers.items()})
        return out

    def sampler_positions(self) -> dict[str, dict]:
        """Each sampler's order and position (a checkpoint's state.json `samplers`)."""
        return {k: {"order": s.order, "pos": s.pos} for k, s in self.samplers.items()}

    def load(self, rng: dict[str, torch.Tensor], positions: dict[str, dict]) -> None:
        """Restore what rng_state() and sampler_positions() saved."""
        for k, s in self.samplers.items():
            s.load_state_dict({**positions[k], "generator": rng[f"sampler.{k}"]})
        self.noise.set_state(rng["noise"]), self.aug.set_state(rng["aug"]), self.tome.set_state(rng["tome"])
        if "caption" in rng:  # checkpoints from before caption_dropout have none (and drew none)
            self.caption.set_state(rng["caption"])
        torch.set_rng_state(rng["torch"])
