"""`nanobooth eval` and `nanobooth eval-dataset`: the DreamBooth paper's evaluation protocol.

For one subject: render every prompt of the paper's object or live list (4 images each, fixed seeds),
render the plain class prompt with the same seeds (for PRES), and score them against the real photos
with DINO, CLIP-I, CLIP-T, PRES and DIV (definitions in `eval_metrics`). Writes `eval.json` and
`contact_sheet.png` and prints the numbers next to the paper's. `eval-dataset` does that for every
subject folder of the 30-subject DreamBooth dataset and writes one summary table.

Sampling flags left out take the run's own settings (its config.yaml's validation sampler, steps and
guidance, as `nanobooth generate`), else 50 steps at guidance 7.5. The embedded toy model is
scored by the toy world's probe (--backend toy, offline) unless --backend says otherwise; its columns
are named for the probe, and the paper's numbers, on another scale, are not shown beside them.
"""
# The commands' arguments, torch-free: `nanobooth eval --help` and an argument error answer at once; the protocol
# (eval/evaluate.py, torch) loads when a command runs.

from __future__ import annotations

import argparse

from ..core.config_values import SAMPLERS, guidance_fraction
from ..core.data import check_images, resolve_data_dir
from ..inference.generate_cli import base_model_of
from ..inference.weights_check import check_weights


MODEL_HELP = "base model: a hub id, a diffusers folder, a .safetensors file or a built-in name (toy, toy-flux, tiny, ...)"


def eval_cli(args) -> dict:
    # evaluate() and load_run check these too; here a wrong path answers before torch loads
    check_images(resolve_data_dir(args.subject_dir, "--subject-dir"), "--subject-dir")
    if args.weights:
        check_weights(args.weights)
    args.model = base_model_of(args.model, args.weights)  # as generate: the run names the model it trained on
    from .evaluate import eval_cli as run

    return run(args)


def eval_dataset_cli(args) -> dict:
    from .evaluate import eval_dataset_cli as run

    return run(args)


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--identifier", default=None, help="the rare token the run was trained with (default: sks)")
    p.add_argument("--prompts", default=None,
                   help="object, live, or a file (one prompt per line, {0}=identifier {1}=class); default: live for "
                        "dog/cat, else object (the paper's choice); the toy world's scene prompts with --backend toy")
    p.add_argument("--images-per-prompt", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    # unset sampling flags take the run's own validation settings, as `nanobooth generate` does (eval_sampling)
    p.add_argument("--steps", type=int, default=None,
                   help="default: the run's validation_inference_steps, else 50")
    p.add_argument("--guidance", type=float, default=None, help="default: the run's validation_guidance_scale, else 7.5")
    p.add_argument("--guidance-cutoff", type=guidance_fraction, default=None,
                   help="fraction of the steps that use guidance (default: the run's validation_guidance_cutoff, else 1.0)")
    p.add_argument("--sampler", choices=SAMPLERS, default=None,
                   help="the model's own sampler, DPM-Solver++ 2M (DDPM models only) or auto; default: the run's "
                        "validation_sampler, else model")
    p.add_argument("--resolution", type=int, default=None,
                   help="pixels (default: the run's resolution, else the model's native size)")
    p.add_argument("--class-prompt", default=None, help='PRES prompt template (default "a {1}"; toy: "a photo of a {1}")')
    p.add_argument("--pres-prompts", type=int, default=None,
                   help="render the class prompt with the seeds of the first K prompts (default: all; 0 skips PRES)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="fp32", help="for the diffusion model")
    p.add_argument("--save-images", action="store_true", help="also write every generated image")
    m = p.add_argument_group("metric models")
    m.add_argument("--backend", choices=["real", "toy"], default=None,
                   help="real: DINO + CLIP; toy: the toy world's probe (offline, no CLIP-I/CLIP-T, adds prompt acc); "
                        "default: toy for the embedded toy model (toy, toy-flux or its shipped folder), else real")
    m.add_argument("--dino", default="facebook/dino-vits16", help="ViTModel hub id or local folder (safetensors)")
    m.add_argument("--dino-revision", default=None)
    m.add_argument("--clip", default="openai/clip-vit-base-patch32", help="CLIPModel hub id or local folder; none skips CLIP")
    m.add_argument("--clip-revision", default=None)
    m.add_argument("--toy-probe", default=None, help="probe folder for --backend toy (default: the shipped one)")


def add_parser(subparsers) -> None:
    e = subparsers.add_parser("eval", help="the DreamBooth paper's metrics (DINO, CLIP-I, CLIP-T, PRES, DIV) for one run",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    e.add_argument("--model", default=None, help=MODEL_HELP + "; default: the model the --weights run trained on")
    _add_common(e)
    e.add_argument("--weights", default=None, help="the nanobooth run folder (omit to score the base model)")
    e.add_argument("--subject-dir", required=True, help="the real photos of the subject")
    e.add_argument("--class-noun", default=None, help="e.g. dog (default: from the folder's subject.json)")
    e.add_argument("--out", required=True)
    e.set_defaults(func=eval_cli)

    d = subparsers.add_parser("eval-dataset", help="eval over the 30-subject DreamBooth dataset: one summary table",
                              description="RUNS_ROOT/<subject> is the run for DATASET_ROOT/<subject>; classes come "
                                          "from prompts_and_classes.txt. Finished subjects are reused on a rerun.")
    d.add_argument("--model", required=True, help=MODEL_HELP)
    _add_common(d)
    d.add_argument("--runs-root", required=True)
    d.add_argument("--dataset-root", required=True)
    d.add_argument("--out", required=True)
    d.add_argument("--subjects", nargs="+", default=None, help="default: every folder in --dataset-root")
    d.add_argument("--classes-file", default=None, help="default: the shipped prompts_and_classes.txt")
    d.add_argument("--overwrite", action="store_true", help="re-score subjects that already have an eval.json")
    d.set_defaults(func=eval_dataset_cli)
