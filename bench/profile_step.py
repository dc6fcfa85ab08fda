"""Where a training step's time goes, from the torch profiler: nanobooth and diffusers' reference script.

    python bench/profile_step.py --diffusers-examples /path/to/diffusers/examples --python /path/to/refvenv/bin/python
    python bench/profile_step.py --method full ...      # dreambooth-prior-pre vs train_dreambooth.py
    python bench/profile_step.py --no-reference         # nanobooth alone

Runs the same LoRA + prior (or full + prior) setting as bench/vs_diffusers.py (the mid-size SD model, dog
photos, 256², batch 1 + 1 class image, fp32, 1 thread) and records steps --from+1 .. --to of each tool with
`torch.profiler` (CPU activities). nanobooth is profiled through its library API (a `Step` callback starts
and stops the profiler); the reference through bench/_ref_clock.py (its "Steps" bar). The table gives, per
step, the self CPU time of the ops in each group (convolution, matmul/linear, attention, normalization,
optimizer, other aten ops), their sum, the step's wall time, and the rest: wall time outside any aten op
(Python, data loading, the loop's own work), the part a faster loop could still remove.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
from train_step import mid_model_path, print_table  # noqa: E402
from vs_diffusers import CLASS, LR, PROMPT, SCRIPTS  # noqa: E402

# (group, substrings of aten op names); the first match wins, so backward ops go with their forward's group
GROUPS = [("convolution", ("conv",)), ("attention", ("attention", "softmax", "baddbmm")),
          ("matmul / linear", ("addmm", "aten::mm", "bmm", "matmul", "linear")),
          ("normalization", ("group_norm", "layer_norm", "native_norm")),
          ("optimizer", ("_foreach", "addcdiv", "lerp", "sqrt"))]


def group_of(name: str) -> str:
    low = name.lower()
    return next((g for g, keys in GROUPS if any(k in low for k in keys)), "other aten ops")


def per_step(prof: dict) -> dict:
    """Group -> ms per step from a profile dump ({steps, wall_s, ops: [[name, self_cpu_us, count], ...]})."""
    out = {g: 0.0 for g, _ in GROUPS} | {"other aten ops": 0.0}
    for name, self_us, _count in prof["ops"]:
        if name.startswith("aten::") or name.startswith("mkldnn") or name.startswith("_"):
            out[group_of(name)] += self_us / 1000 / prof["steps"]
    out["all aten ops"] = sum(out.values())
    out["step wall time"] = prof["wall_s"] * 1000 / prof["steps"]
    out["outside aten ops"] = out["step wall time"] - out["all aten ops"]
    return out


def child_nanobooth(args) -> None:
    """Runs in a fresh process: nanobooth through its API, profiling steps --from+1 .. --to."""
    import time

    import torch.profiler

    from nanobooth import api
    from nanobooth.core import events
    from nanobooth.core.config import load_config

    variant = "dreambooth-lora-prior-pre" if args.method == "lora" else "dreambooth-prior-pre"
    over = [f"model={args.model}", f"instance_data_dir={args.photos}", f"output_dir={args.work / 'out'}",
            f"instance_prompt={PROMPT}", f"class_prompt={CLASS}", f"num_class_images={args.class_images}", "sample_batch_size=4",
            f"resolution={args.resolution}", "center_crop=true", "train_batch_size=1", f"max_train_steps={args.to + 1}",
            f"learning_rate={LR[args.method]}", "lr_scheduler=constant", "lr_warmup_steps=0", "seed=0", "checkpointing_steps=0",
            "validation_prompts=[]", "mixed_precision=no", f"class_data_dir={args.work / 'class'}", "num_threads=1"]
    over += ["lora_rank=4", "lora_alpha=4"] if args.method == "lora" else []
    prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
    t0 = []

    def on_event(e) -> None:
        if isinstance(e, events.Step) and e.step == args.start:
            prof.start()
            t0.append(time.time())
        elif isinstance(e, events.Step) and e.step == args.to:
            wall = time.time() - t0[0]  # before stop(), which processes the recorded events
            prof.stop()
            ops = [[k.key, k.self_cpu_time_total, k.count] for k in prof.key_averages()]
            (args.work / "profile.json").write_text(json.dumps({"steps": args.to - args.start, "wall_s": wall, "ops": ops}))

    api.train(load_config(variant, over), callbacks=[on_event])


def run(cmd: list[str], env: dict, log: Path) -> None:
    with log.open("w") as f:
        if subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env).returncode != 0:
            raise RuntimeError(f"run failed; its output: {log}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--diffusers-examples", help="a diffusers checkout's examples/ folder (holds dreambooth/)")
    p.add_argument("--python", default=sys.executable, help="interpreter for the reference (needs torchvision)")
    p.add_argument("--no-reference", action="store_true", help="profile nanobooth alone")
    p.add_argument("--method", choices=list(SCRIPTS), default="lora")
    p.add_argument("--from", dest="start", type=int, default=5, help="profile from the end of this step ...")
    p.add_argument("--to", type=int, default=15, help="... to the end of this one")
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--class-images", type=int, default=2)
    p.add_argument("--layers-per-block", type=int, default=1)
    p.add_argument("--model", default=None)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--photos", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child_nanobooth(args)
    if not args.no_reference and not args.diffusers_examples:
        sys.exit("--diffusers-examples DIR is needed for the reference (or --no-reference)")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from nanobooth.core.data import image_paths, resolve_data_dir

    model = args.model or str(mid_model_path(args.layers_per_block))
    root = Path(tempfile.mkdtemp(prefix="nb-profile-"))
    photos = root / "photos"
    photos.mkdir()
    for f in image_paths(resolve_data_dir("example:dog")):
        shutil.copy(f, photos / f.name)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_MININTERVAL": "1", "NANOBOOTH_CLASS_IMAGE_CACHE": "none"}
    profiles = {}
    work = root / "nanobooth"
    work.mkdir()
    run([sys.executable, __file__, "--child", "--method", args.method, "--from", str(args.start), "--to", str(args.to),
         "--resolution", str(args.resolution), "--class-images", str(args.class_images), "--model", model,
         "--photos", str(photos), "--work", str(work)], env, work / "log.txt")
    profiles["nanobooth"] = json.loads((work / "profile.json").read_text())
    if not args.no_reference:
        work = root / "reference"
        work.mkdir()
        cmd = [args.python, str(ROOT / "_ref_clock.py"), str(work / "times.json"),
               str(Path(args.diffusers_examples) / "dreambooth" / SCRIPTS[args.method]), "--pretrained_model_name_or_path", model,
               "--instance_data_dir", str(photos), "--class_data_dir", str(work / "class"), "--output_dir", str(work / "out"),
               "--instance_prompt", PROMPT, "--class_prompt", CLASS, "--with_prior_preservation", "--prior_loss_weight", "1.0",
               "--num_class_images", str(args.class_images), "--sample_batch_size", "4", "--resolution", str(args.resolution),
               "--center_crop", "--train_batch_size", "1", "--max_train_steps", str(args.to + 1), "--learning_rate", LR[args.method],
               "--lr_scheduler", "constant", "--lr_warmup_steps", "0", "--seed", "0", "--checkpointing_steps", "100000",
               "--mixed_precision", "no", "--dataloader_num_workers", "0"] + (["--rank", "4"] if args.method == "lora" else [])
        run(cmd, {**env, "NB_PROFILE": f"{args.start}:{args.to}:{work / 'profile.json'}"}, work / "log.txt")
        profiles["diffusers"] = json.loads((work / "profile.json").read_text())
    tools = [t for t in ("diffusers", "nanobooth") if t in profiles]
    table = {t: per_step(profiles[t]) for t in tools}
    lines = [[k] + [f"{table[t][k]:.1f}" for t in tools] + ([f"{table['nanobooth'][k] / table['diffusers'][k]:.2f}"
                                                             if table["diffusers"][k] > 0.05 else "-"] if len(tools) == 2 else [])
             for k in table[tools[0]]]
    print(f"\n{args.method} + prior, {Path(model).name}, {args.resolution}², steps {args.start + 1}-{args.to} profiled, 1 thread; "
          "ms per step (self CPU time of the aten ops in each group)")
    print_table(["ms per step"] + [f"{t}" for t in tools] + (["nanobooth / reference"] if len(tools) == 2 else []), lines,
                f"profile_step-{args.method}", [{"tool": t, **table[t]} for t in tools])
    top = sorted(profiles["nanobooth"]["ops"], key=lambda o: -o[1])[:12]
    print("\nnanobooth's 12 most expensive ops (self CPU ms per step):")
    for name, us, count in top:
        print(f"  {us / 1000 / profiles['nanobooth']['steps']:8.1f}  {name}  ({count / profiles['nanobooth']['steps']:.0f} calls)")
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
