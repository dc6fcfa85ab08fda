"""`nanobooth toy ...`: the synthetic world's commands."""

from __future__ import annotations

from ..core.config_values import SAMPLERS, at_least


def cmd_subject(args) -> None:
    from . import world

    out = world.write_subject(args.seed, args.out, args.num_images)
    meta = (out / "subject.json").read_text()
    print(f"wrote {args.num_images} image{'' if args.num_images == 1 else 's'} of subject {args.seed} to {out}\n{meta}")


def cmd_eval(args) -> None:
    from .run_check import finished_run

    finished_run(args.run_dir)  # toy_eval checks it again; here a wrong RUN_DIR answers before torch loads
    from .evaluate import toy_eval

    toy_eval(args.run_dir, args.images_per_prompt, args.seed, args.steps, args.guidance, with_base=not args.no_base,
             guidance_cutoff=args.guidance_cutoff, sampler=args.sampler)


_at_least_two = at_least(2)  # toy eval's images per prompt: diversity needs a pair


def add_parser(sub) -> None:
    from ..core.config import guidance_fraction

    toy = sub.add_parser("toy", help="the toy world: subjects, evaluation, pretraining recipe")
    tsub = toy.add_subparsers(dest="toy_command", required=True)

    s = tsub.add_parser("subject", help="write a fresh toy subject's instance images and subject.json")
    s.add_argument("--seed", type=at_least(0), required=True,
                   help="which subject: class, two colours, pattern, mark and poses all follow from it")
    s.add_argument("--out", required=True, help="a new or empty folder for NN.png, NN.mask.png and subject.json")
    s.add_argument("--num-images", type=at_least(1), default=5, help="instance photos to render (default 5)")
    s.set_defaults(func=cmd_subject)

    e = tsub.add_parser("eval", help="subject/prompt fidelity, prior drift and diversity of a toy run -> RUN_DIR/toy_eval.json")
    e.add_argument("run_dir")
    e.add_argument("--images-per-prompt", type=_at_least_two, default=4,
                   help="images per prompt (at least 2: diversity compares the subject's images pairwise; "
                        "docs/evaluation.md's tables use 8, less noisy than 4)")
    e.add_argument("--seed", type=int, default=1234)
    e.add_argument("--steps", type=int, default=None,
                   help="sampler steps per image (default: 15 for dpm++, 25 for the model's own)")
    e.add_argument("--sampler", choices=SAMPLERS, default="auto",
                   help="the model's own sampler (DDIM for the toy UNet, Euler for the FLUX twin), DPM-Solver++ 2M "
                        "(UNet models only), or auto: DPM-Solver++ where the model allows it (default)")
    e.add_argument("--guidance", type=float, default=None, help="default: the run's validation_guidance_scale")
    e.add_argument("--guidance-cutoff", type=guidance_fraction, default=None,
                   help="fraction of the steps that use guidance; default: the run's validation_guidance_cutoff")
    e.add_argument("--no-base", action="store_true", help="skip scoring the base model")
    e.add_argument("--threads", type=at_least(1), default=None, help="CPU threads (default: the cores not busy with other work)")
    e.set_defaults(func=cmd_eval)

    # listed for --help only: nanobooth.cli.main hands these words straight to the recipe's own parser
    tsub.add_parser("pretrain", help="the toy model's training recipe (nanobooth toy pretrain --help)", add_help=False)
    tsub.add_parser("pretrain-flux", help="the toy FLUX twin's training recipe (nanobooth toy pretrain-flux --help)",
                    add_help=False)
    tsub.add_parser("probe", help="train/evaluate the toy world's probe classifier (nanobooth toy probe --help)",
                    add_help=False)
