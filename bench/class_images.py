"""Class-image generation cost: sampler, steps and batch size, on the mid-size model.

    python bench/class_images.py                          # 8 images at 256²
    python bench/class_images.py --num 16 --resolution 512

Rows: the diffusers-reference setting (the model's own sampler, 50 steps, one image at a time) and
nanobooth's (DPM-Solver++ 2M, 25 steps, batched). Prints seconds per image and peak RSS; writes JSON.
Cost grows linearly in the number of class images and roughly with resolution² (latent tokens).
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from pathlib import Path

import torch

from train_step import mid_model_path, print_table


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num", type=int, default=8)
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--layers-per-block", type=int, default=1)
    args = p.parse_args()
    from nanobooth.core.models import load_pipeline
    from nanobooth.core.prior import generate_class_images

    pipe = load_pipeline(str(mid_model_path(args.layers_per_block)))
    if torch.cuda.is_available():
        pipe.to("cuda")
    settings = [("model sampler, 50 steps, batch 1 (diffusers reference)", "model", 50, 1),
                ("dpm++, 25 steps, batch 1", "dpm++", 25, 1),
                ("dpm++, 25 steps, batch 8 (nanobooth default)", "dpm++", 25, 8)]
    rows = []
    for name, sampler, steps, batch in settings:
        folder = Path(tempfile.mkdtemp(prefix="nb-class-"))
        t = time.perf_counter()
        generate_class_images(pipe, folder, "a photo of dog", args.num, 0, batch, steps, args.resolution, sampler=sampler)
        dt = time.perf_counter() - t
        rows.append({"setting": name, "num": args.num, "resolution": args.resolution, "total_s": dt, "s_per_image": dt / args.num,
                     "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)})
        print(f"{name:55s} {dt:7.1f} s  ({dt / args.num:.2f} s/image)", flush=True)
    base = rows[0]["total_s"]
    print_table(["setting", "images", "resolution", "total s", "s/image", "speedup"],
                [[r["setting"], r["num"], f"{r['resolution']}²", f"{r['total_s']:.1f}", f"{r['s_per_image']:.2f}",
                  f"{base / r['total_s']:.2f}x"] for r in rows], "class_images", rows)


if __name__ == "__main__":
    main()
