"""`accelerate launch` with 2 CPU processes (gloo) equals one process at the same global batch."""

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import train_args
from safetensors.torch import load_file


@pytest.mark.slow
def test_two_processes_equal_one(tiny_model, subject_dir, tmp_path):
    common = ["learning_rate=1e-3", "num_class_images=4", "max_train_steps=3"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
              "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "nanobooth", "train", "dreambooth-lora-prior-pre"]
    two = tmp_path / "two"
    subprocess.run(launch + train_args(tiny_model, subject_dir, two, *common, "train_batch_size=1"), env=env, check=True,
                   capture_output=True)
    one = tmp_path / "one"
    subprocess.run([sys.executable, "-m", "nanobooth", "train", "dreambooth-lora-prior-pre",
                    *train_args(tiny_model, subject_dir, one, *common, "train_batch_size=2")], env=env, check=True,
                   capture_output=True)
    a, b = load_file(one / "pytorch_lora_weights.safetensors"), load_file(two / "pytorch_lora_weights.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
    assert any(not torch.allclose(a[k], torch.zeros_like(a[k])) for k in a if "lora_B" in k or "lora.up" in k)
    la = [json.loads(x)["loss"] for x in (one / "train_log.jsonl").read_text().splitlines()]
    lb = [json.loads(x)["loss"] for x in (two / "train_log.jsonl").read_text().splitlines()]
    assert la == pytest.approx(lb, abs=1e-4) and len(lb) == 3  # one log, written by rank 0 only
    assert len(list((two / "class_images").glob("*.png"))) == 4  # generated once, not per rank
