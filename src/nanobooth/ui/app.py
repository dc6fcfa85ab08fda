"""`nanobooth ui`: the page (gradio Blocks). Subject -> Train -> Try it -> Measure -> Export, and Runs.

Every setting goes through `load_config(variant, ["key=value", ...])`, the CLI's loading and validation
(did-you-mean errors), then `cli.check_train_input`, the CLI's pre-checks; training runs in the job
manager's worker (jobs.py). The page polls the manager once a second, so a reloaded page shows the live
run. Errors reach the page as the CLI's one line (jobs.one_line), never a traceback.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import shutil
from pathlib import Path

from ..core.data import DataError, image_paths
from .jobs import FINAL, JobManager, one_line, progress_html
from .runs import HEADERS, WIDTHS, newest_first, runs_rows
from .workspace import (MAX_PHOTOS, MIN_PHOTOS, Workspace, as_uploaded, export_run, header_md, photo_count_problem,
                        remember_names, run_status, subject_names, subject_prompts, subject_view, suggested_prompts,
                        warnings_said)

FAMILIES = {"toy (embedded, CPU)": "toy/", "toy FLUX twin (CPU)": "toy-flux/", "Stable Diffusion 1.5": "", "SDXL": "sdxl/", "SD3": "sd3/", "FLUX.1": "flux/"}
VARIANTS = ["dreambooth-lora", "dreambooth-lora-prior-pre", "dreambooth", "dreambooth-prior-pre",
            "dreambooth-finetune-text-encoder"]
DEFAULT = ("toy (embedded, CPU)", "dreambooth-lora-prior-pre")  # the form opens on the README's recipe: LoRA + prior
EXPORTS = {"kohya / A1111 LoRA": "kohya", "ComfyUI LoRA": "comfyui", "single-file checkpoint": "single-file",
           "diffusers": "diffusers"}


def _guard(fn):
    """Run a handler; any exception becomes a gr.Error with the CLI's one line (the page shows it). Gradio's queue
    prints a traceback for every gr.Error unless it says print_exception=False: a refusal is the user's news, shown
    on the page, and leaves the server's terminal quiet."""
    @functools.wraps(fn)
    def wrapper(*args):
        import gradio as gr

        try:
            return fn(*args)
        except gr.Error as e:  # ours (run_dir, build_cfg): already one line
            e.print_exception = False
            raise
        except BaseException as e:  # noqa: BLE001 - a page shows a line, not a traceback
            raise gr.Error(one_line(e), duration=None, print_exception=False) from None
    return wrapper


# the toy models draw 64x64 images: shown at the box's size, pixels kept sharp, not at 64 px in a corner
CSS = ("#nb-base-img img, #nb-tuned-img img, #nb-grid img {width: 100%; height: 100%; object-fit: contain; "
       "image-rendering: pixelated;}")


def variant_fields(family: str, variant: str) -> tuple:
    """The Train tab's form values for a variant as it trains (prior preservation, max_train_steps, lora_rank,
    resolution, num_class_images), so the form shows the variant's recipe rather than overriding it with the last one's."""
    from ..core.config import load_config, variant_names

    name = FAMILIES[family] + variant
    if name not in variant_names():
        return (None,) * 5  # no such variant in this family: the form stays; Start says so
    cfg = load_config(name, [])
    return cfg.with_prior_preservation, cfg.max_train_steps, cfg.lora_rank, cfg.resolution, cfg.num_class_images


def build(workspace: Workspace, manager: JobManager | None = None):
    import gradio as gr
    import pandas as pd

    from ..core.config import load_config, variant_names

    jm = manager or JobManager()
    ws = workspace

    run_names = functools.partial(newest_first, ws.runs)  # the newest first: every run dropdown opens on it

    def run_dir(name):
        folder = (ws.runs / (name or "")).resolve()
        if not name or folder.parent != ws.runs or not folder.is_dir():
            raise gr.Error("pick a run first (Runs tab, or train one)")
        return folder

    def show_subject(name, resolution, identifier, noun):
        *tab, unreadable = subject_view(ws.subject_folder(name), int(resolution), identifier, noun)
        return *tab, gr.Button(visible=unreadable)  # the remove button, only where it has something to do

    with gr.Blocks(title="nanobooth") as page:
        header = gr.Markdown(f"# nanobooth: DreamBooth in your browser\nworkspace: `{ws.root}`", elem_id="nb-header")
        subject = gr.Dropdown(ws.subjects(), label="subject", value=None, elem_id="nb-subject")  # on_load fills it
        with gr.Tabs():
            with gr.Tab("1 Subject"):
                with gr.Row():
                    uploads = gr.File(file_count="multiple", label=f"upload {MIN_PHOTOS}-{MAX_PHOTOS} photos",
                                      elem_id="nb-upload")
                    with gr.Column():
                        dog_btn = gr.Button("use the example dog", elem_id="nb-dog")
                        toy_seed = gr.Number(7, label="toy subject seed", precision=0)
                        toy_btn = gr.Button("generate a toy subject", elem_id="nb-toy")
                with gr.Row():
                    identifier = gr.Textbox("sks", label="identifier")
                    noun = gr.Textbox("dog", label="class noun", elem_id="nb-noun")
                upload_msg = gr.Markdown(elem_id="nb-upload-msg")
                thumbs = gr.Gallery(label="photos (caption: warnings)", columns=6, height=220, elem_id="nb-thumbs")
                warnings = gr.Markdown(elem_id="nb-warnings")
                remove_btn = gr.Button("remove unreadable photos", visible=False, elem_id="nb-remove-unreadable")
                prompts_md = gr.Markdown(elem_id="nb-prompts")
            with gr.Tab("2 Train"):
                with gr.Row():
                    family = gr.Dropdown(list(FAMILIES), value=DEFAULT[0], label="family")
                    variant = gr.Dropdown(VARIANTS, value=DEFAULT[1], label="variant", elem_id="nb-variant")
                    model = gr.Textbox("toy", label="model (hub id, local folder or .safetensors in the workspace)",
                                       elem_id="nb-model")
                prior0, steps0, rank0, res0, n_class0 = variant_fields(*DEFAULT)  # the variant's recipe, as picking it gives
                with gr.Row():
                    steps = gr.Number(steps0, label="max_train_steps", precision=0, elem_id="nb-steps")
                    lr = gr.Textbox("", label="learning_rate (empty: the variant's)")
                    rank = gr.Number(rank0, label="lora_rank", precision=0)
                    resolution = gr.Number(res0, label="resolution", precision=0)
                with gr.Row():
                    prior = gr.Checkbox(prior0, label="prior preservation", elem_id="nb-prior")
                    n_class = gr.Number(n_class0, label="num_class_images", precision=0)
                val_prompts = gr.Textbox("a photo of a sks dog\na photo of a sks dog on the beach", lines=2,
                                         label="validation prompts (one a line)", elem_id="nb-val")
                advanced = gr.Textbox("", lines=3, label="advanced: any key=value, one a line (as on the CLI)",
                                      elem_id="nb-advanced")
                with gr.Row():
                    start = gr.Button("Start", variant="primary", elem_id="nb-start")
                    stop = gr.Button("Stop (checkpoint)", elem_id="nb-stop")
                    resume = gr.Button("Resume", elem_id="nb-resume")
                train_msg = gr.Markdown(elem_id="nb-train-msg")
                progress = gr.HTML(progress_html(jm.current()), elem_id="nb-progress-box")
                with gr.Row():
                    loss_plot = gr.LinePlot(x="step", y="loss", label="loss", height=260)
                    grid = gr.Image(label="latest validation grid", type="filepath", elem_id="nb-grid")
            with gr.Tab("3 Try it"):
                try_run = gr.Dropdown(run_names(), label="run", elem_id="nb-try-run")
                with gr.Row():
                    try_prompt = gr.Textbox("a photo of a sks dog on the beach", label="prompt", elem_id="nb-try-prompt")
                    try_seed = gr.Number(0, label="seed", precision=0)
                try_btn = gr.Button("Generate", elem_id="nb-generate")
                with gr.Row():
                    base_img = gr.Image(label="base model", type="pil", height=320, elem_id="nb-base-img")
                    tuned_img = gr.Image(label="trained", type="pil", height=320, elem_id="nb-tuned-img")
            with gr.Tab("4 Measure"):
                eval_run = gr.Dropdown(run_names(), label="run")
                eval_btn = gr.Button("Evaluate", elem_id="nb-eval")
                eval_md = gr.Markdown(elem_id="nb-eval-msg")
                eval_img = gr.Image(label="sheet", type="filepath")
            with gr.Tab("5 Export"):
                exp_run = gr.Dropdown(run_names(), label="run", elem_id="nb-exp-run")
                exp_fmt = gr.Radio(list(EXPORTS), value="kohya / A1111 LoRA", label="format")
                exp_btn = gr.Button("Export", elem_id="nb-export")
                exp_file = gr.File(label="download (with pivotal tuning: the LoRA and its new tokens' _emb file)",
                                   file_count="multiple", elem_id="nb-export-file")
                exp_msg = gr.Markdown(elem_id="nb-export-msg")  # export's own words on using the _emb file
            with gr.Tab("6 Runs") as runs_tab:
                runs_df = gr.Dataframe(headers=HEADERS, interactive=False, wrap=True, column_widths=WIDTHS,
                                       elem_id="nb-runs")
                runs_pick = gr.Dropdown(run_names(), label="run", elem_id="nb-runs-pick")
                reopen = gr.Button("Reopen (select it in every tab)")
                runs_cfg = gr.Code(language="yaml", label="config.yaml", elem_id="nb-runs-cfg")
                runs_grid = gr.Image(label="final grid", type="filepath")
        timer = gr.Timer(1.0)

        # --- subject ---------------------------------------------------------------------------------------------
        def subject_choice(folder, msg=""):
            # a new folder name every time (Workspace.new_folder), so the dropdown's change (on_subject) fills its words
            return gr.Dropdown(choices=ws.subjects(), value=folder.name), msg, header_md(ws, len(run_names()), folder)

        @_guard
        def on_upload(files):
            folder, refused = ws.save_uploads([getattr(f, "name", f) for f in files or []])
            if folder is None:
                raise gr.Error("no usable photo in the upload: " + "; ".join(refused))
            # the photos are the subject's now (its thumbnails below): the box empties, or its file chips would read as
            # waiting to be saved, and the next subject's upload would start beside them
            n = len(image_paths(folder))
            saved = f"saved {n} photo{'' if n == 1 else 's'} as subject `{folder.name}`"
            return *subject_choice(folder, "\n".join([saved] + [f"- {r}" for r in refused])), None

        # spinners and gradio's "Error" badge go on the message box only: on the header they covered the page's title
        sub_out, shown = [subject, upload_msg, header], dict(show_progress_on=upload_msg)
        uploads.upload(on_upload, uploads, sub_out + [uploads], **shown)
        dog_btn.click(_guard(lambda: subject_choice(ws.example_dog())), None, sub_out, **shown)
        toy_btn.click(_guard(lambda s: subject_choice(ws.toy_subject(int(s)))), toy_seed, sub_out, **shown)

        @_guard
        def on_subject(name, res):
            # the subject's own words (subject.json: a toy subject's, or those a run was started with), not the
            # form's last ones: a reloaded page keeps the subject and would otherwise train it as a "dog"
            if not name:
                return ("sks", "dog", *suggested_prompts("sks", "dog"), [], "", "", gr.Button(visible=False),
                        header_md(ws, len(run_names())))
            folder = ws.subject_folder(name)
            ident, n = subject_names(folder)
            return (ident, n, *suggested_prompts(ident, n), *show_subject(name, res, ident, n),
                    header_md(ws, len(run_names()), folder))  # its next step: more photos, or Train

        view = [thumbs, warnings, prompts_md, remove_btn]
        subject.change(on_subject, [subject, resolution], [identifier, noun, val_prompts, try_prompt, *view, header],
                       show_progress_on=[thumbs, warnings])
        for trigger in (identifier.input, noun.input):  # typed by the user, not set by a subject
            trigger(lambda i, n: suggested_prompts(i.strip(), n.strip()), [identifier, noun], [val_prompts, try_prompt])
        for trigger in (identifier.submit, noun.submit, resolution.submit):
            trigger(_guard(lambda *a: show_subject(*a) if a[0] else ([], "", "", gr.Button(visible=False))),
                    [subject, resolution, identifier, noun], view)

        @_guard
        def on_remove(name, *form):
            gone = ws.remove_unreadable(name)
            msg = f"removed {', '.join(gone)} from subject `{name}`" if gone else "no unreadable photo to remove"
            return *show_subject(name, *form), msg, header_md(ws, len(run_names()), ws.subject_folder(name))

        remove_btn.click(on_remove, [subject, resolution, identifier, noun], [*view, upload_msg, header], **shown)

        # --- train -----------------------------------------------------------------------------------------------
        def build_cfg(sub, ident, n, fam, var, mdl, st, rate, rk, res, pri, ncls, vals, adv):
            folder = ws.subject_folder(sub)
            if problem := photo_count_problem(len(image_paths(folder))):
                raise gr.Error(f"subject '{folder.name}' has {problem}")
            name = FAMILIES[fam] + var
            if name not in variant_names():
                raise gr.Error(f"no variant {name} for {fam}")
            inst, cls = subject_prompts(folder, ident.strip(), n.strip())
            out = ws.new_folder("runs", f"{folder.name.split('-')[0]}-{var}")
            over = [f"instance_data_dir={folder}", f"output_dir={out}", f"max_train_steps={int(st)}",
                    f"resolution={int(res)}", f"with_prior_preservation={bool(pri)}",
                    f"num_class_images={int(ncls)}", f"instance_prompt={inst}", f"class_prompt={cls}",
                    "validation_prompts=" + json.dumps([p.strip() for p in vals.splitlines() if p.strip()])]
            if mdl.strip() and not (fam.startswith("toy") and mdl.strip() == "toy"):
                over.append(f"model={mdl.strip()}")
            if rate.strip():
                over.append(f"learning_rate={rate.strip()}")
            if "lora" in var:
                over.append(f"lora_rank={int(rk)}")
            over += [line.strip() for line in adv.splitlines() if line.strip() and not line.strip().startswith("#")]
            try:
                cfg = load_config(name, over)
                ws.check_paths(cfg)
                from ..cli import check_train_input

                with warnings_said() as said:  # the CLI's warnings (e.g. a class the toy model never saw) go on the page too
                    check_train_input(cfg)
            except BaseException as e:
                shutil.rmtree(out, ignore_errors=True)  # ours and empty: nothing is left behind by a refusal
                if isinstance(e, DataError):  # a photo named as the user uploaded it, not by its saved path
                    raise DataError(as_uploaded(str(e), folder)) from None
                raise
            remember_names(folder, ident.strip(), n.strip())
            return cfg, said

        def on_variant(fam, var):
            return [gr.update() if v is None else v for v in variant_fields(fam, var)]

        for trigger in (family.change, variant.change):
            trigger(_guard(on_variant), [family, variant], [prior, steps, rank, resolution, n_class])

        @_guard
        def on_start(*a):
            cfg, said = build_cfg(*a)
            job = jm.submit(cfg)
            names = run_names()
            msg = "\n".join([job.message or f"started {job.name}"] + [f"- warning: {line}" for line in said])
            return ([msg] + [gr.Dropdown(choices=names, value=job.name)] * 4
                    + [header_md(ws, len(names))])

        start.click(on_start, [subject, identifier, noun, family, variant, model, steps, lr, rank, resolution, prior,
                               n_class, val_prompts, advanced], [train_msg, runs_pick, try_run, eval_run, exp_run, header],
                    show_progress_on=train_msg)

        @_guard
        def on_stop():
            job = jm.current()
            if job is None or job.status in FINAL:
                return "nothing is running"
            jm.stop(job)
            # said as the moment's news, as it stays up after the stop: the progress box carries the job's state
            return f"Stop pressed: {job.name} writes a checkpoint at its next step and stops (the box below says when)"

        stop.click(on_stop, None, train_msg)

        @_guard
        def on_resume(name):
            job = jm.current()
            if job is not None and job.status not in FINAL:
                return f"{job.name} is {job.status}"
            if name:
                from ..core.run_folder import load_run_config

                cfg = load_run_config(run_dir(name))
            elif job is not None:
                cfg = job.cfg
            else:
                return "no run to resume: pick one on the Runs tab"
            ws.check_paths(cfg)
            return jm.resume(cfg).message or f"Resume pressed: {Path(cfg.output_dir).name} continues (the box below follows it)"

        resume.click(on_resume, runs_pick, train_msg)

        def tick():
            job = jm.current()
            pairs = job.losses if job else []
            # typed columns: an untyped (object) column makes a categorical axis
            losses = pd.DataFrame({"step": pd.Series([s for s, _ in pairs], dtype="int64"),
                                   "loss": pd.Series([v for _, v in pairs], dtype="float64")})
            latest = str(job.grids[-1][1]) if job and job.grids else None
            queued = [j.name for j in jm.jobs() if j.status == "queued"]
            return progress_html(job, queued), losses, latest

        # not the message line: any output to it clears its error badge, and Start's refusal must keep it
        timer.tick(tick, None, [progress, loss_plot, grid])

        # --- try it, measure, export --------------------------------------------------------------------------------
        @_guard
        def on_generate(name, prompt, seed):
            from .. import api
            from ..core.run_folder import load_run_config
            from ..inference.generate import sampling_settings

            run = run_dir(name)
            cfg = load_run_config(run)
            same = dict(seed=int(seed), **sampling_settings(run))  # the run's grid settings, for base and tuned alike
            base = api.generate(cfg.model, [prompt], **same)[0]
            tuned = api.generate(cfg.model, [prompt], weights=str(run), **same)[0]
            return base, tuned

        try_btn.click(on_generate, [try_run, try_prompt, try_seed], [base_img, tuned_img])

        @_guard
        def on_eval(name, progress=gr.Progress(track_tqdm=True)):  # toy_eval's and evaluate's tqdm bars, with counts
            from .. import api
            from ..core.data import read_subject_meta, resolve_data_dir
            from ..core.builtin_models import is_toy
            from ..core.run_folder import load_run_config

            run = run_dir(name)
            cfg = load_run_config(run)
            if is_toy(cfg.model):
                meta = read_subject_meta(resolve_data_dir(cfg.instance_data_dir))
                if not meta.get("subject"):
                    return ("toy eval scores toy-world subjects only (its probe knows balls, cubes, stars, rings and cups): "
                            "train on a generated toy subject to measure a toy run"), None
                from ..toy.evaluate import format_table

                res = api.toy_eval(run)  # base and tuned, scored by the toy world's probe
                return format_table(res), str(run / "toy_eval.png")
            noun = cfg.class_prompt.split()[-1]
            res = api.evaluate(cfg.model, resolve_data_dir(cfg.instance_data_dir), run / "eval", weights=run, class_noun=noun)
            return "```\n" + json.dumps(res.get("mean", res), indent=1)[:3000] + "\n```", str(run / "eval" / "contact_sheet.png")

        eval_btn.click(on_eval, eval_run, [eval_md, eval_img])

        exp_btn.click(_guard(lambda name, fmt: export_run(ws, run_dir(name), EXPORTS[fmt])), [exp_run, exp_fmt],
                      [exp_file, exp_msg])

        # --- runs ----------------------------------------------------------------------------------------------------
        def runs_table():
            names = run_names()
            return [runs_rows(ws.runs, jm)] + [gr.Dropdown(choices=names, value=(names[0] if names else None))] * 4

        page.load(runs_table, None, [runs_df, runs_pick, try_run, eval_run, exp_run])
        timer.tick(lambda: runs_rows(ws.runs, jm), None, runs_df)

        @_guard
        def on_pick(name):
            if not name:
                return "", None
            st = run_status(run_dir(name))
            import yaml

            return yaml.safe_dump(st["config"], sort_keys=False), str(st["grid"]) if st["grid"] else None

        # and again on opening the tab: Start picks its run before training has written config.yaml or a grid
        gr.on([runs_pick.change, runs_tab.select], on_pick, runs_pick, [runs_cfg, runs_grid])
        reopen.click(lambda n: [gr.Dropdown(value=n)] * 3, runs_pick, [try_run, eval_run, exp_run])
        def on_load():
            # a reloaded page lists what was made since launch and shows the newest subject; the header's
            # counts say the page is ready (a busy server can answer this after a very quick first upload)
            newest = ws.newest_subject()
            return (gr.Dropdown(choices=ws.subjects(), value=newest),
                    header_md(ws, len(run_names()), ws.subject_folder(newest) if newest else None))

        page.load(on_load, None, [subject, header])
    return page


def serve(workspace: str, host: str = "127.0.0.1", port: int = 7860, share: bool = False, block: bool = True):
    """Start the page; returns (page, url). Gradio's uploads and caches go under the workspace."""
    ws = Workspace(workspace)
    os.environ["GRADIO_TEMP_DIR"] = str(ws.root / ".gradio")  # before gradio reads it: nothing outside the workspace
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # gradio's own startup requests are not the user's news
    page = build(ws)
    page.queue(default_concurrency_limit=2)
    # quiet: gradio's own lines name its Python API ("set `share=True` in `launch()`"); ours name the CLI's flags
    _, url, share_url = page.launch(server_name=host, server_port=port, share=share, allowed_paths=[str(ws.root)],
                                    max_file_size="20mb", prevent_thread_lock=True, show_error=True, quiet=True, css=CSS)
    if block:
        print(f"nanobooth ui: open {url} (workspace {ws.root}; Ctrl-C stops it)"
              + (f"; public link {share_url}" if share_url else "; --share for a public link"), flush=True)
        page.block_thread()
    return page, url
