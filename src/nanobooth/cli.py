"""`nanobooth` command line: train, generate, config.

Building the parser and checking a command's input import no torch/diffusers/transformers (5-30 s on
a busy CPU): help, `config` and every input error answer at once; each command imports its stack
when it runs. Commands whose parsers live in their own packages (eval, export, toy) are registered as
placeholders (see LAZY) and parsed by their real parser only when chosen.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import logging
import os
import sys
import warnings

from .core.config import describe, guidance_fraction, load_config, variant_names  # noqa: F401 (guidance_fraction: its old home)
from .core.config_values import SAMPLERS, at_least
from .core.ranks import launch_rank, rank_tag

# (module, class) of the errors whose message is the whole story for a user (no traceback)
USER_ERRORS = (("nanobooth.core.config", "ConfigError"), ("nanobooth.core.data", "DataError"), ("nanobooth.core.errors", "ModelError"),
               ("nanobooth.core.errors", "CheckpointError"), ("nanobooth.core.train", "TrainingError"))


def _user_errors(load: bool = True) -> tuple:
    """The user-error classes. With load=False, only those of modules already imported: an error can
    only come from a module that is loaded, so main() need not import the training stack to catch it."""
    out = []
    for module, name in USER_ERRORS:
        if load or module in sys.modules:
            out.append(getattr(importlib.import_module(module), name))
    return tuple(out)


def _setup_logging() -> None:
    rank = launch_rank()
    # under `accelerate launch` every process runs this command: rank 0 prints the run, the others only
    # their errors, marked with their rank (core/ranks.py says why). The root level, not a handler's:
    # logging_redirect_tqdm (_run) swaps the console handler for one without the level.
    logging.basicConfig(level=logging.ERROR if rank else logging.INFO,
                        format=f"[nanobooth rank {rank}] %(message)s" if rank else "[nanobooth] %(message)s")
    if rank:
        os.environ["TQDM_DISABLE"] = "1"  # any bar not gated where it is made; tqdm reads it on import, which comes later
        os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
        warnings.simplefilter("ignore")  # Python warnings: the same on every rank, rank 0 prints them
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # hides the torchvision-missing chatter; set by environment so neither library is imported here
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    # the hub client's retry lines printed twice (its own handler, then ours); a load that fails says why in one line
    os.environ.setdefault("HF_HUB_VERBOSITY", "error")
    for lib in ("transformers", "diffusers", "huggingface_hub"):
        if lib in sys.modules:  # already imported (a caller's own import): the variable came too late
            importlib.import_module(f"{lib}.utils.logging").set_verbosity_error()
    # diffusers (0.42) still passes hf_hub_download an argument the hub client deprecated: not the user's to fix
    warnings.filterwarnings("ignore", message="The `local_dir_use_symlinks` argument is deprecated")
    # bitsandbytes (the quant extra) logs a CPU-kernel notice on import, whichever method the run uses
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)


def cmd_train(args) -> None:
    cfg = load_config(args.config, args.overrides)
    check_train_input(cfg)
    warn_variant_family(args.config, cfg.model)
    from .core.run_folder import SAMPLES
    from .core.train import train

    run_dir = train(cfg)
    samples = run_dir / SAMPLES
    if launch_rank() == 0:  # one copy under a launcher
        print(f"run finished: {run_dir}" + (f" (sample grids in {samples})" if samples.is_dir() else ""))


# a packaged variant's folder -> the pipeline its recipe is for (the others are SD 1.x/2.x recipes)
_VARIANT_PIPELINES = {"toy/": "StableDiffusionPipeline", "toy-flux/": "FluxPipeline", "flux/": "FluxPipeline",
                      "sd3/": "StableDiffusion3Pipeline", "sdxl/": "StableDiffusionXLPipeline"}


def warn_variant_family(variant: str, model: str) -> None:
    """Warn when a flux/, sd3/ or sdxl/ variant meets a model of another family: training follows the model
    (model=tiny is SD1.5-shaped), so the run would otherwise pass for the variant's family. Reads only a local
    folder's model_index.json or the built-in names; a hub id's or a file's family is known once it loads."""
    import json
    from pathlib import Path

    want = next((p for prefix, p in _VARIANT_PIPELINES.items() if variant.startswith(prefix)), None)
    if want is None:
        return
    from .core.builtin_models import PIPELINES

    if model in PIPELINES:
        got = PIPELINES[model]
    else:
        try:
            got = json.loads((Path(model).expanduser() / "model_index.json").read_text())["_class_name"]
        except (OSError, ValueError, KeyError, TypeError):
            return  # not a local pipeline folder: the loader reports what it is
    if got != want:
        logging.getLogger("nanobooth").warning(
            "variant '%s' is a %s recipe, but model=%s is a %s: the run trains that %s with this recipe; "
            "pass a %s model (folder or hub id%s) to train one", variant, want, model, got, got, want,
            "".join(f", or model={name}" for name, cls in PIPELINES.items() if cls == want))


def check_train_input(cfg) -> None:
    """The one-line refusals a train command can meet, before the training stack loads (the UI calls it too);
    fills empty prompts from subject.json. One place, core/prechecks.py: train() runs the same checks."""
    from .core.prechecks import check_train_input as check

    check(cfg)


def cmd_generate(args) -> None:
    from .inference.generate_cli import generate_cli

    generate_cli(args)


def cmd_config(args) -> None:
    if args.action == "list":
        from .core.variant_table import variant_table

        print(variant_table())
        return
    if not args.variant:
        print(describe())
        return
    import yaml

    cfg = load_config(args.variant, args.overrides)
    print(f"# {args.variant}, resolved (every key; `nanobooth train --help` gives each one's default and meaning)")
    print(yaml.safe_dump(cfg.to_dict(), sort_keys=False, allow_unicode=True), end="")


def cmd_demo(args) -> None:
    # everything the demo touches ships in the package: never wait on a hub behind a firewall
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from .demo import demo

    demo(args.out, args.steps, subject_seed=args.seed, threads=args.threads, num_class_images=args.num_class_images,
         model=args.model)


positive_int = at_least(1)  # --num-images, --steps


def resolution_px(text: str) -> int:
    """argparse type of --resolution: a positive multiple of 8 (the VAE's downsampling; the model may ask more)."""
    from .core.config_checks import _nearest_multiples  # the config key's own suggestion

    n = positive_int(text)
    if n % 8:
        raise argparse.ArgumentTypeError(f"{n} is not a multiple of 8; try {_nearest_multiples(n, 8)}")
    return n


def port_number(text: str) -> int:
    """argparse type of --port: an int in 1-65535 (argparse turns the error into its one usage line)."""
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a port number (1-65535)") from None
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{port} is not a port number (1-65535)")
    return port


def check_port_free(host: str, port: int) -> None:
    """Raise ConfigError naming --host/--port when the page could not bind there (taken by another `nanobooth ui`,
    or a host this machine does not have), before the workspace is made; gradio's own error is a traceback."""
    import socket

    from .core.errors import ConfigError

    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
    except socket.gaierror:
        raise ConfigError(f"--host {host}: not an address of this machine; pass --host 127.0.0.1 (the default)") from None
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: a port in TIME_WAIT is free
        try:
            s.bind((host, port))
        except OSError as e:
            raise ConfigError(f"--port {port}: {host}:{port} cannot be used ({e.strerror or e}; another `nanobooth ui` "
                              f"may be running there); pass another, e.g. --port {port + 1 if port < 65535 else 7860}") from None


def cmd_ui(args) -> None:
    from .core.errors import ConfigError

    if importlib.util.find_spec("gradio") is None:  # checked before the workspace's folders are made
        raise ConfigError('nanobooth ui needs gradio, which this environment lacks: pip install -e ".[ui]" in a '
                          'clone (pip install "nanobooth[ui]" otherwise), then run it again')
    check_port_free(args.host, args.port)
    from .ui.app import serve

    serve(args.workspace, host=args.host, port=args.port, share=args.share)


def _train_help_variant(argv: list[str]):
    """(variant, resolved config) for `nanobooth train VARIANT [key=value ...] --help`, so the help lists the values
    that variant trains with rather than the dataclass defaults (SD 1.5's); None for any other command line. A
    variant that does not resolve raises its one-line ConfigError."""
    if argv[:1] != ["train"] or not {"-h", "--help"} & set(argv):
        return None
    rest = [a for a in argv[1:] if a not in ("-h", "--help")]
    if not rest or rest[0].startswith("-"):
        return None
    overrides = [a for a in rest[1:] if "=" in a]
    return rest[0] + (f" with {' '.join(overrides)}" if overrides else ""), load_config(rest[0], overrides)


def build_parser(train_variant=None) -> argparse.ArgumentParser:
    """The command line's parser; train_variant, a (name, resolved config) pair, makes `train --help` list that
    variant's values."""
    if train_variant is None:
        keys = "config keys (each with its default; `nanobooth train VARIANT --help` shows a variant's values):\n" + describe()
    else:
        keys = (f"config keys as {train_variant[0]} sets them (the default beside each one it changes):\n"
                + describe(train_variant[1]))
    p = argparse.ArgumentParser(prog="nanobooth", description="DreamBooth fine-tuning for diffusion models: SD 1.x/2.x, SDXL, SD3, FLUX.1.")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a DreamBooth variant", formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Train CONFIG (a packaged variant or a YAML path), overriding keys with key=value "
                                   "(values parse as YAML: validation_prompts='[\"a sks dog\"]', lora_rank=8).",
                       epilog="variants: " + ", ".join(variant_names()) + "\n\n" + keys)
    # optional to argparse, so a bare `nanobooth train` gets the line below rather than "required: config, key=value"
    # (argparse lists a nargs="*" positional as required too)
    t.add_argument("config", nargs="?", help="a packaged variant (nanobooth config list) or a YAML file")
    t.add_argument("overrides", nargs="*", metavar="key=value", help="optional: config keys to change")
    t.set_defaults(func=cmd_train, missing_config="nanobooth train needs a variant or a YAML file: nanobooth train "
                   "toy/dreambooth-lora-prior-pre instance_data_dir=PHOTOS (nanobooth config list names the variants)")

    g = sub.add_parser("generate", help="render images from a base model and a run")
    g.add_argument("--model", default=None, help="base model (hub id, diffusers folder, .safetensors, or a built-in name: "
                                                 "toy, toy-flux, tiny, tiny-sdxl, tiny-sd3, tiny-flux); default with --weights: "
                                                 "the model the run trained on")
    g.add_argument("--weights", help="a nanobooth run folder (full pipeline, LoRA or textual-inversion embeddings); an "
                   "exported single-file checkpoint renders as --model FILE instead")
    g.add_argument("--prompt", action="append", required=True, help="repeat for several prompts")
    g.add_argument("--num-images", type=positive_int, default=4, help="images per prompt")
    g.add_argument("--seed", type=int, default=0)
    # unset flags take the --weights run's own validation settings (generate.sampling_settings)
    g.add_argument("--steps", type=positive_int, default=None, help="default: the run's validation_inference_steps, else 30")
    g.add_argument("--guidance", type=float, default=None, help="default: the run's validation_guidance_scale, else 7.5")
    g.add_argument("--guidance-cutoff", type=guidance_fraction, default=None,
                   help="fraction of the steps that use guidance; the rest sample without it (default: the run's "
                        "validation_guidance_cutoff, else 1.0: all)")
    g.add_argument("--resolution", type=resolution_px, default=None,
                   help="pixels, a multiple of 8 (default: the run's resolution, else the model's native size)")
    g.add_argument("--sampler", choices=SAMPLERS, default=None,
                   help="the model's own sampler, DPM-Solver++ 2M (DDPM models only) or auto (DPM-Solver++ where the model "
                        "allows it); default: the run's validation_sampler, else model")
    g.add_argument("--out", required=True, help="folder for promptII-JJ.png and grid.png (created if missing)")
    g.add_argument("--overwrite", action="store_true", help="replace the images an earlier generate left in --out")
    g.add_argument("--device", default=None)
    g.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="fp32")
    g.add_argument("--tome-ratio", type=float, default=0.0)
    g.add_argument("--allow-pickle", action="store_true")
    g.add_argument("--single-file-config", default=None)
    g.add_argument("--threads", type=at_least(1), default=None, help="CPU threads (default: the cores not busy with other work)")
    g.set_defaults(func=cmd_generate)

    c = sub.add_parser("config", help="list variants or show a resolved config",
                       description="`config list`: the packaged variants by model, each with what it trains, its prior "
                       "preservation, steps and lr. `config show VARIANT [key=value ...]`: every key "
                       "of that variant as it would train, overrides applied (a YAML file works too). `config show` "
                       "alone: every key with its default and meaning.")
    c.add_argument("action", choices=["show", "list"])
    c.add_argument("variant", nargs="?", help="with show: a packaged variant or a YAML file")
    c.add_argument("overrides", nargs="*", metavar="key=value", help="with show: config keys to change")
    c.set_defaults(func=cmd_config)

    d = sub.add_parser("demo", help="the main job: DreamBooth on the embedded toy model, before/after grids",
                       description="The main job, offline in minutes: a new toy subject (5 photos of one object), the "
                       "LoRA + prior recipe (toy/dreambooth-lora-prior-pre; toy-flux/... with --model toy-flux) on "
                       "the embedded toy model, a before/after sample grid, and toy eval's scores. It prints the plan "
                       "and the time it expects first, and where everything went last.")
    d.add_argument("--out", default="runs/demo",
                   help="the demo's folder (default runs/demo); one holding an earlier demo is kept and the next "
                   "free name (runs/demo-2, ...) is used")
    d.add_argument("--steps", type=int, default=None, help="override the recipe's max_train_steps (default 300)")
    d.add_argument("--num-class-images", type=int, default=None,
                   help="override the recipe's num_class_images (prior-preservation class images; default 50)")
    d.add_argument("--seed", type=at_least(0), default=0,
                   help="which toy subject (default 0, the one the README shows; any other draws another subject)")
    d.add_argument("--model", choices=["toy", "toy-flux"], default="toy",
                   help="the toy model: toy (UNet, the default) or toy-flux (its FLUX-shaped twin)")
    d.add_argument("--threads", type=at_least(1), default=None, help="CPU threads (default: the cores not busy with other work)")
    d.set_defaults(func=cmd_demo)

    u = sub.add_parser("ui", help="the whole workflow in a local browser page (needs gradio: pip install nanobooth[ui])",
                       description="Serve nanobooth's page (photos, training, samples, evaluation, exports) at "
                       "http://HOST:PORT until Ctrl-C. It reads and writes only under --workspace.")
    u.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    u.add_argument("--port", type=port_number, default=7860, help="port to serve on (default 7860)")
    u.add_argument("--workspace", default="nanobooth-workspace",
                   help="folder for subjects, runs and exports; nothing outside it is read or written")
    u.add_argument("--share", action="store_true", help="also open a public gradio.live link (off by default)")
    u.set_defaults(func=cmd_ui)

    for name, (module, help_text) in LAZY.items():
        # add_help=False: `nanobooth eval --help` is answered by the real parser
        sub.add_parser(name, help=help_text, add_help=False).set_defaults(lazy=module)
    return p


# Commands whose parsers are defined in their own packages (torch-free modules: eval/cli.py, interop/export_cli.py,
# toy/cli.py), so `nanobooth --help` lists them from here and only a chosen one is imported.
LAZY = {
    "export": ("nanobooth.interop.export_cli", "convert a run for A1111/ComfyUI/kohya (LoRA) or into one checkpoint file"),
    "eval": ("nanobooth.eval.cli", "the DreamBooth paper's metrics (DINO, CLIP-I, CLIP-T, PRES, DIV) for one run"),
    "eval-dataset": ("nanobooth.eval.cli", "eval over the 30-subject DreamBooth dataset: one summary table"),
    "toy": ("nanobooth.toy.cli", "the toy world: subjects, evaluation, pretraining recipe"),
}


def _real_parser(module: str) -> argparse.ArgumentParser:
    """The parser of one LAZY command, from its own module's add_parser."""
    p = argparse.ArgumentParser(prog="nanobooth", description="DreamBooth fine-tuning for diffusion models: SD 1.x/2.x, SDXL, SD3, FLUX.1.")
    sub = p.add_subparsers(dest="command", required=True)
    importlib.import_module(module).add_parser(sub)
    return p


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = build_parser(_train_help_variant(argv))
    args, extra = parser.parse_known_args(argv)
    if getattr(args, "lazy", None) and getattr(args, "func", None) is None:
        parser = _real_parser(args.lazy)
        args, extra = parser.parse_known_args(argv)
    if extra:  # argparse's own error would print the top-level usage; the command's own is the useful one
        _command_parser(parser, args).error(f"unrecognized arguments: {' '.join(extra)}")
    if getattr(args, "missing_config", None) and args.config is None:
        _command_parser(parser, args).error(args.missing_config)
    return args


def _command_parser(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.ArgumentParser:
    """The innermost subcommand's parser that args was parsed with (`nanobooth toy eval` -> toy eval's)."""
    for dest in ("command", "toy_command"):
        sub = next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)
        if sub is None or getattr(args, dest, None) not in sub.choices:
            break
        parser = sub.choices[getattr(args, dest)]
    return parser


def _run(args) -> None:
    """Run the chosen command with log lines kept off the progress bars, and the CPU threads set."""
    from tqdm.contrib.logging import logging_redirect_tqdm

    from .core.threads import threads_when_models_load

    # the commands that run models set torch's threads as their first model loads; train and demo from num_threads
    models = args.command in ("generate", "eval", "eval-dataset", "export") or getattr(args, "toy_command", None) == "eval"
    with logging_redirect_tqdm():  # the root logger's console handler; "nanobooth" propagates to it
        with threads_when_models_load(getattr(args, "threads", None)) if models else contextlib.nullcontext():
            args.func(args)


# Recipes with their own argparse: everything after the two words is theirs
# (argparse.REMAINDER cannot take a leading "--out", so they bypass our parser).
PASSTHROUGH = {("toy", "pretrain"): "nanobooth.toy.recipes.pretrain", ("toy", "pretrain-flux"): "nanobooth.toy.recipes.pretrain_flux",
               ("toy", "probe"): "nanobooth.toy.probe"}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        if tuple(argv[:2]) in PASSTHROUGH:
            return importlib.import_module(PASSTHROUGH[tuple(argv[:2])]).main(argv[2:]) or 0
        _setup_logging()
        args = parse_args(argv)
        _run(args)
    except KeyboardInterrupt as e:
        # one line, no traceback; a training run that saved a checkpoint says so in its message (and its
        # exit code: 130 for Ctrl-C, 143 for SIGTERM). Under a launcher rank 0 says it for all: the ranks
        # stop at one step (or, in setup, the launcher stops the others), and only rank 0 writes the checkpoint.
        if launch_rank() == 0:
            print(f"\nnanobooth: interrupted{': ' + str(e) if str(e) else ''}", file=sys.stderr)
        return getattr(e, "exit_code", 130)
    except BrokenPipeError:  # `nanobooth config show X | head`: the reader is gone, nothing to report
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit-time flush stays quiet
        return 0
    except Exception as e:
        if isinstance(e, _user_errors(load=False)):
            print(f"nanobooth: error{rank_tag()}: {e}", file=sys.stderr)  # every rank: it may be this one's alone
            return 2
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
