"""nanobooth against diffusers' reference DreamBooth scripts, side by side on this machine.

    python bench/vs_diffusers.py --diffusers-examples /path/to/diffusers/examples --python /path/to/refvenv/bin/python
    python bench/vs_diffusers.py ... --method full      # train_dreambooth.py vs dreambooth-prior-pre, lr 5e-6
    python bench/vs_diffusers.py ... --model DIR        # any SD-layout folder instead of the mid-size model

Runs diffusers' `examples/dreambooth/train_dreambooth_lora.py` (from the checkout you point at; its
interpreter needs torchvision, hence --python) and `nanobooth train dreambooth-lora-prior-pre` with the
same settings (`--method full`: `train_dreambooth.py` and `dreambooth-prior-pre`, the whole UNet at the
reference's default lr 5e-6): the bench's mid-size SD-architecture model (random weights, built once and saved to a
folder), the shipped dog photos, batch 1 + 1 class image, rank 4 (alpha 4) on to_q/to_k/to_v/to_out.0,
lr 1e-4 constant, center crop, no text-encoder training, fp32, the same CPU thread count, class-image batch 4.
Each tool generates its class images with its own default sampler (reference: the model's scheduler,
50 steps; nanobooth: DPM-Solver++ 25 steps) unless --same-class-sampler. Runs are interleaved
(reference, nanobooth, reference, ...), each in a fresh process, and the table gives per tool the median over repeats of:

- s/step = (t[35] - t[5]) / 30 from per-step timestamps (reference: its "Steps" tqdm bar, clocked by
  bench/_ref_clock.py; nanobooth: train_log.jsonl), i.e. `--steps` - `--skip` steps after warm-up
- peak RSS of the process (os.wait4), class-image time, whole-run time (process start to exit)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
from train_step import mid_model_path, print_table  # noqa: E402

PROMPT, CLASS = "a photo of sks dog", "a photo of dog"


def step_rate(times: list[float], skip: int) -> float:
    """Seconds per step from cumulative per-step timestamps (times[i] = when step i+1 ended): (t[n] - t[skip]) / (n - skip)."""
    if len(times) <= skip:
        raise ValueError(f"{len(times)} step timestamps, need more than --skip={skip}")
    return (times[-1] - times[skip - 1]) / (len(times) - skip) if skip else (times[-1] - times[0]) / (len(times) - 1)


def reference_times(events: list) -> tuple[list[float], float | None]:
    """(per-step timestamps, class-image seconds) from _ref_clock's events."""
    steps = [t for d, kind, t in events if d == "Steps" and kind == "update"]
    cls = [(kind, t) for d, kind, t in events if d == "Generating class images" and kind in ("start", "close")]
    start = next((t for k, t in cls if k == "start"), None)
    end = next((t for k, t in cls if k == "close"), None)
    return steps, (end - start if start is not None and end is not None else None)


def run_child(cmd: list[str], env: dict, log: Path) -> tuple[int, float, float]:
    """(returncode, wall seconds, peak RSS MB) of one fresh process."""
    t0 = time.time()
    with log.open("w") as f:
        p = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(p.pid, 0)
    return os.waitstatus_to_exitcode(status), time.time() - t0, usage.ru_maxrss / 1024


SCRIPTS = {"lora": "train_dreambooth_lora.py", "full": "train_dreambooth.py"}
LR = {"lora": "1e-4", "full": "5e-6"}  # each reference script's default


def reference(args, model: str, photos: Path, work: Path, env: dict) -> dict:
    out, times = work / "out", work / "times.json"
    cmd = [args.python, str(ROOT / "_ref_clock.py"), str(times), str(Path(args.diffusers_examples) / "dreambooth" / SCRIPTS[args.method]),
           "--pretrained_model_name_or_path", model, "--instance_data_dir", str(photos), "--class_data_dir", str(work / "class"),
           "--output_dir", str(out), "--instance_prompt", PROMPT, "--class_prompt", CLASS, "--with_prior_preservation",
           "--prior_loss_weight", "1.0", "--num_class_images", str(args.class_images), "--sample_batch_size", "4",
           "--resolution", str(args.resolution), "--center_crop", "--train_batch_size", "1", "--max_train_steps", str(args.steps),
           "--learning_rate", LR[args.method], "--lr_scheduler", "constant", "--lr_warmup_steps", "0", "--seed", "0",
           "--checkpointing_steps", "100000", "--mixed_precision", "no", "--dataloader_num_workers", "0"]
    cmd += ["--rank", "4"] if args.method == "lora" else []
    rc, wall, rss = run_child(cmd, env, work / "log.txt")
    if rc != 0:
        raise RuntimeError(f"reference run failed (exit {rc}); its output: {work / 'log.txt'}")
    steps, cls = reference_times(json.loads(times.read_text())["events"])
    return {"tool": "diffusers", "s_per_step": step_rate(steps, args.skip), "peak_rss_mb": rss, "class_s": cls, "total_s": wall}


def nanobooth(args, model: str, photos: Path, work: Path, env: dict) -> dict:
    out = work / "out"
    variant = "dreambooth-lora-prior-pre" if args.method == "lora" else "dreambooth-prior-pre"
    cmd = [sys.executable, "-m", "nanobooth", "train", variant, f"model={model}", f"instance_data_dir={photos}",
           f"output_dir={out}", f"instance_prompt={PROMPT}", f"class_prompt={CLASS}", f"num_class_images={args.class_images}",
           "sample_batch_size=4", f"resolution={args.resolution}", "center_crop=true", "train_batch_size=1",
           f"max_train_steps={args.steps}", f"learning_rate={LR[args.method]}", "lr_scheduler=constant", "lr_warmup_steps=0",
           "seed=0", "checkpointing_steps=0", "validation_prompts=[]", "mixed_precision=no",
           f"class_data_dir={work / 'class'}", f"num_threads={args.threads}"]
    cmd += ["lora_rank=4", "lora_alpha=4"] if args.method == "lora" else []
    if args.same_class_sampler:
        cmd += ["class_sampler=model", "class_generation_steps=50"]
    rc, wall, rss = run_child(cmd, env, work / "log.txt")
    if rc != 0:
        raise RuntimeError(f"nanobooth run failed (exit {rc}); its output: {work / 'log.txt'}")
    steps = [json.loads(x)["time"] for x in (out / "train_log.jsonl").read_text().splitlines()]
    ttm = json.loads((out / "time_to_model.json").read_text())
    return {"tool": "nanobooth", "s_per_step": step_rate(steps, args.skip), "peak_rss_mb": rss, "class_s": ttm["class_images_s"],
            "total_s": wall}


def summarize(rows: list[dict]) -> list[list]:
    """Table lines: one per measure, the median over repeats per tool and nanobooth / diffusers."""
    def median(tool, k):  # None where no run measured it (class images premade with --class-from)
        vals = [r[k] for r in rows if r["tool"] == tool and r[k] is not None]
        return statistics.median(vals) if vals else None

    med = {tool: {k: median(tool, k) for k in ("s_per_step", "peak_rss_mb", "class_s", "total_s")} for tool in ("diffusers", "nanobooth")}
    fmt = {"s_per_step": ("s/step", "{:.3f}"), "peak_rss_mb": ("peak RSS MB", "{:.0f}"), "class_s": ("class images s", "{:.1f}"),
           "total_s": ("whole run s", "{:.1f}")}
    return [[name, f.format(med["diffusers"][k]), f.format(med["nanobooth"][k]), f"{med['nanobooth'][k] / med['diffusers'][k]:.2f}"]
            for k, (name, f) in fmt.items() if med["diffusers"][k] and med["nanobooth"][k]]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--diffusers-examples", required=True, help="a diffusers checkout's examples/ folder (holds dreambooth/)")
    p.add_argument("--python", default=sys.executable, help="interpreter for the reference (needs torchvision)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--steps", type=int, default=35)
    p.add_argument("--skip", type=int, default=5, help="s/step = (t[steps] - t[skip]) / (steps - skip)")
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--class-images", type=int, default=8)
    p.add_argument("--threads", type=int, default=1, help="CPU threads for both tools (OMP_NUM_THREADS)")
    p.add_argument("--layers-per-block", type=int, default=1, help="mid-size UNet depth: 1 (12.8M) or 2 (18.2M)")
    p.add_argument("--method", choices=list(SCRIPTS), default="lora", help="lora: LoRA + prior; full: full fine-tune + prior")
    p.add_argument("--model", default=None, help="an SD-layout model folder (default: the mid-size model, built on first use)")
    p.add_argument("--class-from", type=Path, default=None,
                   help="copy the images of this folder into both tools' class folders first, so neither generates any "
                        "(for big models, where class images would take most of the run: the reference makes them at the "
                        "model's own size, whatever --resolution is)")
    p.add_argument("--same-class-sampler", action="store_true", help="nanobooth makes class images as the reference does (model sampler, 50 steps)")
    args = p.parse_args()
    if not (Path(args.diffusers_examples) / "dreambooth" / SCRIPTS[args.method]).is_file():
        sys.exit(f"--diffusers-examples {args.diffusers_examples}: no dreambooth/{SCRIPTS[args.method]} there; "
                 "point it at a diffusers checkout's examples/ folder")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from nanobooth.core.data import image_paths, resolve_data_dir

    model = args.model or str(mid_model_path(args.layers_per_block))
    root = Path(tempfile.mkdtemp(prefix="nb-vs-diffusers-"))
    photos = root / "photos"  # the photos only: the reference reads every file in the folder as an image
    photos.mkdir()
    for f in image_paths(resolve_data_dir("example:dog")):
        shutil.copy(f, photos / f.name)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "TQDM_MININTERVAL": "1", "NANOBOOTH_CLASS_IMAGE_CACHE": "none"}
    rows = []
    for r in range(args.repeats):
        for tool in (reference, nanobooth):
            work = root / f"{tool.__name__}-{r}"
            work.mkdir()
            if args.class_from:
                shutil.copytree(args.class_from, work / "class")
            row = {**tool(args, model, photos, work, env), "repeat": r}
            rows.append(row)
            print(f"repeat {r} {row['tool']:10s} {row['s_per_step']:.3f} s/step  peak RSS {row['peak_rss_mb']:.0f} MB  "
                  f"class images {row['class_s'] or 0:.1f} s  whole run {row['total_s']:.1f} s", flush=True)
            shutil.rmtree(work / "out", ignore_errors=True)
    print(f"\n{args.method}, {Path(model).name}: {args.repeats} repeats, interleaved; medians; {args.resolution}², {args.steps} steps (s/step over steps "
          f"{args.skip + 1}-{args.steps}), {args.class_images} class images, {args.threads} thread(s)")
    print_table(["measure", "diffusers reference", "nanobooth", "nanobooth / reference"], summarize(rows), "vs_diffusers", rows)
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
