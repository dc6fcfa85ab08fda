"""Subject and class images: loading that survives real-world files, and the pixel transform.

Real photo folders contain CMYK JPEGs, 16-bit PNGs, palette GIFs, RGBA screenshots, phone photos that
are only upright after their EXIF orientation, `.DS_Store` and `Thumbs.db`. Each is either fixed up
(converted, rotated; with a warning where the user should know) or refused with one line naming the file.
"""

from __future__ import annotations

import difflib
import json
import logging
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

if TYPE_CHECKING:  # torch loads where tensors are made: the folder checks run before any heavy import
    import torch

log = logging.getLogger("nanobooth")

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


# photos of one subject a run is for: the DreamBooth paper used 3-5; users of its trainers bring up to about 20
MIN_PHOTOS, MAX_PHOTOS = 3, 20


class DataError(ValueError):
    """Unusable input data; the message names the file or folder and what to do."""


def resolve_data_dir(path: str | None, key: str = "instance_data_dir", must_exist: bool = True) -> Path:
    """The folder a data key names; DataError (naming `key`) if it is missing, a file, or a mistyped
    example. must_exist=False (class_data_dir, which training creates) lets a missing folder pass."""
    if not path:
        raise DataError(f"config key '{key}' is required: pass {key}=PATH (a folder of 3-20 photos of your subject)")
    if path.startswith("example:"):
        name = path.split(":", 1)[1]
        res = resources.files("nanobooth") / "assets" / "examples" / name
        if not res.is_dir():
            raise DataError(f"{key}={path}: no shipped example named '{name}' (try example:dog)")
        return Path(str(res))
    folder = Path(path).expanduser()
    if folder.is_dir() or (not must_exist and not folder.exists()):
        return folder
    if folder.exists():
        what = "the folder that holds the photos" if must_exist else "a folder (created and filled with class images if missing)"
        raise DataError(f"{key}={path}: this is a file, not a folder; pass {what}")
    raise DataError(f"{key}={path}: this folder does not exist{_did_you_mean(folder)}")


def _did_you_mean(folder: Path) -> str:
    """'; did you mean `sibling`?' for the closest existing folder next to a mistyped one."""
    parent = folder.parent
    if not parent.is_dir():
        return f" (nor is there a folder '{parent}')"
    try:
        names = [p.name for p in parent.iterdir() if p.is_dir()]
    except OSError:
        return ""
    close = difflib.get_close_matches(folder.name, names, n=1, cutoff=0.6)
    if not close:
        return ""
    return f"; did you mean `{parent / close[0] if str(parent) != '.' else close[0]}`?"


def read_subject_meta(folder: Path) -> dict:
    """`subject.json` beside the photos names the prompts, so a toy subject needs no prompt keys."""
    meta = folder / "subject.json"
    if not meta.is_file():
        return {}
    try:
        return json.loads(meta.read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"{meta}: not valid JSON ({e}); fix or delete it") from None


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode to 8-bit RGB, upright. Transparency is composited on white, as viewers show it."""
    img = ImageOps.exif_transpose(img)
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16/32-bit greyscale: scale the used range to 8 bits instead of clipping at 255.
        arr = np.asarray(img, dtype=np.float64)
        hi = 65535.0 if arr.max() > 255 else 255.0
        img = Image.fromarray(np.clip(arr / hi * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        img = img.convert("RGBA")
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, img)
    return img.convert("RGB")


def load_image(path: Path, draft: tuple[int, int] | None = None) -> Image.Image:
    """The image as upright 8-bit RGB, or DataError naming the file. `draft`: let a JPEG decode at a reduced
    size near it (enough to find a broken file cheaply; check_images)."""
    try:
        with Image.open(path) as img:
            if draft:
                img.draft("RGB", draft)
            img.load()  # forces the full decode, so truncated files fail here and not mid-training
            return to_rgb(img)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise DataError(f"{path}: cannot read this image ({e}); replace or remove the file") from None


def image_paths(folder: Path) -> list[Path]:
    """The image files of `folder` sorted by name: what an image set trains on, in data order, what a
    checkpoint records and what class images count. Hidden files (.DS_Store, a class image still being
    written), folders and other extensions are not images. [] for a folder not made yet."""
    if not folder.is_dir():
        return []
    files = [p for p in sorted(folder.iterdir()) if not p.name.startswith(".") and not p.is_dir() and p.suffix.lower() in IMAGE_EXTS]
    stems = {p.stem for p in files}
    return [p for p in files if not _is_mask(p, stems)]


MASK_SUFFIX = ".mask"  # NAME.mask.png beside NAME.jpg: that photo's loss mask (mask_of), not a photo


def _is_mask(p: Path, stems: set[str]) -> bool:
    """`p` is another image's mask: NAME.mask.EXT where an image NAME.* exists (list_images refuses one without)."""
    return p.stem.endswith(MASK_SUFFIX) and p.stem[: -len(MASK_SUFFIX)] in stems


def mask_path(image: Path) -> Path | None:
    """The mask file beside `image` (NAME.mask.png, or another image extension), or None."""
    return next((m for ext in sorted(IMAGE_EXTS) if (m := image.with_name(image.stem + MASK_SUFFIX + ext)).is_file()), None)


def mask_of(image: Path) -> Image.Image | None:
    """The loss mask of a photo as 8-bit greyscale ('L', white = subject), upright like the photo: NAME.mask.png
    beside it (any mode, converted to grey), else the photo's own alpha channel, else None. DataError names a mask
    that cannot be read or whose size differs from the photo's."""
    path = mask_path(image)
    try:
        if path is not None:
            with Image.open(path) as m:
                m.load()
                mask = ImageOps.exif_transpose(m).convert("L")
            with Image.open(image) as img:
                size = ImageOps.exif_transpose(img).size
            if mask.size != size:
                raise DataError(f"{path}: the mask is {mask.size[0]}x{mask.size[1]} but {image.name} is {size[0]}x{size[1]}; "
                                "save the mask at the photo's size")
            return mask
        with Image.open(image) as img:
            img.load()
            img = ImageOps.exif_transpose(img)
            if img.mode == "P" and "transparency" in img.info:
                img = img.convert("RGBA")
            if img.mode not in ("RGBA", "LA", "PA"):
                return None
            return img.getchannel("A")
    except DataError:  # the size refusal above: a ValueError too, which the next clause would wrap in a second message
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise DataError(f"{path or image}: cannot read this mask ({e}); replace or remove the file") from None


def check_images(folder: Path, key: str = "instance_data_dir") -> None:
    """Refuse, in one line, a folder with no photos or with a photo that cannot be read, without decoding
    at full size (JPEG draft mode): the CLI calls this before any model loads, and before the prompts,
    which an empty folder's missing subject.json would otherwise be blamed for. Every unreadable photo is named in
    that line, not the first one alone (newcomer55 fixed one, reran, and met the next)."""
    bad = {}
    for p in _some_images(image_paths(folder), folder, key):
        try:
            load_image(p, draft=(64, 64))
        except DataError as e:
            bad[p] = e
    if len(bad) == 1:
        raise next(iter(bad.values()))
    if bad:
        raise DataError(f"{len(bad)} photos cannot be read as images: {', '.join(map(str, bad))}; replace or remove them "
                        f"(the first: {next(iter(bad.values()))})")


def list_images(folder: Path, key: str = "instance_data_dir", warn: bool = True) -> list[Path]:
    """The folder's photos (image_paths); DataError for none or an orphan mask. warn: one warning per file that is
    skipped (a caption with no photo, a non-image); False where a caller lists a folder that was already warned about."""
    if not folder.is_dir():
        raise DataError(f"{key}: folder '{folder}' does not exist")
    files = image_paths(folder)
    # NAME.mask.png whose photo is missing would train as a photo of the subject (a white or black square)
    if orphan := next((p for p in files if p.stem.endswith(MASK_SUFFIX)), None):
        raise DataError(f"{orphan}: a loss mask with no photo {orphan.stem[: -len(MASK_SUFFIX)]}.* beside it, so it would train "
                        "as a photo; add that photo, or remove or rename the mask")
    skipped = [p for p in sorted(folder.iterdir()) if not p.name.startswith(".") and not p.is_dir() and p not in files]
    stems = {p.stem for p in files}
    for p in skipped if warn else []:
        if p.name == "subject.json" or (p.suffix == ".txt" and p.stem in stems) or _is_mask(p, stems):  # a caption, a mask
            continue
        if p.suffix == ".txt":
            log.warning("%s: a caption with no photo %s.* beside it (e.g. %s.png), skipped; add the photo or remove the caption",
                        p, p.stem, p.stem)
        else:
            log.warning("%s: not an image file, skipped", p)
    return _some_images(files, folder, key)


def _some_images(files: list[Path], folder: Path, key: str) -> list[Path]:
    if not files:
        raise DataError(f"{key}: no images in '{folder}' (expected .jpg/.png/.webp files)")
    return files


CAPTION_PLACEHOLDERS = ("{identifier}", "{class}")


def has_word(text: str, word: str) -> bool:
    """`word` stands alone in `text` (punctuation may touch it: "sks," counts, "sksdog" does not)."""
    return re.search(rf"(?<!\w){re.escape(word)}(?!\w)", text) is not None


def caption_of(image: Path, fallback: str, fill: dict[str, str] | None = None) -> str:
    """The prompt of one photo: the text of `image.txt` beside `image.jpg` (kohya's and OneTrainer's
    convention; surrounding whitespace dropped), else `fallback` (instance_prompt), also for an empty file (with a
    warning naming it).
    `{identifier}` / `{class}` in the text become fill's words (config_values.caption_words: "sks", "dog");
    DataError naming the file for another `{word}` (a typo would train as literal braces) or one fill lacks."""
    txt = image.with_suffix(".txt")
    if not txt.is_file():
        return fallback
    try:
        text = " ".join(txt.read_text(encoding="utf-8").split())
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{txt}: cannot read this caption ({e}); save it as UTF-8 text or remove it") from None
    if not text:  # kohya trains an empty caption as the empty prompt; here it is instance_prompt, which the user should know
        log.warning("%s: empty caption; this photo trains with instance_prompt '%s' (write a caption or remove the file)", txt, fallback)
    for ph in dict.fromkeys(re.findall(r"\{\w*\}", text)):
        if ph not in CAPTION_PLACEHOLDERS:
            raise DataError(f"{txt}: unknown placeholder {ph}; a caption may use {' and '.join(CAPTION_PLACEHOLDERS)} "
                            "(the identifier and class noun of instance_prompt) or plain text")
        if ph[1:-1] not in (fill or {}):
            raise DataError(f"{txt}: {ph} cannot be told from instance_prompt '{fallback}' (the identifier is the one word "
                            "class_prompt lacks, or token_abstraction; the class noun the word after it); write it out")
        text = text.replace(ph, fill[ph[1:-1]])
    return text or fallback


def drop_captions(prompts: list[str], p: float, generator: torch.Generator) -> list[str]:
    """caption_dropout: each prompt replaced by "" with probability p, one uniform draw per prompt from
    `generator` (latents.BatchDraw calls it only when p > 0, so runs without dropout draw nothing)."""
    import torch

    drop = (torch.rand(len(prompts), generator=generator) < p).tolist()
    return ["" if d else q for q, d in zip(prompts, drop)]


def upscale_warning(size: tuple[int, int], resolution: int) -> str | None:
    """The warning for a photo of `size` (w, h) pixels trained at `resolution`, or None: the CLI's log line
    and the UI's photo note say the same."""
    if min(size) >= resolution:
        return None
    return f"{size[0]}x{size[1]} is smaller than resolution {resolution}: upscaled (blurry)"


def load_folder(folder: Path, resolution: int, key: str = "instance_data_dir", limit: int | None = None,
                warn: bool = True) -> list[Image.Image]:
    """The folder's images (the first `limit` by file name when given), upright and RGB; warn: list_images'."""
    return load_paths(list_images(folder, key, warn)[:limit], resolution)


def load_paths(paths: list[Path], resolution: int) -> list[Image.Image]:
    """These images, upright and RGB, each smaller than `resolution` with a warning naming it."""
    images = []
    for p in paths:
        img = load_image(p)
        if warning := upscale_warning(img.size, resolution):
            log.warning("%s: %s", p, warning)
        images.append(img)
    return images


def resize_short_side(img: Image.Image, resolution: int) -> Image.Image:
    w, h = img.size
    scale = resolution / min(w, h)
    size = (max(resolution, round(w * scale)), max(resolution, round(h * scale)))
    return img.resize(size, Image.Resampling.BICUBIC, reducing_gap=None)


def to_tensor(img: Image.Image) -> torch.Tensor:
    """PIL RGB -> float tensor (3, H, W) in [-1, 1], the VAE's input range."""
    import torch

    arr = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float()
    return arr / 127.5 - 1.0


def crop_origin(size: tuple[int, int], resolution: int | tuple[int, int], generator: torch.Generator | None) -> tuple[int, int]:
    """(left, top) of the resolution-square crop (or (w, h) crop: a bucket) of an image of size (w, h):
    centred when generator is None, else drawn from generator (left first, then top)."""
    w, h = size
    cw, ch = (resolution, resolution) if isinstance(resolution, int) else resolution
    if generator is None:
        return (w - cw) // 2, (h - ch) // 2
    import torch

    left = int(torch.randint(0, w - cw + 1, (1,), generator=generator))
    top = int(torch.randint(0, h - ch + 1, (1,), generator=generator))
    return left, top


def crop(img: Image.Image, resolution: int, generator: torch.Generator | None) -> Image.Image:
    """Center crop when generator is None, else a random crop drawn from generator."""
    left, top = crop_origin(img.size, resolution, generator)
    return img.crop((left, top, left + resolution, top + resolution))


@dataclass
class ImageSet:
    """Pre-resized images of one role (instance or class) with their prompt, and each photo's size
    before resizing (SDXL is conditioned on it)."""

    images: list[Image.Image]
    prompt: str
    original_sizes: list[tuple[int, int]] | None = None  # (h, w) before resizing; None: the images' own sizes
    captions: list[str] | None = None  # each image's own prompt (caption_of); None: `prompt` for every image
    masks: list[Image.Image | None] | None = None  # masked_loss: each image's mask ('L'), resized alike; None: unmasked
    sizes: list[tuple[int, int]] | None = None  # enable_bucket: each image's bucket (w, h); None: resolution squares

    @classmethod
    def from_folder(cls, folder: Path, prompt: str, resolution: int, key: str, limit: int | None = None,
                    captions: bool = False, masks: bool = False, buckets: list[tuple[int, int]] | None = None,
                    fill: dict[str, str] | None = None, warn: bool = True) -> "ImageSet":
        """captions: read each image's `.txt` caption (caption_of, its placeholders from `fill`), falling back to `prompt`. masks: read each
        image's loss mask (mask_of); an image without one trains unmasked, with a warning naming it; DataError
        when no image has one.
        buckets: (w, h) sizes (buckets.bucket_sizes); each image is resized to cover its nearest one.
        warn: list_images' warnings about skipped files (listed once here, so said once)."""
        from .buckets import cover_size, nearest_bucket

        paths = list_images(folder, key, warn)[:limit]
        photos = load_paths(paths, resolution)
        sizes = [nearest_bucket(im.size, buckets) for im in photos] if buckets else None

        def resize(i: int, im: Image.Image) -> Image.Image:
            if sizes is None:
                return resize_short_side(im, resolution)
            return im.resize(cover_size(im.size, sizes[i]), Image.Resampling.BICUBIC, reducing_gap=None)

        mask_list = None
        if masks:
            mask_list = []
            found = [mask_of(p) for p in paths]
            if all(m is None for m in found):  # every photo would train unmasked: the key asks for nothing this folder has
                raise DataError(f"{key}={folder}: masked_loss=true but no photo here has a mask; add NAME{MASK_SUFFIX}.png beside "
                                "NAME.jpg (white = subject) or an alpha channel to the photos, or set masked_loss=false")
            for p, m in zip(paths, found):
                if m is None:
                    log.warning("%s: masked_loss=true but this photo has no alpha channel and no %s%s.png beside it; "
                                "it trains unmasked", p, p.stem, MASK_SUFFIX)
                mask_list.append(m and resize(len(mask_list), m))
        own = None
        if captions:
            own = [caption_of(p, prompt, fill) for p in paths]
            n = sum(c != prompt for c in own)
            if n:
                log.info("%s: %d of %d images have their own caption (.txt); the others use '%s'", folder, n, len(own), prompt)
            ident = (fill or {}).get("identifier")
            if ident and key == "instance_data_dir":  # held-out captions train nothing: binding is the instance photos' matter
                lacking = [p.with_suffix(".txt").name for p, c in zip(paths, own) if c != prompt and not has_word(c, ident)]
                if lacking:  # not an error: a style caption may leave the subject out on purpose
                    one = len(lacking) == 1
                    log.warning("%s: caption%s %s do%s not contain the identifier '%s': %s do%s not bind the subject to it "
                                "(add '%s' where the photo shows the subject)", folder, "" if one else "s", ", ".join(lacking),
                                "es" if one else "", ident, "that photo" if one else "those photos", "es" if one else "", ident)
            own = own if n else None
        if sizes:
            log.info("%s: %d images in buckets %s", folder, len(sizes), ", ".join(f"{w}x{h}: {sizes.count((w, h))}"
                                                                               for w, h in sorted(set(sizes))))
        return cls([resize(i, im) for i, im in enumerate(photos)], prompt, [(im.height, im.width) for im in photos], own,
                   mask_list, sizes)

    def __len__(self) -> int:
        return len(self.images)

    def size_of(self, i: int, resolution: int) -> tuple[int, int]:
        """The (w, h) that image i trains at: its bucket, or the resolution square."""
        return self.sizes[i] if self.sizes else (resolution, resolution)

    def prompt_of(self, i: int) -> str:
        return self.captions[i] if self.captions else self.prompt

    def distinct_prompts(self) -> list[str]:
        """Every prompt this set trains with, each once, in image order."""
        return list(dict.fromkeys(self.captions or [self.prompt]))

    def pixels(self, idx: list[int], resolution: int, flips: list[bool], generator: torch.Generator | None) -> torch.Tensor:
        return self.sample(idx, resolution, flips, generator)[0]

    def sample(self, idx: list[int], resolution: int, flips: list[bool],
               generator: torch.Generator | None, with_masks: bool = False,
               size: tuple[int, int] | None = None) -> tuple[torch.Tensor, ...]:
        """Cropped (and mirrored where flips[i]) images and what SDXL's micro-conditioning says of them.

        Returns pixels (N, 3, resolution, resolution) in [-1, 1] and coords (N, 4) int64: the photo's
        original (height, width) and the crop's (top, left) in the resized photo. A mirrored crop at
        `left` is the crop at `w - resolution - left` of the mirrored photo, and that is the left it
        reports: diffusers' SDXL DreamBooth script (examples/dreambooth/train_dreambooth_lora_sdxl.py,
        DreamBoothDataset) flips the resized photo before cropping it and records the crop's top-left
        in the flipped photo, so a mirrored example is described as the image the UNet actually sees.
        with_masks: also return the masks (N, 1, resolution, resolution) in [0, 1], cropped and mirrored as
        the pixels; ones for an image without a mask.
        size: crop every image to this (w, h) instead of its own size_of (a class image to the batch's
        bucket), resizing it first to cover that size if it does not (pixels are then (N, 3, h, w)).
        """
        import torch

        from .buckets import cover_size

        out, coords, masks = [], [], []
        for i, flip in zip(idx, flips):
            img = self.images[i]
            cw, ch = size or self.size_of(i, resolution)
            mask = self.masks[i] if self.masks else None
            if img.width < cw or img.height < ch:
                img = img.resize(cover_size(img.size, (cw, ch)), Image.Resampling.BICUBIC, reducing_gap=None)
                mask = mask and mask.resize(img.size, Image.Resampling.BICUBIC, reducing_gap=None)
            full_w = img.width
            left, top = crop_origin(img.size, (cw, ch), generator)
            box = (left, top, left + cw, top + ch)
            img = img.crop(box)
            mask = mask.crop(box) if mask is not None else Image.new("L", img.size, 255)
            if flip:
                img, mask = ImageOps.mirror(img), ImageOps.mirror(mask)
                left = full_w - cw - left
            h, w = self.original_sizes[i] if self.original_sizes else (self.images[i].height, self.images[i].width)
            out.append(to_tensor(img))
            coords.append((h, w, top, left))
            masks.append(torch.from_numpy(np.asarray(mask, dtype=np.float32) / 255.0)[None])
        pixels, coords = torch.stack(out), torch.tensor(coords, dtype=torch.long)
        return (pixels, coords, torch.stack(masks)) if with_masks else (pixels, coords)


def latent_masks(masks: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Pixel masks (N, 1, H, W) in [0, 1] -> (N, 1, h, w) on the latent grid, each latent pixel the mean of
    the image pixels it covers (area averaging, as kohya's masked loss)."""
    import torch.nn.functional as F

    return F.interpolate(masks, size=tuple(size), mode="area")


class Sampler:
    """Epoch-wise shuffled indices from its own generator; its state is part of every checkpoint.

    Every process draws the same global batch and takes its own slice, so N processes see exactly the
    examples one process sees at N times the per-process batch.
    """

    def __init__(self, n: int, seed: int):
        import torch

        self.n = n
        self.generator = torch.Generator().manual_seed(seed)
        self.order: list[int] = []
        self.pos = 0

    def take(self, k: int) -> list[int]:
        import torch

        out = []
        while len(out) < k:
            if self.pos >= len(self.order):
                self.order = torch.randperm(self.n, generator=self.generator).tolist()
                self.pos = 0
            out.append(self.order[self.pos])
            self.pos += 1
        return out

    def state_dict(self) -> dict:
        return {"order": list(self.order), "pos": self.pos, "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.order, self.pos = list(state["order"]), int(state["pos"])
        self.generator.set_state(state["generator"])
