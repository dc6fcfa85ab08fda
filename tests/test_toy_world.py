import json
from itertools import combinations

import numpy as np
import pytest

from nanobooth.toy import world
from nanobooth.toy.world import CLASSES, COLOURS, HELD_OUT, SCENES, Spec


def test_sample_and_render_are_deterministic():
    a = world.sample_spec(np.random.default_rng(3))
    b = world.sample_spec(np.random.default_rng(3))
    assert a == b
    ia, ib = np.asarray(world.render(a)), np.asarray(world.render(b))
    assert ia.shape == (64, 64, 3) and ia.dtype == np.uint8
    assert np.array_equal(ia, ib)
    c = world.sample_spec(np.random.default_rng(4))
    assert not np.array_equal(ia, np.asarray(world.render(c)))


def test_caption_style():
    s = Spec("star", "blue", "on the beach", 12, 32, 32)
    assert world.caption(s) == "a photo of a blue star on the beach"
    assert world.caption(s, colour=False, scene=False) == "a photo of a star"
    assert world.caption(s, colour=False, identifier="sks") == "a photo of a sks star on the beach"
    plain = Spec("star", "blue", None, 12, 32, 32)  # the plain backdrop goes unnamed
    assert world.caption(plain) == "a photo of a blue star"


def test_plain_specs_render_on_the_subjects_backdrop():
    rng = np.random.default_rng(5)
    specs = [world.sample_spec(rng, plain=True) for _ in range(20)]
    assert all(s.scene is None for s in specs) and len({s.cls for s in specs}) > 2
    img = np.asarray(world.render(specs[0])).astype(np.float32)
    bg = world.background(None, specs[0].bg_seed)
    corner = (slice(0, 6), slice(0, 6)) if specs[0].x > 20 or specs[0].y > 20 else (slice(58, 64), slice(58, 64))
    assert np.abs(img[corner] - np.clip(bg[corner], 0, 255)).max() <= 1.0


def test_held_out_is_excluded_but_composable():
    assert len(HELD_OUT) == 20
    rng = np.random.default_rng(0)
    seen = {(s.cls, s.colour, s.scene) for s in (world.sample_spec(rng) for _ in range(3000))}
    assert not seen & HELD_OUT
    assert world.is_held_out(Spec(*sorted(HELD_OUT)[0], 12, 32, 32))
    # every attribute pair of a held-out triple still occurs in training
    train = {(c, k, s) for c in CLASSES for k in COLOURS for s in SCENES} - HELD_OUT
    for t in HELD_OUT:
        for a, b in combinations(range(3), 2):
            assert any(u[a] == t[a] and u[b] == t[b] for u in train)
    caps = world.held_out_captions()
    assert caps == world.held_out_captions() and len(caps) == 20
    assert all(c.startswith("a photo of a ") for c in caps)


def test_scene_backgrounds_are_distinct():
    means = {s: world.background(s, 0).reshape(-1, 3).mean(0) for s in SCENES}
    for a, b in combinations(SCENES, 2):
        assert np.abs(means[a] - means[b]).sum() > 40, (a, b)
    with pytest.raises(ValueError):
        world.background("on the moon")


@pytest.mark.parametrize("colour", COLOURS)
def test_object_shows_its_colour(colour):
    img = np.asarray(world.render(Spec("star", colour, "at night", 16, 32, 32))).astype(int)
    assert np.abs(img[32, 32] - np.array(world.RGB[colour])).max() <= 2
    # a ring has a hole: the background shows through at its centre
    ring = np.asarray(world.render(Spec("ring", colour, "at night", 16, 32, 32))).astype(int)
    assert np.abs(ring[32, 32] - np.array(world.RGB[colour])).max() > 60


def test_classes_have_different_silhouettes():
    masks = []
    for c in CLASSES:
        img = np.asarray(world.render(Spec(c, "white", "at night", 16, 32, 32, angle=0.3, bg_seed=1)))
        masks.append(img.mean(2) > 120)
    for a, b in combinations(range(len(CLASSES)), 2):
        assert (masks[a] ^ masks[b]).sum() > 40, (CLASSES[a], CLASSES[b])


def test_subjects_are_seeded_and_distinct():
    s = world.make_subject(5)
    assert s == world.make_subject(5)
    assert s.colour1 != s.colour2 and s.cls in CLASSES
    subs = {(t.cls, t.colour1, t.colour2, t.pattern, t.mark) for t in map(world.make_subject, range(20))}
    assert len(subs) >= 15
    a0, a0b, a1 = (np.asarray(world.render_subject(s, i)) for i in (0, 0, 1))
    assert np.array_equal(a0, a0b) and not np.array_equal(a0, a1)
    in_snow = np.asarray(world.render_subject(s, 0, "in the snow"))
    assert not np.array_equal(a0, in_snow)


def test_subject_is_not_a_plain_world_object():
    # two colours: a base-world object of the same class is one flat colour
    s = world.make_subject(0)
    img = np.asarray(world.render_subject(s, 0)).reshape(-1, 3).astype(int)
    near = lambda c: (np.abs(img - np.array(world.RGB[c])).max(1) < 25).sum()  # noqa: E731
    assert near(s.colour1) > 20 and near(s.colour2) > 20


def test_write_subject(tmp_path):
    out = world.write_subject(7, tmp_path / "subj", n_images=5)
    assert sorted(p.name for p in out.glob("*.png")) == sorted([f"{i:02d}.png" for i in range(5)]
                                                              + [f"{i:02d}.mask.png" for i in range(5)])
    meta = json.loads((out / "subject.json").read_text())
    cls = world.make_subject(7).cls
    assert meta["seed"] == 7 and meta["class_noun"] == cls and meta["identifier"] == "sks"
    assert meta["instance_prompt"] == f"a photo of a sks {cls}"
    assert meta["class_prompt"] == f"a photo of a {cls}"
    s = world.make_subject(7)  # its look in the pretraining captions' words, which pivotal tuning starts from
    assert meta["initializer_concept"] == world.look_words(s) == f"{s.colour1} {s.colour2} {world.PATTERN_WORDS[s.pattern]} {s.mark}"
    assert all(w in world.described_caption(s) for w in meta["initializer_concept"].split())
    assert world.subject_caption(world.make_subject(7), "on the beach") == f"a photo of a sks {cls} on the beach"


def test_a_subject_is_never_written_over_or_beside_other_photos(tmp_path, capsys):
    # newcomer50: `toy subject --seed 999` into subject 12345's folder replaced its photos and subject.json, and a
    # 3-image subject into a 5-image folder left two photos of the other subject beside its own
    from nanobooth.cli import main

    first = world.write_subject(7, tmp_path / "subj", n_images=5)
    before = {p.name: p.read_bytes() for p in first.iterdir()}
    for seed, n in ((999, 5), (8, 3)):
        assert main(["toy", "subject", "--seed", str(seed), "--num-images", str(n), "--out", str(first)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and "already holds 11 files (00.mask.png, 00.png, 01.mask.png, ...)" in err
        assert "new or empty folder" in err and "Traceback" not in err
    assert {p.name: p.read_bytes() for p in first.iterdir()} == before
    (tmp_path / "a-file").write_text("x")
    assert main(["toy", "subject", "--seed", "7", "--out", str(tmp_path / "a-file")]) == 2
    assert "is a file" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["toy", "subject", "--seed", "7", "--out", str(tmp_path / "empty")]) == 0  # an empty folder is fine


def test_subject_mask_covers_exactly_what_differs_from_the_backdrop(tmp_path):
    # the mask is the object's coverage: the photo equals the plain backdrop where the mask is 0, and the
    # loader reads it as the photo's loss mask (masked_loss) and not as a photo
    from nanobooth.core.data import image_paths, mask_of

    s = world.make_subject(7)
    out = world.write_subject(7, tmp_path / "subj", n_images=2)
    for i in range(2):
        photo = np.asarray(world.render_subject(s, i)).astype(int)
        bg = world.background(None, world.subject_pose(s, i)["bg_seed"]).round().astype(int)
        mask = np.asarray(mask_of(out / f"{i:02d}.png"))
        assert mask.shape == (world.SIZE, world.SIZE) and mask.dtype == np.uint8
        assert 0.05 < (mask > 0).mean() < 0.6 and (mask == 255).sum() > 0.7 * (mask > 0).sum()
        assert (photo[mask == 0] == bg[mask == 0]).all()
        assert (np.abs(photo - bg).max(-1)[mask == 255] > 0).mean() > 0.9
    assert [p.name for p in image_paths(out)] == ["00.png", "01.png"]
    assert not list(world.write_subject(7, tmp_path / "bare", n_images=2, masks=False).glob("*.mask.png"))


def test_described_caption_names_the_subject_as_pretraining_captions_do():
    s = world.make_subject(7)
    words = f"{s.colour1} and {s.colour2} {world.PATTERN_WORDS[s.pattern]} {s.cls} with {world.MARK_WORDS[s.mark]}"
    assert world.described_caption(s) == f"a photo of a {words}"
    assert world.described_caption(s, "at night") == f"a photo of a {words} at night"


# ------------------------------------------------- recipe v5: patterned, marked objects in pretraining
def test_patterned_captions_name_colours_pattern_and_mark_together():
    s = Spec("cube", "red", "on grass", 16, 32, 32, colour2="blue", pattern="stripes", scale=2.0, mark="eye")
    assert world.caption(s) == "a photo of a red and blue striped cube with an eye on grass"
    # without colours the look goes too, unless asked for: "a photo of a red cube" stays a flat red one
    assert world.caption(s, colour=False) == "a photo of a cube on grass"
    assert world.caption(s, colour=False, look=True) == "a photo of a striped cube with an eye on grass"
    assert world.caption(s, scene=False) == "a photo of a red and blue striped cube with an eye"
    solid = Spec("ball", "pink", None, 16, 32, 32, colour2="cyan", pattern="solid", scale=2.0, mark="spot")
    assert world.caption(solid) == "a photo of a pink ball with a spot"
    unmarked = Spec("ring", "cyan", None, 16, 32, 32, colour2="white", pattern="dots", scale=2.0, mark="none")
    assert world.caption(unmarked) == "a photo of a cyan and white dotted ring"


def test_patterned_spec_renders_exactly_as_the_subject_it_describes():
    # the pretraining objects are drawn by the subjects' own painter: same attributes, same pixels
    subj = world.make_subject(11)
    p = world.subject_pose(subj, 2)
    spec = Spec(subj.cls, subj.colour1, "on the beach", p["size"], p["x"], p["y"], p["angle"], p["bg_seed"],
                colour2=subj.colour2, pattern=subj.pattern, scale=subj.scale, mark=subj.mark)
    assert np.array_equal(np.asarray(world.render(spec)), np.asarray(world.render_subject(subj, 2, "on the beach")))
    # the pretraining-only looks: a solid colour with a spot, and a pattern without a mark
    solid = dict(cls="ball", colour="orange", scene=None, size=16, x=32, y=32, colour2="blue", scale=2.0)
    spot = np.asarray(world.render(Spec(**solid, pattern="solid", mark="spot"))).astype(int)
    assert np.abs(spot[32, 32] - np.array(world.RGB["black"])).max() <= 2  # the spot sits at the centre
    flat = np.asarray(world.render(Spec(**{k: v for k, v in solid.items() if k != "colour2"}))).astype(int)
    differs = np.abs(spot - flat).max(-1) > 0
    assert 20 < differs.sum() < 80 and not differs[:, :24].any()  # elsewhere a flat orange ball (r 0.24: ~45 px)
    bare = np.asarray(world.render(Spec(**solid, pattern="halves", mark="none"))).astype(int)
    assert np.abs(bare[32, 32] - np.array(world.RGB["black"])).max() > 60


def test_sample_patterned_spec_covers_the_subjects_attributes():
    a = world.sample_patterned_spec(np.random.default_rng(3))
    assert a == world.sample_patterned_spec(np.random.default_rng(3))
    rng = np.random.default_rng(0)
    specs = [world.sample_patterned_spec(rng, plain=bool(i % 2)) for i in range(400)]
    assert {s.pattern for s in specs} == {"solid", *world.PATTERNS}
    assert {s.mark for s in specs} == {"none", *world.MARKS}
    assert not any(s.pattern == "solid" and s.mark == "none" for s in specs)  # that is a plain object
    assert {s.colour for s in specs} | {s.colour2 for s in specs} >= {"pink", "cyan"}
    assert all(s.colour != s.colour2 for s in specs)
    assert all(s.scene is None for s in specs[1::2]) and all(s.scene in SCENES for s in specs[::2])
    assert all(abs(s.angle) <= 0.6 for s in specs)  # posed like the subjects, so marks sit where theirs do


def test_toy_subject_command_counts_one_image_in_the_singular(tmp_path, capsys):
    from types import SimpleNamespace

    from nanobooth.toy.cli import cmd_subject

    cmd_subject(SimpleNamespace(seed=3, out=str(tmp_path / "one"), num_images=1))
    assert capsys.readouterr().out.startswith(f"wrote 1 image of subject 3 to {tmp_path / 'one'}\n")
    cmd_subject(SimpleNamespace(seed=3, out=str(tmp_path / "two"), num_images=2))
    assert capsys.readouterr().out.startswith(f"wrote 2 images of subject 3 to {tmp_path / 'two'}\n")


def test_a_class_outside_the_world_is_named_for_the_scores_reader():
    """newcomer57: toy eval of a run on the example dog printed subject fidelity 0.84 with no word that the probe reads
    only balls, cubes, stars, rings and cups."""
    assert world.outside_world("star") is None and world.outside_world("cups") is None
    said = world.outside_world("dog")
    assert said.startswith("the class 'dog' is not in the toy world (balls, cubes, stars, rings, cups)")
    assert "do not measure this subject" in said
