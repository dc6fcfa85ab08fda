"""Shared fixtures: a tiny seeded SD pipeline saved to disk once per session, tiny subject photos."""

import atexit
import os
import shutil
import tempfile
from importlib import resources
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

XDIST_WORKER = os.environ.get("PYTEST_XDIST_WORKER")  # "gw0", "gw1"... under pytest-xdist (-n N), else None
if XDIST_WORKER:
    # N workers share the cores: N x torch's default (one thread per core) spin at OpenMP barriers for cores
    # another worker holds (threads.py measured 3.9x slower), so each worker gets its share, at least 1
    from nanobooth.core.threads import usable_cpus

    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1") or 1)
    torch.set_num_threads(max(1, min(2, usable_cpus() // workers)))
    # gradio keeps uploads and served files in one folder per machine unless told: one per worker
    os.environ["GRADIO_TEMP_DIR"] = tempfile.mkdtemp(prefix=f"nanobooth-tests-gradio-{XDIST_WORKER}-")
    atexit.register(shutil.rmtree, os.environ["GRADIO_TEMP_DIR"], ignore_errors=True)
else:
    torch.set_num_threads(min(2, torch.get_num_threads()))
# A fixed thread count for every run a test starts, in-process or not: nanobooth otherwise picks one from
# the cores free at that moment (threads.py), and bit-exact comparisons need one reduction order.
os.environ["OMP_NUM_THREADS"] = str(torch.get_num_threads())


# Under `-n N --dist loadfile` a run lasts at least as long as its longest file, so the long ones start first
# (tests/test_toy_claims.py alone is most of a worker's time); xdist's own order (files with the most tests
# first) would start them last.
LONG_FILES = ("test_toy_claims.py", "test_demo.py", "test_toy_pretrain.py", "test_interrupt.py",
              "test_reliability.py", "test_distributed.py")


def pytest_configure(config):
    if getattr(config.option, "dist", "no") != "no":
        config.option.loadscopereorder = False  # keep the order below (xdist's --no-loadscope-reorder)


def pytest_collection_modifyitems(config, items):
    if XDIST_WORKER:  # every worker sorts alike: xdist checks that all collected the same order
        rank = {name: i for i, name in enumerate(LONG_FILES)}
        items.sort(key=lambda item: rank.get(item.path.name, len(LONG_FILES)))  # stable: files keep their order


@pytest.fixture(scope="session", autouse=True)
def _cache(tmp_path_factory):
    os.environ["NANOBOOTH_CACHE"] = str(tmp_path_factory.mktemp("nanobooth-cache"))
    # class images stay in each run's folder unless a test asks for the shared cache (class_image_cache=PATH):
    # tests that count or interrupt class-image generation must not see another test's images
    os.environ["NANOBOOTH_CLASS_IMAGE_CACHE"] = "none"


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    from nanobooth.tiny import build_tiny_pipeline

    return build_tiny_pipeline(tmp_path_factory.mktemp("models") / "tiny-sd")


@pytest.fixture(scope="session")
def tiny_sdxl_model(tmp_path_factory) -> Path:
    from nanobooth.tiny import build_tiny_sdxl_pipeline

    return build_tiny_sdxl_pipeline(tmp_path_factory.mktemp("models") / "tiny-sdxl")


@pytest.fixture(scope="session")
def tiny_sd3_model(tmp_path_factory) -> Path:
    from nanobooth.tiny import build_tiny_sd3_pipeline

    return build_tiny_sd3_pipeline(tmp_path_factory.mktemp("models") / "tiny-sd3")


@pytest.fixture(scope="session")
def tiny_flux_model(tmp_path_factory) -> Path:
    from nanobooth.tiny import build_tiny_flux_pipeline

    return build_tiny_flux_pipeline(tmp_path_factory.mktemp("models") / "tiny-flux")


@pytest.fixture(scope="session")
def tiny_vpred_model(tmp_path_factory, tiny_model) -> Path:
    """The tiny model with an SD2-style v-prediction scheduler."""
    path = tmp_path_factory.mktemp("models") / "tiny-sd-v"
    shutil.copytree(tiny_model, path)
    cfg = path / "scheduler" / "scheduler_config.json"
    cfg.write_text(cfg.read_text().replace('"prediction_type": "epsilon"', '"prediction_type": "v_prediction"'))
    return path


TOY_V5_FLAGS = ["--recipe", "v5", "--n-images", "40", "--n-plain", "12", "--n-patterned", "12", "--vae-steps", "2",
                "--vae-batch", "4", "--vae-refine-steps", "1", "--vae-refine-subjects", "2", "--decoder-refine-steps", "1",
                "--unet-batch", "2", "--threads", "1"]


@pytest.fixture(scope="session")
def toy_v5_base(tmp_path_factory) -> Path:
    """The toy recipe v5 at toy scale (TOY_V5_FLAGS), one stage-2 step: its data, autoencoder and cached latents."""
    from nanobooth.toy.recipes import autoencoder, pretrain

    out = tmp_path_factory.mktemp("toy_v5") / "pre"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(autoencoder, "HELD_APART", 16)  # encoding 512 held-apart scenes after each stage: most of the time
        assert pretrain.main(TOY_V5_FLAGS + ["--out", str(out), "--unet-steps", "1"]) == 0
    return out


@pytest.fixture(scope="session")
def subject_dir(tmp_path_factory) -> Path:
    """Three of the shipped dog photos at 48 px: real photos, CPU-cheap."""
    src = Path(str(resources.files("nanobooth") / "assets" / "examples" / "dog"))
    out = tmp_path_factory.mktemp("dog")
    for p in sorted(src.glob("*.jpg"))[:3]:
        img = Image.open(p).convert("RGB")
        img.thumbnail((48, 48))
        img.save(out / (p.stem + ".png"))
    return out


def step2_resume_folder(full, part, class_images: bool = False):
    """A new run folder holding `full`'s config and its step-2 checkpoint (and class images), to resume from."""
    part.mkdir()
    shutil.copy(full / "config.yaml", part / "config.yaml")
    shutil.copytree(full / "checkpoints" / "checkpoint-000002", part / "checkpoints" / "checkpoint-000002")
    if class_images:
        shutil.copytree(full / "class_images", part / "class_images")
    return part


def train_args(model: Path, subject: Path, out: Path, *extra: str, prior: bool = True) -> list[str]:
    """Overrides that make any packaged variant a seconds-long CPU run on the tiny model. prior=False leaves out the
    class-image keys, which a variant without prior preservation names as unread in a warning line each (for the
    tests that count a refusal's lines)."""
    class_keys = ["num_class_images=2", "class_generation_steps=2", "sample_batch_size=2"] if prior else []
    return [f"model={model}", f"instance_data_dir={subject}", f"output_dir={out}", "resolution=32",
            "max_train_steps=3", *class_keys,
            "validation_prompts=[]", "validation_inference_steps=2", "mixed_precision=no", "checkpointing_steps=0",
            "train_batch_size=1", *extra]


def fixed_noise_batch(c) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x, noise, t, noisy) for components `c` (load_components): 2 latents [2, C, 4, 4] at timesteps 300 and 700,
    noisy = c.noise_scheduler.add_noise(x, noise, t). Its own generator (seed 0): the same batch every call."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, c.unet.config.in_channels, 4, 4, generator=g)
    noise = torch.randn(x.shape, generator=g)
    t = torch.tensor([300, 700])
    return x, noise, t, c.noise_scheduler.add_noise(x, noise, t)


def cond_batch(cond: dict, n: int = 2) -> dict:
    """One prompt's conditioning (family.encode: tensors [1, ...], and dicts of them such as SDXL's added_cond_kwargs)
    expanded to a batch of `n` (views, no copy), the batch fixed_noise_batch draws."""
    return {k: v.expand(n, *v.shape[1:]) if torch.is_tensor(v) else {kk: vv.expand(n, *vv.shape[1:]) for kk, vv in v.items()}
            for k, v in cond.items()}
