"""The DreamBooth paper's metrics as maths over interchangeable feature extractors.

Every metric is computed from L2-normalised features, so similarities are cosines:

- DINO / CLIP-I: mean cosine over all (generated, real) pairs of image embeddings.
- CLIP-T: mean cosine between each image and its prompt with the identifier removed.
- PRES: DINO between plain class-prompt generations and the real subject images (lower is better).
- DIV: mean over distinct pairs of one prompt's images of an LPIPS-style distance (`lpips_style_distance`).

A `FeatureBackend` supplies the features. Real evaluation uses DINO ViT-S/16 (`DinoBackend`) and CLIP
(`ClipBackend`); the toy world uses its probe (`ProbeBackend`). The maths never knows which.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..core.models import ModelError, hub_files_only

log = logging.getLogger("nanobooth")

# Table 1 of Ruiz et al., "DreamBooth" (CVPR 2023), averaged over the 30 subjects of their dataset.
PAPER = {
    "DreamBooth (Stable Diffusion)": {"dino": 0.668, "clip_i": 0.803, "clip_t": 0.305},
    "Real images": {"dino": 0.774, "clip_i": 0.885},
}
IMAGENET_MEAN_STD = ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
CLIP_MEAN_STD = ([0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711])
# Where the hub's conversion bot leaves a safetensors copy of pickle-only repos (facebook/dino-vits16).
SAFETENSORS_PR = "refs/pr/1"


class FeatureBackend:
    """What the metrics need from a feature extractor. Optional parts return None when unsupported."""

    name = "features"
    source = ""  # what was loaded (id@revision), recorded in eval.json
    prompt_templates: list[str] | None = None  # a backend whose world has its own prompts (the toy) names them
    class_template = "a {1}"

    def image_features(self, images: list[Image.Image]) -> torch.Tensor:
        """[N, D], rows L2-normalised."""
        raise NotImplementedError

    def patch_features(self, images: list[Image.Image]) -> list[torch.Tensor] | None:
        """Per layer [N, P, C] spatial features, for DIV. None: DIV falls back to image_features."""
        return None

    def text_features(self, texts: list[str]) -> torch.Tensor | None:
        return None

    def prompt_match(self, images: list[Image.Image], prompts: list[str]) -> torch.Tensor | None:
        """Per image 1.0 if it shows what its prompt names (backends that can read images), else None."""
        return None


# ------------------------------------------------------------------ maths
def cross_similarity(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean cosine over all pairs (a_i, b_j) of unit rows."""
    return float((a @ b.T).mean())


def self_similarity(f: torch.Tensor | None) -> float | None:
    """Mean cosine over distinct pairs of one set: what the paper's "real images" row reports.
    Self-pairs are excluded, since they are 1 by construction and would inflate small sets."""
    if f is None or len(f) < 2:
        return None
    sim = f @ f.T
    return float(sim[~torch.eye(len(f), dtype=torch.bool, device=f.device)].mean())


def lpips_style_distance(layers: list[torch.Tensor]) -> float | None:
    """Mean over distinct image pairs of LPIPS's recipe with uniform channel weights.

    LPIPS unit-normalises each spatial position's channel vector, takes squared differences weighted
    by learned per-channel weights, averages over positions and sums over layers. Without the learned
    weights (and VGG/AlexNet), for unit vectors ||a - b||^2 / 2 = 1 - cos(a, b), so the distance per
    layer is 1 - (mean over positions of the per-position cosine); layers are averaged. Identical
    images give 0. `layers` are [N, P, C] (or [N, D], read as one position).
    """
    n = len(layers[0])
    if n < 2:
        return None
    off = ~torch.eye(n, dtype=torch.bool)
    per_layer = []
    for f in layers:
        f = F.normalize((f if f.dim() == 3 else f[:, None, :]).float(), dim=-1)
        cos = torch.einsum("ipc,jpc->ij", f, f) / f.shape[1]
        per_layer.append(float((1.0 - cos.cpu()[off]).clamp_min(0).mean()))  # rounding can put cos a hair above 1
    return float(np.mean(per_layer))


def diversity(backend: FeatureBackend, images: list[Image.Image]) -> float | None:
    if len(images) < 2:
        return None
    layers = backend.patch_features(images)
    return lpips_style_distance(layers if layers is not None else [backend.image_features(images)])


def strip_identifier(prompt: str, identifier: str) -> str:
    """"a sks dog on the beach" -> "a dog on the beach": CLIP has never seen `sks`, so it only adds noise.
    Only the whitespace-delimited token goes ("sksy" stays), so identifiers with punctuation work too."""
    out = re.sub(rf"(?<!\S){re.escape(identifier)}(?!\S)", " ", prompt)
    return " ".join(out.split())


def mean(values) -> float | None:
    vals = [v for v in values if v is not None]
    return float(np.mean(vals)) if vals else None


# ------------------------------------------------------------------ preprocessing
def preprocess(images: list[Image.Image], size: int, mean_std, resample=Image.Resampling.BICUBIC) -> torch.Tensor:
    """Shorter side to `size`, centre crop, normalise: CLIP's and DINO's evaluation transform, in PIL + torch.
    (Hugging Face's ViT processor squashes to a square instead; cropping keeps subject proportions.)"""
    out = []
    for img in images:
        img = img.convert("RGB")
        w, h = img.size
        s = size / min(w, h)
        img = img.resize((max(size, round(w * s)), max(size, round(h * s))), resample, reducing_gap=None)
        left, top = (img.size[0] - size) // 2, (img.size[1] - size) // 2
        img = img.crop((left, top, left + size, top + size))
        out.append(torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1))
    x = torch.stack(out).float() / 255.0
    m, s = (torch.tensor(v).view(1, 3, 1, 1) for v in mean_std)
    return (x - m) / s


def _image_settings(src: str, revision: str | None, default, files_only: bool = False) -> tuple:
    """The model's own normalisation (preprocessor_config.json), else the family default."""
    from transformers.image_processing_base import ImageProcessingMixin

    try:
        cfg, _ = ImageProcessingMixin.get_image_processor_dict(src, revision=revision, local_files_only=files_only)
    except OSError:
        log.info("%s: no preprocessor_config.json; normalising with the standard mean/std", src)
        return default, Image.Resampling.BICUBIC
    mean_std = (cfg.get("image_mean", default[0]), cfg.get("image_std", default[1]))
    return mean_std, Image.Resampling(cfg.get("resample", Image.Resampling.BICUBIC))


def _hub_id(src: str) -> bool:
    """`src` names a hub repo (owner/name), not a local folder."""
    return not Path(src).expanduser().exists() and src.count("/") == 1


def _files_only(src: str, revision: str | None, flag: str | None) -> bool:
    """A hub id loads from the hub cache alone when the hub cannot be reached (models.hub_files_only, which raises a
    ModelError naming `flag` when it is not cached either); a local folder is never looked up."""
    return _hub_id(src) and hub_files_only(src, revision, "config.json", flag or "", "folder")


def _load(cls, src: str, revision: str | None, flag: str | None, files_only: bool = False, **kw):
    """safetensors only. Hub repos that ship only pickles often have the bot's safetensors PR; try it.
    `flag`: the `nanobooth eval` option that chose `src`, named in the ModelError with its fix; None (training's
    validation_scores, where no flag was typed): the error says only what failed and the caller says what to do."""
    tries = [None, SAFETENSORS_PR] if _hub_id(src) and not revision else [revision]
    err = None
    for rev in tries:
        try:
            model = cls.from_pretrained(src, revision=rev, use_safetensors=True, local_files_only=files_only, **kw)
            if rev and not revision:
                log.info("%s: main has no safetensors weights; loaded the hub's conversion at %s", f"{flag} {src}" if flag else src, rev)
            return model, rev
        except (OSError, ValueError) as e:
            err = e
    msg = (str(err).strip().splitlines() or [type(err).__name__])[0]
    if flag is None:
        raise ModelError(f"'{src}': could not load {cls.__name__} with safetensors weights ({msg})")
    raise ModelError(f"{flag} '{src}': could not load {cls.__name__} with safetensors weights ({msg}); pass a local folder "
                     f"or hub id with model.safetensors (or {flag}-revision), or run once online to cache it")


def _batched(fn, images, batch: int = 32) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([fn(images[i:i + batch]) for i in range(0, len(images), batch)])


# ------------------------------------------------------------------ backends
class DinoBackend(FeatureBackend):
    """DINO ViT (the paper: ViT-S/16): CLS token for DINO/PRES, patch tokens of 4 depths for DIV."""

    name = "dino"

    def __init__(self, src: str = "facebook/dino-vits16", revision: str | None = None, device="cpu", flag: str | None = "--dino"):
        from transformers import ViTModel

        files_only = _files_only(src, revision, flag)  # uncached with no hub: one line now, not the hub client's retries
        self.model, rev = _load(ViTModel, src, revision, flag, files_only, add_pooling_layer=False)
        self.source = f"{src}@{rev}" if rev else src
        self.model.to(device).eval()
        self.device, self.size = device, self.model.config.image_size
        self.mean_std, self.resample = _image_settings(src, rev, IMAGENET_MEAN_STD, files_only)
        n = self.model.config.num_hidden_layers
        self.layers = sorted({round(n * k / 4) for k in (1, 2, 3, 4)} - {0})  # LPIPS-like: shallow to deep

    def _forward(self, images, hidden: bool):
        x = preprocess(images, self.size, self.mean_std, self.resample).to(self.device)
        return self.model(pixel_values=x, output_hidden_states=hidden)

    def image_features(self, images):
        # last_hidden_state is after ViT's final layer norm, which is where DINO takes its CLS embedding
        return F.normalize(_batched(lambda b: self._forward(b, False).last_hidden_state[:, 0].float(), images), dim=-1).cpu()

    def patch_features(self, images):
        with torch.no_grad():
            hs = self._forward(images, True).hidden_states
        return [hs[i][:, 1:].float().cpu() for i in self.layers]  # drop CLS: LPIPS compares spatial maps


class ClipBackend(FeatureBackend):
    name = "clip"

    def __init__(self, src: str = "openai/clip-vit-base-patch32", revision: str | None = None, device="cpu", flag: str | None = "--clip"):
        from transformers import AutoTokenizer, CLIPModel

        files_only = _files_only(src, revision, flag)
        self.model, rev = _load(CLIPModel, src, revision, flag, files_only)
        self.source = f"{src}@{rev}" if rev else src
        self.model.to(device).eval()
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(src, revision=rev, local_files_only=files_only)
        except (OSError, ValueError) as e:
            raise ModelError(f"{flag + ' ' if flag else ''}'{src}': no tokenizer there ({e}); CLIP-T needs the model's tokenizer files") from None
        self.device, self.size = device, self.model.config.vision_config.image_size
        self.mean_std, self.resample = _image_settings(src, rev, CLIP_MEAN_STD, files_only)

    @staticmethod
    def _projected(out) -> torch.Tensor:
        # transformers 5 returns a model output whose pooler_output is the projection; 4.x a tensor
        return out if isinstance(out, torch.Tensor) else out.pooler_output

    def image_features(self, images):
        def fn(b):
            x = preprocess(b, self.size, self.mean_std, self.resample).to(self.device)
            return self._projected(self.model.get_image_features(pixel_values=x)).float()

        return F.normalize(_batched(fn, images), dim=-1).cpu()

    def text_features(self, texts):
        max_len = min(self.model.config.text_config.max_position_embeddings, 77)
        tok = self.tokenizer(list(texts), padding=True, truncation=True, max_length=max_len, return_tensors="pt")
        with torch.no_grad():
            out = self.model.get_text_features(input_ids=tok.input_ids.to(self.device),
                                               attention_mask=tok.attention_mask.to(self.device))
        return F.normalize(self._projected(out).float(), dim=-1).cpu()


class ProbeBackend(FeatureBackend):
    """The toy world's probe as the DINO stand-in: subject features, and it can read class and scene off an
    image, which stands in for CLIP-T as `prompt_acc`. It has no spatial features, so DIV is 1 - cosine."""

    name = "toy-probe"
    class_template = "a photo of a {1}"  # the toy model's captions all start so

    def __init__(self, path: str | None = None, probe=None):
        if probe is None:
            try:
                from ..toy.probe import load_probe
            except ImportError as e:
                raise ModelError(f"--backend toy needs the toy world's probe (nanobooth.toy.probe), which cannot be imported ({e})") from None
            try:
                probe = load_probe(path)
            except (OSError, KeyError, ValueError, RuntimeError) as e:  # RuntimeError: weights of another architecture
                msg = (str(e).strip().splitlines() or [type(e).__name__])[0]
                raise ModelError(f"--toy-probe '{path or 'shipped'}': cannot load the probe ({msg})") from None
        self.probe, self.source = probe, str(path or "shipped")
        scenes = [s for s in self.probe.labels["scene"] if s != "plain"]
        self.prompt_templates = ["a photo of a {0} {1}"] + [f"a photo of a {{0}} {{1}} {s}" for s in scenes]

    def image_features(self, images):
        return self.probe.features(list(images)).float()

    def prompt_match(self, images, prompts):
        pred = self.probe.predict(list(images))
        hits = []
        for i, p in enumerate(prompts):
            scene = next((s for s in self.probe.labels["scene"] if s in p), None)
            cls = next((c for c in self.probe.labels["class"] if re.search(rf"\b{re.escape(c)}\b", p)), None)
            hits.append(float((scene is None or pred["scene"][i] == scene) and (cls is None or pred["class"][i] == cls)))
        return torch.tensor(hits)


def load_backends(kind: str, dino: str, clip: str | None, device="cpu", dino_revision=None, clip_revision=None,
                  toy_probe: str | None = None) -> dict[str, FeatureBackend | None]:
    """Roles, not models: "dino" scores DINO/PRES/DIV, "clip" (optional) scores CLIP-I/CLIP-T."""
    if kind == "toy":
        return {"dino": ProbeBackend(toy_probe), "clip": None}
    return {"dino": DinoBackend(dino, dino_revision, device),
            "clip": ClipBackend(clip, clip_revision, device) if clip and clip != "none" else None}
