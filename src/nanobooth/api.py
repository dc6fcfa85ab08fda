"""nanobooth as a library: three plain functions with typed arguments, the same code the CLI runs.

    from nanobooth import events, evaluate, generate, load_config, train

    cfg = load_config("toy/dreambooth-lora-prior-pre", ["instance_data_dir=my_subject", "output_dir=runs/toy"])
    run = train(cfg, callbacks=[lambda e: print(e) if isinstance(e, events.Step) else None])
    images = generate("toy", ["a photo of a sks ball on the beach"], weights=run, num_images=4)
    scores = evaluate("toy", "my_subject", "eval/toy", weights=run, backend="toy")

- `train(cfg, should_stop=None, callbacks=())` -> the run folder (train.py). Callbacks get the events of
  events.py; returning events.STOP (or should_stop() returning True) checkpoints at the next step boundary
  and raises stop.TrainingInterrupted; resume with `cfg.resume_from_checkpoint = "latest"`.
- `generate(model, prompts, *, weights=None, num_images=1, seed=0, ...)` -> list of PIL images (generate.py).
- `evaluate(model, subject_dir, out, *, weights=None, ...)` -> the eval.json dict (evaluate.py).
- `toy_eval(run_dir)` -> the toy_eval.json dict of a toy-model run (toy/evaluate.py), `export(run_dir, fmt, out)`
  -> the written path (interop/export.py): what `nanobooth toy eval` and `nanobooth export` run.

Errors a user can cause are the classes the CLI prints as one line (ConfigError, DataError, ModelError,
CheckpointError, TrainingError). Importing this module imports torch; `import nanobooth` does not.
"""

from __future__ import annotations

from .eval.evaluate import evaluate
from .inference.generate import generate
from .core.stop import TrainingInterrupted
from .core.train import train
from .interop.export import export
from .toy.evaluate import toy_eval

__all__ = ["train", "generate", "evaluate", "toy_eval", "export", "TrainingInterrupted"]
