"""Seconds per training step by CPU thread count, alone and beside a competing busy process.

    python bench/threads.py                          # toy/dreambooth-lora, 40 steps, threads 1 / 2 / auto
    python bench/threads.py --steps 25 --first 10 --threads 1 auto
    python bench/threads.py --variant toy/dreambooth-lora-prior-pre --set num_class_images=4 class_generation_steps=5

Each cell is one `nanobooth train toy/dreambooth-lora ... num_threads=T` run in a fresh process (auto =
num_threads unset: nanobooth's choice from the free cores; torch's own default is one thread per core,
the "2" row on a 2-core machine). "beside a busy job" starts `--competitors` single-threaded
busy-loop processes first and stops them after the run. s/step is the mean of the step-to-step times of
train_log.jsonl ('time' field) after step `--first`. OMP_NUM_THREADS is removed from the runs'
environment (it would override auto). Prints a table and writes JSON to bench/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_step import print_table  # noqa: E402

BUSY = "while True: pass"


def step_time(run_dir: Path, first: int) -> float:
    log = [json.loads(x) for x in (run_dir / "train_log.jsonl").read_text().splitlines()]
    times = [b["time"] - a["time"] for a, b in zip(log, log[1:]) if b["step"] > first]
    return statistics.mean(times)


def threads_used(stderr: str) -> str:
    for line in stderr.splitlines():
        if "CPU threads: " in line:
            return line.split("CPU threads: ", 1)[1].split(" of")[0].strip()
    return ""


def run(variant: str, subject: Path, steps: int, threads: str, first: int, competitors: int, extra: list[str]) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    env.update(HF_HUB_OFFLINE="1", TQDM_DISABLE="1")
    busy = [subprocess.Popen([sys.executable, "-c", BUSY]) for _ in range(competitors)]
    try:
        with tempfile.TemporaryDirectory(prefix="nb-threads-") as tmp:
            cmd = [sys.executable, "-m", "nanobooth", "train", variant, f"instance_data_dir={subject}", f"output_dir={tmp}/run",
                   f"max_train_steps={steps}", "validation_prompts=[]", "checkpointing_steps=0", "log_every=1000", *extra]
            if threads != "auto":
                cmd.append(f"num_threads={threads}")
            res = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if res.returncode != 0:
                raise SystemExit(f"{' '.join(cmd)} failed:\n{res.stderr[-2000:]}")
            s = step_time(Path(tmp) / "run", first)
    finally:
        for p in busy:
            p.kill()
            p.wait()
    return {"variant": variant, "competitors": competitors, "threads": threads, "s_per_step": round(s, 3),
            "auto_chose": threads_used(res.stderr) if threads == "auto" else threads}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variant", default="toy/dreambooth-lora")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--first", type=int, default=10, help="time the steps after this one")
    p.add_argument("--threads", nargs="+", default=["1", "2", "auto"])
    p.add_argument("--competitors", type=int, default=1, help="busy-loop processes in the 'beside' runs")
    p.add_argument("--set", nargs="*", default=[], metavar="key=value", help="extra config overrides, e.g. num_class_images=4")
    args = p.parse_args()
    from nanobooth.toy import world

    rows = []
    with tempfile.TemporaryDirectory(prefix="nb-subject-") as tmp:
        subject = world.write_subject(7, Path(tmp) / "subject")
        for competitors in (0, args.competitors):
            for threads in args.threads:
                row = run(args.variant, subject, args.steps, threads, args.first, competitors, args.set)
                print(json.dumps(row), flush=True)
                rows.append(row)
    lines = [[("alone" if r["competitors"] == 0 else f"beside {r['competitors']} busy job(s)"),
              r["threads"] + (f" (chose {r['auto_chose']})" if r["threads"] == "auto" and r["auto_chose"] else ""),
              r["s_per_step"]] for r in rows]
    print_table(["load", "threads", "s/step"], lines, "threads", rows)


if __name__ == "__main__":
    main()
