"""The CLI a newcomer meets: fast help and input errors, one-line Ctrl-C, log lines kept off the bars,
a thread count that fits the free cores, and a demo that says up front what it will do."""

import json
import logging
import subprocess
import sys
import textwrap

import pytest

from nanobooth import cli
from nanobooth.core.data import DataError, resolve_data_dir
from nanobooth.core.threads import busy_cpus_from_stat, choose_threads

HEAVY = ("torch", "diffusers", "transformers")

# Runs each argv through main() in ONE fresh interpreter and reports, after each, which heavy modules
# (and which nanobooth.toy modules) were loaded, the exit code and stderr's last line.
PROBE = textwrap.dedent("""
    import contextlib, io, json, sys
    from nanobooth.cli import main
    out = []
    for argv in json.loads(sys.argv[1]):
        err = io.StringIO()
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
            try:
                rc = main(argv)
            except SystemExit as e:
                rc = e.code
        out.append({"argv": argv, "rc": rc, "err": err.getvalue().strip().splitlines()[-1:],
                    "heavy": [m for m in %r if m in sys.modules],
                    "toy": sorted(m for m in sys.modules if m.startswith("nanobooth.toy"))})
    print(json.dumps(out))
""" % (HEAVY,))


def run_probe(argvs, cwd):
    res = subprocess.run([sys.executable, "-c", PROBE, json.dumps(argvs)], capture_output=True, text=True, cwd=cwd,
                         timeout=300)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_help_config_and_input_errors_load_no_heavy_module(tmp_path):
    (tmp_path / "my_subject123").mkdir()
    (tmp_path / "afile").write_text("x")
    argvs = [["--help"], ["train", "--help"], ["config", "list"], ["config", "show", "toy/dreambooth"],
             ["config", "show", "toy/dreambooth", "lora_rnk=3"],
             ["train", "toy/dreambooth", "lora_rnk=3"],
             ["train", "toy/dreambooth", "instance_data_dir=my_subjct123"],
             ["train", "toy/dreambooth", "instance_data_dir=afile"],
             ["generate", "--model", "toy", "--prompt", "a", "--out", "x", "--guidance-cutoff", "2"],
             # a wrong path to a command that loads models answers before torch does (4 s on a busy CPU)
             ["generate", "--weights", "no-run", "--prompt", "a", "--out", "x"],
             ["export", "no-run", "--format", "kohya", "--out", "x.safetensors"],
             ["eval", "--model", "toy", "--subject-dir", "no-photos", "--out", "e"],
             ["export", "--help"], ["eval", "--help"], ["eval-dataset", "--help"]]
    results = run_probe(argvs, tmp_path)
    for r in results:
        assert r["heavy"] == [], r
        assert r["toy"] == [], r  # the toy package loads only when a toy command runs
    rc = {" ".join(r["argv"]): r["rc"] for r in results}
    assert rc["--help"] == 0 and rc["config list"] == 0 and rc["config show toy/dreambooth"] == 0
    assert all(r["rc"] == 2 for r in results[4:12]) and all(r["rc"] == 0 for r in results[12:])
    assert "did you mean 'lora_rank'" in results[5]["err"][0]
    assert "did you mean `my_subject123`" in results[6]["err"][0]
    assert "--weights 'no-run': nothing is there" in results[9]["err"][0]
    assert "RUN_DIR 'no-run' is not a finished nanobooth run" in results[10]["err"][0]
    assert "--subject-dir=no-photos: this folder does not exist" in results[11]["err"][0]


def test_toy_commands_load_the_toy_package_only_when_chosen(tmp_path):
    toy_help, no_run = run_probe([["toy", "eval", "--help"], ["toy", "eval", "no-run"]], tmp_path)
    assert toy_help["rc"] == 0 and "nanobooth.toy.cli" in toy_help["toy"] and toy_help["heavy"] == []
    assert no_run["rc"] == 2 and no_run["heavy"] == [] and "RUN_DIR 'no-run' does not exist" in no_run["err"][0]


def test_lazy_commands_parse_with_their_real_parsers(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["export", "--help"])
    assert e.value.code == 0 and "--format" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:  # an unknown option is still argparse's error, not silently dropped
        cli.main(["config", "list", "--bogus"])
    assert e.value.code == 2 and "unrecognized arguments: --bogus" in capsys.readouterr().err


def test_export_takes_a1111_and_forge_as_names_for_the_kohya_file(monkeypatch, tmp_path, capsys):
    """newcomer57: the page says "kohya / A1111 LoRA" and the README "for A1111", but --format a1111 was refused."""
    from nanobooth.interop import export as ex
    from nanobooth.interop import export_cli

    seen = []
    monkeypatch.setattr(export_cli, "read_run", lambda run_dir: ("lora", {}))
    monkeypatch.setattr(ex, "export", lambda run, fmt, out, dtype, overwrite: seen.append(fmt) or tmp_path / out)
    for name in ("a1111", "forge", "kohya"):
        assert cli.main(["export", str(tmp_path), "--format", name, "--out", "x.safetensors"]) == 0
        assert capsys.readouterr().out.startswith(f"exported {tmp_path} as kohya: ")
    assert seen == ["kohya"] * 3


@pytest.mark.parametrize("argv, usage", [(["demo", "--dry"], "usage: nanobooth demo"),
                                         (["toy", "eval", "--nope", "x"], "usage: nanobooth toy eval"),
                                         (["train", "toy/dreambooth-lora", "--dry-run"], "usage: nanobooth train")])
def test_an_unknown_option_shows_its_commands_usage(argv, usage, capsys):
    # argparse's own error printed the top-level usage ("nanobooth [-h] {toy} ...") for any subcommand
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith(usage) and f"{usage[7:]}: error: unrecognized arguments: {argv[-1 if argv[-1].startswith('-') else -2]}" in err


def test_an_unknown_variant_is_one_short_line_with_the_nearest_name(capsys):
    assert cli.main(["train", "toy/dreambooth-lora-prio"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "did you mean 'toy/dreambooth-lora-prior-pre'?" in line and "nanobooth config list" in line and len(line) < 250


# --- data folders: the error names the real problem -----------------------------------------------------

def test_mistyped_instance_folder_says_so_and_suggests_the_sibling(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "my_subject123").mkdir()
    assert cli.main(["train", "toy/dreambooth", "instance_data_dir=my_subjct123"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "instance_data_dir" in err and "does not exist" in err and "did you mean `my_subject123`?" in err
    assert "instance_prompt" not in err  # the old error blamed the prompt read from the missing folder's subject.json


def test_data_folder_that_is_a_file_or_missing(tmp_path):
    f = tmp_path / "photo.jpg"
    f.write_bytes(b"x")
    with pytest.raises(DataError, match="instance_data_dir=.*is a file, not a folder"):
        resolve_data_dir(str(f))
    with pytest.raises(DataError, match=f"does not exist; did you mean `{tmp_path / 'dogs'}`"):
        (tmp_path / "dogs").mkdir()
        resolve_data_dir(str(tmp_path / "dgos"))
    with pytest.raises(DataError, match="does not exist$"):  # nothing alike next to it: no guess
        resolve_data_dir(str(tmp_path / "zzzzzzz"))
    # class_data_dir is created by training: missing is fine, a file is not
    assert resolve_data_dir(str(tmp_path / "new_class"), "class_data_dir", must_exist=False) == tmp_path / "new_class"
    with pytest.raises(DataError, match="class_data_dir=.*is a file, not a folder"):
        resolve_data_dir(str(f), "class_data_dir", must_exist=False)


def test_class_data_dir_file_is_refused_before_training(tmp_path, monkeypatch, capsys, subject_dir):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "classes.txt").write_text("x")
    rc = cli.main(["train", "toy/dreambooth-prior-pre", f"instance_data_dir={subject_dir}", "class_data_dir=classes.txt"])
    assert rc == 2 and "class_data_dir=classes.txt: this is a file, not a folder" in capsys.readouterr().err


# --- Ctrl-C and logging ----------------------------------------------------------------------------------

def test_ctrl_c_is_one_line_and_exit_130(monkeypatch, capsys):
    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "cmd_config", interrupted)
    assert cli.main(["config", "list"]) == 130
    err = capsys.readouterr().err
    assert err.strip() == "nanobooth: interrupted" and "Traceback" not in err


def test_ctrl_c_keeps_the_message_a_command_gives_it(monkeypatch, capsys):
    def interrupted(args):
        raise KeyboardInterrupt("saved checkpoint-000007; resume_from_checkpoint=latest continues")

    monkeypatch.setattr(cli, "cmd_config", interrupted)
    assert cli.main(["config", "list"]) == 130
    assert capsys.readouterr().err.strip() == "nanobooth: interrupted: saved checkpoint-000007; resume_from_checkpoint=latest continues"


def test_log_lines_go_through_tqdm_while_a_command_runs(monkeypatch):
    seen = {}

    def record(args):
        seen["root"] = [type(h).__name__ for h in logging.getLogger().handlers]
        seen["own"] = logging.getLogger("nanobooth").handlers[:]

    monkeypatch.setattr(cli, "cmd_config", record)
    assert cli.main(["config", "list"]) == 0
    assert "_TqdmLoggingHandler" in seen["root"]  # tqdm.write: a log line never lands inside a bar
    assert seen["own"] == []  # and is printed once (nanobooth's records propagate to the root handler)


# --- threads ---------------------------------------------------------------------------------------------

def test_thread_count_fits_the_free_cores():
    assert choose_threads(None, cpus=2, busy=0.05) == 2  # alone
    assert choose_threads(None, cpus=2, busy=1.0) == 1  # beside one busy job
    assert choose_threads(None, cpus=2, busy=5.0) == 1  # never 0
    assert choose_threads(None, cpus=8, busy=2.6) == 5
    assert choose_threads(0, cpus=8, busy=None) == 8  # unknown load: every core
    assert choose_threads(3, cpus=2, busy=2.0) == 3  # the user's num_threads wins
    assert choose_threads(None, cpus=8, busy=0.0, env="2") == 2  # and so does their OMP_NUM_THREADS
    assert choose_threads(None, cpus=8, busy=0.0, env="junk") == 8


def test_thread_line_only_when_other_work_takes_cores(monkeypatch, caplog):
    import torch

    from nanobooth.core import threads

    old = torch.get_num_threads()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(threads, "usable_cpus", lambda: 2)
    try:
        for busy, line in ((0.1, False), (1.0, True)):
            monkeypatch.setattr(threads, "measure_busy_cpus", lambda: busy)
            caplog.clear()
            with caplog.at_level("INFO", logger="nanobooth"):
                threads.apply_threads(None)
            assert ("CPU threads: 1 of 2" in caplog.text) == line  # an idle machine's every-command line is noise
    finally:
        torch.set_num_threads(old)


def test_a_bad_input_on_a_busy_machine_is_one_line(monkeypatch, caplog, capsys, tmp_path):
    """generate/eval/export/toy eval hold their threads until a model loads (load_pipeline): a wrong path answers with
    its one line, not after torch's import and a 'CPU threads' line."""
    import torch

    from nanobooth.core import threads

    old = torch.get_num_threads()
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(threads, "usable_cpus", lambda: 2)
    monkeypatch.setattr(threads, "measure_busy_cpus", lambda: 1.0)
    try:
        with caplog.at_level("INFO", logger="nanobooth"):
            rc = cli.main(["generate", "--model", "toy", "--weights", str(tmp_path / "no-run"), "--prompt", "a dog",
                           "--out", str(tmp_path / "gen")])
            assert rc == 2 and "CPU threads" not in caplog.text and threads._held == []  # the request ended with it
            err = capsys.readouterr().err.strip().splitlines()
            assert len(err) == 1 and "no-run" in err[0], err
            with threads.threads_when_models_load(None):
                threads.apply_held_threads()  # what the first model's loading does, once
                threads.apply_held_threads()
        assert caplog.text.count("CPU threads: 1 of 2") == 1 and torch.get_num_threads() == 1
    finally:
        threads._held.clear()
        torch.set_num_threads(old)


def test_threads_flag_refuses_zero(capsys):
    with pytest.raises(SystemExit):
        cli.parse_args(["generate", "--model", "toy", "--prompt", "a dog", "--threads", "0"])
    assert "--threads: '0': pass a whole number of at least 1" in capsys.readouterr().err


def _stat(*cpus):
    """/proc/stat text with per-core (busy, idle) jiffies."""
    lines = [f"cpu  {sum(b for b, _ in cpus)} 0 0 {sum(i for _, i in cpus)} 0 0 0 0 0 0"]
    lines += [f"cpu{k} {b} 0 0 {i} 0 0 0 0 0 0" for k, (b, i) in enumerate(cpus)]
    return "\n".join(lines + ["intr 1 2 3"])


def test_busy_cpus_from_two_proc_stat_readings():
    before = _stat((100, 100), (100, 100), (0, 0))
    after = _stat((200, 100), (110, 190), (100, 0))  # core 0 fully busy, core 1 10% busy, core 2 busy
    assert busy_cpus_from_stat(before, after, {0, 1}) == pytest.approx(1.1)
    assert busy_cpus_from_stat(before, after) == pytest.approx(2.1)
    assert busy_cpus_from_stat(before, before, {0}) is None  # no time passed: unknown


def test_num_threads_key_sets_torch_threads():
    import torch

    from nanobooth.core.config import ConfigError, load_config
    from nanobooth.core.threads import apply_threads

    old = torch.get_num_threads()
    try:
        assert apply_threads(1) == 1 and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(old)
    assert load_config("toy/dreambooth", ["num_threads=2"]).num_threads == 2
    with pytest.raises(ConfigError, match="num_threads"):
        load_config("toy/dreambooth", ["num_threads=-1"])


# --- progress bars ---------------------------------------------------------------------------------------

def test_eval_rendering_shows_a_counted_bar(monkeypatch, capsys):
    from nanobooth.eval import evaluate

    monkeypatch.setattr(evaluate, "render", lambda pipe, prompts, n, seed, **kw: [[None] * n for _ in prompts])
    gen, cls = evaluate.generate(None, ["a sks dog", "a sks dog in snow"], "a dog", evaluate.Protocol(images_per_prompt=3))
    assert len(gen) == 2 and len(cls) == 2
    err = capsys.readouterr().err
    assert "eval: rendering" in err and "12/12" in err


def test_toy_eval_score_advances_its_bar_per_image(monkeypatch):
    from types import SimpleNamespace

    from nanobooth.toy import evaluate as te
    from nanobooth.toy import world

    monkeypatch.setattr(te, "render", lambda pipe, prompts, n, seed, steps, guidance, **kw: [[None] * n for _ in prompts])
    monkeypatch.setattr(te, "metrics", SimpleNamespace(**{k: (lambda *a: 0.5) for k in (
        "subject_fidelity", "prompt_fidelity", "prior_drift", "diversity")}))
    bar = SimpleNamespace(n=0)
    bar.update = lambda k: setattr(bar, "n", bar.n + k)
    te.score(None, "ball", [], None, "sks", 3, 0, 25, 4.0, bar=bar)
    assert bar.n == 3 * (2 + len(world.SCENES))


# --- demo ------------------------------------------------------------------------------------------------

def test_demo_plan_counts_every_phase_and_scales_with_speed():
    from nanobooth.core.config import load_config
    from nanobooth.demo import plan, unet_evaluations

    cfg = load_config("toy/dreambooth-lora-prior-pre", {"validation_prompts": ["a", "b", "c", "d"]})
    work = unet_evaluations(cfg, n_scenes=5)
    assert set(work) == {"class images", "sample grids", "toy eval"}  # training is timed as whole steps
    assert work["class images"] == 50 * 10 * 2  # the toy variants' 10 steps, guided: two forwards per step
    # base and tuned model x (subject + 5 scenes + class prompts) x 4 images x 15 DPM++ steps x 1.5 forwards (guidance
    # on the first half of the steps)
    assert work["toy eval"] == 2 * 7 * 4 * 15 * 1.5
    # the start and end grids x 4 prompts x 2 images x the toy grids' 15 DPM++ steps x 1.5 forwards
    assert work["sample grids"] == 2 * 4 * 2 * 15 * 1.5
    slow, fast = plan(cfg, 5, 0.05, 0.6), plan(cfg, 5, 0.005, 0.06)
    assert "about 6 min" in slow and "about 51 s" in fast and "300 LoRA steps on the denoiser and the text encoder" in slow
    assert "training ~3 min" in slow and "training ~18 s" in fast  # 300 steps x the step's seconds
    frozen = load_config("toy/dreambooth-lora-prior-pre", {"train_text_encoder": False})
    assert "300 LoRA steps (" in plan(frozen, 5, 0.05, 0.6)  # the text encoder is named only where it trains


def test_demo_speed_times_a_real_training_step_of_the_method(monkeypatch):
    """`demo.speed` times the sampling forward without gradients on the base model, then real training steps: the
    run's method attached (LoRA adapters, the only trainable weights), the run's rows (2 instance + 2 class),
    gradients on."""
    import torch

    from nanobooth.core.config import load_config
    from nanobooth.demo import speed
    from nanobooth.families.sd import SD

    calls, denoise = [], SD.denoise

    def recorded(self, model, noisy, timesteps, cond):
        trainable = [n for n, p in model.named_parameters() if p.requires_grad]
        calls.append((noisy.shape[0], torch.is_grad_enabled(), bool(trainable) and all("lora_" in n for n in trainable)))
        return denoise(self, model, noisy, timesteps, cond)

    monkeypatch.setattr(SD, "denoise", recorded)
    torch.manual_seed(0)
    per_forward, per_step = speed(load_config("toy/dreambooth-lora-prior-pre", {}), sample_batch=3, repeats=2)
    assert calls == [(3, False, False)] * 3 + [(4, True, True)] * 3  # warm-up + 2 timed, each
    assert per_forward > 0 and per_step > 0


def test_demo_plan_counts_only_the_class_images_the_cache_lacks(tmp_path):
    from PIL import Image

    from nanobooth.core.config import load_config
    from nanobooth.core.run_folder import class_images_dir
    from nanobooth.demo import unet_evaluations

    cfg = load_config("toy/dreambooth-lora-prior-pre", {"class_image_cache": str(tmp_path / "cache"), "output_dir": str(tmp_path / "run")})
    folder = class_images_dir(cfg, cfg.output_dir)
    folder.mkdir(parents=True)
    for i in range(30):  # an earlier run of this class made 30 of the 50
        Image.new("RGB", (8, 8)).save(folder / f"class-{i:05d}.png")
    assert unet_evaluations(cfg, n_scenes=5)["class images"] == 20 * 10 * 2


def test_demo_says_what_it_will_do_before_it_starts(tmp_path, monkeypatch, capsys):
    from nanobooth import demo
    from nanobooth.core import train

    monkeypatch.setattr(demo, "speed", lambda *a: (0.02, 0.2))

    def interrupted(cfg):  # stop where training would begin
        raise KeyboardInterrupt

    monkeypatch.setattr(train, "train", interrupted)
    assert cli.main(["demo", "--out", str(tmp_path / "demo")]) == 130
    out = capsys.readouterr().out
    assert "demo: toy subject 0 (--seed N draws another)" in out and "demo: about 2 min on this machine" in out


def test_output_piped_into_head_ends_without_a_traceback():
    proc = subprocess.Popen([sys.executable, "-m", "nanobooth", "config", "show", "toy/dreambooth"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    proc.stdout.close()  # the reader is gone before the first line is written (`| head` after it has its lines)
    err = proc.stderr.read()
    assert proc.wait(timeout=120) == 0 and "Traceback" not in err and "BrokenPipe" not in err


# --- train's input checks: before the training stack loads ---------------------------------------------------

@pytest.fixture
def toy_subject(subject_dir, tmp_path):
    """The subject photos with a subject.json naming the prompts, as `nanobooth toy subject` writes them."""
    import shutil

    d = tmp_path / "subject"
    shutil.copytree(subject_dir, d)
    (d / "subject.json").write_text(json.dumps({"instance_prompt": "a photo of sks dog", "class_prompt": "a photo of dog"}))
    return d


def test_output_dir_and_resolution_refusals_load_no_heavy_module(tmp_path, toy_subject):
    from nanobooth.core.config import load_config, save_config

    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "notes.txt").write_text("someone else's")
    (tmp_path / "afile").write_text("x")
    (tmp_path / "partial").mkdir()  # a run stopped before its first checkpoint: its log, no result
    (tmp_path / "partial" / "train_log.jsonl").write_text(json.dumps({"step": 3, "loss": 0.1}) + "\n")
    # a run of the same config but lora_rank=8, prompts filled from subject.json as train fills them
    prev = tmp_path / "prev"
    prev.mkdir()
    saved = load_config("toy/dreambooth", [f"instance_data_dir={toy_subject}", f"output_dir={prev}", "lora_rank=8",
                                           "instance_prompt=a photo of sks dog", "class_prompt=a photo of dog"])
    save_config(saved, prev / "config.yaml")
    base = ["train", "toy/dreambooth", f"instance_data_dir={toy_subject}"]
    results = run_probe([[*base, "output_dir=full"], [*base, f"output_dir={prev}", "resume_from_checkpoint=latest"],
                         [*base, "output_dir=afile"], [*base, "resolution=100"], [*base, "output_dir=partial"]], tmp_path)
    for r in results:
        assert r["rc"] == 2 and r["heavy"] == [], r
    full, resumed, afile, resolution, partial = (r["err"][0] for r in results)
    # a folder of other files has nothing to resume: the line does not offer it (newcomer54)
    assert "output_dir 'full' holds other files and no nanobooth run" in full and "resume" not in full
    assert "output_dir 'partial' is not empty" in partial and "resume_from_checkpoint=latest" in partial
    # the key that differs, with both values; not the prompts (the CLI fills them from subject.json first)
    assert "different config" in resumed and "lora_rank: 8 there, 4 now" in resumed and "instance_prompt" not in resumed
    assert "output_dir 'afile' is a file" in afile
    assert "'resolution': 100 is not a multiple of 8" in resolution and "96 or 112 (this model needs multiples of 16)" in resolution


def test_photo_resume_and_model_resolution_refusals_load_no_heavy_module(tmp_path, toy_subject):
    """The input errors a newcomer met at 8-15 s (the training stack loaded first) come back before it loads,
    each naming the real problem: an empty folder is 'no images' (not a missing instance_prompt), a broken
    photo names the file, a resume that would lose or replace work is refused, and a resolution the local
    model cannot render names the model's own multiple (the toy model: 16)."""
    import shutil

    (tmp_path / "empty").mkdir()
    broken = tmp_path / "broken"
    shutil.copytree(toy_subject, broken)
    (broken / "zz.png").write_bytes(b"\x89PNG not really")
    finished = tmp_path / "finished"  # a finished LoRA run at step 5 whose checkpoints were removed
    finished.mkdir()
    (finished / "train_log.jsonl").write_text("".join(json.dumps({"step": s, "loss": 0.1}) + "\n" for s in range(1, 6)))
    (finished / "pytorch_lora_weights.safetensors").write_bytes(b"")
    base = ["train", "toy/dreambooth-lora", f"instance_data_dir={toy_subject}"]
    results = run_probe([["train", "toy/dreambooth", "instance_data_dir=empty"],
                         ["train", "toy/dreambooth", "instance_data_dir=broken"],
                         [*base, f"output_dir={finished}", "resume_from_checkpoint=latest"],
                         [*base, "output_dir=new", "resume_from_checkpoint=nowhere/checkpoint-000010"],
                         [*base, "output_dir=new", "resolution=104"]], tmp_path)
    for r in results:
        assert r["rc"] == 2 and r["heavy"] == [], r
    empty, bad_photo, finished_run, bad_resume, resolution = (r["err"][0] for r in results)
    assert "no images in 'empty'" in empty and "instance_prompt" not in empty
    assert "zz.png: cannot read this image" in bad_photo
    assert "has no checkpoint to resume from (its log reaches step 5)" in finished_run
    assert "'nowhere/checkpoint-000010': not a nanobooth checkpoint folder" in bad_resume
    assert "'resolution': 104 is not a multiple of 16" in resolution and "96 or 112" in resolution


def test_train_says_which_prompts_it_took_from_subject_json(tmp_path, toy_subject, monkeypatch, caplog):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")  # refused after the prompts are filled: nothing trains
    with caplog.at_level(logging.INFO, logger="nanobooth"):
        assert cli.main(["train", "toy/dreambooth", f"instance_data_dir={toy_subject}", "output_dir=full"]) == 2
    filled = [r.getMessage() for r in caplog.records if "subject.json" in r.getMessage()]
    assert filled == [f"instance_prompt from {toy_subject}/subject.json: 'a photo of sks dog'",
                      f"class_prompt from {toy_subject}/subject.json: 'a photo of dog'"]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="nanobooth"):  # a prompt given on the command line is not "filled in"
        cli.main(["train", "toy/dreambooth", f"instance_data_dir={toy_subject}", "output_dir=full", "instance_prompt=a sks pup"])
    assert [r.getMessage() for r in caplog.records if "subject.json" in r.getMessage()] == [  # named, not taken
        f"instance_prompt='a sks pup' is used, not {toy_subject}/subject.json's 'a photo of sks dog' (leave instance_prompt "
        "out to use the file's)", f"class_prompt from {toy_subject}/subject.json: 'a photo of dog'"]


def test_config_show_points_at_the_help_that_documents_every_key(capsys):
    import re

    from nanobooth.core.config import field_docs

    assert cli.main(["config", "show", "toy/dreambooth"]) == 0
    header = capsys.readouterr().out.splitlines()[0]
    (pointed,) = re.findall(r"`nanobooth ([^`]+)`", header)
    assert pointed == "train --help"  # not `config show` itself, which prints values without docs
    with pytest.raises(SystemExit) as e:
        cli.main(pointed.split())
    out = capsys.readouterr().out
    assert e.value.code == 0 and all(doc in out for doc in field_docs().values())


def test_train_help_after_a_variant_lists_that_variants_values(capsys, tmp_path):
    """`train VARIANT --help` shows what that variant trains with (a newcomer read SD 1.5's lr and model as the
    toy recipe's), the default beside each key it changes; overrides count; no heavy module loads."""
    with pytest.raises(SystemExit) as e:
        cli.main(["train", "toy/dreambooth-lora-prior-pre", "lora_rank=8", "--help"])
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert e.value.code == 0 and "config keys as toy/dreambooth-lora-prior-pre with lora_rank=8 sets them" in out
    assert "  model = toy   (default: stable-diffusion-v1-5/stable-diffusion-v1-5)" in lines
    assert "  lora_rank = 8   (default: 4)" in lines and "  learning_rate = 0.002   (default: 5.0e-06)" in lines
    assert "  seed = 0" in lines  # a key the variant leaves alone shows no default beside it
    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    plain = capsys.readouterr().out.splitlines()
    assert "  lora_rank = 4" in plain and not any("(default:" in line for line in plain)
    with pytest.raises(SystemExit):
        cli.main(["train", "toy/dreambooth-lora-prior-pre", "--help"])
    assert "config keys as toy/dreambooth-lora-prior-pre sets them" in capsys.readouterr().out
    assert cli.main(["train", "toy/dreambooth-lora-pror", "--help"]) == 2  # an unknown variant: its one line
    assert "did you mean 'toy/dreambooth-lora-prior-pre'" in capsys.readouterr().err
    (probe,) = run_probe([["train", "toy/dreambooth-lora-prior-pre", "--help"]], tmp_path)
    assert probe["rc"] == 0 and probe["heavy"] == [] and probe["toy"] == []


def test_a_flux_or_sd3_variant_on_another_familys_model_is_warned_about(tmp_path, caplog):
    """`flux/dreambooth-lora model=tiny` (or an SD1.5 folder) trains an SD1.5 UNet: said before training, naming
    both; a matching model, a plain SD variant and a non-folder model say nothing."""
    sd15 = tmp_path / "sd15"
    sd15.mkdir()
    (sd15 / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    flux = tmp_path / "flux"
    flux.mkdir()
    (flux / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    with caplog.at_level(logging.WARNING, logger="nanobooth"):
        cli.warn_variant_family("flux/dreambooth-lora", "tiny")
        cli.warn_variant_family("sd3/dreambooth", str(sd15))
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2
    assert "flux/dreambooth-lora" in lines[0] and "FluxPipeline" in lines[0] and "model=tiny" in lines[0]
    assert "StableDiffusion3Pipeline" in lines[1] and str(sd15) in lines[1] and "StableDiffusionPipeline" in lines[1]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="nanobooth"):
        cli.warn_variant_family("flux/dreambooth-lora", str(flux))
        cli.warn_variant_family("dreambooth-lora", str(sd15))
        cli.warn_variant_family("flux/dreambooth-lora", "black-forest-labs/FLUX.1-dev")
        cli.warn_variant_family("flux/dreambooth-lora", str(tmp_path / "missing"))
        cli.warn_variant_family("toy-flux/dreambooth-lora", "toy-flux")  # the built-in names know their family
        cli.warn_variant_family("flux/dreambooth", "tiny-flux")
        cli.warn_variant_family("toy/dreambooth", "toy")
    assert caplog.records == []
    with caplog.at_level(logging.WARNING, logger="nanobooth"):
        cli.warn_variant_family("toy/dreambooth-lora", "toy-flux")
        cli.warn_variant_family("toy-flux/dreambooth-lora", "toy")
    assert [r.getMessage().split(" is a ")[1].split(" ")[0] for r in caplog.records] == ["StableDiffusionPipeline", "FluxPipeline"]


def test_ui_without_gradio_is_one_line_naming_the_extra_and_makes_no_workspace(tmp_path, monkeypatch, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gradio" else real(name, *a))
    monkeypatch.setitem(sys.modules, "gradio", None)  # `import gradio` raises, as where it is not installed
    ws = tmp_path / "booth"
    assert cli.main(["ui", "--workspace", str(ws)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and '.[ui]' in err and "gradio" in err and "Traceback" not in err
    assert not ws.exists()


def test_ui_port_taken_or_invalid_is_one_line_and_makes_no_workspace(tmp_path, capsys):
    """A second `nanobooth ui` on the same port, or a port that is not one, was gradio's traceback (newcomer54)."""
    import socket

    pytest.importorskip("gradio")
    ws = tmp_path / "booth"
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert cli.main(["ui", "--workspace", str(ws), "--port", str(port)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"--port {port}: 127.0.0.1:{port} cannot be used" in err
    assert f"--port {port + 1}" in err and not ws.exists()
    for bad in ("99999", "0", "http"):
        with pytest.raises(SystemExit) as e:
            cli.main(["ui", "--workspace", str(ws), "--port", bad])
        assert e.value.code == 2
        assert "is not a port number (1-65535)" in capsys.readouterr().err
    assert not ws.exists()


def test_bare_train_says_what_it_needs_and_demo_seed_picks_the_subject(tmp_path, monkeypatch, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["train"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "needs a variant or a YAML file" in err and "required" not in err  # the overrides are optional
    from nanobooth import demo
    from nanobooth.core import train

    monkeypatch.setattr(demo, "speed", lambda *a: (0.02, 0.2))
    monkeypatch.setattr(train, "train", lambda cfg: (_ for _ in ()).throw(KeyboardInterrupt))
    assert cli.main(["demo", "--out", str(tmp_path / "demo"), "--seed", "7"]) == 130
    assert "demo: toy subject 7" in capsys.readouterr().out
    assert json.loads((tmp_path / "demo" / "subject" / "subject.json").read_text())["seed"] == 7


def test_unknown_model_name_suggests_the_built_in_one():
    from nanobooth.core.models import ModelError, _check_path

    with pytest.raises(ModelError, match=r"model 'toyy': .*did you mean 'toy'\? built-in names: toy, toy-flux, tiny"):
        _check_path("toyy", False)


def test_toy_eval_of_a_run_moved_away_from_its_relative_subject_says_where_it_looks(tmp_path, monkeypatch):
    """newcomer54: a copied demo run failed with only "instance_data_dir=runs/demo/subject: this folder does not
    exist"; the line now says the path is relative to where the run was trained and how to point it."""
    from nanobooth.core.config import load_config, save_config
    from nanobooth.core.data import DataError
    from nanobooth.toy.evaluate import toy_eval

    run = tmp_path / "copied"
    run.mkdir()
    save_config(load_config("toy/dreambooth-lora", ["instance_data_dir=runs/demo/subject", f"output_dir={run}"]),
                run / "config.yaml")
    (run / "pytorch_lora_weights.safetensors").write_bytes(b"")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match=r"runs/demo/subject.*relative to the folder the run was trained from: run toy "
                                        r"eval there, or set an absolute instance_data_dir in .*copied/config.yaml"):
        toy_eval(run)


def test_toy_eval_of_a_subject_outside_the_toy_world_says_its_scores_measure_nothing(tmp_path, caplog, capsys):
    """newcomer57: a run on the example dog scored subject fidelity 0.84 by the toy probe, with no word that the probe
    reads only the toy world's five classes; the line comes under the table and toy_eval.json records it."""
    run = tmp_path / "dog"
    assert cli.main(["train", "toy/dreambooth-lora", "instance_data_dir=example:dog", f"output_dir={run}",
                     "max_train_steps=1"]) == 0
    with caplog.at_level("WARNING", logger="nanobooth"):
        assert cli.main(["toy", "eval", str(run), "--images-per-prompt", "2", "--steps", "2", "--no-base"]) == 0
    assert "toy eval: the class 'dog' is not in the toy world" in caplog.text
    assert json.loads((run / "toy_eval.json").read_text())["settings"]["outside_toy_world"] is True


def test_seeds_and_counts_below_their_least_are_argparse_errors(capsys):
    """newcomer54: `toy subject --seed -1` was numpy's traceback (and left an empty folder), --num-images 0 wrote a
    subject without photos; demo --seed -1 the same traceback."""
    for argv in (["toy", "subject", "--seed", "-1", "--out", "x"], ["toy", "subject", "--seed", "3", "--out", "x",
                                                                     "--num-images", "0"], ["demo", "--seed", "-1"]):
        with pytest.raises(SystemExit) as e:
            cli.main(argv)
        assert e.value.code == 2 and "pass a whole number of at least" in capsys.readouterr().err
