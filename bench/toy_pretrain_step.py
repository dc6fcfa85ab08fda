"""Seconds per pretraining step of the toy models (recipes v5's and v6's UNet + CLIP, the FLUX twin's transformer + CLIP + T5),
fp32 against CPU bfloat16 autocast, measured side by side in one process (the shared CPU's noise hits both alike).

    python bench/toy_pretrain_step.py                  # batch 32, 1 thread, 3 rounds
    python bench/toy_pretrain_step.py --threads 2 --rounds 5

A step is the recipes' own: text encoders and denoiser forward, loss, backward (the optimizer step is the
same in both precisions and left out). Rounds alternate fp32 / bf16 so drift in the machine's load hits both;
the first round is warm-up. Prints the median seconds per step and the ratio, and writes JSON to bench/results/.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from train_step import print_table


def unet_step(batch: int, arch: str = "v5"):
    from nanobooth.toy.recipes import pretrain

    unet, te = pretrain.make_unet(arch), pretrain.make_text_encoder()
    ids, x, t = torch.randint(0, 1000, (batch, 77)), torch.randn(batch, 4, 32, 32), torch.randint(0, 1000, (batch,))

    def step(bf16: bool):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = unet(x, t, te(ids)[0]).sample.float()
        out.square().mean().backward()
    return step


def flux_step(batch: int):
    from nanobooth.families.flux import image_ids, pack
    from nanobooth.toy.recipes import pretrain, pretrain_flux

    tok = pretrain_flux.make_t5_tokenizer()
    clip, t5, tr = pretrain.make_text_encoder(), pretrain_flux.make_t5(len(tok)), pretrain_flux.make_transformer()
    ids, t5_ids = torch.randint(0, 1000, (batch, 77)), torch.randint(0, len(tok), (batch, pretrain_flux.T5_LENGTH))
    x = pack(torch.randn(batch, 4, 32, 32))

    def step(bf16: bool):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = tr(hidden_states=x, timestep=torch.rand(batch), pooled_projections=clip(ids).pooler_output,
                     encoder_hidden_states=t5(t5_ids)[0], img_ids=image_ids(32, 32),
                     txt_ids=torch.zeros(pretrain_flux.T5_LENGTH, 3), return_dict=False)[0].float()
        out.square().mean().backward()
    return step


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=3, help="timed rounds after one warm-up round")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    rows, lines = [], []
    for name, make in (("v5 UNet + CLIP", unet_step), ("v6 UNet + CLIP", lambda b: unet_step(b, "v6")),
                       ("FLUX twin + CLIP + T5", flux_step)):
        step = make(a.batch)
        times = {False: [], True: []}
        for r in range(a.rounds + 1):
            for bf16 in (False, True):
                t0 = time.perf_counter()
                step(bf16)
                if r:
                    times[bf16].append(time.perf_counter() - t0)
        fp32, bf16 = statistics.median(times[False]), statistics.median(times[True])
        rows.append({"model": name, "batch": a.batch, "threads": a.threads, "fp32_s": times[False], "bf16_s": times[True]})
        lines.append([name, f"{fp32:.2f}", f"{bf16:.2f}", f"{fp32 / bf16:.2f}x"])
    print_table(["model", "fp32 s/step", "bf16 autocast s/step", "speed-up"], lines, "toy_pretrain_step", rows)


if __name__ == "__main__":
    main()
