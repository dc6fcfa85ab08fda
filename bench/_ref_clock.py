"""Run a script (diffusers' train_dreambooth_lora.py) with a clock on its tqdm bars, unchanged otherwise.

    python bench/_ref_clock.py TIMES.json SCRIPT.py [script args...]

Writes TIMES.json: {"events": [[desc, "start"|"update"|"close", unix time], ...]}. With NB_PROFILE=A:B:OUT.json
in the environment, the torch profiler records from the A-th to the B-th "Steps" update (steps A+1..B) and
OUT.json gets its per-op self CPU times (bench/profile_step.py reads them). The reference prints
no per-step times, but it advances its "Steps" bar once per optimizer step and wraps class-image
generation in a "Generating class images" bar; those timestamps are all vs_diffusers.py needs.
"""

import atexit
import json
import os
import runpy
import sys
import time

import tqdm.auto

out, script = sys.argv[1], sys.argv[2]
events = []
cls = tqdm.auto.tqdm
init, update, close = cls.__init__, cls.update, cls.close


def _init(self, *a, **k):
    init(self, *a, **k)
    events.append([str(k.get("desc") or ""), "start", time.time()])


PROFILE = os.environ.get("NB_PROFILE", "").split(":") if os.environ.get("NB_PROFILE") else None
profiler, steps_seen = None, 0


def _profile(desc: str) -> None:
    global profiler, steps_seen
    if desc != "Steps":
        return
    steps_seen += 1
    start, stop, path = int(PROFILE[0]), int(PROFILE[1]), PROFILE[2]
    if steps_seen == start:
        import torch.profiler

        profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
        profiler.start()
        profiler.t0 = time.time()
    elif steps_seen == stop and profiler is not None:
        wall = time.time() - profiler.t0  # before stop(), which processes the recorded events
        profiler.stop()
        ops = [[e.key, e.self_cpu_time_total, e.count] for e in profiler.key_averages()]
        with open(path, "w") as f:
            json.dump({"steps": stop - start, "wall_s": wall, "ops": ops}, f)


def _update(self, n=1):
    events.append([str(getattr(self, "desc", "") or ""), "update", time.time()])
    if PROFILE:
        _profile(str(getattr(self, "desc", "") or ""))
    return update(self, n)


def _close(self):
    if not getattr(self, "_clocked_close", False):
        self._clocked_close = True
        events.append([str(getattr(self, "desc", "") or ""), "close", time.time()])
    return close(self)


cls.__init__, cls.update, cls.close = _init, _update, _close
atexit.register(lambda: open(out, "w").write(json.dumps({"events": events})))
sys.argv = [script, *sys.argv[3:]]
runpy.run_path(script, run_name="__main__")
