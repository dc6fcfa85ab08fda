"""Textual inversion (methods/textual_inversion.py, `method=textual_inversion`) on the tiny SD and SDXL models."""

import shutil

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from conftest import cond_batch, fixed_noise_batch, train_args
from nanobooth.core.config import ConfigError, TrainConfig, load_config
from nanobooth.core.models import load_components, load_pipeline, make_pipeline
from nanobooth.core.run_summary import run_summary
from nanobooth.core.run_folder import LORA_FILE, MODEL_INDEX, RunFolderError, output_paths, result_kind
from nanobooth.inference.generate import load_run, render
from nanobooth.interop.export import ExportError, export
from nanobooth.methods import METHODS, TextualInversion, embeddings

PROMPT = "a photo of sks dog"


def _ti(model, tmp_path, **kw):
    """Components with TI attached as train.py does (method.attach, then embeddings.attach); the old tables copied."""
    c = load_components(str(model))
    for m in (c.vae, *c.text_encoders, c.unet):
        m.requires_grad_(False)
    cfg = TrainConfig(model=str(model), method="textual_inversion", instance_prompt=PROMPT, class_prompt="a photo of dog",
                      output_dir=str(tmp_path / "run"), **kw)
    TextualInversion().attach(c.family, c.unet, c.text_encoders, cfg)
    tables = [embeddings._token_embedding(te).token_embedding.weight.clone() for te in c.text_encoders]
    tokens = embeddings.attach(c.family, c.tokenizers, c.text_encoders, cfg) if cfg.trains_embeddings else {}
    return c, cfg, tokens, tables


def _train(model, subject, out, *extra):
    from nanobooth.core.train import train

    return train(load_config("textual-inversion", train_args(model, subject, out, "learning_rate=5e-2", "scale_lr=false",
                                                             "gradient_accumulation_steps=1", *extra)))


@pytest.mark.parametrize("fixture", ["tiny_model", "tiny_sdxl_model"])
def test_only_the_new_rows_train_and_the_loss_falls(fixture, request, tmp_path):
    c, cfg, tokens, _ = _ti(request.getfixturevalue(fixture), tmp_path, learning_rate=5e-2, num_new_tokens_per_abstraction=2)
    assert tokens == {"sks": "<s0><s1>"}
    before = {f"{i}.{k}": v.clone() for i, m in enumerate((c.unet, *c.text_encoders)) for k, v in m.state_dict().items()
              if not k.endswith("token_embedding.new")}  # every weight, the old vocabulary tables included
    method = METHODS[cfg.method]()
    trainable = [p for m in (c.unet, *c.text_encoders) for p in m.parameters() if p.requires_grad]
    assert [id(p) for p in trainable] == [id(p) for p in embeddings.new_params(c.text_encoders)]  # the rows alone
    groups = method.param_groups(c.unet, c.text_encoders, cfg, 1.0)
    assert len(groups) == 1 and groups[0]["lr"] == 5e-2 and len(groups[0]["params"]) == len(c.text_encoders)
    trained = method.trained_modules(c.family, c.unet, c.text_encoders, cfg)
    assert list(trained) == list(c.family.text_encoder_names)  # no UNet
    # the console line counts the new rows alone (2 tokens x width per encoder), not the frozen vocabulary table
    rows = [f"{n}'s new tokens ({p.numel()} parameters)" for n, p in zip(c.family.text_encoder_names, embeddings.new_params(c.text_encoders))]
    assert all(p.shape[0] == 2 for p in embeddings.new_params(c.text_encoders))
    assert run_summary(trained, groups, cfg).startswith(f"training {', '.join(rows)} by textual inversion; lr new tokens 5.0e-02")
    init = [p.detach().clone() for p in embeddings.new_params(c.text_encoders)]

    opt = torch.optim.AdamW(groups, weight_decay=0.1)  # weight decay would shrink every row it reached
    _, noise, t, noisy = fixed_noise_batch(c)  # the same fixed example every step
    losses = []
    for _ in range(6):
        enc = c.family.encode(c.text_encoders, c.family.tokenize(c.tokenizers, embeddings.rewrite(PROMPT, tokens), "cpu"), 32)
        cond = cond_batch(enc)
        loss = torch.nn.functional.mse_loss(c.family.denoise(c.unet, noisy, t, cond), noise)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    # the rows alone fit the fixed example (without training every step's loss would be losses[0])
    assert all(b < a for a, b in zip(losses, losses[1:])) and losses[-1] < losses[0] - 0.01
    after = {f"{i}.{k}": v for i, m in enumerate((c.unet, *c.text_encoders)) for k, v in m.state_dict().items()
             if not k.endswith("token_embedding.new")}
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)  # bit for bit
    assert all(not torch.equal(p, q) for p, q in zip(embeddings.new_params(c.text_encoders), init))


@pytest.mark.parametrize("fixture", ["tiny_model", "tiny_sdxl_model"])
def test_saved_file_loads_with_load_textual_inversion_and_renders_as_trained(fixture, request, tmp_path):
    model = request.getfixturevalue(fixture)
    c, cfg, tokens, _ = _ti(model, tmp_path)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # stand-in for training: move the new rows
        for p in embeddings.new_params(c.text_encoders):
            p.add_(0.5 * torch.randn(p.shape, generator=g))
    folder = tmp_path / "run"
    folder.mkdir()
    TextualInversion().save(folder, c, c.unet, c.text_encoders, cfg)
    emb = folder / "run_emb.safetensors"
    sdxl = fixture == "tiny_sdxl_model"
    assert sorted(p.name for p in folder.iterdir()) == [emb.name]  # no LoRA, no pipeline: the embeddings alone
    assert result_kind(folder) == "textual_inversion" and emb in output_paths(folder)
    state = load_file(emb)
    assert set(state) == ({"clip_l", "clip_g"} if sdxl else {"clip_l"})

    pipe = make_pipeline(c, unet=c.unet, text_encoders=c.text_encoders)  # what the final validation grid renders with
    setattr(pipe, embeddings.TOKEN_MAP, tokens)
    during = np.asarray(render(pipe, [PROMPT], seed=3, steps=2, resolution=32)[0][0])
    loaded = load_run(str(model), str(folder))  # `nanobooth generate --weights run`
    assert np.array_equal(np.asarray(render(loaded, [PROMPT], seed=3, steps=2, resolution=32)[0][0]), during)
    # diffusers' own loader, on a fresh base pipeline, with the file's tensors under the tokens in its metadata
    fresh = load_pipeline(str(model))
    pairs = [("clip_l", fresh.text_encoder, fresh.tokenizer)] + ([("clip_g", fresh.text_encoder_2, fresh.tokenizer_2)] if sdxl else [])
    for key, te, tok in pairs:
        fresh.load_textual_inversion(state[key], token=["<s0>", "<s1>"], text_encoder=te, tokenizer=tok)
    plain = np.asarray(render(fresh, ["a photo of <s0><s1> dog"], seed=3, steps=2, resolution=32)[0][0])
    assert np.array_equal(plain, during)
    base = np.asarray(render(load_run(str(model)), [PROMPT], seed=3, steps=2, resolution=32)[0][0])
    assert not np.array_equal(base, during)  # the rows change the image, so the checks above can fail


@pytest.mark.parametrize("fixture", ["tiny_model", "tiny_sdxl_model"])
def test_training_writes_only_the_embeddings_and_exports_them(fixture, request, subject_dir, tmp_path):
    model = request.getfixturevalue(fixture)
    run = _train(model, subject_dir, tmp_path / "run")
    emb = run / "run_emb.safetensors"
    assert not (run / LORA_FILE).exists() and not (run / MODEL_INDEX).exists() and result_kind(run) == "textual_inversion"
    with safe_open(str(emb), "pt") as f:
        assert f.metadata() == {"token_abstraction": "sks", "tokens": "<s0>", "method": "textual_inversion"}
    sdxl = fixture == "tiny_sdxl_model"
    state = load_file(emb)
    assert set(state) == ({"clip_l", "clip_g"} if sdxl else {"clip_l"})
    base = load_pipeline(str(model))
    dog = base.tokenizer("dog", add_special_tokens=False).input_ids[0]
    assert not torch.equal(state["clip_l"][0], base.text_encoder.get_input_embeddings().weight[dog])  # trained off the class noun

    out = tmp_path / "out"
    for fmt in ("kohya", "comfyui"):  # A1111's and ComfyUI's keys: SD one tensor `emb_params`, SDXL clip_l + clip_g
        written = load_file(export(run, fmt, out / f"{fmt}.safetensors"))
        assert written.keys() == ({"clip_l", "clip_g"} if sdxl else {"emb_params"})
        assert all(torch.equal(written[k], state[{"emb_params": "clip_l"}.get(k, k)]) for k in written)
    assert export(run, "diffusers", out / "d.safetensors").read_bytes() == emb.read_bytes()
    assert sorted(p.name for p in out.iterdir()) == ["comfyui.safetensors", "d.safetensors", "kohya.safetensors"]  # no *_emb twin
    with pytest.raises(ExportError, match="textual-inversion run: it changes no model weight") as e:
        export(run, "single-file", out / "full.safetensors")
    assert "\n" not in str(e.value) and not (out / "full.safetensors").exists()


def test_resume_is_bit_exact(tiny_model, subject_dir, tmp_path):
    whole = _train(tiny_model, subject_dir, tmp_path / "a", "max_train_steps=4", "checkpointing_steps=2")
    ckpt = whole / "checkpoints" / "checkpoint-000002"
    assert any(k.endswith("token_embedding.new") for k in load_file(ckpt / "model.safetensors"))
    part = tmp_path / "b"
    part.mkdir()
    (part / "config.yaml").write_text((whole / "config.yaml").read_text().replace(str(whole), str(part)))
    shutil.copytree(ckpt, part / "checkpoints" / ckpt.name)
    resumed = _train(tiny_model, subject_dir, part, "max_train_steps=4", "checkpointing_steps=2", "resume_from_checkpoint=latest")
    a, b = load_file(whole / "a_emb.safetensors"), load_file(resumed / "b_emb.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    fresh = load_pipeline(str(tiny_model))
    start = fresh.text_encoder.get_input_embeddings().weight[fresh.tokenizer("dog", add_special_tokens=False).input_ids[0]]
    assert not torch.equal(a["clip_l"][0], start)  # it trained, so equality is not two untouched copies


def test_refusals_are_one_line(tiny_sd3_model, tiny_flux_model, subject_dir, tmp_path):
    with pytest.raises(ConfigError, match="train_text_encoder.*textual_inversion trains only the new token embeddings") as e:
        TrainConfig(method="textual_inversion", train_text_encoder=True)
    assert "\n" not in str(e.value)
    for model in (tiny_sd3_model, tiny_flux_model):
        for extra, what in ((["method=textual_inversion"], "textual_inversion is implemented for SD and SDXL"),
                            (["method=lora", "train_text_encoder_ti=true"], "pivotal tuning is implemented for SD and SDXL")):
            out = tmp_path / f"{model.name}-{extra[-1].split('=')[0]}"
            with pytest.raises(ConfigError, match=what) as e:
                _train(model, subject_dir, out, *extra)
            assert "\n" not in str(e.value) and not out.exists()  # refused before the run folder is made
    # a folder holding a pipeline and an embedding file mixes two runs
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    (mixed / MODEL_INDEX).write_text("{}")
    (mixed / "x_emb.safetensors").write_bytes(b"")
    with pytest.raises(RunFolderError, match="two results, token embeddings"):
        result_kind(mixed)


def test_token_abstraction_no_prompt_uses_is_refused_before_anything_is_written(tiny_model, subject_dir, tmp_path, capsys):
    """token_abstraction=zzz with instance_prompt 'a photo of sks dog' trained tokens no prompt reaches (nothing
    learnt, no word said): one line naming the key, no run folder; in a caption file instead it is accepted."""
    from nanobooth.cli import main

    out = tmp_path / "r"
    args = train_args(tiny_model, subject_dir, out, "method=textual_inversion", "token_abstraction=zzz",
                      "instance_prompt=a photo of sks dog", "class_prompt=a photo of dog")
    assert main(["train", "dreambooth", *args]) == 2
    err = capsys.readouterr().err
    assert "'token_abstraction'" in err and "zzz" in err and "Traceback" not in err
    assert not out.exists()
    from nanobooth.core.prechecks import check_token_abstraction

    captioned = tmp_path / "captioned"
    captioned.mkdir()
    (captioned / "a.txt").write_text("a photo of zzz dog")
    check_token_abstraction(load_config("textual-inversion", ["token_abstraction=zzz", "instance_prompt=a photo of sks dog"]),
                            captioned)  # no raise
