"""`nanobooth config list`'s table (core/variant_table.py): read from the YAML files, it must say what the validated
config of each variant says."""
from nanobooth import cli
from nanobooth.core.config import load_config, variant_names
from nanobooth.core.variant_table import variant_rows, variant_table, what_it_trains


def test_every_row_agrees_with_the_validated_config():
    rows = variant_rows()
    assert [r[1] for r in rows] == variant_names()
    for model, name, trains, prior, steps, lr in rows:
        cfg = load_config(name, [])
        assert model == cfg.model and steps == str(cfg.max_train_steps), name
        assert float(lr) == cfg.learning_rate, name
        assert (prior != "-") == cfg.with_prior_preservation, name
        if cfg.with_prior_preservation:
            assert prior == f"{cfg.num_class_images} class images", name
        assert trains == what_it_trains(name, cfg.to_dict()), name


def test_what_it_trains_names_the_parts():
    rows = {r[1]: r[2] for r in variant_rows()}
    assert rows["toy/dreambooth-lora-prior-pre"] == "LoRA on the UNet + text encoder + new tokens"
    assert rows["dreambooth"] == "full UNet"
    assert rows["flux/dreambooth-lora"] == "LoRA on the transformer"
    assert rows["textual-inversion"] == "new token embeddings only"


def test_config_list_prints_one_heading_per_model(capsys):
    assert cli.main(["config", "list"]) == 0
    out = capsys.readouterr().out
    assert out == variant_table() + "\n"
    assert "toy (embedded, offline):" in out and "stabilityai/stable-diffusion-xl-base-1.0:" in out
    assert out.count("toy/dreambooth-lora-prior-pre ") == 1 and "2e-3" in out
