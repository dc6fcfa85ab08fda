import logging

import numpy as np
import pytest
import torch
from PIL import Image

from nanobooth.core.data import (DataError, ImageSet, Sampler, image_paths, list_images, load_folder, load_image, resolve_data_dir,
                            to_rgb, to_tensor)


def test_modes_convert_to_rgb(tmp_path):
    cmyk = Image.new("CMYK", (40, 40), (0, 255, 255, 0))  # pure red in CMYK
    assert to_rgb(cmyk).mode == "RGB" and to_rgb(cmyk).getpixel((0, 0))[0] > 200
    sixteen = Image.fromarray(np.full((40, 40), 65535, dtype=np.uint16))
    assert to_rgb(sixteen).getpixel((0, 0)) == (255, 255, 255)  # not clipped to a random byte
    pal = Image.new("RGB", (40, 40), (0, 0, 255)).convert("P")
    assert to_rgb(pal).getpixel((0, 0)) == (0, 0, 255)
    rgba = Image.new("RGBA", (40, 40), (255, 0, 0, 0))  # fully transparent red
    assert to_rgb(rgba).getpixel((0, 0)) == (255, 255, 255)  # composited on white, not black or red


def test_exif_rotated_photo_is_upright(tmp_path):
    img = Image.new("RGB", (60, 30), "red")  # landscape pixels ...
    exif = Image.Exif()
    exif[0x0112] = 6  # ... displayed rotated 90 degrees: portrait
    img.save(tmp_path / "p.jpg", exif=exif)
    assert load_image(tmp_path / "p.jpg").size == (30, 60)


def test_truncated_and_corrupt_jpeg_name_the_file(tmp_path):
    Image.new("RGB", (64, 64), "blue").save(tmp_path / "ok.jpg", quality=95)
    data = (tmp_path / "ok.jpg").read_bytes()
    (tmp_path / "trunc.jpg").write_bytes(data[: len(data) // 2])
    (tmp_path / "junk.jpg").write_bytes(b"not a jpeg at all")
    for name in ("trunc.jpg", "junk.jpg"):
        with pytest.raises(DataError, match=f"{name}.*replace or remove"):
            load_image(tmp_path / name)


def test_folder_skips_non_images_and_warns_on_small(tmp_path, caplog):
    Image.new("RGB", (20, 20), "green").save(tmp_path / "a.png")
    (tmp_path / "notes.txt").write_text("hi")
    (tmp_path / ".DS_Store").write_bytes(b"\0")
    with caplog.at_level(logging.WARNING, logger="nanobooth"):
        images = load_folder(tmp_path, resolution=32)
    assert len(images) == 1
    assert "notes.txt: a caption with no photo notes.*" in caplog.text and "smaller than resolution 32" in caplog.text


def test_image_paths_is_the_one_list_of_a_folders_images(tmp_path, subject_dir):
    """What trains (list_images), what a checkpoint records (train.input_record) and what class images count
    (prior.missing_indices) are one list: sorted by name, without hidden files, folders or other files."""
    from nanobooth.core.config import load_config
    from nanobooth.core.prior import missing_indices
    from nanobooth.core.train import input_record

    d = tmp_path / "photos"
    d.mkdir()
    for name in ("b.png", "A.JPG", "c.webp", "class-00001.png"):
        Image.new("RGB", (8, 8)).save(d / name, format="PNG")
    for name in (".DS_Store", ".class-00002.png.tmp", "notes.txt", "subject.json", "caption.png.txt"):
        (d / name).write_text("x")
    (d / "more.png").mkdir()
    want = ["A.JPG", "b.png", "c.webp", "class-00001.png"]  # by name: upper case sorts first, as on disk listings
    assert [p.name for p in image_paths(d)] == want
    assert image_paths(tmp_path / "not-made-yet") == []
    assert [p.name for p in list_images(d)] == want
    assert missing_indices(d, 6) == [0, 2]  # 4 images count; class-00001 exists, so indices 0 and 2 are made
    cfg = load_config("dreambooth-lora-prior-pre", [f"instance_data_dir={d}", f"class_data_dir={d}", "num_class_images=3"])
    record = input_record(cfg, tmp_path)
    assert [n for n, _ in record["instance_data_dir"]] == want and [n for n, _ in record["class_data_dir"]] == want[:3]


def test_missing_and_empty_folders(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_folder(tmp_path / "nope", 32)
    (tmp_path / "readme.md").write_text("x")
    with pytest.raises(DataError, match="no images in"):
        load_folder(tmp_path, 32)
    with pytest.raises(DataError, match="instance_data_dir' is required"):
        resolve_data_dir(None)
    assert (resolve_data_dir("example:dog") / "00.jpg").is_file()


def test_center_crop_and_flip_pixels():
    img = Image.new("RGB", (64, 32), "black")
    img.paste(Image.new("RGB", (16, 32), "white"), (0, 0))  # white band on the left
    s = ImageSet([img], "p")
    x = s.pixels([0], 32, [False], None)
    assert x.shape == (1, 3, 32, 32) and x.min() == -1.0 and x.max() == -1.0  # center crop misses the band
    flipped = ImageSet([img.crop((0, 0, 32, 32))], "p").pixels([0], 32, [True], None)
    assert flipped[0, :, :, -1].min() == 1.0 and flipped[0, :, :, 0].max() == -1.0


def test_sampler_epochs_and_state():
    s = Sampler(5, seed=3)
    first = s.take(5)
    assert sorted(first) == list(range(5))
    state = s.state_dict()
    cont = s.take(7)
    s2 = Sampler(5, seed=99)
    s2.load_state_dict(state)
    assert s2.take(7) == cont
    assert torch.equal(Sampler(5, 3).generator.get_state(), Sampler(5, 3).generator.get_state())


def test_sample_reports_original_size_and_crop_of_each_image(tmp_path):
    Image.new("RGB", (49, 40), "red").save(tmp_path / "a.png")  # -> 39x32: centre crop at left 3
    img = Image.new("RGB", (60, 40), "blue")  # stored landscape, shown portrait (40x60) -> 32x48: crop at top 8
    exif = Image.Exif()
    exif[0x0112] = 6
    img.save(tmp_path / "b.jpg", exif=exif)
    s = ImageSet.from_folder(tmp_path, "p", 32, "instance_data_dir")
    assert s.original_sizes == [(40, 49), (60, 40)]  # (h, w) of the upright photo, before resizing
    pixels, coords = s.sample([0, 1, 0], 32, [False, False, True], None)
    assert pixels.shape == (3, 3, 32, 32)
    # a mirrored crop at left 3 of the 39 px wide image is the crop at left 39 - 32 - 3 = 4 of the mirrored image
    assert coords.tolist() == [[40, 49, 0, 3], [60, 40, 8, 0], [40, 49, 0, 4]]
    g = torch.Generator().manual_seed(0)
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 40, 3), dtype=np.uint8))
    for flip in (False, True):
        px, c = ImageSet([noise], "p").sample([0], 32, [flip], g)  # random crop; sizes of the image itself
        h, w, top, left = c[0].tolist()
        seen = noise.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if flip else noise
        assert (h, w, top) == (32, 40, 0) and torch.equal(px[0], to_tensor(seen.crop((left, 0, left + 32, 32))))


def _photos(folder, names):
    folder.mkdir()
    for i, n in enumerate(names):
        Image.new("RGB", (40, 40), (40 * i, 0, 0)).save(folder / n)
    return folder


def test_caption_beside_a_photo_is_its_prompt_else_instance_prompt(tmp_path, caplog):
    from nanobooth.core.data import caption_of

    folder = _photos(tmp_path / "s", ["a.png", "b.jpg", "c.png"])
    (folder / "a.txt").write_text("a photo of sks dog\n on the grass \n")
    (folder / "b.txt").write_text("  \n")  # empty: the fallback
    (folder / "notes.txt").write_text("not a caption")
    with caplog.at_level(logging.WARNING, logger="nanobooth"):
        s = ImageSet.from_folder(folder, "a photo of sks dog", 32, "instance_data_dir", captions=True)
    assert s.captions == ["a photo of sks dog on the grass", "a photo of sks dog", "a photo of sks dog"]
    assert [s.prompt_of(i) for i in range(3)] == s.captions
    assert s.distinct_prompts() == ["a photo of sks dog on the grass", "a photo of sks dog"]
    warned = caplog.text
    assert "notes.txt" in warned and "a.txt" not in warned  # a caption is not "not an image file"
    plain = ImageSet.from_folder(folder, "a photo of sks dog", 32, "instance_data_dir")  # class images: no captions
    assert plain.captions is None and plain.distinct_prompts() == ["a photo of sks dog"]
    (folder / "a.txt").unlink()
    (folder / "b.txt").unlink()
    assert ImageSet.from_folder(folder, "p", 32, "instance_data_dir", captions=True).captions is None  # none: the old path
    assert caption_of(folder / "c.png", "fallback") == "fallback"


def test_caption_edge_cases_each_warn_once_naming_the_file(tmp_path, caplog):
    """newcomer12: an empty caption, a caption without the identifier and a caption with no photo were silent or
    said twice that a .txt is 'not an image file'. Each is now one line naming the file (the identifier one lists
    every file in one line); not errors."""
    folder = _photos(tmp_path / "s", ["a.png", "b.png", "c.png", "d.png"])
    (folder / "a.txt").write_text(" \n")  # empty: instance_prompt, said
    (folder / "b.txt").write_text("a photo of a dog on the beach")  # no identifier: trains as the class
    (folder / "c.txt").write_text("a photo of sks, dog")  # the identifier, punctuation touching it
    (folder / "07.txt").write_text("a photo of sks dog")  # no 07.png: skipped
    fill = {"identifier": "sks", "class": "dog"}
    with caplog.at_level(logging.WARNING, logger="nanobooth"):
        s = ImageSet.from_folder(folder, "a photo of sks dog", 32, "instance_data_dir", captions=True, fill=fill)
    lines = [r.getMessage() for r in caplog.records]
    assert s.captions == ["a photo of sks dog", "a photo of a dog on the beach", "a photo of sks, dog", "a photo of sks dog"]
    assert lines == [f"{folder / '07.txt'}: a caption with no photo 07.* beside it (e.g. 07.png), skipped; add the photo or "
                     "remove the caption",
                     f"{folder / 'a.txt'}: empty caption; this photo trains with instance_prompt 'a photo of sks dog' (write a "
                     "caption or remove the file)",
                     f"{folder}: caption b.txt does not contain the identifier 'sks': that photo does not bind the subject to "
                     "it (add 'sks' where the photo shows the subject)"]
    (folder / "d.txt").write_text("sksdog in the snow")  # a longer word is not the identifier
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="nanobooth"):
        ImageSet.from_folder(folder, "a photo of sks dog", 32, "instance_data_dir", captions=True, fill=fill)
    ident = [m for r in caplog.records if "identifier" in (m := r.getMessage())]
    assert len(ident) == 1 and "captions b.txt, d.txt do not contain the identifier 'sks'" in ident[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="nanobooth"):  # held-out photos bind nothing: no identifier warning
        ImageSet.from_folder(folder, "a photo of sks dog", 32, "validation_images_dir", captions=True, fill=fill)
    assert not any("identifier" in r.getMessage() for r in caplog.records)


def test_caption_placeholders_and_unreadable_captions_name_the_file(tmp_path):
    from types import SimpleNamespace

    from nanobooth.core.config_values import caption_words

    cfg = SimpleNamespace(instance_prompt="a photo of sks dog", class_prompt="a photo of dog", token_abstraction=None)
    fill = caption_words(cfg)
    assert fill == {"identifier": "sks", "class": "dog"}
    assert caption_words(SimpleNamespace(**{**vars(cfg), "token_abstraction": "zwx"})) == {"identifier": "zwx"}  # not in the prompt
    assert caption_words(SimpleNamespace(**{**vars(cfg), "class_prompt": None})) == {}  # every word is "the identifier"
    folder = _photos(tmp_path / "s", ["a.png"])
    (folder / "a.txt").write_text("{identifier} {class} asleep on a {class} bed")
    assert ImageSet.from_folder(folder, cfg.instance_prompt, 32, "instance_data_dir", captions=True,
                                fill=fill).captions == ["sks dog asleep on a dog bed"]
    with pytest.raises(DataError, match=r"a\.txt: \{identifier\} cannot be told from instance_prompt"):  # nothing to fill it
        ImageSet.from_folder(folder, cfg.instance_prompt, 32, "instance_data_dir", captions=True)
    (folder / "a.txt").write_text("a photo of {identifier} {clss}")  # a typo would train as literal braces
    with pytest.raises(DataError, match=r"a\.txt: unknown placeholder \{clss\}; a caption may use \{identifier\} and \{class\}"):
        ImageSet.from_folder(folder, cfg.instance_prompt, 32, "instance_data_dir", captions=True, fill=fill)
    (folder / "a.txt").write_bytes(b"\xff\xfe\xfa caption")
    with pytest.raises(DataError, match=r"a\.txt: cannot read this caption"):
        ImageSet.from_folder(folder, "a photo of sks dog", 32, "instance_data_dir", captions=True)


def test_caption_dropout_rate_and_determinism():
    from nanobooth.core.data import drop_captions

    prompts = [f"p{i % 3}" for i in range(20000)]
    a = drop_captions(prompts, 0.3, torch.Generator().manual_seed(0))
    assert abs(sum(x == "" for x in a) / len(a) - 0.3) < 0.015  # binomial sd 0.0032: a 4.6-sigma band
    assert all(x in ("", p) for x, p in zip(a, prompts))  # dropped or kept as is, never shuffled
    assert a == drop_captions(prompts, 0.3, torch.Generator().manual_seed(0))  # same generator state, same draws
    assert a != drop_captions(prompts, 0.3, torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(0)
    drop_captions(prompts[:10], 0.5, g)  # the generator advances: one draw per prompt, so a resumed state continues it
    assert torch.equal(g.get_state(), (lambda h: (torch.rand(10, generator=h), h.get_state())[1])(torch.Generator().manual_seed(0)))
    assert drop_captions(prompts[:100], 0.0, torch.Generator().manual_seed(0)) == prompts[:100]


# --- masked_loss: masks beside photos or in their alpha ---------------------------------------------------------

def test_masks_from_alpha_or_mask_file_follow_crop_and_flip(tmp_path, caplog):
    from nanobooth.core.data import latent_masks, mask_of

    rgba = Image.new("RGBA", (48, 32), (255, 0, 0, 0))
    rgba.paste((0, 0, 255, 255), (0, 0, 16, 32))  # the left third opaque: the subject
    rgba.save(tmp_path / "a.png")
    Image.new("RGB", (32, 32), "green").save(tmp_path / "b.jpg")
    m = Image.new("L", (32, 32), 0)
    m.paste(255, (0, 0, 32, 8))  # the top quarter
    m.save(tmp_path / "b.mask.png")
    Image.new("RGB", (32, 32), "blue").save(tmp_path / "c.png")  # no mask
    assert [p.name for p in image_paths(tmp_path)] == ["a.png", "b.jpg", "c.png"]  # the mask is no photo
    assert mask_of(tmp_path / "a.png").getpixel((0, 0)) == 255 and mask_of(tmp_path / "a.png").getpixel((40, 0)) == 0
    with caplog.at_level(logging.WARNING, logger="nanobooth"):
        s = ImageSet.from_folder(tmp_path, "p", 32, "instance_data_dir", masks=True)
    warned = [r.getMessage() for r in caplog.records]
    assert any("c.png" in w and "unmasked" in w for w in warned) and not any("b.mask.png" in w for w in warned)
    pixels, _, masks = s.sample([0, 1, 2, 0], 32, [False, False, False, True], None, with_masks=True)
    assert masks.shape == (4, 1, 32, 32)
    # a: 48x32 centre-cropped at left 8: mask columns 0..7 are the alpha's 8..15 (opaque), the rest transparent
    assert torch.all(masks[0, 0, :, :8] == 1) and torch.all(masks[0, 0, :, 8:] == 0)
    assert torch.all(masks[3, 0, :, -8:] == 1) and torch.all(masks[3, 0, :, :-8] == 0)  # mirrored with the pixels
    assert torch.all(masks[1, 0, :8] == 1) and torch.all(masks[1, 0, 8:] == 0)  # b.mask.png
    assert torch.all(masks[2] == 1)  # no mask: all ones
    assert torch.all(pixels[0, :, :, 8:] == 1.0)  # the transparent pixels are white, as before
    # area averaging onto a 4x4 latent grid: a: columns 0..7 of 32 = the first latent column
    lat = latent_masks(masks, (4, 4))
    assert torch.equal(lat[0, 0], torch.tensor([[1.0, 0, 0, 0]] * 4))
    half = torch.zeros(1, 1, 4, 4)
    half[..., :, :1] = 1.0  # one pixel column of 4 -> a 1x2 grid's left cell covers 2 columns: 0.5
    assert latent_masks(half, (1, 2)).flatten().tolist() == [0.5, 0.0]


def test_masked_loss_with_no_mask_in_the_folder_is_refused_in_one_line_before_anything_is_written(tiny_model, subject_dir,
                                                                                                   tmp_path, capsys):
    """masked_loss=true on photos with neither NAME.mask.png nor alpha: one line naming the folder and the fixes, no run
    folder (it warned per photo and trained unmasked)."""
    from conftest import train_args

    from nanobooth.cli import main

    out = tmp_path / "run"
    assert main(["train", "toy/dreambooth-lora", *train_args(tiny_model, subject_dir, out, "masked_loss=true", "instance_prompt=a sks dog", "class_prompt=a dog", prior=False)]) != 0
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and f"instance_data_dir={subject_dir}" in err and "Traceback" not in err
    assert "NAME.mask.png" in err and "alpha channel" in err and "masked_loss=false" in err
    assert not out.exists()
    Image.new("RGB", (32, 32)).save(tmp_path / "a.png")  # one mask of two is enough: the other photo warns and trains unmasked
    Image.new("RGB", (32, 32)).save(tmp_path / "b.png")
    Image.new("L", (32, 32), 255).save(tmp_path / "b.mask.png")
    assert ImageSet.from_folder(tmp_path, "p", 32, "instance_data_dir", masks=True).masks[0] is None


def test_a_mask_of_another_size_names_the_file(tmp_path):
    from nanobooth.core.data import mask_of

    Image.new("RGB", (32, 32)).save(tmp_path / "b.jpg")
    Image.new("L", (16, 16)).save(tmp_path / "b.mask.png")
    with pytest.raises(DataError) as e:
        mask_of(tmp_path / "b.jpg")
    # one line, the file named once, one fix (it was wrapped in "cannot read this mask (...); replace or remove the file")
    assert str(e.value) == f"{tmp_path / 'b.mask.png'}: the mask is 16x16 but b.jpg is 32x32; save the mask at the photo's size"


def test_a_mask_without_its_photo_is_refused_in_one_line(tmp_path):
    """NAME.mask.png with no NAME.* photo: one DataError naming the mask (it trained as a photo of the subject)."""
    Image.new("RGB", (32, 32)).save(tmp_path / "a.png")
    Image.new("L", (32, 32), 255).save(tmp_path / "a.mask.png")
    assert list_images(tmp_path) == [tmp_path / "a.png"]  # a mask beside its photo is no photo
    Image.new("L", (32, 32), 255).save(tmp_path / "09.mask.png")
    with pytest.raises(DataError, match=r"09\.mask\.png: a loss mask with no photo 09\.\* beside it") as e:
        list_images(tmp_path)
    assert "\n" not in str(e.value)


def test_every_unreadable_photo_is_named_at_once(tmp_path):
    # newcomer55: b.jpg was named, fixed, and only the rerun named c.png
    from nanobooth.core.data import check_images

    Image.new("RGB", (8, 8), "red").save(tmp_path / "a.png")
    (tmp_path / "b.jpg").write_bytes(b"not a jpeg")
    (tmp_path / "c.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(DataError) as e:
        check_images(tmp_path)
    line = str(e.value)
    assert line.startswith("2 photos cannot be read as images: ") and "b.jpg" in line and "c.png" in line and "a.png" not in line
    (tmp_path / "b.jpg").unlink()
    with pytest.raises(DataError, match=r"c\.png: cannot read this image"):  # one: its own line, as before
        check_images(tmp_path)
