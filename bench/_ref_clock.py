"""Run a script (diffusers' train_dreambooth_lora.py) with a clock on its tqdm bars, unchanged otherwise.

    python bench/_ref_clock.py TIMES.json SCRIPT.py [script args...]

Writes TIMES.json: {"events": [[desc, "start"|"update"|"close", unix time], ...]}. The reference prints
no per-step times, but it advances its "Steps" bar once per optimizer step and wraps class-image
generation in a "Generating class images" bar; those timestamps are all vs_diffusers.py needs.
"""

import atexit
import json
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


def _update(self, n=1):
    events.append([str(getattr(self, "desc", "") or ""), "update", time.time()])
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
