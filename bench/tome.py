"""ToMe (tomesd) speed and output change, inference and training, at 64² and 128² latents (512²/1024² images).

    python bench/tome.py                       # ratios 0, 0.3, 0.5 on the mid-size model
    python bench/tome.py --latents 64 --ratios 0 0.5 --repeats 3

For each latent size and ratio: seconds per UNet forward at batch 2 (one classifier-free-guidance
step), seconds per training step (forward + backward, batch 1), and the output change against
ratio 0 as the relative L2 error of the noise prediction on the same input. Prints a table; writes JSON.
"""

from __future__ import annotations

import argparse
import resource
import time

import torch

from train_step import mid_model_path, print_table


def timed(fn, repeats: int) -> float:
    fn()  # warm-up: allocator, kernels
    t = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - t) / repeats


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--latents", type=int, nargs="*", default=[64, 128])
    p.add_argument("--ratios", type=float, nargs="*", default=[0.0, 0.3, 0.5])
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--layers-per-block", type=int, default=1)
    p.add_argument("--max-downsample", type=int, default=1)
    args = p.parse_args()
    from diffusers import UNet2DConditionModel
    import tomesd

    device = "cuda" if torch.cuda.is_available() else "cpu"
    unet = UNet2DConditionModel.from_pretrained(mid_model_path(args.layers_per_block) / "unet").to(device)
    rows = []
    for size in args.latents:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(2, 4, size, size, generator=g).to(device)
        cond = torch.randn(2, 77, unet.config.cross_attention_dim, generator=g).to(device)
        t = torch.tensor([500, 500], device=device)
        ref = None
        for ratio in args.ratios:
            tomesd.remove_patch(unet)
            if ratio:
                tomesd.apply_patch(unet, ratio=ratio, max_downsample=args.max_downsample)
            unet.eval()
            with torch.no_grad():
                infer = timed(lambda: unet(x, t, cond), args.repeats)
                out = unet(x, t, cond).sample
            ref = out if ratio == 0 else ref
            unet.train()

            def step():
                unet.zero_grad(set_to_none=True)
                unet(x[:1], t[:1], cond[:1]).sample.square().mean().backward()

            train = timed(step, args.repeats)
            err = ((out - ref).norm() / ref.norm()).item() if ref is not None else float("nan")
            rows.append({"latent": size, "image_equiv": size * 8, "ratio": ratio, "infer_s": infer, "train_s": train,
                         "rel_l2_vs_ratio0": err, "max_downsample": args.max_downsample, "device": device,
                         "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)})
            print(f"latent {size}² ratio {ratio:.1f}: infer {infer:.3f} s  train {train:.3f} s  rel L2 {err:.4f}", flush=True)
    lines = []
    for r in rows:
        base = next(b for b in rows if b["latent"] == r["latent"] and b["ratio"] == 0)
        lines.append([f"{r['latent']}² ({r['image_equiv']}²)", r["ratio"], f"{r['infer_s']:.3f}", f"{base['infer_s'] / r['infer_s']:.2f}x",
                      f"{r['train_s']:.3f}", f"{base['train_s'] / r['train_s']:.2f}x", f"{r['rel_l2_vs_ratio0']:.4f}"])
    print_table(["latent (image)", "ratio", "UNet fwd b2 s", "speedup", "train step s", "speedup", "rel. L2 vs 0"], lines, "tome", rows)


if __name__ == "__main__":
    main()
