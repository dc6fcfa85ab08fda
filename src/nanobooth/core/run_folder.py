"""The run folder (`output_dir`): the names of everything a run leaves there, which result it holds, and
its config read back.

A finished run holds exactly one result: a LoRA (`pytorch_lora_weights.safetensors`, with pivotal tuning's
`<run>_emb.safetensors` beside it), a full diffusers pipeline (`model_index.json` + component folders; with
pivotal tuning, its `<run>_emb.safetensors` beside it too), or
textual inversion's `<run>_emb.safetensors` alone. Every reader (generate, export, eval,
toy eval) asks `result_kind`, which refuses a folder holding both: that folder mixes two runs, and
reading either half would silently render something nobody trained.

Also here: writing outputs so that they are readable like any other file. safetensors 0.8 writes
through a temp file created 0600 whatever the umask (safetensors/safetensors#782, since #764), and
`tempfile` makes files 0600 and folders 0700; a LoRA handed to a shared ComfyUI box or a web server
must not need a chmod first.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from .config import ConfigError, TrainConfig, field_names, resume_safe_keys
from .config_checks import BUCKET_KEYS
from .errors import CheckpointError, ModelError  # torch-free: the CLI checks output_dir before the training stack loads

log = logging.getLogger("nanobooth")

# --- names ------------------------------------------------------------------------------------------------
CONFIG = "config.yaml"
TRAIN_LOG = "train_log.jsonl"
TIME_TO_MODEL = "time_to_model.json"  # written with the weights: where the run's time went (events.TimeToModel)
SAMPLES = "samples"
TRACKER_LOGS = "logs"  # report_to=tensorboard's event files (trackers.py)
CHECKPOINTS = "checkpoints"
CLASS_IMAGES = "class_images"  # only when class_data_dir is unset
LORA_FILE = "pytorch_lora_weights.safetensors"
EMB_SUFFIX = "_emb.safetensors"  # `<run name>_emb.safetensors`: pivotal tuning's new tokens beside the LoRA (methods/embeddings.py)
MODEL_INDEX = "model_index.json"
TMP_OUTPUT = ".tmp-output"  # the result while it is written; published into the run folder when complete
TOY_EVAL = ("toy_eval.json", "toy_eval.png")  # `nanobooth toy eval` scores a run into its own folder
TOY_EVAL_KEPT = "toy_eval-*"  # and keeps an earlier eval at other settings under a settings-named copy
VALIDATION_SCORES = "validation_scores.png"  # validation_scores: subject vs prompt fidelity per step (step_scores.py)
KEEP_BEST = "keep_best.json"  # keep_best: which step was published and why
# diffusers pipeline components a full run can save (model_index.json names the ones it did)
PIPELINE_COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler",
                       "feature_extractor", "safety_checker", "image_encoder")


def class_images_dir(cfg: TrainConfig, run_dir) -> Path:
    """The class images' folder: class_data_dir when set; else the run's own class_images/ when it exists
    (a run from before the cache, resumed or overwritten, keeps its images) or class_image_cache=none;
    else the shared cache's folder for this run's class-image provenance (class_cache_dir)."""
    if cfg.class_data_dir:
        return Path(cfg.class_data_dir)
    own = Path(run_dir) / CLASS_IMAGES
    root = class_cache_root(cfg.class_image_cache)
    return own if root is None or own.is_dir() else class_cache_dir(root, cfg)


# What generated class images depend on, beyond prior.PROVENANCE_KEYS (which a run's own folder is checked
# against): images made otherwise would be another run's prior, and a run should not depend on which runs came before.
CACHE_KEYS = ("class_prompt", "model", "resolution", "revision", "pretrained_vae_model_name_or_path", "base_quantization",
              "mixed_precision", "class_sampler", "class_generation_steps", "seed")


def class_cache_provenance(cfg: TrainConfig) -> dict:
    """The provenance recorded beside generated class images (and hashed to name a cache folder), with the model's
    `weights` fingerprint where its files are here (weights_fingerprint)."""
    out = {k: getattr(cfg, k) for k in CACHE_KEYS}
    if (weights := weights_fingerprint(str(cfg.model))) is not None:
        out["weights"] = weights
    return out


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".ckpt", ".pt", ".pth", ".json")
_MIB = 1 << 20


def weights_fingerprint(model: str) -> str | None:
    """Which weights a local model (single file, or a pipeline folder's model_index.json and component folders:
    pipeline_parts) or a shipped toy model holds now: 16 hex of a sha256 over its weight and config files' paths,
    sizes and first and last MiB (a few MB read, not gigabytes). A name alone does not say it: `toy` was another
    model before v5 shipped, and a folder can be trained again, so class images its earlier weights made must not
    be reused as this model's prior. What else a run folder holds (toy_eval.json, samples, checkpoints) is not
    the model. None for hub ids and the random built-ins (their revision and seed are in the key)."""
    import hashlib

    from .builtin_models import local_folder

    path = local_folder(model)
    if not path.exists():
        return None
    parts = [path] if path.is_file() else pipeline_parts(path)
    files = sorted(f for part in parts for f in ([part] if part.is_file() else part.rglob("*"))
                   if f.suffix in WEIGHT_SUFFIXES and f.is_file())
    h = hashlib.sha256()
    for f in files:
        size = f.stat().st_size
        h.update(f"{f.relative_to(path).as_posix() if f != path else f.name}:{size}\n".encode())
        with open(f, "rb") as fh:
            h.update(fh.read(_MIB))
            if size > _MIB:
                fh.seek(max(_MIB, size - _MIB))
                h.update(fh.read())
    return h.hexdigest()[:16]


def class_cache_root(setting: str) -> Path | None:
    """The cache's root folder for class_image_cache=`setting` (auto, a path, none); None: no cache."""
    if setting == "auto":
        setting = os.environ.get("NANOBOOTH_CLASS_IMAGE_CACHE", "auto")
    if str(setting).lower() == "none":
        return None
    if setting != "auto":
        return Path(setting).expanduser()
    if os.environ.get("NANOBOOTH_CACHE"):
        return Path(os.environ["NANOBOOTH_CACHE"]) / CLASS_IMAGES
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "nanobooth" / CLASS_IMAGES


def class_cache_dir(root: Path, cfg: TrainConfig) -> Path:
    """root/<first 16 hex of the sha256 of the provenance>. A local model counts by its absolute path, so
    `model=./sd` from two folders is two models."""
    import hashlib

    key = class_cache_provenance(cfg)
    if Path(str(cfg.model)).expanduser().exists():
        key["model"] = str(Path(str(cfg.model)).expanduser().resolve())
    return root / hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


class RunFolderError(ModelError):
    """A run folder that cannot be read as one run's result; the message names the folder and what to do."""


# --- which result ----------------------------------------------------------------------------------------
def _emb_method(path: Path) -> str | None:
    """The method an embedding file's metadata names (embeddings.save writes it; None in files from before).
    Read from the safetensors header itself (8-byte little-endian length, then JSON): no torch import."""
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(n)) if 0 < n < 100_000_000 else {}
        return (header.get("__metadata__") or {}).get("method")
    except (OSError, ValueError, AttributeError):  # unreadable: the mixed-folder refusal names it
        return None


def result_kind(folder) -> str | None:
    """'lora', 'full', 'textual_inversion' (an `*_emb.safetensors` alone: new token embeddings, no weights) or
    None (no finished result). A LoRA with an embedding file is pivotal tuning ('lora'), and so is a pipeline
    with one its full fine-tune wrote (the file's metadata says method=full): 'full'. Raises RunFolderError
    when the folder holds a pipeline beside a LoRA or an embedding file: two runs' outputs, and neither can be
    trusted to be the last."""
    folder = Path(folder)
    lora, full = (folder / LORA_FILE).is_file(), (folder / MODEL_INDEX).is_file()
    emb = next((p for p in sorted(folder.glob("*" + EMB_SUFFIX)) if p.is_file()), None) if folder.is_dir() else None
    if full and emb and not lora and _emb_method(emb) == "full":
        return "full"  # a full fine-tune with pivotal tuning: its new tokens beside the pipeline, as a LoRA run's
    if full and (lora or emb):
        other = f"a LoRA ({LORA_FILE})" if lora else f"token embeddings ({emb.name})"
        raise RunFolderError(f"'{folder}' holds two results, {other} and a full pipeline ({MODEL_INDEX}): "
                             "it mixes two runs; retrain into an empty output_dir, or delete the result you do not want")
    return "lora" if lora else "full" if full else "textual_inversion" if emb else None


def pipeline_parts(folder) -> list[Path]:
    """The full-pipeline entries in `folder`: model_index.json and its component folders (those it names,
    plus the usual names, so a half-published pipeline is found too)."""
    import json

    folder = Path(folder)
    names = set(PIPELINE_COMPONENTS)
    index = folder / MODEL_INDEX
    if index.is_file():
        try:
            names |= {k for k, v in json.loads(index.read_text()).items() if isinstance(v, list)}
        except ValueError:
            pass  # unreadable index: the usual names still cover what nanobooth writes
    return [folder / MODEL_INDEX] + [folder / n for n in sorted(names) if (folder / n).is_dir()]


def output_paths(folder) -> list[Path]:
    """Everything a run leaves in `folder` that belongs to that run alone: config, log, samples,
    checkpoints, the result of either kind (and a half-written one), toy-eval scores. Not the class
    images: they depend only on class prompt, model and resolution (recorded and checked beside them),
    so the next run reuses them instead of generating them again."""
    folder = Path(folder)
    # the results first (model_index.json before its components): a folder cleared halfway holds no result
    rest = [CONFIG, TRAIN_LOG, TIME_TO_MODEL, SAMPLES, TRACKER_LOGS, CHECKPOINTS, TMP_OUTPUT, *TOY_EVAL, VALIDATION_SCORES, KEEP_BEST]
    kept_evals = sorted(folder.glob(TOY_EVAL_KEPT))  # earlier toy evals at other settings (toy/evaluate.py)
    return ([folder / LORA_FILE] + sorted(folder.glob("*" + EMB_SUFFIX)) + pipeline_parts(folder) + [folder / n for n in rest]
            + kept_evals)


def clear_outputs(folder) -> list[Path]:
    """Remove every output of an earlier run from `folder` (overwrite=true), keeping class_images/ and any
    file nanobooth did not write. Returns what was removed."""
    removed = []
    for p in output_paths(folder):
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        elif p.exists() or p.is_symlink():
            p.unlink()
        else:
            continue
        removed.append(p)
    return removed


# --- the run's config ------------------------------------------------------------------------------------
def load_run_config(folder) -> TrainConfig | None:
    """The run's config.yaml as a TrainConfig (None when there is none, e.g. a plain diffusers folder).
    Keys this version does not know (a run from another version) are skipped with a warning; a bad value
    is a ConfigError naming the file and the key."""
    import yaml

    path = Path(folder) / CONFIG
    if not path.is_file():
        return None
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]}); restore or delete it") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of config keys; restore or delete it")
    known = set(field_names())
    unknown = sorted(k for k in data if k not in known)
    if unknown:
        log.warning("%s: keys %s are not config keys of this nanobooth version; ignored", path, ", ".join(unknown))
    try:
        return TrainConfig(**{k: v for k, v in data.items() if k in known})
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def check_output_dir(cfg: TrainConfig) -> None:
    """Refuse a run into an output_dir that holds something else, before any model loads (torch-free: the
    CLI calls it before importing the training stack; train.prepare_run calls it again for library
    callers). A non-empty folder needs resume_from_checkpoint or overwrite=true; a resume of a run whose
    config.yaml differs in a key that is not resume-safe (config.resume_safe_keys) is refused naming the
    keys. `cfg`'s prompts must be filled in first (subject_prompts.fill_prompts): the saved config has them."""
    run_dir = Path(cfg.output_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"output_dir '{run_dir}' is a file, not a folder; pass a folder (created if missing)")
    if not run_dir.is_dir() or not any(run_dir.iterdir()) or cfg.overwrite:
        return
    if not cfg.resume_from_checkpoint:
        done = logged_steps(run_dir)
        if done and _finished(run_dir):  # "continue it" would only meet check_finished's refusal (newcomer50)
            raise ConfigError(f"output_dir '{run_dir}' holds a run finished at step {done}: pass another output_dir, "
                              f"or overwrite=true to replace it{_train_on(run_dir, done)}")
        if not ((run_dir / CONFIG).is_file() or (run_dir / TRAIN_LOG).is_file() or list_checkpoints(run_dir)):
            # nothing to resume: say what overwrite=true does to a folder of someone else's files
            raise ConfigError(f"output_dir '{run_dir}' holds other files and no nanobooth run: pass a new or empty "
                              "output_dir (overwrite=true would write the run beside those files)")
        raise ConfigError(f"output_dir '{run_dir}' is not empty: pass resume_from_checkpoint=latest to continue it, "
                          "overwrite=true to reuse it, or another output_dir")
    saved = load_run_config(run_dir)
    if saved is None:
        return
    old, safe = saved.to_dict(), resume_safe_keys()
    if not old.get("enable_bucket") and not cfg.enable_bucket:  # inert without buckets (toy runs saved before 16)
        safe = safe | set(BUCKET_KEYS)
    diff = [(k, old.get(k), v) for k, v in cfg.to_dict().items() if k not in safe and old.get(k) != v]
    if diff:
        what = ", ".join(f"{k}: {o!r} there, {n!r} now" for k, o, n in diff[:3]) + (" ..." if len(diff) > 3 else "")
        raise ConfigError(f"output_dir '{run_dir}' holds a run with a different config ({what}): resume with the same "
                          "config, or use overwrite=true")


# --- readable outputs ------------------------------------------------------------------------------------
def _umask() -> int:
    try:  # Linux >= 4.7 reports it without changing it (os.umask would, for every thread, for a moment)
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def make_readable(path) -> None:
    """Give `path` (a file, or a folder and everything in it) the modes a plain open()/mkdir() gives:
    0o666 / 0o777 less the umask (0644 / 0755 with the usual 022)."""
    path = Path(path)
    mask = _umask()
    fmode, dmode = 0o666 & ~mask, 0o777 & ~mask
    if path.is_file():
        os.chmod(path, fmode)
        return
    os.chmod(path, dmode)
    for root, dirs, files in os.walk(path):
        for d in dirs:
            os.chmod(os.path.join(root, d), dmode)
        for f in files:
            os.chmod(os.path.join(root, f), fmode)


@contextmanager
def atomic_file(out):
    """Yields a temp path beside `out` to write; when the block succeeds the file gets plain-file modes and
    replaces `out` (os.replace), when it fails the temp file is removed and `out` is untouched."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        make_readable(tmp)
        os.replace(tmp, out)
    finally:
        Path(tmp).unlink(missing_ok=True)


# --- checkpoints and resume (torch-free, so the CLI refuses a bad resume before the training stack loads) ---
CKPT = re.compile(r"checkpoint-(\d+)$")


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    """Where the checkpoint of `step` (steps done) lives: checkpoints/checkpoint-NNNNNN."""
    return Path(run_dir) / CHECKPOINTS / f"checkpoint-{step:06d}"


def list_checkpoints(run_dir: Path) -> list[Path]:
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and CKPT.match(p.name) and (p / "state.json").is_file()]
    return sorted(found, key=lambda p: int(CKPT.match(p.name).group(1)))


def _train_on(run_dir: Path, done: int) -> str:
    """How a finished run can train on, as the end of a sentence: only from a checkpoint, and a checkpoint older than
    the finished step means the steps after it are trained again (newcomer55: the advice was given with no checkpoint
    to resume from, and a resume from step 44 of a 150-step run said nothing)."""
    ckpts = list_checkpoints(run_dir)
    if not ckpts:
        return " (it has no checkpoint to train on from: checkpointing_steps was 0 or above its steps)"
    step = checkpoint_step(ckpts[-1])
    redo = f"; its last checkpoint is at step {step}, so steps {step + 1}-{done} are trained again" if step < done else ""
    return f", or resume_from_checkpoint=latest with max_train_steps above {done} to train it on{redo}"


def checkpoint_step(checkpoint: Path) -> int:
    """The step a checkpoint folder holds (its state.json's)."""
    return int(json.loads((Path(checkpoint) / "state.json").read_text())["step"])


def redo_after(run_dir: Path, step: int) -> None:
    """A resume at `step`: drop the log's lines past it (those steps are trained again and logged again), and when the
    folder holds a finished result of later steps say so and keep its toy evals aside as toy_eval-stepN.* (they scored
    the weights this run replaces)."""
    done = logged_steps(run_dir)
    if done > step and _finished(run_dir):
        log.warning("resuming %s from step %d: its finished weights (step %d) are replaced at the end; steps %d-%d are "
                    "trained again", run_dir, step, done, step + 1, done)
        for name in TOY_EVAL:
            if (run_dir / name).is_file():
                kept = run_dir / f"toy_eval-step{done}{Path(name).suffix}"
                (run_dir / name).replace(kept)
                log.warning("%s scored the step-%d weights: kept as %s", name, done, kept.name)
    truncate_log(run_dir / TRAIN_LOG, step)


def _finished(run_dir: Path) -> bool:
    """The folder holds a finished result (result_kind); a folder with two results counts as finished too."""
    try:
        return result_kind(run_dir) is not None
    except RunFolderError:
        return True


def logged_steps(run_dir: Path) -> int:
    """The last step train_log.jsonl records (0 when none)."""
    p = Path(run_dir) / TRAIN_LOG
    lines = [ln for ln in p.read_text().splitlines() if ln.strip()] if p.is_file() else []
    try:
        return int(json.loads(lines[-1])["step"]) if lines else 0
    except (ValueError, KeyError, TypeError):
        return 0


def resolve_resume(run_dir: Path, spec: str | None, warn: bool = True) -> Path | None:
    """The checkpoint folder `spec` (latest, or a path) names, None to start at step 0; CheckpointError when
    that would lose work or the folder is not a checkpoint. `warn`: log the start-from-0 case."""
    if not spec:
        return None
    if spec == "latest":
        ckpts = list_checkpoints(run_dir)
        if not ckpts:
            trained = logged_steps(run_dir)
            if trained:  # starting over would silently throw those steps away
                raise CheckpointError(f"resume_from_checkpoint=latest: {run_dir} has no checkpoint to resume from (its log "
                                      f"reaches step {trained}); to train it again from step 0 drop resume_from_checkpoint "
                                      f"and pass overwrite=true")
            # nothing trained yet (e.g. stopped while making class images): step 0 loses nothing
            if warn:
                log.warning("resume_from_checkpoint=latest: no checkpoint in %s yet; starting from step 0", run_dir)
            return None
        return ckpts[-1]
    path = Path(spec)
    if not (path / "state.json").is_file():
        raise CheckpointError(f"resume_from_checkpoint '{spec}': not a nanobooth checkpoint folder (no state.json); pass latest or a checkpoints/checkpoint-N folder")
    return path


def check_finished(run_dir: Path, max_train_steps: int) -> None:
    """A finished run's weights are never replaced by a resume that ends at or before their step."""
    done = logged_steps(run_dir)
    if done >= max_train_steps and result_kind(run_dir):
        raise CheckpointError(f"output_dir '{run_dir}' holds a run finished at step {done}: resuming to max_train_steps="
                              f"{max_train_steps} would replace its weights with less-trained ones; pass max_train_steps "
                              f"above {done} to train on, or another output_dir")


def check_steps_left(checkpoint: Path, step: int, max_train_steps: int) -> None:
    """CheckpointError when the checkpoint's `step` (its state.json's) leaves nothing to train."""
    if step >= max_train_steps:
        raise CheckpointError(f"{Path(checkpoint).name} is at step {step} and max_train_steps={max_train_steps}: nothing left to "
                              f"train; pass max_train_steps above {step} to train on (the run folder is left as it is)")


def check_resume_request(run_dir: Path, spec: str | None, max_train_steps: int) -> None:
    """What train refuses about a resume before it loads anything (in its order: the checkpoint, steps left,
    a finished run's weights), without torch, for the CLI; train then also checks the input images."""
    resume = resolve_resume(run_dir, spec, warn=False)
    if resume:
        check_steps_left(resume, checkpoint_step(resume), max_train_steps)
        check_finished(run_dir, max_train_steps)


def truncate_log(path: Path, step: int) -> None:
    """Drop the lines of a train_log.jsonl past `step`: a resumed run redoes those steps and logs them again."""
    if path.exists():
        kept = [ln for ln in path.read_text().splitlines() if ln and json.loads(ln)["step"] <= step]
        path.write_text("".join(ln + "\n" for ln in kept))
