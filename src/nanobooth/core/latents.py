"""VAE latents of an image set for training: posteriors (mean, std) cached once per image and size, or
encoded per step (LatentSource); a step's rows sampled from them with the loop's checkpointed generators
(BatchDraw, generators.py)."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from tqdm.auto import tqdm

from .config import TrainConfig
from .data import ImageSet, drop_captions, latent_masks
from .generators import Generators


def encode_dist(vae, pixels: torch.Tensor, batch: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """VAE posterior (mean, std) for pixels in [-1, 1]; sampling happens per step from our generator.
    Small batches: this runs once per image set, so a bigger batch only raises the memory peak."""
    means, stds = [], []
    from accelerate import PartialState

    quiet = len(pixels) <= batch or not PartialState().is_main_process  # per-step encodes stay quiet
    with torch.no_grad():
        for i in tqdm(range(0, len(pixels), batch), desc="encode latents", unit="batch", leave=False, disable=quiet):
            dist = vae.encode(pixels[i : i + batch].to(vae.device, vae.dtype)).latent_dist
            means.append(dist.mean.float())
            stds.append(dist.std.float())
    return torch.cat(means), torch.cat(stds)


class LatentSource:
    """Latent posteriors of one image set, with each example's (original size, crop) coords and, for a masked
    set (masked_loss), its mask on the latent grid: cached once (both flips if random_flip) or encoded per step.
    Cached per (w, h) size: each image at its own (its bucket or the resolution square), or, given `sizes`
    (class images with enable_bucket), every image at each of those."""

    def __init__(self, images: ImageSet, vae, cfg: TrainConfig, cached: bool, sizes: list[tuple[int, int]] | None = None):
        self.images, self.vae, self.cfg, self.cached = images, vae, cfg, cached
        self.masked = images.masks is not None
        if cached:
            groups: dict[tuple[int, int], list[int]] = {}
            for i in range(len(images)):
                for size in sizes or [images.size_of(i, cfg.resolution)]:
                    groups.setdefault(size, []).append(i)
            self.cache = {size: self._encode(idx, size) for size, idx in groups.items()}

    def _encode(self, idx: list[int], size: tuple[int, int]):
        flips = [False, True] if self.cfg.random_flip else [False]
        samples = [self.images.sample(idx, self.cfg.resolution, [f] * len(idx), None, with_masks=True, size=size) for f in flips]
        dists = [encode_dist(self.vae, s[0]) for s in samples]
        mean = torch.stack([d[0] for d in dists], 1)  # (N, flips, C, h, w)
        std = torch.stack([d[1] for d in dists], 1)
        coords = torch.stack([s[1] for s in samples], 1)  # (N, flips, 4): a flip moves the crop's left
        mask = torch.stack([latent_masks(s[2], mean.shape[-2:]) for s in samples], 1)  # (N, flips, 1, h, w)
        return {i: row for row, i in enumerate(idx)}, mean, std, coords, mask

    def dist(self, idx: list[int], flips: list[bool], crop_gen: torch.Generator | None, size: tuple[int, int] | None = None):
        """Posterior (mean, std) of the examples idx (mirrored where flips), their coords (N, 4) and masks
        (N, 1, h, w) (None for an unmasked set). size: the (w, h) to crop to (the batch's bucket); None: the
        images' own (one size for all of idx: a batch never mixes buckets)."""
        if self.cached:
            rows, mean, std, coords, mask = self.cache[size or self.images.size_of(idx[0], self.cfg.resolution)]
            f = torch.tensor([int(x) for x in flips]) if self.cfg.random_flip else torch.zeros(len(idx), dtype=torch.long)
            i = torch.tensor([rows[j] for j in idx])
            return mean[i, f], std[i, f], coords[i, f], mask[i, f] if self.masked else None
        pixels, coords, masks = self.images.sample(idx, self.cfg.resolution, flips, crop_gen, with_masks=True, size=size)
        mean, std = encode_dist(self.vae, pixels)
        return mean, std, coords, latent_masks(masks, mean.shape[-2:]) if self.masked else None


@dataclasses.dataclass(eq=False, repr=False)  # holds models: no field-by-field compare or repr
class BatchDraw:
    """Draws a training step's rows of one image set: `draw(kind, n_global, size)`. Every rank draws the whole
    global batch from the same generators (so all stay in step) and keeps its own rows."""

    cfg: TrainConfig
    sets: dict[str, ImageSet]  # "instance", "class"
    sources: dict[str, LatentSource]
    gens: Generators
    family: Any  # families.base.Family: latents_from_vae
    vae_config: Any
    rank: int
    device: torch.device

    def __call__(self, kind: str, n_global: int, size: tuple[int, int] | None = None):
        """This rank's latents (N, C, h, w) sampled from the posteriors, their coords (N, 4: original size, crop),
        prompts, masks (None unless masked_loss) and (w, h) size (`size`, else the batch's own)."""
        cfg, gens = self.cfg, self.gens
        idx = gens.samplers[kind].take(n_global)
        flips = (torch.rand(n_global, generator=gens.aug) < 0.5).tolist() if cfg.random_flip else [False] * n_global
        mine = slice(self.rank * cfg.train_batch_size, (self.rank + 1) * cfg.train_batch_size)
        size = size or self.sets[kind].size_of(idx[0], cfg.resolution)
        mean, std, coords, masks = self.sources[kind].dist(idx[mine], flips[mine], None if cfg.center_crop else gens.aug, size)
        eps = torch.randn((n_global, *mean.shape[1:]), generator=gens.noise)
        prompts = [self.sets[kind].prompt_of(i) for i in idx]
        if kind == "instance" and cfg.caption_dropout:
            prompts = drop_captions(prompts, cfg.caption_dropout, gens.caption)
        latents = mean.to(self.device) + std.to(self.device) * eps[mine].to(self.device)
        return self.family.latents_from_vae(latents, self.vae_config), coords, prompts[mine], masks, size
