"""Memory and seconds per LoRA step of a FLUX-shaped transformer, per memory option (base_quantization,
gradient_checkpointing, offload_blocks).

    python bench/flow_memory.py                               # CPU: a mid-size FLUX-shaped transformer, 32x32 latents
    python bench/flow_memory.py --width 1024 --double 4 --single 8 --repeats 3
    python bench/flow_memory.py --gpu                         # CUDA: FLUX.1-dev's real shapes, bf16, 512² and 1024²

The transformer is built in code with random weights (no download): the LoRA step's cost does not depend on
the weights' values. A step is what train.py does per step for the denoiser: forward on packed latents and a
text sequence, MSE, backward into the adapters (rank 16 on the flux/dreambooth-lora recipe's modules), AdamW.
Each (option, repeat) runs in a fresh process, options interleaved within a repeat, so the machine's load
drifts over all options alike. CPU columns: the weights' bytes, the resident memory once set up, and the
peak resident memory during the steps (a thread samples /proc/self/statm every 2 ms); GPU: peak allocated.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_step import print_table  # noqa: E402

# option -> (base_quantization, gradient_checkpointing, offload_blocks on?)
OPTIONS = {"none": ("none", False, False), "int8": ("int8", False, False), "checkpointing": ("none", True, False),
           "int8+checkpointing": ("int8", True, False), "checkpointing+offload": ("none", True, True),
           "int8+checkpointing+offload": ("int8", True, True), "nf4": ("nf4", False, False),
           "nf4+checkpointing": ("nf4", True, False)}
GPU_OPTIONS = {"none": ("none", False, False), "checkpointing": ("none", True, False), "nf4+checkpointing": ("nf4", True, False),
               "int8+checkpointing": ("int8", True, False), "fp8+checkpointing": ("fp8", True, False),
               "checkpointing+offload": ("none", True, True), "nf4+checkpointing+offload": ("nf4", True, True),
               "int8+checkpointing+offload": ("int8", True, True)}


def rss_mb() -> float:
    import os

    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class PeakRSS(threading.Thread):
    """Samples the resident set size until stopped; .peak in MiB."""

    def __init__(self):
        super().__init__(daemon=True)
        self.peak, self.running = rss_mb(), True

    def run(self):
        while self.running:
            self.peak = max(self.peak, rss_mb())
            time.sleep(0.002)


def _nbytes(t) -> int:
    inner = [getattr(t, a) for a in ("_data", "_scale", "_shift") if getattr(t, a, None) is not None]  # quanto
    if (state := getattr(t, "quant_state", None)) is not None:  # bitsandbytes 4-bit: packed bytes + block scales
        inner = [t.data, state.absmax]
    return sum(x.numel() * x.element_size() for x in inner) if inner else t.numel() * t.element_size()


def build(args, gpu: bool):
    import torch
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    if gpu:  # FLUX.1-dev: the class defaults are its config (19 double + 38 single blocks, width 3072, T5 4096)
        torch.set_default_dtype(torch.bfloat16)
        with torch.device("cuda"):
            model = FluxTransformer2DModel(guidance_embeds=True)
        torch.set_default_dtype(torch.float32)
        return model
    head = 64
    return FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=args.double, num_single_layers=args.single,
                                  attention_head_dim=head, num_attention_heads=args.width // head, joint_attention_dim=args.text_width,
                                  pooled_projection_dim=256, guidance_embeds=True, axes_dims_rope=(16, 24, 24))


def run_one(args) -> dict:
    import torch

    from nanobooth.core.config import load_config
    from nanobooth.core.models import lora_config
    from nanobooth.core.offload import BlockOffload, transformer_blocks
    from nanobooth.core.quantize import quantize_base
    from nanobooth.families.flux import image_ids

    gpu = args.gpu
    device = torch.device("cuda" if gpu else "cpu")
    dtype = torch.bfloat16 if gpu else torch.float32
    quant, checkpointing, offload = (GPU_OPTIONS if gpu else OPTIONS)[args.one]
    model = build(args, gpu)
    model.requires_grad_(False)
    quantize_base(model, SimpleNamespace(base_quantization=quant), dtype, device)
    n_off = (args.offload_blocks if args.offload_blocks is not None else len(transformer_blocks(model)) // 2) if offload else 0
    offloader = BlockOffload(model, n_off, device) if n_off else None
    offloader.place(model) if offloader else model.to(device)
    recipe = load_config("flux/dreambooth-lora")
    model.add_adapter(lora_config(recipe.lora_rank, recipe.effective_lora_alpha, recipe.lora_target_modules, 0.0))
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()  # adapters train in fp32, as train.py keeps them
    if offloader:
        offloader.place(model)  # the adapters peft made beside offloaded weights
    if checkpointing:
        model.enable_gradient_checkpointing()
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, foreach=not gpu, fused=gpu)
    cfg = model.config
    side = args.resolution // 8  # latent side (VAE f=8); packed 2x2 -> (side/2)² tokens of 4x16 channels
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, (side // 2) ** 2, cfg.in_channels, generator=g).to(device, dtype)
    target = torch.randn(x.shape, generator=g).to(device, dtype)
    text = torch.randn(1, args.text_len, cfg.joint_attention_dim, generator=g).to(device, dtype)
    kw = dict(timestep=torch.tensor([0.5], device=device, dtype=dtype), guidance=torch.tensor([3.5], device=device, dtype=dtype),
              pooled_projections=torch.randn(1, cfg.pooled_projection_dim, generator=g).to(device, dtype),
              encoder_hidden_states=text, txt_ids=torch.zeros(args.text_len, 3, device=device, dtype=dtype),
              img_ids=image_ids(side, side, device, dtype), return_dict=False)
    # the frozen base's bytes as held (a quantized weight: its int8/fp8 data plus scales); adapters excluded
    base_mb = sum(_nbytes(t) for n, t in model.named_parameters() if "lora_" not in n) / 2**20
    if gpu:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    set_up = rss_mb()
    sampler = PeakRSS()
    sampler.start()
    times = []
    for _ in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=gpu):
            pred = model(hidden_states=x, **kw)[0]
        loss = torch.nn.functional.mse_loss(pred.float(), target.float())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if gpu:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    sampler.running = False
    sampler.join()
    assert torch.isfinite(loss), loss
    return {"option": args.one, "offloaded_blocks": n_off, "resolution": args.resolution, "s_per_step": statistics.median(times[args.warmup:]),
            "base_weights_mb": round(base_mb, 1), "rss_setup_mb": round(set_up), "rss_peak_steps_mb": round(sampler.peak),
            "peak_cuda_mb": round(torch.cuda.max_memory_allocated() / 2**20) if gpu else None,
            "trainable_m": round(sum(p.numel() for p in params) / 1e6, 2),
            "device": torch.cuda.get_device_name() if gpu else f"cpu x{torch.get_num_threads()}"}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpu", action="store_true", help="FLUX.1-dev's real shapes on CUDA, bf16, at 512² and 1024²")
    p.add_argument("--options", nargs="*", default=None, help=f"CPU: {list(OPTIONS)}; GPU: {list(GPU_OPTIONS)}")
    p.add_argument("--width", type=int, default=512, help="CPU: transformer width (64-wide heads)")
    p.add_argument("--double", type=int, default=2, help="CPU: double-stream blocks")
    p.add_argument("--single", type=int, default=4, help="CPU: single-stream blocks")
    p.add_argument("--text-width", type=int, default=512, help="CPU: text-encoder width (T5-XXL: 4096)")
    p.add_argument("--text-len", type=int, default=None, help="text tokens (default CPU 64, GPU 512 as FLUX.1-dev trains)")
    p.add_argument("--resolution", type=int, nargs="*", default=None, help="pixels (default CPU 256 = 32x32 latents; GPU 512 1024)")
    p.add_argument("--offload-blocks", type=int, default=None, help="blocks the +offload options offload (default: half)")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--one", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.text_len is None:
        args.text_len = 512 if args.gpu else 64
    if args.one:
        args.resolution = args.resolution[0]
        print(json.dumps(run_one(args)))
        return
    options = args.options or list(GPU_OPTIONS if args.gpu else OPTIONS)
    resolutions = args.resolution or ([512, 1024] if args.gpu else [256])
    passthrough = ["--width", str(args.width), "--double", str(args.double), "--single", str(args.single),
                   "--text-width", str(args.text_width), "--text-len", str(args.text_len), "--steps", str(args.steps),
                   "--warmup", str(args.warmup), *(["--gpu"] if args.gpu else []),
                   *(["--offload-blocks", str(args.offload_blocks)] if args.offload_blocks is not None else [])]
    rows = []
    for res in resolutions:
        for r in range(args.repeats):
            for opt in options:  # interleaved: each repeat runs every option once
                out = subprocess.run([sys.executable, __file__, "--one", opt, "--resolution", str(res), *passthrough],
                                     capture_output=True, text=True)
                if out.returncode:
                    print(out.stderr[-2000:], file=sys.stderr)
                    raise SystemExit(f"{opt} at {res}: failed")
                rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
                print(f"repeat {r + 1}/{args.repeats} {res}px {opt}: {rows[-1]['s_per_step']:.3f} s/step", file=sys.stderr)
    lines = []
    for res in resolutions:
        for opt in options:
            rs = [x for x in rows if x["option"] == opt and x["resolution"] == res]
            med = lambda k: statistics.median(x[k] for x in rs)  # noqa: E731
            mem = [f"{med('peak_cuda_mb') / 1024:.1f}"] if args.gpu else [round(med("rss_setup_mb")), round(med("rss_peak_steps_mb"))]
            mem = [round(med("base_weights_mb"))] + mem
            lines.append([opt, res, f"{med('s_per_step'):.3f}", *mem, rs[0]["trainable_m"]])
    mem_head = ["frozen base MiB", *(["peak VRAM GiB"] if args.gpu else ["RSS set up MiB", "peak RSS in steps MiB"])]
    print_table(["option", "resolution", "s/step (median)", *mem_head, "LoRA params (M)"], lines, "flow_memory", rows)
    print(f"\n{rows[0]['device']}, {args.repeats} repeats x {args.steps} steps (+{args.warmup} warm-up)")


if __name__ == "__main__":
    main()
