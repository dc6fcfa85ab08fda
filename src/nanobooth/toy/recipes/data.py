"""The pretraining data of the toy model and its FLUX twin: renders of the toy world (resumable, saved in parts)
and their latent cache (posterior mean and std of each image, fp16 safetensors)."""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from nanobooth.toy import world
from nanobooth.toy.recipes.ckpt import add_time, to_tensor

log = logging.getLogger("nanobooth.toy.recipes.data")
RENDER_PART = 2000  # images rendered per saved part (a stopped render resumes at the next part)


def _render_set(path: Path, n: int, rng: np.random.Generator, plain: bool, desc: str, patterned: bool = False):
    spec_path = path.with_suffix(".json")
    if path.exists() and spec_path.exists():
        specs = [world.Spec(**d) for d in json.loads(spec_path.read_text())]
        return np.load(path, allow_pickle=False), specs
    log.info("rendering %d %s", n, desc)
    t = time.time()
    specs = [world.sample_patterned_spec(rng, plain=bool(i % 2)) if patterned else world.sample_spec(rng, plain=plain)
             for i in range(n)]
    # rendered in parts, each saved as it completes: a stopped run picks up at the next part
    parts, chunk = [], RENDER_PART
    bar = tqdm(total=n, desc="render", mininterval=10)
    for k in range(0, n, chunk):
        part = path.with_name(f"{path.stem}.part{k // chunk}.npy")
        if part.exists():
            parts.append(np.load(part, allow_pickle=False))
        else:
            parts.append(np.stack([np.asarray(world.render(s)) for s in specs[k:k + chunk]]))
            with open(part.with_suffix(".tmp"), "wb") as f:
                np.save(f, parts[-1], allow_pickle=False)
            part.with_suffix(".tmp").replace(part)
        bar.update(len(parts[-1]))
    bar.close()
    imgs = np.concatenate(parts)
    np.save(path, imgs, allow_pickle=False)
    spec_path.write_text(json.dumps([s.__dict__ for s in specs]))
    for k in range(0, n, chunk):
        path.with_name(f"{path.stem}.part{k // chunk}.npy").unlink()
    log.info("rendered in %.0fs", time.time() - t)
    add_time(path.parent, "render_seconds", time.time() - t)
    return imgs, specs


def load_or_render_data(out: Path, n: int, seed: int, n_plain: int = 0, n_patterned: int = 0):
    """n scenes, then n_plain objects on the plain backdrop, then n_patterned patterned/marked objects
    (recipe v5; half on the plain backdrop, half in scenes). The plain ones matter for DreamBooth:
    subjects' instance images are shot on that backdrop, and a base model that has never seen it
    makes the fine-tune learn the backdrop along with the subject, binding it to the identifier
    ("a sks star on the beach" then comes out on the backdrop). Real base models have seen
    countless product shots; captions leave the backdrop unnamed, as people do."""
    imgs, specs = _render_set(out / f"data_seed{seed}_n{n}.npy", n, np.random.default_rng([seed, 5]), False,
                              "training scenes")
    if n_plain:
        p_imgs, p_specs = _render_set(out / f"data_seed{seed}_plain{n_plain}.npy", n_plain,
                                      np.random.default_rng([seed, 6]), True, "plain-backdrop images")
        imgs, specs = np.concatenate([imgs, p_imgs]), specs + p_specs
    if n_patterned:
        q_imgs, q_specs = _render_set(out / f"data_seed{seed}_patterned{n_patterned}.npy", n_patterned,
                                      np.random.default_rng([seed, 7]), False, "patterned objects", patterned=True)
        imgs, specs = np.concatenate([imgs, q_imgs]), specs + q_specs
    return imgs, specs


LATENT_CACHES = (("vae_centred", "latents_centred.safetensors"), ("vae_refined", "latents_refined.safetensors"),
                 (None, "latents.safetensors"))  # the first whose autoencoder folder exists


def encode_latents(out: Path, vae, imgs: np.ndarray):
    """Posterior mean/std of every image, cached. The cache may hold a prefix of imgs (images added to
    the data later, e.g. the plain-backdrop set): only the rest is encoded."""
    # one cache per latent space: stages 1c and 1e move it
    path = out / next(f for d, f in LATENT_CACHES if d is None or (out / d / "config.json").exists())
    means, stds = [], []
    if path.exists():
        d = load_file(str(path))
        means, stds = [d["mean"][: len(imgs)]], [d["std"][: len(imgs)]]
    done = len(means[0]) if means else 0
    if done == len(imgs):
        return means[0], stds[0]
    log.info("encoding %d images to latents", len(imgs) - done)
    with torch.no_grad():
        for i in tqdm(range(done, len(imgs), 256), desc="encode", mininterval=15):
            post = vae.encode(to_tensor(imgs[i:i + 256])).latent_dist
            means.append(post.mean.half())
            stds.append(post.std.half())
    mean, std = torch.cat(means), torch.cat(stds)
    save_file({"mean": mean.contiguous(), "std": std.contiguous()}, str(path))
    return mean, std
