"""core/prechecks.py: the CLI's, the UI's and train()'s pre-checks are one function."""

import pytest
from conftest import train_args

import nanobooth.core.train as train_mod
from nanobooth.core.config import load_config
from nanobooth.core.data import DataError
from nanobooth.core.errors import ConfigError


def test_a_library_train_runs_the_cli_prechecks_before_loading_a_model(tiny_model, subject_dir, tmp_path, monkeypatch):
    """train() called from Python refuses a class_data_dir that is a file before it loads the model, in the CLI's
    words (the CLI's checks lived in cli.py only)."""
    def no_load(*a, **k):
        raise AssertionError("the model was loaded before the pre-checks")

    monkeypatch.setattr(train_mod, "load_components", no_load)
    a_file = tmp_path / "class.txt"
    a_file.write_text("not a folder")
    cfg = load_config("dreambooth-lora-prior-pre", train_args(tiny_model, subject_dir, tmp_path / "run", f"class_data_dir={a_file}"))
    with pytest.raises(DataError, match=f"class_data_dir={a_file}: this is a file, not a folder"):
        train_mod.train(cfg)
    assert not (tmp_path / "run").exists()


def test_a_toy_run_on_a_class_outside_the_toy_world_is_warned(caplog):
    # newcomer55: the UI's example dog on the default toy family trained without a word, and toy eval scored it
    from nanobooth.core.config import load_config
    from nanobooth.core.prechecks import warn_class_outside_toy_world

    def warned(*overrides):
        caplog.clear()
        with caplog.at_level("WARNING", logger="nanobooth"):
            warn_class_outside_toy_world(load_config(overrides[0], list(overrides[1:])))
        return caplog.text

    dog = ["instance_prompt=a photo of sks dog", "class_prompt=a photo of dog"]
    assert "'a photo of dog' names none of them" in warned("toy/dreambooth-lora", *dog)
    assert "balls, cubes, stars, rings, cups" in caplog.text
    assert warned("toy/dreambooth-lora", "instance_prompt=a photo of sks star", "class_prompt=a photo of a star") == ""
    assert warned("dreambooth-lora", *dog) == ""  # a real model knows dogs


def test_a_heldout_folder_holding_training_photos_is_warned(subject_dir, tmp_path, caplog):
    # newcomer55: validation_images_dir pointed at the training photos drew a "held-out" curve that followed the
    # training loss; compared by content, so a renamed copy counts and another photo does not
    import shutil

    from PIL import Image

    from nanobooth.core.prechecks import warn_heldout_is_trained_on

    held = tmp_path / "held"
    held.mkdir()
    first = sorted(subject_dir.glob("*.png"))[0]
    shutil.copy(first, held / "renamed.png")
    Image.new("RGB", (48, 48), (10, 200, 30)).save(held / "other.png")

    def warned(folder, *extra):
        cfg = load_config("toy/dreambooth-lora", [f"validation_images_dir={folder}", *extra])
        caplog.clear()  # load_config's own warnings are another test's
        with caplog.at_level("WARNING", logger="nanobooth"):
            warn_heldout_is_trained_on(cfg, subject_dir)
        return caplog.messages

    assert warned(subject_dir, "validation_loss_steps=5") == [
        f"validation_images_dir={subject_dir}: 3 of its 3 photos are training photos ({', '.join(p.name for p in sorted(subject_dir.glob('*.png')))}), "
        "so val_loss_heldout follows the training loss and cannot show overfitting; point it at photos of the subject that "
        "the run does not train on"]
    assert warned(held, "validation_loss_steps=5")[0].startswith(f"validation_images_dir={held}: 1 of its 2 photos are training photos (renamed.png)")
    (held / "renamed.png").unlink()
    assert warned(held, "validation_loss_steps=5") == []  # photos the run does not train on
    assert warned(subject_dir) == []  # no validation loss: the folder is not read (its own idle-key warning says so)


def test_fewer_than_three_photos_are_warned_naming_the_folder(subject_dir, tmp_path, caplog):
    # newcomer56: the CLI trained on one photo without a word, where the UI refuses it
    import shutil

    from nanobooth.core.data import MIN_PHOTOS
    from nanobooth.core.prechecks import warn_few_photos

    one = tmp_path / "one"
    one.mkdir()
    shutil.copy(sorted(subject_dir.glob("*.png"))[0], one / "a.png")
    for folder, said in ((one, [f"instance_data_dir={one} holds 1 photo of the subject: DreamBooth needs 3-20 (varied poses "
                                "and backgrounds), or the run learns the picture rather than the subject; add photos"]),
                         (subject_dir, [])):
        cfg = load_config("toy/dreambooth-lora", [f"instance_data_dir={folder}"])
        caplog.clear()
        with caplog.at_level("WARNING", logger="nanobooth"):
            warn_few_photos(cfg, folder)
        assert caplog.messages == said
    assert MIN_PHOTOS == len(list(subject_dir.glob("*.png")))  # the fixture's three photos sit at the bound, unwarned


def test_checked_twice_a_config_warns_once_and_a_changed_one_again(tmp_path, caplog):
    """The CLI (or the UI) checks the input, then train() checks it again for library callers: newcomer57 saw the
    toy-world warning twice. The second pass still refuses what is wrong; it only says nothing new."""
    from nanobooth.core.prechecks import check_train_input

    cfg = load_config("toy/dreambooth-lora", ["instance_data_dir=example:dog", f"output_dir={tmp_path / 'run'}"])
    with caplog.at_level("INFO", logger="nanobooth"):
        check_train_input(cfg)
        check_train_input(cfg)
        assert caplog.text.count("names none of them") == 1 and caplog.text.count("instance_prompt from") == 1
        cfg.instance_prompt = "a photo of zwx dog"  # a changed config is a new check, said again
        check_train_input(cfg)
    assert caplog.text.count("names none of them") == 2
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "notes.txt").write_text("x")
    with pytest.raises(ConfigError, match="holds other files and no nanobooth run"):  # a second pass still refuses
        check_train_input(cfg)
