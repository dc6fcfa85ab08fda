"""The toy world: procedural, seeded 64x64 scenes with exact captions.

Everything is a pure function of a `Spec` (or a `Subject` plus a pose), so the
ground truth of every image is known. That is what lets a tiny probe classifier
judge generations, and what makes DreamBooth measurable offline.

Objects are drawn analytically at 3x resolution in object-local coordinates
and box-filtered down, which gives anti-aliased edges without any drawing
library; backgrounds are drawn directly at 64x64 because they are smooth.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

SIZE = 64
_SS = 3  # supersampling factor for object edges

CLASSES = ["ball", "cube", "star", "ring", "cup"]
COLOURS = ["red", "blue", "green", "yellow", "purple", "orange", "white"]
SCENES = ["on grass", "in the snow", "on the beach", "at night", "on a red rug"]

# Saturated object colours; scene palettes below are deliberately muted or
# darker so that e.g. a green ball stays separable from grass at 64x64.
RGB = {
    "red": (225, 30, 30),
    "blue": (30, 75, 235),
    "green": (40, 210, 60),
    "yellow": (250, 225, 20),
    "purple": (150, 45, 210),
    "orange": (255, 140, 15),
    "white": (250, 250, 250),
    "black": (15, 15, 15),
    "pink": (255, 120, 190),
    "cyan": (30, 220, 230),
}
OUTLINE = np.array((20, 20, 20), np.float32)
IDENTIFIER = "sks"


@dataclass
class Spec:
    cls: str
    colour: str
    scene: str | None  # None: the plain studio backdrop, which captions leave unnamed
    size: float  # object radius in pixels
    x: float  # centre, pixels
    y: float
    angle: float = 0.0  # radians
    bg_seed: int = 0  # texture of the background
    # a patterned/marked object (recipe v5's pretraining world); pattern None: a flat `colour`
    colour2: str | None = None
    pattern: str | None = None  # one of PATTERNS or "solid" (colour only, with a mark)
    scale: float = 0.0  # pattern cells per object radius
    mark: str | None = None  # one of MARKS or "none"


def _held_out() -> frozenset:
    """20 of the 175 (class, colour, scene) triples, never seen in pretraining.

    Chosen so that every pair of attributes of a held-out triple still occurs
    in training: generating them needs composition, not memorisation.
    """
    triples = [(c, k, s) for c in CLASSES for k in COLOURS for s in SCENES]
    order = np.random.default_rng(1234).permutation(len(triples))
    chosen: list = []
    for i in order:
        t = triples[i]
        trial = set(chosen) | {t}
        ok = all(
            any(u not in trial and u[a] == t[a] and u[b] == t[b] for u in triples)
            for a, b in ((0, 1), (0, 2), (1, 2))
        )
        if ok:
            chosen.append(t)
        if len(chosen) == 20:
            break
    return frozenset(chosen)


HELD_OUT = _held_out()


def is_held_out(spec: Spec) -> bool:
    return (spec.cls, spec.colour, spec.scene) in HELD_OUT


def held_out_captions() -> list[str]:
    return [f"a photo of a {k} {c} {s}" for c, k, s in sorted(HELD_OUT)]


def in_world(word: str) -> bool:
    """`word` names a class of this world, singular or plural ("cup", "Cups")."""
    return word.strip().lower().removesuffix("s") in CLASSES


def outside_world(class_noun: str) -> str | None:
    """The line a toy-probe score of a subject of another class needs (a dog: the probe reads balls, cubes, stars, rings
    and cups only, so its numbers would look like a result and measure nothing); None for a class of this world."""
    if in_world(class_noun):
        return None
    return (f"the class '{class_noun}' is not in the toy world ({', '.join(c + 's' for c in CLASSES)}): its probe reads "
            "only those, so these scores do not measure this subject (the sheet shows what was drawn); score a toy "
            "subject (`nanobooth toy subject`), or real photos with a real model and --backend real")


def caption(spec: Spec, colour: bool = True, scene: bool = True, identifier: str | None = None,
            look: bool | None = None) -> str:
    """A patterned object's colours come with its pattern and mark ("a photo of a red and blue striped
    cube with an eye"), so "a red cube" only ever means a flat red one; look=True names the pattern and
    mark without the colours (default: with the colours)."""
    words = ["a photo of a"]
    if identifier:
        words.append(identifier)
    look = colour if look is None else look
    if colour:
        words.append(spec.colour if spec.pattern in (None, "solid") else f"{spec.colour} and {spec.colour2}")
    if look and spec.pattern not in (None, "solid"):
        words.append(PATTERN_WORDS[spec.pattern])
    words.append(spec.cls)
    if look and spec.mark not in (None, "none"):
        words.append(f"with {MARK_WORDS[spec.mark]}")
    if scene and spec.scene:
        words.append(spec.scene)
    return " ".join(words)


def sample_spec(rng: np.random.Generator, allow_held_out: bool = False, plain: bool = False) -> Spec:
    """plain=True: an object on the plain backdrop (product-shot style), the backdrop subjects'
    instance images are shot on."""
    while True:
        cls = CLASSES[rng.integers(len(CLASSES))]
        colour = COLOURS[rng.integers(len(COLOURS))]
        scene = None if plain else SCENES[rng.integers(len(SCENES))]
        if allow_held_out or (cls, colour, scene) not in HELD_OUT:
            break
    size = float(rng.uniform(10, 18))
    m = size + 2
    return Spec(
        cls, colour, scene, size,
        float(rng.uniform(m, SIZE - m)), float(rng.uniform(m, SIZE - m)),
        float(rng.uniform(0, 2 * np.pi)), int(rng.integers(2**31)),
    )


def sample_patterned_spec(rng: np.random.Generator, plain: bool = False) -> Spec:
    """A patterned and/or marked object like the DreamBooth subjects (their colours, patterns, scales,
    marks and poses), drawn independently attribute by attribute, so the base model learns to draw
    what a subject is made of without having seen any one subject (recipe v5). 1 in 5 is a flat colour
    with a mark, 1 in 5 has no mark; never both."""
    cls = CLASSES[rng.integers(len(CLASSES))]
    names = [k for k in RGB if k != "black"]
    c1, c2 = rng.choice(len(names), 2, replace=False)
    pattern = (["solid"] + PATTERNS)[rng.choice(len(PATTERNS) + 1, p=[0.2] + [0.2] * len(PATTERNS))]
    mark = "none" if pattern != "solid" and rng.random() < 0.25 else MARKS[rng.integers(len(MARKS))]
    scene = None if plain else SCENES[rng.integers(len(SCENES))]
    size = float(rng.uniform(12, 21))
    m = size + 2
    return Spec(
        cls, names[c1], scene, size, float(rng.uniform(m, SIZE - m)), float(rng.uniform(m, SIZE - m)),
        float(rng.uniform(-0.6, 0.6)), int(rng.integers(2**31)),
        colour2=names[c2], pattern=pattern, scale=float(rng.uniform(1.5, 3.0)), mark=mark,
    )


# ----------------------------------------------------------------- backgrounds
def background(scene: str | None, seed: int = 0) -> np.ndarray:
    """HxWx3 float32 in [0, 255]. scene=None is a plain light studio backdrop."""
    rng = np.random.default_rng(seed)
    H = SIZE
    yy = np.arange(H, dtype=np.float32)[:, None, None] * np.ones((1, H, 1), np.float32)
    img = np.zeros((H, H, 3), np.float32)

    def noise(amp):
        return rng.normal(0, amp, (H, H, 1)).astype(np.float32)

    if scene is None:
        shade = rng.uniform(190, 225)
        tint = rng.uniform(-8, 8, 3)
        img[:] = shade + tint - 0.4 * (yy - H / 2)
    elif scene == "on grass":
        h = int(rng.integers(14, 24))
        img[:] = (150, 200, 240)
        ground = np.array((60, 135, 45), np.float32) + noise(10)
        # dark vertical blades give grass a texture no object colour has
        blades = (rng.random((H, H)) < 0.12)[..., None] * np.array((-25, -35, -15), np.float32)
        ground = ground + blades
        img[h:] = ground[h:]
    elif scene == "in the snow":
        h = int(rng.integers(14, 24))
        img[:] = np.array((165, 175, 195), np.float32) + 0.6 * yy
        ground = np.array((232, 238, 248), np.float32) + noise(4)
        for _ in range(4):  # soft blue shadows of drifts
            cx, cy, r = rng.uniform(0, H), rng.uniform(h, H), rng.uniform(5, 12)
            d = (np.arange(H)[None, :] - cx) ** 2 + (np.arange(H)[:, None] - cy) ** 2
            ground -= (d < r * r)[..., None] * np.array((25, 18, 5), np.float32)
        img[h:] = ground[h:]
    elif scene == "on the beach":
        h1 = int(rng.integers(10, 18))
        h2 = h1 + int(rng.integers(6, 11))
        img[:] = (140, 205, 250)
        img[h1:h2] = np.array((25, 95, 170), np.float32) + noise(6)[h1:h2]
        img[h2:] = np.array((222, 198, 145), np.float32) + noise(7)[h2:]
    elif scene == "at night":
        img[:] = np.array((10, 12, 38), np.float32) + 0.3 * yy
        stars = rng.random((H, H)) < 0.02
        img[stars] = (235, 235, 205)
    elif scene == "on a red rug":
        img[:] = np.array((125, 20, 35), np.float32) + noise(5)
        p = int(rng.integers(9, 14))
        u = np.arange(H)[None, :] + rng.integers(p)
        v = np.arange(H)[:, None] + rng.integers(p)
        lattice = ((u + v) % p < 1.5) | ((u - v) % p < 1.5)  # gold diamond weave
        img[lattice] = (200, 160, 60)
        border = np.zeros((H, H), bool)
        border[:3] = border[-3:] = True
        border[:, :3] = border[:, -3:] = True
        img[border] = (60, 10, 20)
    else:
        raise ValueError(f"unknown scene {scene!r}")
    return np.clip(img, 0, 255)


# --------------------------------------------------------------------- objects
def _local(cx, cy, r, angle):
    n = SIZE * _SS
    g = (np.arange(n, dtype=np.float32) + 0.5) / _SS
    u, v = np.meshgrid(g - cx, g - cy)
    c, s = np.cos(angle), np.sin(angle)
    return (c * u + s * v) / r, (-s * u + c * v) / r


def _shape(cls: str, lx, ly):
    """Returns (mask, shade): shade is a multiplicative lighting term that gives
    3D cues (cube faces, cup rim) so classes differ by more than silhouette."""
    shade = np.ones_like(lx)
    d2 = lx * lx + ly * ly
    if cls == "ball":
        mask = d2 < 1
        shade = 1.08 - 0.25 * np.clip(np.sqrt((lx + 0.35) ** 2 + (ly + 0.35) ** 2), 0, 1.4)
    elif cls == "ring":
        mask = (d2 < 1) & (d2 > 0.5**2)
    elif cls == "star":
        th = np.arctan2(ly, lx) + np.pi / 2
        phi = np.abs(np.mod(th, 2 * np.pi / 5) - np.pi / 5)  # fold onto one spike
        d = np.sqrt(d2)
        px, py = d * np.cos(np.pi / 5 - phi), d * np.sin(np.pi / 5 - phi)
        ix, iy = 0.45 * np.cos(np.pi / 5), 0.45 * np.sin(np.pi / 5)
        # inside iff on the origin's side of the edge (1,0)-(ix,iy)
        mask = (px - 1) * (iy - 0) - (py - 0) * (ix - 1) <= 0
        mask |= d < 0.45
    elif cls == "cube":
        front = (lx > -0.8) & (lx < 0.45) & (ly > -0.45) & (ly < 0.8)
        top = (ly <= -0.45) & (ly > -0.8) & (lx > -0.8 + (-0.45 - ly)) & (lx < 0.45 + (-0.45 - ly))
        side = (lx >= 0.45) & (lx < 0.8) & (ly < 0.8 - (lx - 0.45)) & (ly > -0.45 - (lx - 0.45))
        mask = front | top | side
        shade = np.where(top, 1.25, np.where(side, 0.65, 1.0))
    elif cls == "cup":
        bx = lx + 0.2
        half = 0.5 + 0.2 * (0.8 - ly) / 1.5  # widens towards the rim
        body = (ly > -0.7) & (ly < 0.8) & (np.abs(bx) < half)
        hd2 = (lx - 0.45) ** 2 + ly**2
        handle = (hd2 < 0.42**2) & (hd2 > 0.22**2) & (lx > 0.4)
        rim = (bx / 0.7) ** 2 + ((ly + 0.7) / 0.16) ** 2 < 1
        mask = body | handle | rim
        shade = np.where(rim & ~body, 1.2, np.where(rim, 0.45, 1.0))
    else:
        raise ValueError(f"unknown class {cls!r}")
    return mask, shade


def _dilate(mask: np.ndarray, k: int) -> np.ndarray:
    out = mask.copy()
    for dy in range(-k, k + 1):
        for dx in range(-k, k + 1):
            if dx * dx + dy * dy <= k * k:
                out |= np.roll(np.roll(mask, dy, 0), dx, 1)
    return out


def _down(a: np.ndarray) -> np.ndarray:
    n = SIZE
    return a.reshape(n, _SS, n, _SS, *a.shape[2:]).mean(axis=(1, 3))


def _coverage(cls, cx, cy, r, angle):
    """(lx, ly, mask, shade, alpha) on the supersampled grid; alpha covers the object and its outline."""
    lx, ly = _local(cx, cy, r, angle)
    mask, shade = _shape(cls, lx, ly)
    outline = _dilate(mask, _SS) & ~mask
    return lx, ly, mask, shade, (mask | outline).astype(np.float32)


def _composite(bg: np.ndarray, cls, cx, cy, r, angle, paint) -> Image.Image:
    """paint(lx, ly) -> HxWx3 float colours in object-local coordinates."""
    lx, ly, mask, shade, alpha = _coverage(cls, cx, cy, r, angle)
    col = paint(lx, ly) * shade[..., None]
    layer = np.where(mask[..., None], col, OUTLINE)
    a = _down(alpha)[..., None]
    c = _down(layer * alpha[..., None])
    out = c + (1 - a) * bg
    return Image.fromarray(np.clip(out, 0, 255).round().astype(np.uint8))


def render(spec: Spec) -> Image.Image:
    rgb = np.array(RGB[spec.colour], np.float32)
    paint = lambda lx, ly: np.broadcast_to(rgb, lx.shape + (3,))  # noqa: E731
    if spec.pattern is not None:
        paint = _subject_paint(Subject(-1, spec.cls, spec.colour, spec.colour2, spec.pattern, spec.scale, spec.mark))
    return _composite(background(spec.scene, spec.bg_seed), spec.cls, spec.x, spec.y, spec.size, spec.angle, paint)


# -------------------------------------------------------------------- subjects
PATTERNS = ["checker", "stripes", "dots", "halves"]
# A subject's identity must survive the toy VAE (f=4), or no model built on it could learn it. A small
# black cross did not: its round trips were read as a cross 59%, as a spot 37% of the time (the probe on
# 150 subjects), so it was dropped. Eye and spot survive: read right after a round trip 99% / 99%.
MARKS = ["eye", "spot"]
# how captions name them (recipe v5's pretraining world; DreamBooth prompts never do)
PATTERN_WORDS = {"checker": "checkered", "stripes": "striped", "dots": "dotted", "halves": "two-tone"}
MARK_WORDS = {"eye": "an eye", "spot": "a spot"}


@dataclass
class Subject:
    """A specific instance: no caption of the base world describes it, since
    base objects are always a single flat colour with no mark."""

    seed: int
    cls: str
    colour1: str
    colour2: str
    pattern: str
    scale: float  # pattern cells per object radius
    mark: str
    extra: dict = field(default_factory=dict)

    @property
    def class_noun(self) -> str:
        return self.cls


def make_subject(seed: int) -> Subject:
    rng = np.random.default_rng([seed, 77])
    cls = CLASSES[rng.integers(len(CLASSES))]
    c1, c2 = rng.choice(len(RGB) - 1, 2, replace=False)  # any colour but the last
    names = [k for k in RGB if k != "black"]
    return Subject(
        seed, cls, names[c1], names[c2], PATTERNS[rng.integers(len(PATTERNS))],
        float(rng.uniform(1.5, 3.0)), MARKS[rng.integers(len(MARKS))],
    )


def _mark_centre(cls: str):
    return {"ring": (0.0, -0.75), "cup": (-0.2, 0.1), "cube": (-0.18, 0.18)}.get(cls, (0.0, 0.0))


def _subject_paint(s: Subject):
    c1 = np.array(RGB[s.colour1], np.float32)
    c2 = np.array(RGB[s.colour2], np.float32)
    mx, my = _mark_centre(s.cls)
    mr = 0.2 if s.cls == "ring" else 0.3

    def paint(lx, ly):
        k = s.scale
        if s.pattern == "checker":
            sel = (np.floor(lx * k) + np.floor(ly * k)) % 2 == 0
        elif s.pattern == "stripes":
            sel = np.floor(ly * k) % 2 == 0
        elif s.pattern == "dots":
            sel = ((np.mod(lx * k, 1) - 0.5) ** 2 + (np.mod(ly * k, 1) - 0.5) ** 2) > 0.09
        elif s.pattern == "halves":
            sel = lx < 0
        else:  # "solid" (pretraining objects only): colour1 with a mark
            sel = np.ones(lx.shape, bool)
        col = np.where(sel[..., None], c1, c2)
        dx, dy = lx - mx, ly - my
        d2 = dx * dx + dy * dy
        black, white = np.array(RGB["black"], np.float32), np.array(RGB["white"], np.float32)
        if s.mark == "eye":
            col = np.where((d2 < mr**2)[..., None], white, col)
            col = np.where((d2 < (0.45 * mr) ** 2)[..., None], black, col)
        elif s.mark == "spot":
            col = np.where((d2 < (0.8 * mr) ** 2)[..., None], black, col)
        return col  # mark "none": pretraining objects only

    return paint


def subject_pose(subject: Subject, pose: int | np.random.Generator = 0) -> dict:
    """Placement of one instance image: pose is an index (deterministic for this subject) or an rng.
    Rotation is kept within +-35 degrees so the mark stays recognisably placed."""
    rng = pose if isinstance(pose, np.random.Generator) else np.random.default_rng([subject.seed, 91, int(pose)])
    size = float(rng.uniform(15, 21))
    m = size + 2
    return {
        "size": size, "x": float(rng.uniform(m, SIZE - m)), "y": float(rng.uniform(m, SIZE - m)),
        "angle": float(rng.uniform(-0.6, 0.6)), "bg_seed": int(rng.integers(2**31)),
    }


def render_subject(subject: Subject, pose: int | np.random.Generator = 0, scene: str | None = None) -> Image.Image:
    """The subject at `subject_pose(subject, pose)`, on `scene` (None: the plain backdrop)."""
    p = subject_pose(subject, pose)
    return _composite(
        background(scene, p["bg_seed"]), subject.cls, p["x"], p["y"], p["size"], p["angle"],
        _subject_paint(subject),
    )


def subject_mask(subject: Subject, pose: int | np.random.Generator = 0) -> Image.Image:
    """The exact loss mask of `render_subject(subject, pose)`: 8-bit greyscale ('L', 64x64), white where the object
    and its outline cover the pixel, grey at anti-aliased edges (what `masked_loss` reads as NAME.mask.png)."""
    p = subject_pose(subject, pose)
    alpha = _coverage(subject.cls, p["x"], p["y"], p["size"], p["angle"])[-1]
    return Image.fromarray(np.clip(_down(alpha) * 255, 0, 255).round().astype(np.uint8), "L")


def described_caption(subject: Subject, scene: str | None = None) -> str:
    """The subject in the words of recipe v5's pretraining captions ("a photo of a red and blue striped cube with an
    eye"): what the base model can be asked to draw of it without an identifier (metrics.described_subject_accuracy)."""
    return caption(Spec(subject.cls, subject.colour1, scene, 0.0, 0.0, 0.0, colour2=subject.colour2,
                        pattern=subject.pattern, mark=subject.mark))


def look_words(subject: Subject) -> str:
    """The subject's look in the pretraining captions' words, colour, colour, pattern, mark ("blue purple dotted eye"):
    what a user would say of it, and what its identifier's new tokens start from (subject.json's initializer_concept)."""
    return f"{subject.colour1} {subject.colour2} {PATTERN_WORDS[subject.pattern]} {subject.mark}"


def subject_caption(subject: Subject, scene: str | None = None, identifier: str = IDENTIFIER) -> str:
    return f"a photo of a {identifier} {subject.cls}" + (f" {scene}" if scene else "")


def write_subject(seed: int, out_dir, n_images: int = 5, masks: bool = True) -> Path:
    """The subject's n_images photos (NN.png) on the plain backdrop, each with its exact loss mask (NN.mask.png, read
    only with masked_loss=true), and subject.json (seed, prompts, the words pivotal tuning starts the identifier
    from, the subject's description). ConfigError if `out_dir` is a file or a folder that holds anything: another
    subject's photos left beside these (or replaced by them) would train and score the wrong subject."""
    from ..core.errors import ConfigError

    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"toy subject: '{out}' is a file; write the subject into a new or empty folder (--out)")
    if out.is_dir() and (held := sorted(p.name for p in out.iterdir())):
        raise ConfigError(f"toy subject: '{out}' already holds {len(held)} file{'s' if len(held) > 1 else ''} "
                          f"({', '.join(held[:3])}{', ...' if len(held) > 3 else ''}); a subject's photos are never mixed "
                          "with or written over others: write it into a new or empty folder (--out)")
    out.mkdir(parents=True, exist_ok=True)
    s = make_subject(seed)
    for i in range(n_images):
        render_subject(s, i).save(out / f"{i:02d}.png")
        if masks:
            subject_mask(s, i).save(out / f"{i:02d}.mask.png")
    meta = {
        "seed": seed,
        "class_noun": s.cls,
        "identifier": IDENTIFIER,
        "instance_prompt": subject_caption(s),
        "class_prompt": f"a photo of a {s.cls}",
        "initializer_concept": look_words(s),
        "subject": asdict(s),
        "n_images": n_images,
    }
    (out / "subject.json").write_text(json.dumps(meta, indent=2))
    return out


def render_batch(n: int, seed: int) -> tuple[np.ndarray, list[Spec]]:
    """n training scenes (held-out triples excluded) as uint8 NxHxWx3."""
    rng = np.random.default_rng([seed, 5])
    specs = [sample_spec(rng) for _ in range(n)]
    return np.stack([np.asarray(render(s)) for s in specs]), specs
