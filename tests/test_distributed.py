"""`accelerate launch` with 2 CPU processes (gloo) equals one process at the same global batch."""

import json
import logging
import os
import subprocess
import sys

import pytest
import torch
from conftest import train_args
from safetensors.torch import load_file


def two_processes_and_one(launch: list, model, subject_dir, tmp_path, common: list, variant: str):
    """Train under `launch` (2 processes, batch 1 each) and in one process at batch 2: the same global batch.
    Returns the (one, two) run folders and the launch's CompletedProcess (text output)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    two, one = tmp_path / "two", tmp_path / "one"
    launched = subprocess.run(launch + train_args(model, subject_dir, two, *common, "train_batch_size=1"), env=env, check=True,
                              capture_output=True, text=True)
    subprocess.run([sys.executable, "-m", "nanobooth", "train", variant,
                    *train_args(model, subject_dir, one, *common, "train_batch_size=2")], env=env, check=True,
                   capture_output=True)
    return one, two, launched


def losses(run) -> list:
    return [json.loads(x)["loss"] for x in (run / "train_log.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_two_processes_equal_one(tiny_model, subject_dir, tmp_path):
    common = ["learning_rate=1e-3", "num_class_images=4", "max_train_steps=3"]
    # port 0 = a free one: launches in parallel test workers (pytest -n) or beside other jobs never meet on 29500
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
              "--main_process_port", "0", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "nanobooth", "train", "dreambooth-lora-prior-pre"]
    one, two, launched = two_processes_and_one(launch, tiny_model, subject_dir, tmp_path, common, "dreambooth-lora-prior-pre")
    a, b = load_file(one / "pytorch_lora_weights.safetensors"), load_file(two / "pytorch_lora_weights.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
    assert any(not torch.allclose(a[k], torch.zeros_like(a[k])) for k in a if "lora_B" in k or "lora.up" in k)
    la, lb = losses(one), losses(two)
    assert la == pytest.approx(lb, abs=1e-4) and len(lb) == 3  # one log, written by rank 0 only
    assert len(list((two / "class_images").glob("*.png"))) == 4  # generated once, not per rank
    # the console: one copy of the run, from rank 0 (every process used to print every line)
    err = launched.stderr.replace("\r", "\n").splitlines()
    count = lambda start: sum(ln.startswith(start) for ln in err)  # noqa: E731
    assert count("[nanobooth] training unet (") == 1  # the run summary
    assert count("[nanobooth] found 4 class images") == 1 and count("[nanobooth] step 3/3 loss") == 1
    assert count("[nanobooth] weights saved in") == 1 and count("[nanobooth] done:") == 0  # stdout's one line says it
    assert err.count("train:   0%|          | 0/3 [00:00<?, ?step/s]") == 1  # one progress bar: its first frame
    assert count("[nanobooth rank") == 0  # the other rank had no error to print
    assert launched.stdout.splitlines() == [f"run finished: {two}"]


@pytest.mark.slow
def test_fsdp_two_processes_equal_one_full_fine_tune_flux(tiny_flux_model, subject_dir, tmp_path):
    """FSDP2 (accelerate's plugin, transformer blocks as units) on 2 CPU processes: a full fine-tune of the tiny FLUX
    saves whole weights equal to one process's at the same global batch. accelerate runs FSDP only in accelerator
    worlds, so tests/fsdp_cpu.py marks the CPU world FSDP; sharding, gathers and the save are nanobooth's and torch's."""
    from pathlib import Path

    common = ["learning_rate=1e-4", "gradient_checkpointing=false"]
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--use_fsdp", "--fsdp_version", "2", "--num_processes", "2",
              "--num_machines", "1", "--main_process_port", "0", "--mixed_precision", "no", "--dynamo_backend", "no",
              "--fsdp_auto_wrap_policy", "TRANSFORMER_BASED_WRAP", "--fsdp_transformer_layer_cls_to_wrap", "FluxTransformerBlock,FluxSingleTransformerBlock",
              str(Path(__file__).parent / "fsdp_cpu.py"), "train", "flux/dreambooth"]
    one, two, _ = two_processes_and_one(launch, tiny_flux_model, subject_dir, tmp_path, common, "flux/dreambooth")

    def weights(run: Path) -> dict:
        return {k: v for f in sorted((run / "transformer").glob("*.safetensors")) for k, v in load_file(f).items()}

    a, b, base = weights(one), weights(two), weights(tiny_flux_model)
    assert a.keys() == b.keys() == base.keys()  # whole tensors, not shards
    assert all(a[k].shape == base[k].shape and torch.allclose(a[k], b[k], atol=1e-5) for k in a)
    assert max((a[k] - base[k]).abs().max().item() for k in a) > 1e-4  # it trained
    la, lb = losses(one), losses(two)
    assert la == pytest.approx(lb, abs=1e-4) and len(lb) == 3


def test_the_rank_comes_from_the_launcher_and_other_ranks_log_only_errors(monkeypatch, caplog):
    """train() from a script under a launcher: nanobooth's lines below ERROR only from rank 0 (the CLI also sets
    the root level, so other libraries' lines follow)."""
    from nanobooth.core.ranks import errors_only_off_main, launch_rank, rank_tag

    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.setenv("RANK", "1")
    assert launch_rank() == 1 and rank_tag() == " (rank 1)"
    monkeypatch.delenv("RANK")
    assert launch_rank() == 0 and rank_tag() == ""
    log = logging.getLogger("nanobooth")
    with caplog.at_level(logging.INFO, logger="nanobooth"):
        with errors_only_off_main(main=False):
            log.info("info"), log.warning("warning"), log.error("error")
        log.info("after")
    assert [r.getMessage() for r in caplog.records] == ["error", "after"]


RANK1_FAILS = '''import os, sys
import nanobooth.core.train as train
from nanobooth.cli import main
from nanobooth.core.errors import ModelError

if os.environ.get("RANK") == "1":  # a failure of this process alone (its node's copy of the model is broken)
    def broken(*args, **kwargs):
        raise ModelError("this copy of the model is unreadable")
    train.load_components = broken
sys.exit(main())
'''


@pytest.mark.slow
def test_an_error_of_one_process_alone_is_printed_by_it(tiny_model, subject_dir, tmp_path):
    """Rank 0 speaks for the run, but an error only rank 1 meets is printed by rank 1, marked with its rank."""
    script = tmp_path / "rank1_fails.py"
    script.write_text(RANK1_FAILS)
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
              "--main_process_port", "0", "--mixed_precision", "no", "--dynamo_backend", "no", str(script), "train", "dreambooth-lora",
              *train_args(tiny_model, subject_dir, tmp_path / "run")]
    done = subprocess.run(launch, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    ours = [ln for ln in done.stderr.splitlines() if "this copy of the model is unreadable" in ln]
    assert ours == ["nanobooth: error (rank 1): this copy of the model is unreadable"], done.stderr
