import numpy as np
import pytest
import torch

from nanobooth.inference.generate import grid, render
from nanobooth.core.models import load_pipeline


def test_render_is_seeded_per_prompt_and_leaves_global_rng_alone(tiny_model):
    pipe = load_pipeline(str(tiny_model))
    pipe.set_progress_bar_config(disable=True)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a = render(pipe, ["a sks dog", "a dog"], num_images=2, seed=3, steps=2, batch_size=4)
    assert torch.equal(torch.get_rng_state(), state)
    b = render(pipe, ["a sks dog"], num_images=2, seed=3, steps=2, batch_size=1)
    for j in range(2):
        diff = np.abs(np.asarray(a[0][j], dtype=float) - np.asarray(b[0][j], dtype=float)).max()
        assert diff <= 2  # same picture whatever the batch composition
    assert np.abs(np.asarray(a[0][0], dtype=float) - np.asarray(a[0][1], dtype=float)).max() > 0
    g = grid(a, ["a sks dog", "a dog"], title="t")
    assert g.size[0] >= 2 * 128 and g.size[1] > 2 * 128



def test_dpm_sampler_is_a_copy_that_samples_differently_and_flow_matching_is_refused(tiny_model, tiny_flux_model):
    from nanobooth.core.errors import ModelError
    from nanobooth.inference.generate import with_sampler
    from nanobooth.methods import embeddings

    pipe = load_pipeline(str(tiny_model))
    pipe.set_progress_bar_config(disable=True)
    assert with_sampler(pipe, "model") is pipe
    dpm = with_sampler(pipe, "dpm++")
    assert type(dpm.scheduler).__name__ == "DPMSolverMultistepScheduler" and dpm.unet is pipe.unet
    assert type(pipe.scheduler).__name__ != "DPMSolverMultistepScheduler"  # the caller's pipeline keeps its sampler
    assert dpm.scheduler.config.beta_schedule == pipe.scheduler.config.beta_schedule  # the model's noise schedule
    # a textual-inversion or pivotal run's identifier rewrite goes with the copy (toy eval and generate sample with it)
    setattr(pipe, embeddings.TOKEN_MAP, {"sks": "<s0><s1>"})
    assert getattr(with_sampler(pipe, "dpm++"), embeddings.TOKEN_MAP) == {"sks": "<s0><s1>"}
    delattr(pipe, embeddings.TOKEN_MAP)
    a, b = (render(p, ["a sks dog"], num_images=1, seed=3, steps=3)[0][0] for p in (pipe, dpm))
    assert np.abs(np.asarray(a, dtype=float) - np.asarray(b, dtype=float)).max() > 0
    flux = load_pipeline(str(tiny_flux_model))
    with pytest.raises(ModelError, match="flow matching.*--sampler model"):
        with_sampler(flux, "dpm++")
    with pytest.raises(ValueError, match="model, dpm\\+\\+"):
        with_sampler(pipe, "euler")
    # auto: DPM-Solver++ for the DDPM model, the flow-matching model's own Euler
    assert type(with_sampler(pipe, "auto").scheduler).__name__ == "DPMSolverMultistepScheduler"
    assert with_sampler(flux, "auto") is flux

def _unet_batches(pipe):
    sizes = []
    pipe.unet.register_forward_pre_hook(lambda mod, args: sizes.append(args[0].shape[0]))
    return sizes


def test_guidance_cutoff_guides_only_the_first_steps(tiny_model):
    pipe = load_pipeline(str(tiny_model))
    pipe.set_progress_bar_config(disable=True)
    sizes = _unet_batches(pipe)
    prompts = ["a sks dog", "a dog"]
    full = render(pipe, prompts, num_images=2, seed=3, steps=4, guidance=5.0, batch_size=4)
    assert sizes == [8] * 4  # unconditional + conditional halves at every step
    sizes.clear()
    cut = render(pipe, prompts, num_images=2, seed=3, steps=4, guidance=5.0, batch_size=4, guidance_cutoff=0.5)
    assert sizes == [8, 8, 4, 4]  # guided for half the steps, then the conditional half alone
    diff = max(np.abs(np.asarray(f, dtype=float) - np.asarray(c, dtype=float)).max()
               for rf, rc in zip(full, cut) for f, c in zip(rf, rc))
    assert diff > 0
    # each image keeps its own prompt after the cutoff, whatever the batch holds (diffusers' own cutoff
    # callback keeps one image's embeddings and fails on batches like this one)
    one = render(pipe, prompts, num_images=2, seed=3, steps=4, guidance=5.0, batch_size=1, guidance_cutoff=0.5)
    for rc, ro in zip(cut, one):
        for c, o in zip(rc, ro):
            assert np.abs(np.asarray(c, dtype=float) - np.asarray(o, dtype=float)).max() <= 2
    with pytest.raises(ValueError, match="guidance_cutoff"):
        render(pipe, prompts, steps=2, guidance_cutoff=0.0)


def test_guidance_cutoff_on_sdxl_drops_the_extra_conditioning_too(tiny_sdxl_model):
    pipe = load_pipeline(str(tiny_sdxl_model))
    pipe.set_progress_bar_config(disable=True)
    sizes = _unet_batches(pipe)
    rows = render(pipe, ["a sks dog", "a dog"], num_images=1, seed=0, steps=3, guidance=5.0, batch_size=2,
                  guidance_cutoff=0.34)
    assert sizes == [4, 2, 2] and all(len(r) == 1 for r in rows)


@pytest.mark.parametrize("argv", [["generate", "--model", "toy", "--prompt", "a dog", "--out", "unused"],
                                  ["toy", "eval", "unused"]])
def test_cli_rejects_a_guidance_cutoff_outside_0_1_before_loading_anything(argv, capsys):
    from nanobooth.cli import main

    with pytest.raises(SystemExit) as exc:
        main(argv + ["--guidance-cutoff", "1.5"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--guidance-cutoff" in err and "(0, 1]" in err


# --- generate --weights RUN samples like the run's own grids --------------------------------------------------

def _generate_with(monkeypatch, tmp_path, run, *flags):
    """`nanobooth generate` through the CLI, with loading and rendering replaced by recorders."""
    from PIL import Image

    from nanobooth.inference import generate as G
    from nanobooth.inference import generate_cli as GC
    from nanobooth.cli import main

    calls = {}

    class Pipe:
        def to(self, device):
            return self

    def fake_render(pipe, prompts, num_images=1, seed=0, steps=25, guidance=7.5, resolution=None, batch_size=8,
                    guidance_cutoff=1.0):
        calls.update(steps=steps, guidance=guidance, resolution=resolution, guidance_cutoff=guidance_cutoff)
        return [[Image.new("RGB", (8, 8))] * num_images for _ in prompts]

    monkeypatch.setattr(GC, "check_weights", lambda weights: None)  # the run folder holds a config.yaml alone
    monkeypatch.setattr(G, "check_weights", lambda weights: None)
    monkeypatch.setattr(G, "load_run", lambda *a, **k: Pipe())
    monkeypatch.setattr(G, "render", fake_render)
    monkeypatch.setattr(G, "with_sampler", lambda pipe, sampler: calls.update(sampler=sampler) or pipe)
    weights = ["--weights", str(run)] if run else []
    assert main(["generate", "--model", "tiny", *weights, "--prompt", "a sks dog", "--num-images", "1",
                 "--out", str(tmp_path / "out"), "--overwrite", *flags]) == 0  # each call replaces the last one's
    return calls


def test_generate_defaults_to_the_runs_sampling_settings_and_flags_override(monkeypatch, tmp_path):
    from nanobooth.core.config import load_config, save_config

    run = tmp_path / "run"
    run.mkdir()
    save_config(load_config("toy/dreambooth-lora-prior-pre", ["validation_inference_steps=17", "validation_guidance_scale=3.5",
                                                               "validation_guidance_cutoff=0.5", "resolution=48"]),
                run / "config.yaml")
    ran = dict(steps=17, guidance=3.5, resolution=48, guidance_cutoff=0.5, sampler="dpm++")  # the toy variants' dpm++
    assert _generate_with(monkeypatch, tmp_path, run) == ran
    assert _generate_with(monkeypatch, tmp_path, run, "--steps", "9", "--guidance", "2", "--guidance-cutoff", "1",
                          "--resolution", "64", "--sampler", "model") == dict(steps=9, guidance=2.0, resolution=64,
                                                                            guidance_cutoff=1.0, sampler="model")
    assert _generate_with(monkeypatch, tmp_path, run, "--guidance", "6") == {**ran, "guidance": 6.0}
    # a base model without a run: generate's own defaults
    assert _generate_with(monkeypatch, tmp_path, None) == dict(steps=30, guidance=7.5, resolution=None, guidance_cutoff=1.0,
                                                               sampler="model")


# --- grid labels ------------------------------------------------------------------------------------------------

def _gaps(strip) -> list[int]:
    """Widths of the blank column runs between the first and last inked column of a label strip."""
    ink = (np.asarray(strip.convert("L")) < 128).any(0)
    cols = np.flatnonzero(ink)
    runs, n = [], 0
    for x in range(cols[0], cols[-1] + 1):
        if ink[x]:
            if n:
                runs.append(n)
            n = 0
        else:
            n += 1
    return runs


def test_grid_labels_keep_their_spaces():
    from PIL import Image

    label = "a photo of a sks star"
    g = grid([[Image.new("RGB", (64, 64), "white")]], [label])
    strip = g.crop((0, 0, g.size[0], 13))
    # every space is a visible gap, wider than any gap between two letters of a word
    assert sum(w >= 4 for w in _gaps(strip)) == label.count(" ")
    squeezed = grid([[Image.new("RGB", (64, 64), "white")]], ["a photo of a sksstar"]).crop((0, 0, g.size[0], 13))
    assert sum(w >= 4 for w in _gaps(squeezed)) == label.count(" ") - 1


def test_a_long_title_wraps_within_the_grid():
    from PIL import Image

    one = [[Image.new("RGB", (64, 64), "white")]]
    short = grid(one, ["a dog"], title="run step 20")
    long = grid(one, ["a dog"], title="photos-dreambooth-lora-20261206-182538 step 20 of a longer run name")
    assert long.size[0] == short.size[0] and long.size[1] >= short.size[1] + 12  # another line, not cut at the edge
    ink = [x for x in range(long.size[0]) for y in range(28) if long.getpixel((x, y)) != (255, 255, 255)]
    assert max(ink) < long.size[0] - 2
    # one word longer than the grid (a run's name, newcomer55's "...20261206-184") is cut into lines, every letter kept
    from nanobooth.inference.generate import label_font, wrap_label

    name = "toy-dreambooth-lora-prior-pre-20261206-184350-and-some-more"
    lines = wrap_label(name, label_font(), 248)
    assert len(lines) >= 2 and "".join(lines) == name
    assert all(label_font().getlength(ln) <= 248 for ln in lines)


def test_long_labels_wrap_at_spaces_and_keep_every_word():
    from nanobooth.inference.generate import label_font, wrap_label

    font = label_font()
    text = "a photo of a sks dog on the beach, at night, with a red ball in its mouth and a lighthouse behind it"
    lines = wrap_label(text, font, 256)
    assert len(lines) > 1 and " ".join(lines) == text
    assert all(font.getlength(ln) <= 256 for ln in lines)
    assert wrap_label("a   sks\tdog", font, 256) == ["a sks dog"]
    assert wrap_label("", font, 256) == [""]


def _fake_run(folder, name, tensors, metadata=None):
    from safetensors.torch import save_file

    folder.mkdir()
    save_file(tensors, str(folder / name), metadata=metadata)
    return folder


def test_weights_of_another_base_model_are_one_line_naming_the_run(tiny_model, tmp_path):
    """A run's tensors that do not fit --model (a toy run rendered on another model) are a ModelError naming
    --weights and --model, not diffusers' shape traceback (nor its logged state-dict dump)."""
    from nanobooth.core.models import ModelError
    from nanobooth.inference.generate import load_run

    ti = _fake_run(tmp_path / "ti", "ti_emb.safetensors", {"clip_l": torch.zeros(1, 7)},
                   {"token_abstraction": "sks", "tokens": "<s0>"})
    with pytest.raises(ModelError, match="--weights '.*ti' does not fit --model"):
        load_run(str(tiny_model), str(ti))
    key = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    lora = _fake_run(tmp_path / "lora", "pytorch_lora_weights.safetensors",
                     {f"{key}.lora_A.weight": torch.zeros(4, 7), f"{key}.lora_B.weight": torch.zeros(7, 4)})
    with pytest.raises(ModelError, match="--weights '.*lora' does not fit --model"):
        load_run(str(tiny_model), str(lora))


def _lora_keys(run):
    from safetensors import safe_open

    with safe_open(str(run / "pytorch_lora_weights.safetensors"), "pt") as f:
        return list(f.keys())


@pytest.mark.parametrize("method", ["lora", "lokr"])
def test_a_run_of_another_model_family_is_one_line_not_the_base_models_images(method, tiny_model, tiny_flux_model,
                                                                                subject_dir, tmp_path, capsys):
    """A FLUX run rendered with --model an SD model: diffusers loads only the LoRA keys of components the pipeline has
    (no transformer here) and peft only those of modules it finds, so generate wrote the base model's images as the
    run's ("wrote 4 images", no warning). Its adapter attaching to nothing is now the one line naming the run's model."""
    from conftest import train_args

    from nanobooth.cli import main

    run, out = tmp_path / "run", tmp_path / "g"
    assert main(["train", "flux/dreambooth-lora", *train_args(tiny_flux_model, subject_dir, run, "max_train_steps=1",
                                                               "gradient_checkpointing=false", f"method={method}")]) == 0
    n = len(_lora_keys(run))
    capsys.readouterr()
    assert main(["generate", "--model", str(tiny_model), "--weights", str(run), "--prompt", "a sks dog", "--steps", "1",
                 "--out", str(out)]) == 2
    captured = capsys.readouterr()
    said = (f"--weights '{run}' does not fit --model '{tiny_model}' (none of its adapter's {n} tensors matched the model's "
            f"modules); pass the base model the run was trained on: --model {tiny_flux_model} (its config.yaml)")
    assert said in captured.err and "wrote" not in captured.out
    assert not list(out.glob("*.png"))
    # on its own base model the same run renders
    assert main(["generate", "--weights", str(run), "--prompt", "a sks dog", "--steps", "1", "--out", str(out)]) == 0
    assert (out / "grid.png").is_file()


def test_a_run_that_attaches_to_part_of_the_model_is_one_line_without_the_libraries_key_lists(
        tiny_model, tiny_sdxl_model, tiny_flux_model, tiny_sd3_model, subject_dir, tmp_path, recwarn):
    """An SD3 run (transformer and both CLIPs) on FLUX: peft puts the adapters whose module names FLUX shares and warns
    of the others in one long line of module names; on SDXL (the tester's case) its CLIP adapters go into text encoders
    with more layers, transformers logs two MISSING-key tables, and the transformer's adapters go nowhere; on SD
    nothing attaches. Each is now load_run's one line, and the libraries' lists are not shown."""
    import logging
    import re

    from conftest import train_args
    from transformers.utils import logging as tlog

    from nanobooth.cli import main
    from nanobooth.core.models import ModelError
    from nanobooth.inference.generate import load_run

    run = tmp_path / "run"
    assert main(["train", "sd3/dreambooth-lora", *train_args(tiny_sd3_model, subject_dir, run, "max_train_steps=1",
                                                              "gradient_checkpointing=false", "train_text_encoder=true")]) == 0
    n = len(_lora_keys(run))
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    verbosity = tlog.get_verbosity()
    tlog.set_verbosity_warning()  # the CLI's error level would hide transformers' table anyway
    for lib in ("transformers", "diffusers"):
        logging.getLogger(lib).addHandler(handler)
    recwarn.clear()
    try:
        for model in (tiny_flux_model, tiny_sdxl_model):
            with pytest.raises(ModelError) as e:
                load_run(str(model), str(run))
            m = re.search(r"\((\d+) of its adapter's (\d+) tensors matched none of the model's modules\); pass the base "
                          r"model the run was trained on: --model (\S+) \(its config.yaml\)", str(e.value))
            assert m and 0 < int(m[1]) < int(m[2]) == n and m[3] == str(tiny_sd3_model), str(e.value)
        with pytest.raises(ModelError, match=f"\\(none of its adapter's {n} tensors matched the model's modules\\)"):
            load_run(str(tiny_model), str(run))
    finally:
        for lib in ("transformers", "diffusers"):
            logging.getLogger(lib).removeHandler(handler)
        tlog.set_verbosity(verbosity)
    assert not [w for w in recwarn if "PEFT" in str(w.message)]
    assert not [r for r in records if r.levelno >= logging.WARNING], [r.getMessage()[:200] for r in records]


def test_library_output_held_during_a_load_comes_out_when_the_run_fits():
    """The hold that keeps peft's and transformers' key lists back for a run that does not fit replays them otherwise."""
    import logging
    import warnings

    from nanobooth.inference.generate import _HeldLibraryOutput

    records = []
    handler = logging.Handler()
    handler.emit = records.append
    lib = logging.getLogger("diffusers")
    lib.addHandler(handler)
    level = logging.getLogger("diffusers.loaders.peft").level
    logging.getLogger("diffusers.loaders.peft").setLevel(logging.WARNING)
    try:
        for keep in (True, False):
            records.clear()
            with warnings.catch_warnings(record=True) as seen:
                warnings.simplefilter("always")
                held = _HeldLibraryOutput()
                with held:
                    warnings.warn("peft's notice", RuntimeWarning)
                    logging.getLogger("diffusers.loaders.peft").warning("diffusers' notice")
                assert not seen and not records  # held while loading
                if not keep:
                    held.drop()
                held.replay()
            assert [str(w.message) for w in seen] == (["peft's notice"] if keep else [])
            assert [r.getMessage() for r in records] == (["diffusers' notice"] if keep else [])
        assert lib.handlers[-1] is handler  # the library's handlers are back
    finally:
        lib.removeHandler(handler)
        logging.getLogger("diffusers.loaders.peft").setLevel(level)


def test_generate_cli_counts_one_image_in_the_singular(monkeypatch, tmp_path, capsys):
    """newcomer12: `--num-images 1` printed "wrote 1 images"."""
    from types import SimpleNamespace

    from PIL import Image

    from nanobooth.inference import generate as gen
    from nanobooth.inference.generate_cli import generate_cli

    args = SimpleNamespace(model="toy", prompt=["a sks dog"], weights=None, num_images=1, seed=0, steps=2, guidance=4.0,
                           guidance_cutoff=None, resolution=None, out=str(tmp_path), device=None, dtype=None, tome_ratio=0.0,
                           allow_pickle=False, single_file_config=None, sampler=None, overwrite=False)
    for n, said in ((1, "wrote 1 image and grid.png"), (2, "wrote 2 images and grid.png")):
        monkeypatch.setattr(gen, "generate", lambda *a, n=n, **k: [Image.new("RGB", (8, 8))] * n)
        generate_cli(args)  # imports generate from its module when it runs: the replacement above
        assert capsys.readouterr().out.startswith(said + f" to {tmp_path}")


def test_weights_that_are_not_there_or_not_a_run_are_one_line_each(tmp_path):
    from nanobooth.core.models import ModelError
    from nanobooth.inference.generate import load_run

    with pytest.raises(ModelError, match="--weights '.*gone': nothing is there; pass a finished nanobooth run folder"):
        load_run("toy", str(tmp_path / "gone"))
    (tmp_path / "notes").mkdir()
    with pytest.raises(ModelError, match="--weights '.*notes': no pytorch_lora_weights.safetensors, model_index.json"):
        load_run("toy", str(tmp_path / "notes"))
    (tmp_path / "mine-kohya.safetensors").write_bytes(b"")  # newcomer55: an exported LoRA file
    with pytest.raises(ModelError, match="mine-kohya.safetensors' is a file; --weights takes a nanobooth run folder"):
        load_run("toy", str(tmp_path / "mine-kohya.safetensors"))


def test_generate_flags_that_cannot_render_are_one_line_and_an_earlier_out_is_kept(tmp_path, capsys):
    """newcomer54: --num-images 0 was an IndexError traceback, --steps 0 wrote noise, --resolution 50 was diffusers'
    traceback, --out FILE a FileExistsError, and a second run into the same --out left the first one's images beside
    its own."""
    from nanobooth import cli
    from nanobooth.inference.generate_cli import check_out_folder

    base = ["generate", "--model", "toy", "--prompt", "a sks dog"]
    for flag, value, said in (("--num-images", "0", "pass a whole number of at least 1"), ("--steps", "-3", "of at least 1"),
                              ("--resolution", "50", "50 is not a multiple of 8; try 48 or 56"),
                              ("--resolution", "4", "4 is not a multiple of 8; try 8\n"),  # not "try 8 or 8"
                              ("--resolution", "0", "of at least 1")):
        with pytest.raises(SystemExit) as e:
            cli.main([*base, "--out", str(tmp_path / "g"), flag, value])
        assert e.value.code == 2 and said in capsys.readouterr().err
    (tmp_path / "afile").write_text("x")
    assert cli.main([*base, "--out", str(tmp_path / "afile")]) == 2
    err = capsys.readouterr().err
    assert f"--out '{tmp_path / 'afile'}' is a file; pass a folder" in err and "Traceback" not in err
    out = tmp_path / "earlier"
    out.mkdir()
    for name in ("prompt00-00.png", "prompt00-01.png", "grid.png", "notes.txt"):
        (out / name).write_text("x")
    assert cli.main([*base, "--out", str(out)]) == 2
    assert "holds an earlier generate's images (3 files)" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["grid.png", "notes.txt", "prompt00-00.png", "prompt00-01.png"]
    check_out_folder(out, overwrite=True)  # --overwrite: only what generate writes goes
    assert [p.name for p in out.iterdir()] == ["notes.txt"]


def test_generate_takes_the_base_model_from_the_run_when_model_is_not_given(tmp_path):
    # newcomer55: --model was required though the run's config.yaml records it
    from nanobooth.core.config import ConfigError, load_config, save_config
    from nanobooth.inference.generate_cli import base_model_of

    save_config(load_config("toy/dreambooth-lora", ["model=toy-flux"]), tmp_path / "config.yaml")
    assert base_model_of(None, str(tmp_path)) == "toy-flux"
    assert base_model_of("tiny", str(tmp_path)) == "tiny"  # given wins
    with pytest.raises(ConfigError, match="--model: pass the base model to render.*defaults to the model the run trained on"):
        base_model_of(None, None)


def test_a_runs_adapters_load_without_the_libraries_loading_bars(tiny_model, subject_dir, tmp_path, capsys):
    # newcomer55: the demo's toy eval printed transformers' "Loading weights: 0/32" for the text encoder's LoRA
    from conftest import train_args

    from nanobooth.cli import main
    from nanobooth.inference.generate import load_run

    run = tmp_path / "run"
    assert main(["train", "dreambooth-lora", *train_args(tiny_model, subject_dir, run, "max_train_steps=1",
                                                           "train_text_encoder=true")]) == 0
    capsys.readouterr()
    load_run(str(tiny_model), str(run))
    assert "Loading weights" not in capsys.readouterr().err


def test_an_export_folder_as_weights_is_refused_before_any_model_loads(tiny_model, subject_dir, tmp_path, monkeypatch, capsys):
    """Tester: `generate --weights EXPORTS` (the folder `nanobooth export` wrote into) loaded the whole base model before
    refusing (minutes on a real one); with one pivotal run's export there (a kohya LoRA and its A1111 embedding, which
    looks like a textual-inversion run) it rendered the base model with no tokens loaded. Now one line, nothing loaded."""
    from conftest import train_args

    from nanobooth.cli import main
    from nanobooth.core import models
    from nanobooth.inference import generate as gen

    run, exports, one = tmp_path / "run", tmp_path / "exports", tmp_path / "one-export"
    assert main(["train", "dreambooth-lora", *train_args(tiny_model, subject_dir, run, "max_train_steps=1",
                                                           "train_text_encoder_ti=true")]) == 0
    for fmt, folder in (("kohya", exports), ("single-file", exports), ("kohya", one)):
        assert main(["export", str(run), "--format", fmt, "--out", str(folder / f"dog-{fmt}.safetensors")]) == 0
    capsys.readouterr()

    def no_loading(*a, **k):
        raise AssertionError("a model loaded before --weights was refused")

    monkeypatch.setattr(gen, "load_pipeline", no_loading)
    monkeypatch.setattr(models, "load_pipeline", no_loading)
    base = ["generate", "--prompt", "a sks dog", "--out", str(tmp_path / "gen")]
    for folder, model in ((exports, []), (one, ["--model", str(tiny_model)])):
        assert main([*base, *model, "--weights", str(folder)]) == 2
        err = capsys.readouterr().err
        assert len(err.splitlines()) == 1 and "Traceback" not in err, err
        assert f"--weights '{folder}' is an export folder (kohya LoRA dog-kohya.safetensors, A1111/ComfyUI embedding " in err
        assert "pass the run folder they were exported from" in err
        # a single-file checkpoint renders as --model (generate takes one)
        assert (f"pass --model {exports / 'dog-single-file.safetensors'}" in err) == (folder == exports)
    assert main([*base, "--weights", str(exports / "dog-kohya.safetensors")]) == 2
    assert f"--weights '{exports / 'dog-kohya.safetensors'}' is a file (kohya LoRA); " in capsys.readouterr().err
    assert main([*base, "--weights", str(tmp_path)]) == 2  # the folder above the runs: which one holds a result
    assert "it holds results in its sub-folders run: pass one" in capsys.readouterr().err
    stopped = tmp_path / "stopped"  # newcomer56: a copy of an interrupted run (its checkpoint, no weights)
    (stopped / "checkpoints" / "checkpoint-000002").mkdir(parents=True)
    (stopped / "checkpoints" / "checkpoint-000002" / "state.json").write_text('{"step": 2}')
    assert main([*base, "--model", str(tiny_model), "--weights", str(stopped)]) == 2
    assert (f"it is a run stopped at step 2 (its last checkpoint): finish it with `nanobooth train {stopped / 'config.yaml'} "
            f"output_dir={stopped} resume_from_checkpoint=latest`, then pass it here") in capsys.readouterr().err
    monkeypatch.undo()
    gen.load_run(str(tiny_model), str(run))  # the run itself still loads
