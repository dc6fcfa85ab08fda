"""`nanobooth` command line: train, generate, config."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from .config import ConfigError, describe, load_config, variant_names


def _user_errors() -> tuple:
    """Errors whose message is the whole story for a user (no traceback)."""
    from .checkpoint import CheckpointError
    from .data import DataError
    from .models import ModelError
    from .train import TrainingError

    return ConfigError, DataError, ModelError, CheckpointError, TrainingError


def _setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="[nanobooth] %(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        import transformers

        transformers.utils.logging.set_verbosity_error()  # hides the torchvision-missing chatter
        import diffusers

        diffusers.utils.logging.set_verbosity_error()
    except ImportError:
        pass


def guidance_fraction(text: str) -> float:
    """argparse type of --guidance-cutoff: a fraction of the sampling steps in (0, 1]."""
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"{text!r}: pass a fraction of the sampling steps in (0, 1], e.g. 0.5")
    return value


def cmd_train(args) -> None:
    from .train import train

    cfg = load_config(args.config, args.overrides)
    run_dir = train(cfg)
    samples = run_dir / "samples"
    print(f"run finished: {run_dir}" + (f" (sample grids in {samples})" if samples.is_dir() else ""))


def cmd_generate(args) -> None:
    from .generate import generate_cli

    generate_cli(args)


def cmd_config(args) -> None:
    if args.action == "list":
        print("\n".join(variant_names()))
        return
    if not args.variant:
        print(describe())
        return
    import yaml

    cfg = load_config(args.variant, args.overrides)
    print(f"# {args.variant}, resolved (every key; `nanobooth config show` documents them)")
    print(yaml.safe_dump(cfg.to_dict(), sort_keys=False, allow_unicode=True), end="")


def cmd_demo(args) -> None:
    # everything the demo touches ships in the package: never wait on a hub behind a firewall
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from .demo import demo

    demo(args.out, args.steps)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nanobooth", description="DreamBooth fine-tuning for Stable Diffusion.")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a DreamBooth variant", formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Train CONFIG (a packaged variant or a YAML path), overriding keys with key=value "
                                   "(values parse as YAML: validation_prompts='[\"a sks dog\"]', lora_rank=8).",
                       epilog="variants: " + ", ".join(variant_names()) + "\n\nconfig keys:\n" + describe())
    t.add_argument("config")
    t.add_argument("overrides", nargs="*", metavar="key=value")
    t.set_defaults(func=cmd_train)

    g = sub.add_parser("generate", help="render images from a base model and a run")
    g.add_argument("--model", required=True, help="base model (hub id, diffusers folder, .safetensors, toy, tiny)")
    g.add_argument("--weights", help="a nanobooth run folder (full pipeline or LoRA)")
    g.add_argument("--prompt", action="append", required=True, help="repeat for several prompts")
    g.add_argument("--num-images", type=int, default=4, help="images per prompt")
    g.add_argument("--seed", type=int, default=0)
    # unset flags take the --weights run's own validation settings (generate.sampling_settings)
    g.add_argument("--steps", type=int, default=None, help="default: the run's validation_inference_steps, else 30")
    g.add_argument("--guidance", type=float, default=None, help="default: the run's validation_guidance_scale, else 7.5")
    g.add_argument("--guidance-cutoff", type=guidance_fraction, default=None,
                   help="fraction of the steps that use guidance; the rest sample without it (default: the run's "
                        "validation_guidance_cutoff, else 1.0: all)")
    g.add_argument("--resolution", type=int, default=None, help="default: the run's resolution, else the model's native size")
    g.add_argument("--out", required=True)
    g.add_argument("--device", default=None)
    g.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="fp32")
    g.add_argument("--tome-ratio", type=float, default=0.0)
    g.add_argument("--allow-pickle", action="store_true")
    g.add_argument("--single-file-config", default=None)
    g.set_defaults(func=cmd_generate)

    c = sub.add_parser("config", help="list variants or show a resolved config")
    c.add_argument("action", choices=["show", "list"])
    c.add_argument("variant", nargs="?")
    c.add_argument("overrides", nargs="*", metavar="key=value")
    c.set_defaults(func=cmd_config)

    d = sub.add_parser("demo", help="the main job: DreamBooth on the embedded toy model, before/after grids")
    d.add_argument("--out", default="runs/demo")
    d.add_argument("--steps", type=int, default=None, help="override the recipe's max_train_steps")
    d.set_defaults(func=cmd_demo)

    from .evaluate import add_parser as add_eval
    from .export import add_parser as add_export
    from .toy import cli as toy_cli

    add_export(sub)
    add_eval(sub)
    toy_cli.add_parser(sub)
    return p


# Recipes with their own argparse: everything after the two words is theirs
# (argparse.REMAINDER cannot take a leading "--out", so they bypass our parser).
PASSTHROUGH = {("toy", "pretrain"): "nanobooth.toy.pretrain", ("toy", "probe"): "nanobooth.toy.probe"}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if tuple(argv[:2]) in PASSTHROUGH:
        import importlib

        return importlib.import_module(PASSTHROUGH[tuple(argv[:2])]).main(argv[2:]) or 0
    _setup_logging()
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except _user_errors() as e:
        print(f"nanobooth: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:  # train's TrainingInterrupted says what was saved; exit code 130/143
        print(f"nanobooth: stopped: {e or 'interrupted (Ctrl-C)'}", file=sys.stderr)
        return getattr(e, "exit_code", 130)
    return 0


if __name__ == "__main__":
    sys.exit(main())
