"""The DreamBooth paper's evaluation protocol: rendering, scoring, eval.json and the contact sheet (`nanobooth eval`
and `eval-dataset`; their arguments and what they do: eval/cli.py)."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from PIL import Image
from tqdm.auto import tqdm

from . import metrics as M
from .defaults import EVAL_SAMPLING, choose_backend, eval_sampling, sampling_line, toy_model
from .prompts import LIVE_CLASSES, choose_prompts, fill, protocol_file, read_protocol  # noqa: F401 (their old home)
from ..core.data import DataError, check_images, load_folder, read_subject_meta, resolve_data_dir
from ..core.models import ModelError
from ..inference.generate import DTYPES, grid, load_run, render, save_png, with_sampler
from ..core.run_folder import result_kind

log = logging.getLogger("nanobooth")
SHEET_CELL = 160
# eval.json's metric keys with the table's column heads: named for what measured them. The keys are the metric
# models' roles (metrics.load_backends), the same for both backends, so readers of eval.json need no branch.
COLUMNS = [("dino", "DINO"), ("clip_i", "CLIP-I"), ("clip_t", "CLIP-T"), ("pres", "PRES (lower=better)"),
           ("div", "DIV"), ("prompt_acc", "prompt acc")]
# --backend toy: the probe's features in the DINO role (no CLIP): not the paper's metrics, so not its names
TOY_COLUMNS = [("dino", "probe"), ("pres", "PRES (probe, lower=better)"), ("div", "DIV (probe)"),
               ("prompt_acc", "prompt acc (probe)")]


def columns(backend: str) -> list[tuple[str, str]]:
    return TOY_COLUMNS if backend == "toy" else COLUMNS


@dataclass
class Protocol:
    images_per_prompt: int = 4
    seed: int = 0
    steps: int = 50
    guidance: float = 7.5
    resolution: int | None = None
    batch_size: int = 8
    pres_prompts: int | None = None  # class-prompt rows, one per prompt's seeds; None: all, 0: no PRES
    class_prompt: str | None = None  # template; default: the backend's ("a {1}" as in the paper)
    guidance_cutoff: float = 1.0
    sampler: str = "model"  # inference.generate.with_sampler: model, dpm++ or auto


def generate(pipe, prompts: list[str], class_prompt: str, p: Protocol):
    """Prompt i's image j is seeded seed + 1000*i + j (render's scheme), so any prompt can be re-rendered
    alone; class row i reuses prompt i's seeds, so PRES compares like with like."""
    kw = dict(steps=p.steps, guidance=p.guidance, resolution=p.resolution, batch_size=p.batch_size,
              guidance_cutoff=p.guidance_cutoff)
    k = len(prompts) if p.pres_prompts is None else min(p.pres_prompts, len(prompts))
    gen, cls = [], []
    with tqdm(total=(len(prompts) + k) * p.images_per_prompt, desc="eval: rendering", unit="img") as bar:
        for i, prompt in enumerate(prompts):
            bar.set_postfix_str(prompt[:40])
            gen.append(render(pipe, [prompt], p.images_per_prompt, p.seed + 1000 * i, **kw)[0])
            bar.update(p.images_per_prompt)
        for i in range(k):  # PRES: the class prompt at each prompt's seeds
            bar.set_postfix_str(class_prompt[:40])
            cls.append(render(pipe, [class_prompt], p.images_per_prompt, p.seed + 1000 * i, **kw)[0])
            bar.update(p.images_per_prompt)
    return gen, cls


def score(gen: list[list[Image.Image]], prompts: list[str], real: list[Image.Image], class_rows: list[list[Image.Image]],
          backends: dict, identifier: str) -> dict:
    """Every metric per prompt, their means over prompts, PRES, and the real photos' own similarity."""
    dino, clip = backends["dino"], backends.get("clip")
    real_d = dino.image_features(real)
    real_c = clip.image_features(real) if clip else None
    rows = []
    for prompt, imgs in zip(prompts, gen):
        row = {"prompt": prompt, "text": M.strip_identifier(prompt, identifier), "n": len(imgs)}
        row["dino"] = M.cross_similarity(dino.image_features(imgs), real_d)
        row["clip_i"] = row["clip_t"] = None
        if clip:
            fc = clip.image_features(imgs)
            row["clip_i"] = M.cross_similarity(fc, real_c)
            tf = clip.text_features([row["text"]])
            row["clip_t"] = None if tf is None else M.cross_similarity(fc, tf)
        row["div"] = M.diversity(dino, imgs)
        match = dino.prompt_match(imgs, [prompt] * len(imgs))
        row["prompt_acc"] = None if match is None else float(match.float().mean())
        rows.append(row)
    class_imgs = [im for r in class_rows for im in r]
    mean = {k: M.mean(r[k] for r in rows) for k, _ in COLUMNS if k != "pres"}
    mean["pres"] = M.cross_similarity(dino.image_features(class_imgs), real_d) if class_imgs else None
    real_sim = {"dino": M.self_similarity(real_d), "clip_i": M.self_similarity(real_c), "n": len(real)}
    return {"per_prompt": rows, "mean": mean, "real": real_sim, "class_images": len(class_imgs)}


def _square(img: Image.Image, size: int) -> Image.Image:
    w, h = img.size
    s = min(w, h)
    img = img.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
    return img.resize((size, size), Image.Resampling.LANCZOS)


def contact_sheet(gen, prompts, class_rows, class_prompt, real, title) -> Image.Image:
    cell = min(SHEET_CELL, gen[0][0].size[0])  # thumbnails keep a 25-prompt sheet of 512px images small
    rows = [[_square(im, cell) for im in row] for row in gen]
    labels = list(prompts)
    if class_rows:
        rows.append([_square(im, cell) for im in class_rows[0]])
        labels.append(f"class prompt (PRES): {class_prompt}")
    rows.append([_square(im, cell) for im in real])
    labels.append("real images")
    return grid(rows, labels, title=title)


def _write_json(obj, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name("." + path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    os.replace(tmp, path)


def evaluate_subject(load_pipe, backends: dict, subject_dir, class_noun: str, identifier: str, prompts_spec: str | None,
                     proto: Protocol, out, settings: dict | None = None, resume: bool = False, save_images: bool = False) -> dict:
    """`load_pipe` is called only when images must be rendered, so a resumed dataset run loads nothing."""
    subject_dir, out = Path(subject_dir), Path(out)
    name, templates = choose_prompts(prompts_spec, class_noun, backends["dino"])
    prompts = [fill(t, identifier, class_noun) for t in templates]
    class_prompt = fill(proto.class_prompt or backends["dino"].class_template, identifier, class_noun)
    settings = {**(settings or {}), **asdict(proto), "subject_dir": str(subject_dir), "class_noun": class_noun,
                "identifier": identifier, "prompt_set": name, "class_prompt": class_prompt, "div_features": _div_doc(backends),
                "metric_models": {role: b.source for role, b in backends.items() if b is not None}}
    settings.pop("batch_size")  # images do not depend on it (own generators), so a rerun with another may reuse
    if resume and (out / "eval.json").is_file():
        old = json.loads((out / "eval.json").read_text())
        if old.get("settings") == settings and [r["prompt"] for r in old.get("per_prompt", [])] == prompts:
            log.info("eval: %s already scored with these settings; reusing it", out / "eval.json")
            return old
    real = load_folder(subject_dir, 0, key="--subject-dir")
    gen, class_rows = generate(load_pipe(), prompts, class_prompt, proto)
    res = {"settings": settings, **score(gen, prompts, real, class_rows, backends, identifier), **_labels(_kind(backends))}
    _write_json(res, out / "eval.json")
    save_png(contact_sheet(gen, prompts, class_rows, class_prompt, real, f"{subject_dir.name}: {class_noun}"),
             out / "contact_sheet.png")
    if save_images:
        for tag, rows in (("p", gen), ("class", class_rows)):
            for i, row in enumerate(rows):
                for j, img in enumerate(row):
                    save_png(img, out / "images" / f"{tag}{i:02d}-{j:02d}.png")
    return res


def _div_doc(backends) -> str:
    d = backends["dino"]
    if isinstance(d, M.DinoBackend):
        return f"1 - per-position cosine of DINO patch tokens (blocks {d.layers}), unit-normalised per position, layers averaged"
    return f"1 - cosine of {d.name} image features"


def _kind(backends) -> str:
    return "toy" if isinstance(backends["dino"], M.ProbeBackend) else "real"


def _labels(backend: str) -> dict:
    """eval.json's `columns` (metric key -> what measured it) and `paper` (the paper's numbers; None for the toy
    probe, whose scores are on another scale)."""
    return {"columns": dict(columns(backend)), "paper": M.PAPER if backend == "real" else None}


def format_table(rows: list[tuple[str, dict]], backend: str = "real") -> str:
    """A markdown table of `rows` with `backend`'s column heads; the paper's rows are added for the real backend only,
    so the toy probe's numbers never stand beside the paper's DINO."""
    if backend == "real":
        rows = rows + [(f"paper: {k}", v) for k, v in M.PAPER.items()]
    cols = [(k, h) for k, h in columns(backend) if k != "prompt_acc" or any(r.get(k) is not None for _, r in rows)]
    fmt = lambda v: "–" if v is None else f"{v:.3f}"  # noqa: E731
    lines = ["| | " + " | ".join(h for _, h in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    lines += [f"| {name} | " + " | ".join(fmt(r.get(k)) for k, _ in cols) + " |" for name, r in rows]
    return "\n".join(lines)


# ------------------------------------------------------------------ the library function, then the command lines
def _load_backends(model: str, backend: str, dino: str, clip: str | None, device: str | None, dino_revision: str | None,
                   clip_revision: str | None, toy_probe: str | None) -> dict:
    try:
        return M.load_backends(backend, dino, clip, _device(device), dino_revision, clip_revision, toy_probe)
    except ModelError as e:
        if backend == "real" and toy_model(model):  # DINO/CLIP out of reach, and the toy model needs neither
            raise ModelError(f"{e}; or pass --backend toy to score the toy model with its world's probe, offline") from None
        raise


def _device(device: str | None) -> str:
    return device or ("cuda" if torch.cuda.is_available() else "cpu")


def _pipe_loader(model: str, weights, dtype: str, device: str | None, sampler: str = "model"):
    def load():
        pipe = with_sampler(load_run(model, weights, torch_dtype=DTYPES[dtype]).to(_device(device)), sampler)
        pipe.set_progress_bar_config(disable=True)
        return pipe
    return load


def _metric_settings(backend: str, dino: str, clip: str | None, dino_revision: str | None, clip_revision: str | None,
                     toy_probe: str | None) -> dict:
    if backend == "toy":
        return {"backend": "toy", "toy_probe": toy_probe}
    return {"backend": "real", "dino": dino, "clip": clip, "dino_revision": dino_revision, "clip_revision": clip_revision}


def _settings(model: str, weights, dtype: str, metric: dict) -> dict:
    return {"model": model, "weights": str(Path(weights).resolve()) if weights else None, "dtype": dtype, **metric}


def evaluate(model: str, subject_dir: str | Path, out: str | Path, *, weights: str | Path | None = None,
             class_noun: str | None = None, identifier: str | None = None, prompts: str | None = None,
             images_per_prompt: int = 4, seed: int = 0, steps: int | None = None, guidance: float | None = None,
             resolution: int | None = None, class_prompt: str | None = None, pres_prompts: int | None = None,
             batch_size: int = 8, device: str | None = None, dtype: str = "fp32", save_images: bool = False,
             backend: str | None = None, dino: str = "facebook/dino-vits16", dino_revision: str | None = None,
             clip: str | None = "openai/clip-vit-base-patch32", clip_revision: str | None = None,
             toy_probe: str | None = None, guidance_cutoff: float | None = None, sampler: str | None = None) -> dict:
    """The DreamBooth paper's protocol for one subject: what `nanobooth eval` does, without printing.

    Renders every prompt of `prompts` (object, live, a file of templates, or None: live for dog/cat, else
    object; the toy world's scenes with backend="toy") `images_per_prompt` times from `model` plus the run
    folder `weights` (None: the base model), and the class prompt with the first `pres_prompts` prompts'
    seeds (None: all, 0: no PRES), then scores them against the photos in `subject_dir`. class_noun and
    identifier default to the folder's subject.json (identifier: else "sks"). steps, guidance, guidance_cutoff,
    resolution and sampler left None take the run's own settings as `generate` does, else 50 steps
    at guidance 7.5 (eval_sampling). Metric models: backend "real" (DINO `dino` + CLIP `clip`, hub ids or
    folders; clip None or "none" skips CLIP), "toy" (the toy world's probe), or None: toy for the embedded toy
    model, else real. Writes `out`/eval.json and contact_sheet.png (and every image with save_images) and
    returns eval.json's content: per_prompt rows and their mean (dino, clip_i, clip_t, pres, div, prompt_acc:
    cosines in [-1, 1], None where not measured; with the toy backend `dino` is the probe's), real (the photos'
    own pairwise similarity), settings, columns (key -> what measured it), paper (None with the toy backend).
    Raises DataError (no class noun, bad prompts, unreadable photos) or ModelError before rendering.
    """
    subject = resolve_data_dir(str(subject_dir), "--subject-dir")  # missing or photo-less: said as such, not as no noun
    check_images(subject, "--subject-dir")
    meta = read_subject_meta(subject)
    noun = class_noun or meta.get("class_noun")
    if not noun:
        raise DataError("--class-noun is required (e.g. dog), unless the subject folder has a subject.json naming it")
    identifier = identifier or meta.get("identifier", "sks")
    if weights:
        result_kind(weights)  # a folder mixing two runs is refused before any metric model loads
    sampling = eval_sampling(weights, steps=steps, guidance=guidance, guidance_cutoff=guidance_cutoff,
                             resolution=resolution, sampler=sampler)
    backend = choose_backend(model, backend)
    backends = _load_backends(model, backend, dino, clip, device, dino_revision, clip_revision, toy_probe)
    proto = Protocol(images_per_prompt, seed, batch_size=batch_size, pres_prompts=pres_prompts, class_prompt=class_prompt,
                     **sampling)
    settings = _settings(model, weights, dtype, _metric_settings(backend, dino, clip, dino_revision, clip_revision, toy_probe))
    if backend == "toy" and _outside_toy_world(noun):
        settings["outside_toy_world"] = True  # eval_cli says it under the table
    return evaluate_subject(_pipe_loader(model, weights, dtype, device, proto.sampler), backends, subject, noun, identifier,
                            prompts, proto, out, settings, save_images=save_images)


def _outside_toy_world(noun: str) -> str | None:
    from ..toy.world import outside_world  # the toy layer, for its backend only

    return outside_world(noun)


def _sampling_flags(args) -> dict:
    return {k: getattr(args, k) for k in EVAL_SAMPLING}


def eval_cli(args) -> dict:
    res = evaluate(args.model, args.subject_dir, args.out, weights=args.weights, class_noun=args.class_noun,
                   identifier=args.identifier, prompts=args.prompts, images_per_prompt=args.images_per_prompt,
                   seed=args.seed, class_prompt=args.class_prompt, pres_prompts=args.pres_prompts, batch_size=args.batch_size,
                   device=args.device, dtype=args.dtype, save_images=args.save_images, backend=args.backend,
                   dino=args.dino, dino_revision=args.dino_revision, clip=args.clip, clip_revision=args.clip_revision,
                   toy_probe=args.toy_probe, **_sampling_flags(args))
    subject = Path(args.subject_dir)
    n = sum(r["n"] for r in res["per_prompt"])
    print(format_table([(f"this run ({subject.name}, {n} images)", res["mean"]),
                        (f"real images of {subject.name}, pairwise", res["real"])], res["settings"]["backend"]))
    print(sampling_line(res["settings"], args.weights, _sampling_flags(args)))
    if res["settings"].get("outside_toy_world"):
        log.warning("eval --backend toy: %s", _outside_toy_world(res["settings"]["class_noun"]))
    print(f"wrote {Path(args.out) / 'eval.json'} and contact_sheet.png")
    return res


def eval_dataset_cli(args) -> dict:
    classes, _ = read_protocol(args.classes_file)
    root, runs, out = Path(args.dataset_root), Path(args.runs_root), Path(args.out)
    if not root.is_dir():
        raise DataError(f"--dataset-root '{root}' is not a folder (expected one folder of photos per subject)")
    subjects = args.subjects or sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    unknown = [s for s in subjects if s not in classes]
    if unknown:
        raise DataError(f"subjects {unknown} are not in the class table of {args.classes_file or protocol_file()}; pass --classes-file or --subjects")
    backend = choose_backend(args.model, args.backend)
    backends = _load_backends(args.model, backend, args.dino, args.clip, args.device, args.dino_revision, args.clip_revision,
                              args.toy_probe)
    metric = _metric_settings(backend, args.dino, args.clip, args.dino_revision, args.clip_revision, args.toy_probe)
    results, missing = {}, []
    for s in subjects:
        if not (runs / s).is_dir():
            log.warning("eval-dataset: no run folder %s; %s is left out", runs / s, s)
            missing.append(s)
            continue
        result_kind(runs / s)  # refuses a folder mixing two runs, even when its scores would be reused
        proto = Protocol(args.images_per_prompt, args.seed, batch_size=args.batch_size, pres_prompts=args.pres_prompts,
                         class_prompt=args.class_prompt, **eval_sampling(runs / s, **_sampling_flags(args)))
        results[s] = evaluate_subject(_pipe_loader(args.model, runs / s, args.dtype, args.device, proto.sampler), backends,
                                      root / s, classes[s], args.identifier or "sks", args.prompts, proto, out / s,
                                      _settings(args.model, runs / s, args.dtype, metric),
                                      resume=not args.overwrite, save_images=args.save_images)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    if not results:
        raise DataError(f"--runs-root '{runs}': no run folder named after any subject of {root}")
    keys = [k for k, _ in COLUMNS]
    settings = [r["settings"] for r in results.values()]
    summary = {
        "subjects": {s: {"class": classes[s], "mean": r["mean"], "real": r["real"],
                         "sampling": {k: r["settings"].get(k) for k in EVAL_SAMPLING}} for s, r in results.items()},
        "mean": {k: M.mean(r["mean"][k] for r in results.values()) for k in keys},
        "real": {k: M.mean(r["real"][k] for r in results.values()) for k in ("dino", "clip_i")},
        "missing": missing, **_labels(backend),
        # what every subject shared (each run's own sampling settings are under subjects)
        "settings": {k: v for k, v in settings[0].items() if all(st.get(k) == v for st in settings)
                     and k not in ("subject_dir", "class_noun", "prompt_set", "class_prompt", "weights")},
    }
    table = format_table([(f"{s} ({classes[s]})", r["mean"]) for s, r in results.items()]
                         + [(f"**mean over {len(results)} subjects**", summary["mean"]),
                            ("real images, pairwise (mean)", summary["real"])], backend)
    _write_json(summary, out / "summary.json")
    note = f"\n\nMissing runs (left out): {', '.join(missing)}\n" if missing else "\n"
    (out / "summary.md").write_text(f"# DreamBooth evaluation: {len(results)} subjects\n\n{table}{note}")
    print(table + note, end="")
    return summary
