import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from nanobooth.toy import probe as probe_mod
from nanobooth.toy import world
from nanobooth.toy.probe import DEFAULT_PATH, ProbeNet, label_space, load_probe

shipped = pytest.mark.skipif(not (DEFAULT_PATH / "config.json").exists(), reason="probe not shipped yet")


def test_dataset_labels_match_the_world():
    imgs, tg = probe_mod.make_dataset(40, seed=3, held_out_only=True, degrade=False)
    L = label_space()
    triples = sorted(world.HELD_OUT)
    for i in range(40):
        c, k, s = triples[i % len(triples)]
        assert (L["class"][tg["class"][i]], L["colour"][tg["colour"][i]], L["scene"][tg["scene"][i]]) == (c, k, s)
    assert tg["palette"].sum(1).eq(1).all()  # plain objects have exactly one colour
    _, mixed = probe_mod.make_dataset(60, seed=4, subject_frac=1.0)
    assert mixed["colour"].eq(-1).all() and mixed["palette"].sum(1).eq(2).all()
    assert mixed["pattern"].gt(0).all() and mixed["mark"].gt(0).all()


def test_dataset_sends_a_share_through_the_vae(tiny_model, tmp_path):
    """The probe learns to read past the decoder: with a VAE, about vae_frac of the images are its
    round trips (labels untouched), the rest are the plain renders; without one, nothing changes."""
    from nanobooth.toy.probe import load_vae

    vae = load_vae(str(tiny_model))
    plain, tg0 = probe_mod.make_dataset(40, seed=5, degrade=False)
    mixed, tg1 = probe_mod.make_dataset(40, seed=5, degrade=False, vae=vae, vae_frac=0.5)
    assert all(torch.equal(tg0[k], tg1[k]) for k in tg0)
    same = [np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(plain, mixed)]
    assert 8 <= same.count(False) <= 32 and same.count(True) >= 8
    changed = next(i for i, s in enumerate(same) if not s)
    alone = np.asarray(probe_mod.vae_roundtrip([plain[changed]], vae)[0]).astype(int)
    assert np.abs(np.asarray(mixed[changed]).astype(int) - alone).max() <= 1  # batch size may move float rounding
    assert load_vae("none") is None
    vae.save_pretrained(tmp_path / "vae")  # a pretraining run's autoencoder folder: the same weights
    alone_dir = load_vae(str(tmp_path / "vae"))
    assert torch.equal(alone_dir.decoder.conv_out.weight, vae.decoder.conv_out.weight) and not alone_dir.training


def test_save_load_roundtrip(tmp_path):
    L = label_space()
    net = ProbeNet(L, width=8, dim=16).eval()
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({"labels": L, "width": 8, "dim": 16}))
    p = load_probe(tmp_path)
    imgs = [world.render(world.sample_spec(np.random.default_rng(i))) for i in range(3)]
    with torch.no_grad():
        ref = torch.nn.functional.normalize(net.embed(probe_mod.to_batch(imgs)), dim=1)
    f = p.features(imgs)
    assert f.shape == (3, 16) and torch.allclose(f, ref, atol=1e-5)
    assert torch.allclose(f.norm(dim=1), torch.ones(3), atol=1e-5)
    pred = p.predict(imgs)
    assert set(pred) == set(L) and all(len(v) == 3 for v in pred.values())
    assert all(x in L["scene"] for x in pred["scene"])


def test_probe_path_from_the_environment(tmp_path, monkeypatch):
    # a candidate toy model's retrained probe judges `toy eval` without code changes
    L = label_space()
    net = ProbeNet(L, width=8, dim=16)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({"labels": L, "width": 8, "dim": 16}))
    monkeypatch.setenv("NANOBOOTH_TOY_PROBE", str(tmp_path))
    assert load_probe().net.proj[2].out_features == 16
    monkeypatch.delenv("NANOBOOTH_TOY_PROBE")
    assert load_probe(tmp_path).net.proj[2].out_features == 16


@shipped
def test_shipped_probe_reads_held_out_renders():
    p = load_probe()
    imgs, tg = probe_mod.make_dataset(60, seed=11, held_out_only=True, degrade=False)
    acc = probe_mod.accuracy(p, imgs, tg)
    for k in ("class", "colour", "scene"):
        assert acc[k] >= 0.95, acc


@shipped
def test_shipped_probe_reads_subjects():
    p = load_probe()
    # ring marks sit on the thin band and are ~3 px wide: too small to read reliably at 64x64
    s = next(s for s in map(world.make_subject, range(123, 200)) if s.cls != "ring")
    imgs = [world.render_subject(s, i, sc) for i, sc in enumerate([None, None, "on the beach", "at night"])]
    pred = p.predict(imgs)
    assert pred["class"].count(s.cls) >= 3
    assert pred["scene"][0] == probe_mod.PLAIN and pred["scene"][2] == "on the beach" and pred["scene"][3] == "at night"
    assert pred["mark"].count(s.mark) >= 3


@shipped
def test_identity_is_all_three_subject_heads_at_once():
    # toy eval's subject_identity asks class, pattern and mark of one image at once; on renders of subjects
    # that rate is the instrument's own ceiling, which `toy probe` now reports (subjects_renders)
    p = load_probe()
    imgs, tg = probe_mod.make_dataset(48, seed=12, subject_frac=1.0, degrade=False)
    acc = probe_mod.accuracy(p, imgs, tg)
    pred = p.predict(imgs)
    L = probe_mod.label_space()
    hits = [all(pred[k][i] == L[k][int(tg[k][i])] for k in ("class", "pattern", "mark")) for i in range(len(imgs))]
    assert acc["identity"] == pytest.approx(sum(hits) / len(hits))
    assert acc["identity"] <= min(acc["class"], acc["pattern"], acc["mark"]) and acc["identity"] > 0.5
    ho_imgs, ho_tg = probe_mod.make_dataset(20, seed=13, held_out_only=True, degrade=False)
    assert "identity" not in probe_mod.accuracy(p, ho_imgs, ho_tg)  # no subjects, no identity


def test_training_data_cache_is_keyed_by_the_subject_share(tmp_path):
    _, tg = probe_mod._cached_dataset(30, 0, tmp_path, subject_frac=1.0)
    assert (tmp_path / "probe_data_all_seed0_n30_subjects1_vae-none.safetensors").is_file()
    assert bool((tg["pattern"] > 0).all())  # every image a subject
    _, tg = probe_mod._cached_dataset(30, 0, tmp_path)  # the default share keeps the cache names from before the option
    assert (tmp_path / "probe_data_all_seed0_n30_vae-none.safetensors").is_file() and bool((tg["pattern"] == 0).any())
