"""The UI's workspace folder: subjects, runs and exports live under one root, and nothing else is touched.

Uploads are checked by size and by what PIL reads in them (not by their name or extension) and saved
under names made here (`photo-00.jpg`): an upload's file name is never used as a path, only shown (the
subject's UPLOADED file keeps it, so the page names a photo as the user knows it). Each photo gets
the warnings a user should see before training (too small for the resolution, rotated by its EXIF
orientation, CMYK, unreadable), from the same reader the CLI trains with (core.data.load_image).
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import threading
import time
from importlib import resources
from pathlib import Path

from PIL import Image

from ..core.config import ConfigError
# MIN/MAX_PHOTOS: the bounds the CLI warns at too
from ..core.data import (MAX_PHOTOS, MIN_PHOTOS, DataError, image_paths, load_image, mask_path, read_subject_meta,
                         upscale_warning)

MAX_UPLOAD_BYTES = 20 * 1024 * 1024
# PIL format -> the extension the saved copy gets (what core.data.IMAGE_EXTS reads back)
FORMATS = {"JPEG": ".jpg", "PNG": ".png", "WEBP": ".webp", "BMP": ".bmp", "GIF": ".gif", "TIFF": ".tif", "MPO": ".jpg"}
EXIF_ORIENTATION = 0x0112
# path-valued config keys that must stay inside the workspace
PATH_KEYS = ("output_dir", "instance_data_dir", "class_data_dir", "logging_dir")
# in a subject folder: saved name -> the name it was uploaded as (hidden: image_paths and training skip it)
UPLOADED = ".uploaded-names.json"
UNREADABLE = "cannot read this image"  # how photo_warnings' line for a photo the CLI's reader refuses begins


class Workspace:
    def __init__(self, root):
        self.root = Path(root).expanduser().resolve()
        for sub in ("subjects", "runs", "exports"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)

    @property
    def runs(self) -> Path:
        return self.root / "runs"

    def inside(self, path) -> bool:
        return Path(path).expanduser().resolve().is_relative_to(self.root)

    def check_paths(self, cfg) -> None:
        """ConfigError for a path key (or a local model path) that points outside the workspace."""
        for key in PATH_KEYS:
            value = getattr(cfg, key, None)
            if value and not str(value).startswith("example:") and not self.inside(value):
                raise ConfigError(f"config key '{key}': {value} is outside the workspace {self.root}; "
                                  "the UI reads and writes only there")
        model = str(cfg.model)
        if model.startswith(("/", ".", "~")) and not self.inside(model):
            raise ConfigError(f"config key 'model': {model} is outside the workspace {self.root}; copy the model "
                              f"into it (or use a hub id, toy or tiny)")

    def new_folder(self, kind: str, stem: str) -> Path:
        """A fresh folder under subjects/ or runs/: `stem` plus a time stamp (and a counter if taken)."""
        base = f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}"
        for i in range(100):
            folder = self.root / kind / (base if i == 0 else f"{base}-{i}")
            if not folder.exists():
                folder.mkdir(parents=True)
                return folder
        raise ConfigError(f"cannot make a new folder under {self.root / kind}")

    # --- subjects ---------------------------------------------------------------------------------------------
    def save_uploads(self, uploads: list) -> tuple[Path | None, list[str]]:
        """Copy uploaded files (paths the web server wrote, named as uploaded) into a new subject folder; returns the
        folder (None when no file is usable) and one line per refused file, naming it by its position and its name."""
        refused, keep = [], []
        for i, src in enumerate(uploads[:MAX_PHOTOS], 1):
            src = Path(src)
            said = f"file {i} ({shown_name(src.name)})"
            try:
                size = src.stat().st_size
            except OSError:
                refused.append(f"{said}: cannot be read")
                continue
            if size > MAX_UPLOAD_BYTES:
                refused.append(f"{said}: {size / 2**20:.0f} MB, over the {MAX_UPLOAD_BYTES // 2**20} MB limit")
                continue
            try:
                with Image.open(src) as img:
                    fmt = img.format
            except Exception:  # noqa: BLE001 - whatever PIL says, it is not a photo we can use
                fmt = None
            if fmt not in FORMATS:
                refused.append(f"{said}: not an image (JPEG, PNG, WebP, BMP, GIF or TIFF); skipped")
                continue
            keep.append((src, FORMATS[fmt]))
        if len(uploads) > MAX_PHOTOS:
            refused.append(f"{len(uploads) - MAX_PHOTOS} files over the {MAX_PHOTOS}-photo limit were not used")
        if not keep:
            return None, refused
        folder = self.new_folder("subjects", "photos")
        names = {}
        for j, (src, ext) in enumerate(keep):
            shutil.copyfile(src, folder / f"photo-{j:02d}{ext}")
            names[f"photo-{j:02d}{ext}"] = src.name
        (folder / UPLOADED).write_text(json.dumps(names, indent=2))
        return folder, refused

    def remove_unreadable(self, name: str) -> list[str]:
        """Delete the photos of subject `name` that the CLI's reader cannot read (they would stop training); returns
        them as photo_label names them. Only the subject's own image files are looked at: copies the page made."""
        folder = self.subject_folder(name)
        gone = [p for p in image_paths(folder) if any(w.startswith(UNREADABLE) for w in photo_warnings(p, 0))]
        labels = [photo_label(folder, p) for p in gone]
        for p in gone:
            p.unlink()
            if (mask := mask_path(p)) is not None:  # left alone, a mask with no photo is refused as one
                mask.unlink()
        return labels

    def example_dog(self) -> Path:
        src = Path(str(resources.files("nanobooth") / "assets" / "examples" / "dog"))
        folder = self.new_folder("subjects", "dog")
        for p in image_paths(src):
            shutil.copyfile(p, folder / p.name)
        return folder

    def toy_subject(self, seed: int) -> Path:
        from ..toy import world

        folder = self.new_folder("subjects", f"toy-{seed}")
        world.write_subject(seed, folder)
        return folder

    def subject_folder(self, name: str | None) -> Path:
        folder = (self.root / "subjects" / (name or "")).resolve()
        if not name or folder.parent != (self.root / "subjects") or not folder.is_dir():
            raise DataError(f"subject '{name}': no such subject in the workspace; upload photos or pick one")
        return folder

    def subjects(self) -> list[str]:
        return sorted((p.name for p in (self.root / "subjects").iterdir() if p.is_dir()), reverse=True)

    def newest_subject(self) -> str | None:
        """The subject folder made last (None in an empty workspace): what a freshly loaded page shows."""
        folders = [p for p in (self.root / "subjects").iterdir() if p.is_dir()]
        return max(folders, key=lambda p: (p.stat().st_mtime_ns, p.name)).name if folders else None


def photo_count_problem(n: int) -> str | None:
    """None for a subject of MIN_PHOTOS-MAX_PHOTOS photos, else its count and what to do (the Subject tab's note,
    the header's next step and Start's refusal say the same)."""
    if n < MIN_PHOTOS:
        return (f"{n} photo{'' if n == 1 else 's'}: DreamBooth needs {MIN_PHOTOS}-{MAX_PHOTOS} photos of one subject; "
                f"upload them together (one upload is one subject), or use the example dog or a toy subject")
    if n > MAX_PHOTOS:
        return f"{n} photos: use {MIN_PHOTOS}-{MAX_PHOTOS}; move the extra ones out of the subject's folder"
    return None


def header_md(ws: Workspace, n_runs: int, subject: Path | None = None) -> str:
    """The page's title, what the workspace holds, and the next step for where the user is (a first visit: start
    here; a subject with too few or too many photos: fix that first; a subject no run has trained yet: train it)."""
    n = len(ws.subjects())
    problem = photo_count_problem(len(image_paths(subject))) if subject is not None else None
    if n == 0:
        step = (f"**Start here**: in *1 Subject*, upload {MIN_PHOTOS}-{MAX_PHOTOS} photos of one subject, or use the "
                "example dog or a toy subject; then *2 Train*.")
    elif problem:
        step = f"**Next**: *1 Subject*: this subject has {problem}; then *2 Train*."
    elif n_runs == 0 or (subject is not None and not trained_on(ws, subject)):
        toy = subject is None or read_subject_meta(subject).get("subject") is not None  # a toy subject (toy_subject)
        step = ("**Next**: *2 Train*, then Start " + ("(the toy model trains on this CPU in minutes)." if toy else
                "(for your photos pick a real model family, SD 1.5 to FLUX, on a GPU: the toy model draws only balls, "
                "cubes, stars, rings and cups, so on a CPU it tries the pipeline, not your subject)."))
    else:
        step = "**Next**: *3 Try it* shows the base model and your run side by side; *5 Export* writes files for A1111, ComfyUI or kohya."
    return (f"# nanobooth: DreamBooth in your browser\nworkspace: `{ws.root}`: {n} subject{'' if n == 1 else 's'}, "
            f"{n_runs} run{'' if n_runs == 1 else 's'}\n\n{step}")


def trained_on(ws: Workspace, subject: Path) -> bool:
    """Whether a run in the workspace trained (or trains) `subject`: its config.yaml, written as training starts, names
    the folder as its instance_data_dir."""
    import yaml

    from ..core.run_folder import CONFIG

    for run in ws.runs.iterdir():
        try:
            where = (yaml.safe_load((run / CONFIG).read_text()) or {}).get("instance_data_dir")
        except (OSError, yaml.YAMLError, AttributeError):  # no config yet, or not a mapping: names no subject
            continue
        if isinstance(where, str) and not where.startswith("example:") and Path(where).resolve() == subject.resolve():
            return True
    return False


def shown_name(name: str) -> str:
    """An uploaded file's name as the page shows it: a code span (Markdown in a name stays text), printable
    characters only, at most 60."""
    clean = "".join(c for c in name if c.isprintable() and c != "`")
    return f"`{clean[:57] + '...' if len(clean) > 60 else clean}`"


def photo_label(folder: Path, photo: Path) -> str:
    """A subject's photo named as the user uploaded it ("`04.png` (saved as photo-03.png)"); else its own name."""
    try:
        uploaded = json.loads((folder / UPLOADED).read_text()).get(photo.name)
    except (OSError, ValueError, AttributeError):  # not an upload (the example dog, a toy subject), or a broken file
        uploaded = None
    return f"{shown_name(uploaded)} (saved as {photo.name})" if isinstance(uploaded, str) else photo.name


def as_uploaded(message: str, folder: Path) -> str:
    """A refusal that names a subject's photos by their saved paths, with each named as photo_label does and the
    page's remove button pointed to: the user uploaded `04.png`, not `.../subjects/x/photo-03.png`."""
    photos = sorted(image_paths(folder), key=lambda p: -len(str(p)))  # photo-10 before photo-1
    named = [p for p in photos if str(p) in message]
    for p in named:
        message = message.replace(str(p), photo_label(folder, p).replace("`", ""))  # a toast shows text, not Markdown
    return message + ("; the subject's 'remove unreadable photos' button does it" if named else "")


def photo_warnings(path: Path, resolution: int) -> list[str]:
    """What a user should know about one photo before training on it at `resolution` pixels (the caller names it)."""
    try:
        img = load_image(path)  # the CLI's reader: DataError naming the file
        with Image.open(path) as raw:
            mode, orientation = raw.mode, raw.getexif().get(EXIF_ORIENTATION, 1)
    except DataError as e:  # the CLI's line without the path and its advice: the page names the photo and its own fix
        return [str(e).removeprefix(f"{path}: ").removesuffix("; replace or remove the file")]
    except Exception as e:  # noqa: BLE001 - PIL on a header load_image got past
        return [f"{UNREADABLE} ({e})"]
    out = []
    if warning := upscale_warning(img.size, resolution):
        out.append(warning)
    if orientation not in (1, None):
        out.append("rotated by its EXIF orientation (trained upright, as viewers show it)")
    if mode == "CMYK":
        out.append("CMYK: converted to RGB (colours may shift)")
    return out


def subject_view(folder: Path, resolution: int, identifier: str, noun: str) -> tuple[list, str, str, bool]:
    """The Subject tab for `folder`: (thumbnails captioned with their warnings, the warnings as lines naming each photo
    as uploaded, the prompts, whether a photo is unreadable: the page then offers to remove them)."""
    items, lines, unreadable = [], [], False
    photos = image_paths(folder)
    for p in photos:
        warns = photo_warnings(p, resolution)
        items.append((str(p), "; ".join(warns) or "ok"))
        lines += [f"- {photo_label(folder, p)}: {w}" for w in warns]
        unreadable |= any(w.startswith(UNREADABLE) for w in warns)
    if problem := photo_count_problem(len(photos)):
        lines.insert(0, f"- {problem}")
    if unreadable:
        lines.append("- training refuses a subject with an unreadable photo: *remove unreadable photos* below takes "
                     "them out of it, or upload the photos again without them (a new subject)")
    inst, cls = subject_prompts(folder, identifier, noun)
    return items, "\n".join(lines) or "all photos ok", f"instance prompt: `{inst}`  \nclass prompt: `{cls}`", unreadable


def subject_prompts(folder: Path, identifier: str, noun: str) -> tuple[str, str]:
    """The instance and class prompts of a subject: its subject.json's (a toy subject) when the identifier
    and noun are those, else 'a photo of a {identifier} {noun}' / 'a photo of a {noun}'."""
    meta = read_subject_meta(folder)
    if meta.get("identifier") == identifier and meta.get("class_noun") == noun and meta.get("instance_prompt"):
        return meta["instance_prompt"], meta["class_prompt"]
    return f"a photo of a {identifier} {noun}", f"a photo of a {noun}"


def subject_names(folder: Path) -> tuple[str, str]:
    """(identifier, class noun) a subject folder suggests: subject.json's, else sks / dog."""
    meta = read_subject_meta(folder)
    return meta.get("identifier", "sks"), meta.get("class_noun", "dog")


def remember_names(folder: Path, identifier: str, noun: str) -> None:
    """Keep the identifier and class noun a run was started with in the subject's subject.json (other keys kept),
    so a reloaded page, which shows the newest subject, shows its words too rather than the form's sks / dog."""
    meta = read_subject_meta(folder)
    if (meta.get("identifier"), meta.get("class_noun")) == (identifier, noun):
        return
    path = folder / "subject.json"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({**meta, "identifier": identifier, "class_noun": noun}, indent=2))
    tmp.replace(path)


def suggested_prompts(identifier: str, noun: str) -> tuple[str, str]:
    """(validation prompts, one a line; the Try-it prompt) for a subject called `identifier noun`."""
    subject = f"a photo of a {identifier} {noun}"
    return f"{subject}\n{subject} on the beach", f"{subject} on the beach"


def run_status(run: Path) -> dict:
    """A run folder's state read from disk: status, steps logged, config (a dict), final grid (or None)."""
    from ..core.run_folder import CONFIG, SAMPLES, list_checkpoints, result_kind

    import yaml

    cfg = {}
    try:
        cfg = yaml.safe_load((run / CONFIG).read_text()) or {}
    except (OSError, yaml.YAMLError):
        pass
    cfg = cfg if isinstance(cfg, dict) else {}  # a hand-edited file holding a bare string: no keys to show
    from .jobs import logged_losses  # here: jobs imports this module

    try:  # the last trained step, not the line count: validation-loss records and a resume's redone steps add lines
        steps = max((step for step, _ in logged_losses(run, 1 << 62)), default=0)
    except OSError:
        steps = 0
    try:
        kind = result_kind(run)
    except Exception:  # noqa: BLE001 - a folder mixing two runs: shown as such, not raised
        kind = None
    ckpts = list_checkpoints(run) if (run / "checkpoints").is_dir() else []
    status = "finished" if kind else (f"stopped (checkpoint at step {int(ckpts[-1].name.split('-')[-1])})" if ckpts
                                      else "incomplete")
    grids = sorted((run / SAMPLES).glob("step-*.png"))
    return {"status": status, "steps": steps, "config": cfg, "grid": grids[-1] if grids else None, "kind": kind,
            "toy_eval": read_json(run / "toy_eval.json")}


def read_json(path: Path) -> dict | None:
    """The JSON object in `path`; None when it is missing, unreadable, half-written (an eval writing it as the page
    polls) or not an object, so that one bad file in a run folder blanks a cell rather than the Runs tab."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):  # UnicodeDecodeError is a ValueError too
        return None
    return data if isinstance(data, dict) else None


@contextlib.contextmanager
def warnings_said(logger: str = "nanobooth"):
    """The warning lines `logger` (and its children) says in this thread while the block runs, as a list filled
    in place; they reach the terminal as before. Another thread's lines (a training job's) are not taken."""
    lines, me = [], threading.get_ident()

    class Keep(logging.Handler):
        def emit(self, record):
            if record.thread == me:
                lines.append(record.getMessage())

    keep, log = Keep(logging.WARNING), logging.getLogger(logger)
    log.addHandler(keep)
    try:
        yield lines
    finally:
        log.removeHandler(keep)


def export_run(ws: Workspace, run: Path, fmt: str) -> tuple[list[str], str]:
    """Export `run` as `fmt` (interop.export's formats) under the workspace's exports/; returns the files to
    download (a folder zipped; a pivotal-tuning run's `_emb` file beside its LoRA) and what export said about
    them (how to use the `_emb` file: export's own line, with the file's name for its server path)."""
    from .. import api
    from ..core.run_folder import EMB_SUFFIX

    folder = run_status(run)["kind"] == "full" and fmt == "diffusers"
    out = ws.root / "exports" / f"{run.name}-{fmt}{'' if folder else '.safetensors'}"
    with warnings_said() as said:
        path = api.export(run, fmt, out, overwrite=True)
    if path.is_dir():  # a download is one file
        path = Path(shutil.make_archive(str(path), "zip", path))
    emb = out.with_name(out.stem + EMB_SUFFIX)  # pivotal tuning's new tokens, which the LoRA needs beside it
    files = [path] + ([emb] if emb.is_file() and emb != path else [])
    for f in (out, *files):
        said = [line.replace(str(f), f.name) for line in said]
    return [str(f) for f in files], "\n".join(said)
