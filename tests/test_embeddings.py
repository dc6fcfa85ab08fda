"""Pivotal tuning (methods/embeddings.py, `train_text_encoder_ti`) on the tiny SD and SDXL models."""

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from conftest import cond_batch, fixed_noise_batch, step2_resume_folder, train_args
from nanobooth.core.config import ConfigError, TrainConfig, load_config
from nanobooth.core.models import load_components, load_pipeline, make_pipeline
from nanobooth.core.run_folder import output_paths
from nanobooth.inference.generate import generate, load_run, render
from nanobooth.interop.export import ExportError, export
from nanobooth.core.run_folder import RunFolderError, result_kind
from nanobooth.methods import Full, LoRA, embeddings

PROMPT = "a photo of sks dog"


def _pivotal(model, tmp_path, method=LoRA, **kw):
    c = load_components(str(model))
    for m in (c.vae, *c.text_encoders, c.unet):
        m.requires_grad_(False)
    cfg = TrainConfig(model=str(model), method=method.name, train_text_encoder_ti=True, instance_prompt=PROMPT,
                      class_prompt="a photo of dog", output_dir=str(tmp_path / "run"), **kw)
    torch.manual_seed(0)
    method().attach(c.family, c.unet, c.text_encoders, cfg)
    tables = [embeddings._token_embedding(te).token_embedding.weight.clone() for te in c.text_encoders]
    tokens = embeddings.attach(c.family, c.tokenizers, c.text_encoders, cfg)
    return c, cfg, tokens, tables


def _encode(c, tokens, prompt=PROMPT):
    return c.family.encode(c.text_encoders, c.family.tokenize(c.tokenizers, embeddings.rewrite(prompt, tokens), "cpu"), 32)


def _reloads_as_trained(model, folder, c, tokens, untuned):
    """The saved run, loaded as `nanobooth generate` loads it, renders "sks" as the in-memory trained pipeline does
    (and as the spelled-out new tokens do), and unlike `untuned` (so the checks can fail)."""
    pipe = make_pipeline(c, unet=c.unet, text_encoders=c.text_encoders)
    setattr(pipe, embeddings.TOKEN_MAP, tokens)
    during = render(pipe, [PROMPT], seed=3, steps=2, resolution=32)[0][0]
    loaded = load_run(str(model), str(folder))
    after = render(loaded, [PROMPT], seed=3, steps=2, resolution=32)[0][0]
    assert np.abs(np.asarray(during, dtype=int) - np.asarray(after, dtype=int)).max() <= 1
    spelled = render(loaded, ["a photo of <s0><s1> dog"], seed=3, steps=2, resolution=32)[0][0]
    assert np.array_equal(np.asarray(after), np.asarray(spelled))  # "sks" was rewritten into the new tokens
    other = render(untuned, [PROMPT], seed=3, steps=2, resolution=32)[0][0]
    assert not np.array_equal(np.asarray(after), np.asarray(other))


@pytest.mark.parametrize("fixture", ["tiny_model", "tiny_sdxl_model"])
def test_only_the_new_rows_train_the_loss_falls_and_they_stop_at_the_pivot(fixture, request, tmp_path):
    c, cfg, tokens, tables = _pivotal(request.getfixturevalue(fixture), tmp_path, learning_rate=0.0, text_encoder_lr=5e-2,
                                      max_train_steps=8, train_text_encoder_ti_frac=0.75)
    assert tokens == {"sks": "<s0><s1>"}
    ids = c.tokenizers[0](embeddings.rewrite(PROMPT, tokens), add_special_tokens=False).input_ids
    v = tables[0].shape[0]
    assert ids[-3:-1] == [v, v + 1]  # "<s0><s1>" are two new ids, the rows after the old table
    for te in c.text_encoders:  # in the text encoders only the new rows train
        names = [n for n, p in te.named_parameters() if p.requires_grad]
        assert len(names) == 1 and names[0].endswith("embeddings.token_embedding.new")
    init = [p.detach().clone() for p in embeddings.new_params(c.text_encoders)]
    dog = c.tokenizers[0]("dog", add_special_tokens=False).input_ids[0]
    assert torch.equal(init[0][0], tables[0][dog]) and torch.equal(init[0][1], tables[0][dog])  # from the class noun
    groups = LoRA().param_groups(c.unet, c.text_encoders, cfg, 1.0)
    assert groups[-1]["name"] == embeddings.TI_GROUP and groups[-1]["lr"] == 5e-2
    assert [id(p) for p in groups[-1]["params"]] == [id(p) for p in embeddings.new_params(c.text_encoders)]
    assert sum(len(g["params"]) for g in groups) == len({id(p) for g in groups for p in g["params"]})  # each once

    opt = torch.optim.AdamW(groups, weight_decay=0.1)  # weight decay would shrink every row it reached
    _, noise, t, noisy = fixed_noise_batch(c)  # the same fixed example every step
    losses, rows = [], []
    for step in range(cfg.max_train_steps):
        cond = cond_batch(_encode(c, tokens))
        loss = torch.nn.functional.mse_loss(c.family.denoise(c.unet, noisy, t, cond), noise)
        loss.backward()
        embeddings.pivot(opt, step, cfg)
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
        rows.append([p.detach().clone() for p in embeddings.new_params(c.text_encoders)])
    pivot = int(0.75 * 8)  # steps from here on leave the rows as they were
    # the new rows alone fit the fixed example (deterministic: without training every step's loss is losses[0])
    assert all(b < a for a, b in zip(losses[:pivot], losses[1:pivot])) and losses[pivot - 1] < losses[0] - 0.01
    for te, table in zip(c.text_encoders, tables):  # every old row bit for bit
        assert torch.equal(embeddings._token_embedding(te).token_embedding.base.weight, table)
    assert not torch.equal(rows[pivot - 1][0], init[0])
    assert not torch.equal(rows[pivot - 1][0], rows[pivot - 2][0])
    assert all(torch.equal(r[0], rows[pivot - 1][0]) for r in rows[pivot:])


@pytest.mark.parametrize("fixture", ["tiny_model", "tiny_sdxl_model"])
def test_save_then_generate_reproduces_the_trained_pipeline_and_exports_load(fixture, request, tmp_path):
    model = request.getfixturevalue(fixture)
    c, cfg, tokens, _ = _pivotal(model, tmp_path)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # stand-in for training: move the new rows and the UNet adapters
        for p in [*embeddings.new_params(c.text_encoders), *(p for p in c.unet.parameters() if p.requires_grad)]:
            p.add_(0.3 * torch.randn(p.shape, generator=g))
    trained = {k: v.clone() for k, v in embeddings.trained_rows(c.family, c.text_encoders).items()}
    folder = tmp_path / "run"
    folder.mkdir()
    LoRA().save(folder, c, c.unet, c.text_encoders, cfg)
    emb = folder / "run_emb.safetensors"
    assert embeddings.find(folder) == emb and emb in output_paths(folder)  # overwrite=true clears it with the run
    sdxl = fixture == "tiny_sdxl_model"
    assert set(load_file(emb)) == ({"clip_l", "clip_g"} if sdxl else {"clip_l"})  # diffusers' advanced-script keys

    _reloads_as_trained(model, folder, c, tokens, untuned=load_run(str(model)))

    # A1111 / ComfyUI: SD one tensor `emb_params`, SDXL `clip_l` + `clip_g`; diffusers loads both
    out = tmp_path / "subj.safetensors"
    save_file(embeddings.webui_tensors(emb), str(out))
    exported = load_file(out)
    assert set(exported) == ({"clip_l", "clip_g"} if sdxl else {"emb_params"})
    fresh = load_pipeline(str(model))
    if sdxl:
        for key, te, tok in (("clip_l", fresh.text_encoder, fresh.tokenizer), ("clip_g", fresh.text_encoder_2, fresh.tokenizer_2)):
            fresh.load_textual_inversion(exported[key], token=["<x0>", "<x1>"], text_encoder=te, tokenizer=tok)
            rows = te.get_input_embeddings().weight[tok.convert_tokens_to_ids(["<x0>", "<x1>"])]
            assert torch.equal(rows, trained[key])
    else:
        fresh.load_textual_inversion(str(out), token="<subj>")  # a multi-vector file: "<subj>", "<subj>_1"
        rows = fresh.text_encoder.get_input_embeddings().weight[fresh.tokenizer.convert_tokens_to_ids(["<subj>", "<subj>_1"])]
        assert torch.equal(rows, trained["clip_l"])


def test_training_writes_the_embeddings_and_generate_takes_the_identifier(tiny_model, subject_dir, tmp_path, caplog):
    from nanobooth.core.train import train

    cfg = load_config("dreambooth-lora", train_args(tiny_model, subject_dir, tmp_path / "run", "train_text_encoder_ti=true",
                                                    "learning_rate=1e-2", "train_text_encoder_ti_frac=1.0"))
    run = train(cfg)
    emb = run / "run_emb.safetensors"
    with safe_open(str(emb), "pt") as f:
        assert f.metadata() == {"token_abstraction": "sks", "tokens": "<s0>,<s1>", "method": "lora"}
    base = load_pipeline(str(tiny_model))
    dog = base.tokenizer("dog", add_special_tokens=False).input_ids[0]
    start = base.text_encoder.get_input_embeddings().weight[dog].expand(2, -1)
    assert not torch.equal(load_file(emb)["clip_l"], start)  # they trained away from the class noun's row
    with caplog.at_level("INFO", logger="nanobooth"):
        images = generate(str(tiny_model), PROMPT, weights=run, steps=2)
    assert len(images) == 1 and images[0].size == (32, 32)
    assert "new tokens from run_emb.safetensors: 'sks' in every prompt becomes <s0><s1>" in caplog.text  # said, not silent
    # `nanobooth export`: the embedding goes beside the LoRA, in A1111's/ComfyUI's keys or the run's own
    export(run, "kohya", tmp_path / "out" / "subj.safetensors")
    assert load_file(tmp_path / "out" / "subj_emb.safetensors").keys() == {"emb_params"}
    assert torch.equal(load_file(tmp_path / "out" / "subj_emb.safetensors")["emb_params"], load_file(emb)["clip_l"])
    export(run, "diffusers", tmp_path / "out" / "d.safetensors")
    assert (tmp_path / "out" / "d_emb.safetensors").read_bytes() == emb.read_bytes()
    export(run, "single-file", tmp_path / "out" / "full.safetensors")  # the fused checkpoint keeps the base vocabulary
    rows = [v.shape[0] for k, v in load_file(tmp_path / "out" / "full.safetensors").items() if k.endswith("token_embedding.weight")]
    assert rows == [base.text_encoder.get_input_embeddings().weight.shape[0]]
    assert (tmp_path / "out" / "full_emb.safetensors").is_file()
    (tmp_path / "out" / "x_emb.safetensors").write_bytes(b"mine")
    with pytest.raises(ExportError, match="x_emb.safetensors' already exists"):  # checked before anything is written
        export(run, "kohya", tmp_path / "out" / "x.safetensors")
    assert not (tmp_path / "out" / "x.safetensors").exists()


def test_a_full_runs_diffusers_export_carries_its_new_tokens_inside_the_folder(tiny_model, subject_dir, tmp_path, caplog):
    # newcomer56: the tokens went beside the exported pipeline folder, and `generate --weights FOLDER` rendered the
    # identifier untrained without a word; inside it, the export renders as the run does
    from nanobooth.core.train import train

    cfg = load_config("dreambooth", train_args(tiny_model, subject_dir, tmp_path / "run", "train_text_encoder_ti=true",
                                               "learning_rate=1e-2", "train_text_encoder_ti_frac=1.0"))
    run = train(cfg)
    with caplog.at_level("WARNING", logger="nanobooth"):
        out = export(run, "diffusers", tmp_path / "exp" / "full_pipe")
    inside = out / "full_pipe_emb.safetensors"
    assert inside.read_bytes() == (run / "run_emb.safetensors").read_bytes()
    assert not (tmp_path / "exp" / "full_pipe_emb.safetensors").exists()
    assert f"the run's new tokens are in {inside} (nanobooth generate --weights on the folder loads them)" in caplog.text
    assert "token=['<s0>', '<s1>']) and write '<s0><s1>' where the run's prompts say 'sks'" in caplog.text
    with caplog.at_level("INFO", logger="nanobooth"):
        from_run = generate(str(tiny_model), PROMPT, weights=run, steps=2)
        caplog.clear()
        from_export = generate(str(tiny_model), PROMPT, weights=out, steps=2)
    assert "'sks' in every prompt becomes <s0><s1>" in caplog.text
    assert np.array_equal(np.asarray(from_run[0]), np.asarray(from_export[0]))


def test_bad_pivotal_settings_are_refused_in_one_line(tiny_model, tmp_path):
    with pytest.raises(ConfigError, match="train_text_encoder_ti.*method=lora, dora or full"):
        TrainConfig(method="loha", train_text_encoder_ti=True)
    with pytest.raises(ConfigError, match="train_text_encoder_ti_frac"):
        TrainConfig(method="lora", train_text_encoder_ti=True, train_text_encoder_ti_frac=0.0)
    cfg = TrainConfig(method="lora", train_text_encoder_ti=True, instance_prompt="a photo of my sks dog", class_prompt="a photo of dog")
    with pytest.raises(ConfigError, match="token_abstraction"):  # two words class_prompt lacks: which is the identifier?
        embeddings.identifier(cfg)
    cfg.token_abstraction = "sks"
    tmap = embeddings.token_map(cfg)
    assert embeddings.rewrite("a sks dog, sks.", tmap) == "a <s0><s1> dog, <s0><s1>."
    assert embeddings.rewrite("a sksy dog", tmap) == "a sksy dog"  # whole words only


def test_checkpoint_holds_the_new_rows_and_resume_is_bit_exact(tiny_model, subject_dir, tmp_path):
    from nanobooth.core.train import train

    def run(out, *extra):
        cfg = load_config("dreambooth-lora", train_args(tiny_model, subject_dir, out, "train_text_encoder_ti=true", "learning_rate=1e-2",
                                                        "max_train_steps=4", "checkpointing_steps=2", "train_text_encoder_ti_frac=0.75",
                                                        *extra))
        run_dir = train(cfg)
        return {**load_file(run_dir / "pytorch_lora_weights.safetensors"), **load_file(run_dir / f"{out.name}_emb.safetensors")}

    whole = run(tmp_path / "a")
    part = step2_resume_folder(tmp_path / "a", tmp_path / "b")
    (part / "config.yaml").write_text((part / "config.yaml").read_text().replace(str(tmp_path / "a"), str(part)))
    resumed = run(part, "resume_from_checkpoint=latest")  # step 3 still trains the rows (pivot at step 3 of 4)
    assert whole.keys() == resumed.keys() and all(torch.equal(whole[k], resumed[k]) for k in whole)


@pytest.mark.parametrize("fixture", ["tiny_model", "tiny_sdxl_model"])
def test_a_full_fine_tune_saves_a_plain_pipeline_with_its_new_tokens_beside(fixture, request, tmp_path):
    model = request.getfixturevalue(fixture)
    c, cfg, tokens, tables = _pivotal(model, tmp_path, method=Full, train_text_encoder=True)
    vocab = [len(tok) for tok in c.tokenizers]  # the new tokens included
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # stand-in for training: move the new rows, the old ones and the UNet
        for p in [*embeddings.new_params(c.text_encoders), *(p for te in c.text_encoders for p in te.parameters() if p.requires_grad),
                  *c.unet.parameters()]:
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    folder = tmp_path / "run"
    folder.mkdir()
    Full().save(folder, c, c.unet, c.text_encoders, cfg)
    assert result_kind(folder) == "full" and embeddings.find(folder) == folder / "run_emb.safetensors"
    with safe_open(str(folder / "run_emb.safetensors"), "pt") as f:
        assert f.metadata()["method"] == "full"
    # the folder is the base vocabulary (any tool loads it as a plain model); training left the modules as they were
    plain = load_pipeline(str(folder))
    tes = [plain.text_encoder, *([plain.text_encoder_2] if fixture == "tiny_sdxl_model" else [])]
    toks = [plain.tokenizer, *([plain.tokenizer_2] if fixture == "tiny_sdxl_model" else [])]
    for te, tok, table, trained in zip(tes, toks, tables, c.text_encoders):
        assert len(tok) == table.shape[0] and "<s0>" not in tok.get_vocab()
        assert torch.equal(te.get_input_embeddings().weight, embeddings._token_embedding(trained).token_embedding.base.weight)
        assert not torch.equal(te.get_input_embeddings().weight, table)  # the old rows trained too (train_text_encoder)
    assert [len(tok) for tok in c.tokenizers] == vocab
    assert all(isinstance(embeddings._token_embedding(te).token_embedding, embeddings.NewTokenEmbedding) for te in c.text_encoders)

    _reloads_as_trained(model, folder, c, tokens, untuned=plain)  # plain: the folder without the new tokens


def test_a_folder_mixing_a_pipeline_with_another_runs_embeddings_is_still_refused(tiny_model, tmp_path):
    c, cfg, _, _ = _pivotal(tiny_model, tmp_path, method=Full)
    folder = tmp_path / "run"
    folder.mkdir()
    Full().save(folder, c, c.unet, c.text_encoders, cfg)
    tensors, _ = embeddings.read(folder / "run_emb.safetensors")
    save_file(tensors, str(folder / "run_emb.safetensors"), metadata={"token_abstraction": "sks", "tokens": "<s0>,<s1>"})
    with pytest.raises(RunFolderError, match="two results"):  # a textual-inversion file (no method=full) beside a pipeline
        result_kind(folder)


def test_full_fine_tune_with_pivotal_tuning_trains_exports_and_resumes_bit_exact(tiny_model, subject_dir, tmp_path):
    from nanobooth.core.train import train

    def run(out, *extra):
        cfg = load_config("dreambooth-finetune-text-encoder", train_args(
            tiny_model, subject_dir, out, "train_text_encoder_ti=true", "learning_rate=1e-3", "text_encoder_lr=1e-2",
            "max_train_steps=4", "checkpointing_steps=2", "train_text_encoder_ti_frac=0.75", "initializer_concept=brown fluffy",
            *extra))
        run_dir = train(cfg)
        return run_dir, {**load_file(run_dir / "unet" / "diffusion_pytorch_model.safetensors"),
                         **{f"te.{k}": v for k, v in load_file(run_dir / "text_encoder" / "model.safetensors").items()},
                         **load_file(run_dir / f"{out.name}_emb.safetensors")}

    run_dir, whole = run(tmp_path / "a")
    base = load_pipeline(str(tiny_model))
    words = base.tokenizer("brown fluffy", add_special_tokens=False).input_ids
    start = base.text_encoder.get_input_embeddings().weight[words]
    assert not torch.equal(whole["clip_l"], start)  # the rows trained away from the words'
    table = [v for k, v in whole.items() if k.startswith("te.") and k.endswith("token_embedding.weight")]
    assert [t.shape for t in table] == [base.text_encoder.get_input_embeddings().weight.shape]  # the base vocabulary
    images = generate(str(tiny_model), PROMPT, weights=run_dir, steps=2)
    assert len(images) == 1 and images[0].size == (32, 32)
    # `nanobooth export`: an A1111/ComfyUI checkpoint at the base vocabulary, the new tokens beside it
    export(run_dir, "single-file", tmp_path / "out" / "full.safetensors")
    rows = [v.shape[0] for k, v in load_file(tmp_path / "out" / "full.safetensors").items() if k.endswith("token_embedding.weight")]
    assert rows == [base.text_encoder.get_input_embeddings().weight.shape[0]]
    assert torch.equal(load_file(tmp_path / "out" / "full_emb.safetensors")["emb_params"], whole["clip_l"])
    export(run_dir, "diffusers", tmp_path / "out" / "pipe")
    # inside the pipeline folder, where generate --weights looks for a run's (newcomer56)
    assert (tmp_path / "out" / "pipe" / "pipe_emb.safetensors").read_bytes() == (run_dir / "a_emb.safetensors").read_bytes()
    assert not (tmp_path / "out" / "pipe_emb.safetensors").exists()

    part = step2_resume_folder(tmp_path / "a", tmp_path / "b")
    (part / "config.yaml").write_text((part / "config.yaml").read_text().replace(str(tmp_path / "a"), str(part)))
    _, resumed = run(part, "resume_from_checkpoint=latest")  # step 3 still trains the rows (pivot at step 3 of 4)
    assert whole.keys() == resumed.keys() and all(torch.equal(whole[k], resumed[k]) for k in whole)
