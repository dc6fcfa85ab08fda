"""The UI's workspace (ui/workspace.py): uploads checked by content and size and saved under names made
here, per-photo warnings, and config paths kept inside the workspace."""

import os

import pytest
from PIL import Image

from nanobooth.core.config import ConfigError, load_config
from nanobooth.core.data import check_images
from nanobooth.ui import workspace as W


def test_uploads_are_checked_by_content_and_size_and_never_keep_their_names(tmp_path, monkeypatch):
    ws = W.Workspace(tmp_path / "ws")
    up = tmp_path / "up"
    up.mkdir()
    Image.new("RGB", (80, 60), "red").save(up / "..evil name;.png")  # a name no path should carry
    Image.new("RGB", (80, 60), "blue").save(up / "photo.gif", format="PNG")  # the content decides, not the name
    (up / "notes.jpg").write_text("not an image")
    big = up / "big.png"
    Image.new("RGB", (8, 8)).save(big)
    monkeypatch.setattr(W, "MAX_UPLOAD_BYTES", big.stat().st_size - 1)  # every png of these sizes is over
    folder, refused = ws.save_uploads([up / "notes.jpg", big])
    assert folder is None and len(refused) == 2
    assert "file 1 (`notes.jpg`): not an image" in refused[0] and "file 2 (`big.png`):" in refused[1] and "limit" in refused[1]
    monkeypatch.setattr(W, "MAX_UPLOAD_BYTES", 10**7)
    folder, refused = ws.save_uploads([up / "..evil name;.png", up / "photo.gif", up / "notes.jpg"])
    assert refused == ["file 3 (`notes.jpg`): not an image (JPEG, PNG, WebP, BMP, GIF or TIFF); skipped"]
    assert folder.parent == ws.root / "subjects"
    assert sorted(p.name for p in folder.iterdir()) == [W.UPLOADED, "photo-00.png", "photo-01.png"]
    # the names as uploaded are shown beside the saved ones, as text
    assert W.photo_label(folder, folder / "photo-00.png") == "`..evil name;.png` (saved as photo-00.png)"
    assert W.shown_name("a`b\n**c**.png") == "`ab**c**.png`" and len(W.shown_name("x" * 500)) == 62


def test_the_ui_and_the_training_log_warn_a_small_photo_in_the_same_words(tmp_path, caplog):
    """One function says it (data.upscale_warning): the UI's note is the CLI's log line without the path (they
    were two texts, '; it will be upscaled' and ': upscaled', kept apart by hand)."""
    import logging

    from nanobooth.core.data import load_folder

    small = tmp_path / "small.png"
    Image.new("RGB", (40, 90)).save(small)
    with caplog.at_level(logging.WARNING, logger="nanobooth"):
        load_folder(tmp_path, 64)
    [note] = W.photo_warnings(small, 64)
    assert [r.getMessage() for r in caplog.records if "smaller" in r.getMessage()] == [f"{small}: {note}"]


def test_photo_warnings_name_small_rotated_cmyk_and_unreadable_photos(tmp_path):
    ok = tmp_path / "ok.jpg"
    Image.new("RGB", (96, 96)).save(ok)
    small = tmp_path / "small.png"
    Image.new("RGB", (40, 90)).save(small)
    cmyk = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (96, 96)).save(cmyk)
    rotated = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[W.EXIF_ORIENTATION] = 6
    Image.new("RGB", (96, 128)).save(rotated, exif=exif)
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(ok.read_bytes()[:200])
    assert W.photo_warnings(ok, 64) == []
    assert W.photo_warnings(small, 64) == ["40x90 is smaller than resolution 64: upscaled (blurry)"]
    assert W.photo_warnings(cmyk, 64) == ["CMYK: converted to RGB (colours may shift)"]
    assert W.photo_warnings(rotated, 64) == ["rotated by its EXIF orientation (trained upright, as viewers show it)"]
    # the page names the photo itself (photo_label), once: the CLI's line gives its path, which the page left in twice
    [line] = W.photo_warnings(broken, 64)
    assert line.startswith(W.UNREADABLE + " (") and str(tmp_path) not in line and "replace or remove" not in line


def test_an_unreadable_upload_is_named_as_uploaded_and_the_page_can_remove_it(tmp_path):
    """newcomer: a broken 04.png read "photo-03.png: /.../photo-03.png: cannot read this image (image file is
    truncated); replace or remove the file", and the page had no way to remove it."""
    ws = W.Workspace(tmp_path / "ws")
    up = tmp_path / "up"
    up.mkdir()
    for i in range(1, 6):
        Image.new("RGB", (96, 96), (40 * i, 0, 0)).save(up / f"{i:02d}.png")
    good = (up / "01.png").read_bytes()
    (up / "04.png").write_bytes(good[: len(good) // 2])  # PIL opens it (the header is whole), then cannot decode it
    folder, refused = ws.save_uploads(sorted(up.iterdir()))
    assert refused == [] and len(W.image_paths(folder)) == 5
    items, said, _, unreadable = W.subject_view(folder, 64, "sks", "dog")
    lines = said.splitlines()
    assert unreadable and lines[0].startswith("- `04.png` (saved as photo-03.png): cannot read this image (")
    assert str(tmp_path) not in said and said.count("photo-03.png") == 1
    assert "remove unreadable photos" in lines[-1] and "upload the photos again without them" in lines[-1]
    assert [caption for _, caption in items].count("ok") == 4
    with pytest.raises(W.DataError) as refused:  # Start's refusal (check_images, as the CLI's) names it so too
        check_images(folder)
    said = W.as_uploaded(str(refused.value), folder)
    assert said.startswith("04.png (saved as photo-03.png): cannot read this image") and str(tmp_path) not in said
    assert said.endswith("the subject's 'remove unreadable photos' button does it")
    assert W.as_uploaded("steps must be positive", folder) == "steps must be positive"
    assert ws.remove_unreadable(folder.name) == ["`04.png` (saved as photo-03.png)"]
    assert [p.name for p in W.image_paths(folder)] == ["photo-00.png", "photo-01.png", "photo-02.png", "photo-04.png"]
    assert W.subject_view(folder, 64, "sks", "dog")[1:2] == ("all photos ok",) and ws.remove_unreadable(folder.name) == []
    with pytest.raises(W.DataError, match="no such subject"):  # only a subject's folder, by its name
        ws.remove_unreadable("..")


def test_config_paths_must_stay_inside_the_workspace(tmp_path):
    ws = W.Workspace(tmp_path / "ws")
    inside = load_config("toy/dreambooth-lora", [f"output_dir={ws.runs / 'a'}", "instance_data_dir=example:dog"])
    ws.check_paths(inside)
    for key, value in (("output_dir", tmp_path / "elsewhere"), ("class_data_dir", "/etc"), ("output_dir", ws.root / ".." / "x")):
        cfg = load_config("toy/dreambooth-lora", [f"output_dir={ws.runs / 'a'}", f"{key}={value}"])
        with pytest.raises(ConfigError, match=f"'{key}'.*outside the workspace"):
            ws.check_paths(cfg)
    with pytest.raises(ConfigError, match="'model'.*outside the workspace"):
        ws.check_paths(load_config("toy/dreambooth-lora", [f"output_dir={ws.runs / 'a'}", "model=/opt/models/sd15"]))


def test_the_ui_command_binds_this_machine_only_and_shares_nothing_by_default():
    from nanobooth.cli import cmd_ui, parse_args

    args = parse_args(["ui"])
    assert (args.host, args.port, args.share, args.func) == ("127.0.0.1", 7860, False, cmd_ui)
    args = parse_args(["ui", "--workspace", "ws", "--port", "8000", "--share"])
    assert (args.workspace, args.port, args.share) == ("ws", 8000, True)


def test_the_newest_subject_is_the_last_made_and_a_missing_name_is_one_line(tmp_path):
    ws = W.Workspace(tmp_path / "ws")
    assert ws.newest_subject() is None
    first = ws.toy_subject(7)
    os.utime(first, ns=(1, 1))  # made long ago, whatever its name sorts as
    second = ws.example_dog()
    assert ws.newest_subject() == second.name != first.name
    for name in (None, "", "no-such-subject"):
        with pytest.raises(W.DataError, match="no such subject"):
            ws.subject_folder(name)


def test_a_subject_keeps_the_words_its_run_started_with_and_the_form_follows_the_variant(tmp_path):
    """newcomer54: a reloaded page kept the subject (a toy ball) but reset the class noun to "dog", and Start trained
    "a photo of a sks dog" on it; the prior box stayed unticked for a -prior-pre variant and overrode it."""
    pytest.importorskip("gradio")
    from nanobooth.ui.app import variant_fields

    ws = W.Workspace(tmp_path / "ws")
    ball = ws.toy_subject(3)
    ident, noun = W.subject_names(ball)
    from nanobooth.toy import world

    assert (ident, noun) == ("sks", world.make_subject(3).class_noun) != ("sks", "dog")  # its subject.json's words
    photos = ws.save_uploads([p for p in sorted(ball.iterdir()) if p.suffix == ".png"][:3])[0]
    assert W.subject_names(photos) == ("sks", "dog")  # an upload: the form's default until a run names it
    before = (photos / "subject.json").read_text() if (photos / "subject.json").exists() else None
    W.remember_names(photos, "zwx", "teapot")
    assert W.subject_names(photos) == ("zwx", "teapot") and before is None
    W.remember_names(ball, "sks", "toy ball")  # other keys of a toy subject's subject.json are kept
    import json

    meta = json.loads((ball / "subject.json").read_text())
    assert meta["class_noun"] == "toy ball" and meta["seed"] == 3 and "subject" in meta
    assert W.suggested_prompts("zwx", "teapot") == ("a photo of a zwx teapot\na photo of a zwx teapot on the beach",
                                                    "a photo of a zwx teapot on the beach")
    fam = "toy (embedded, CPU)"
    prior, steps, rank, res, n_class = variant_fields(fam, "dreambooth-lora-prior-pre")
    assert prior is True and res == 64 and n_class == load_config("toy/dreambooth-lora-prior-pre").num_class_images
    assert variant_fields(fam, "dreambooth-lora")[0] is False
    assert variant_fields(fam, "dreambooth-prior-pre")[1] == load_config("toy/dreambooth-prior-pre").max_train_steps
    assert variant_fields("SDXL", "dreambooth-prior-pre")[3] == load_config("sdxl/dreambooth-prior-pre").resolution


def test_a_subject_outside_3_to_20_photos_is_named_with_its_count_and_what_to_do(tmp_path):
    """newcomer: one uploaded photo showed "1 photos: use 3-20" while the header said "Next: 2 Train, then Start"."""
    assert W.photo_count_problem(1).startswith("1 photo: DreamBooth needs 3-20 photos of one subject; upload them")
    assert W.photo_count_problem(0).startswith("0 photos: ")
    assert W.photo_count_problem(W.MIN_PHOTOS) is W.photo_count_problem(W.MAX_PHOTOS) is None
    assert W.photo_count_problem(W.MAX_PHOTOS + 1) == "21 photos: use 3-20; move the extra ones out of the subject's folder"
    ws = W.Workspace(tmp_path / "ws")
    dog = ws.example_dog()
    one = ws.save_uploads(sorted(dog.glob("*.jpg"))[:1])[0]
    said = W.header_md(ws, 0, one)
    assert "2 subjects, 0 runs" in said and "this subject has 1 photo: " in said and "then Start" not in said
    assert "**Next**: *2 Train*, then Start" in W.header_md(ws, 0, dog) and "**Next**: *2 Train*" in W.header_md(ws, 0)
    # newcomer57: the dog's photos were told "the toy model trains on this CPU in minutes", and trained into noise
    assert "pick a real model family" in W.header_md(ws, 0, dog) and "draws only balls" in W.header_md(ws, 0, dog)
    toy = ws.toy_subject(7)
    assert "the toy model trains on this CPU in minutes" in W.header_md(ws, 0, toy)


def test_the_header_says_to_train_a_subject_no_run_has_trained_yet(tmp_path):
    """newcomer: a freshly uploaded subject read "Next: 3 Try it" because the workspace held another subject's run."""
    import yaml

    ws = W.Workspace(tmp_path / "ws")
    dog, toy = ws.example_dog(), ws.toy_subject(7)
    run = ws.runs / "dog-run"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump({"instance_data_dir": str(dog), "method": "lora"}))
    (ws.runs / "starting").mkdir()  # a run loading its model: no config.yaml yet, names no subject
    assert "**Next**: *3 Try it*" in W.header_md(ws, 2, dog)
    assert "**Next**: *2 Train*, then Start" in W.header_md(ws, 2, toy) and "Try it" not in W.header_md(ws, 2, toy)
    assert "**Next**: *3 Try it*" in W.header_md(ws, 2)  # no subject picked: the runs there are


def test_the_export_tab_gives_the_emb_file_and_says_how_to_use_it_in_exports_own_words(tiny_model, subject_dir, tmp_path):
    """newcomer: the Export tab gave a pivotal-tuning run's _emb file without saying what to do with it; the CLI says
    "write 'NAME_emb' where the run's prompts say 'sks'" (interop.export's line, taken as it says it)."""
    from conftest import train_args

    from nanobooth import api

    ws = W.Workspace(tmp_path / "ws")
    run = ws.runs / "pt"
    api.train(load_config("dreambooth-lora", train_args(tiny_model, subject_dir, run, "train_text_encoder_ti=true",
                                                        "train_text_encoder_ti_frac=1.0")))
    files, note = W.export_run(ws, run, "kohya")
    assert [os.path.basename(f) for f in files] == ["pt-kohya.safetensors", "pt-kohya_emb.safetensors"]
    assert all(os.path.isfile(f) and W.Workspace(tmp_path / "ws").inside(f) for f in files)
    assert "write 'pt-kohya_emb' (ComfyUI: 'embedding:pt-kohya_emb') where the run's prompts say 'sks'" in note
    assert "the run's new tokens are in pt-kohya_emb.safetensors: put it in A1111's embeddings/" in note
    assert str(ws.root) not in note and "\n" not in note  # the file's name, as the download gives it; one line
    # (a plain LoRA's export says nothing: the browser test's)


def test_export_notes_are_this_threads_warnings_only(caplog):
    import logging
    import threading

    log = logging.getLogger("nanobooth.somewhere")
    with W.warnings_said() as said:
        log.warning("mine %s", 1)
        log.info("not a warning")
        t = threading.Thread(target=lambda: log.warning("a training job's"))
        t.start()
        t.join()
    log.warning("after")
    assert said == ["mine 1"]
