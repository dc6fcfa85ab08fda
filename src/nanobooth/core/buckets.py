"""Aspect-ratio buckets (enable_bucket): non-square photos keep their framing.

Buckets are (width, height) sizes of about resolution² pixels, sides multiples of `step`, as kohya's
make_bucket_resolutions builds them. Each photo goes to the bucket nearest its aspect ratio (in log ratio,
so 2:1 and 1:2 are equally far from square), is resized to cover it and cropped to it. A batch holds photos
of one bucket only: BucketSampler deals each epoch's shuffled photos into full batches per bucket and
shuffles the batches, from its own generator, so the order is a function of (seed, step) and a resume
continues it bit-exactly. Class images (square, generated at `resolution`) are cropped to the batch's
bucket, so instance and class rows still share one forward.
"""

from __future__ import annotations

import math

from .data import Sampler


def bucket_sizes(resolution: int, step: int, min_side: int | None = None, max_side: int | None = None) -> list[tuple[int, int]]:
    """Every (width, height) with sides multiples of `step` in [min_side, max_side] (defaults resolution / 2
    and resolution * 2, rounded to `step`) and the largest height for its width whose area is at most
    resolution², with its transpose; sorted. The square resolution x resolution is one when `step` divides it."""
    area = resolution * resolution
    lo = max(step, (min_side or resolution // 2) // step * step)
    hi = (max_side or resolution * 2) // step * step
    out = set()
    for w in range(lo, hi + 1, step):
        h = min(hi, area // w // step * step)
        if h >= lo:
            out.update({(w, h), (h, w)})
    return sorted(out)


def nearest_bucket(size: tuple[int, int], buckets: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio is nearest `size`'s (w, h), in |log(w/h) - log(bw/bh)|; a tie goes to
    the larger bucket, then the first in `buckets`' order."""
    r = math.log(size[0] / size[1])
    return min(buckets, key=lambda b: (round(abs(math.log(b[0] / b[1]) - r), 12), -b[0] * b[1]))


def cover_size(size: tuple[int, int], target: tuple[int, int]) -> tuple[int, int]:
    """(w, h) of `size` scaled (aspect kept) to the smallest size that covers `target` (w, h)."""
    scale = max(target[0] / size[0], target[1] / size[1])
    return max(target[0], round(size[0] * scale)), max(target[1], round(size[1] * scale))


class BucketSampler(Sampler):
    """Batches from one bucket at a time. `groups`: the image indices of each bucket (in bucket order).

    An epoch shuffles each bucket's images, deals them into batches of the size `take` asks for (the last
    batch of a bucket filled from the start of that bucket's shuffled order, so every batch is full), then
    shuffles the batches; `take(k)` returns the next batch. `order` (a list of batches) and `pos` are the
    checkpointed state, as Sampler's; every process draws the same global batch and slices its rows.
    """

    def __init__(self, groups: list[list[int]], seed: int):
        super().__init__(sum(len(g) for g in groups), seed)
        self.groups = [list(g) for g in groups if g]

    def take(self, k: int) -> list[int]:
        import torch

        if self.pos >= len(self.order) or len(self.order[self.pos]) != k:
            batches = []
            for g in self.groups:
                perm = [g[j] for j in torch.randperm(len(g), generator=self.generator).tolist()]
                batches += [[perm[j % len(perm)] for j in range(s, s + k)] for s in range(0, len(perm), k)]
            self.order = [batches[j] for j in torch.randperm(len(batches), generator=self.generator).tolist()]
            self.pos = 0
        self.pos += 1
        return list(self.order[self.pos - 1])

    def load_state_dict(self, state: dict) -> None:
        self.order, self.pos = [list(b) for b in state["order"]], int(state["pos"])
        self.generator.set_state(state["generator"])


def make_sampler(images, seed: int) -> Sampler:
    """The data order of an ImageSet: a BucketSampler over its buckets when it has them (enable_bucket),
    else the plain epoch-wise Sampler (unchanged, so runs without buckets keep their order)."""
    if not images.sizes:
        return Sampler(len(images), seed)
    groups: dict[tuple[int, int], list[int]] = {}
    for i, size in enumerate(images.sizes):
        groups.setdefault(size, []).append(i)
    return BucketSampler([groups[s] for s in sorted(groups)], seed)
