"""extract --aug-views K --augment KIND: augmented views of the train images as extra cache rows, and the
heads, curves and report that use them (train on every view, choose and test on plain val/test rows)."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest

from featcache.cache.h5 import FeatureCache
from featcache.cli import main
from featcache.data.demo import DEMO_DATA
from featcache.errors import UserError
from featcache.extract import extract
from helpers import flat, register_tiny

K = 2


def _tiny(data, out, **kw):
    """conftest's "tiny" backbone (the test asks for ``tiny_backbone``): the views' plumbing, not resnet18's cost."""
    options = dict(backbone="tiny", weights="none", batch_size=8, workers=0, progress=False)
    return extract(data, out, **{**options, **kw})


def _demo_views(out, **kw):
    """The demo subset, a stratified 40 of its train images (39 once val is carved; val and test whole), the plain view and K light views of each."""
    return _tiny(DEMO_DATA, out, aug_views=K, augment="light", max_images=40, **kw)


@pytest.fixture(scope="module")
def views_cache(tmp_path_factory):
    """The demo views cache, made once for this module. Read-only."""
    out = tmp_path_factory.mktemp("views") / "views.h5"
    with pytest.MonkeyPatch.context() as mp:
        register_tiny(mp)
        _demo_views(out)
    return out


@pytest.fixture(scope="module")
def train_images(views_cache) -> int:
    return len(FeatureCache.open(views_cache).rows("train"))


def test_rows_per_split_view_tags_and_the_plain_rows_of_a_plain_cache(views_cache, tmp_path, tiny_backbone):
    plain = tmp_path / "plain.h5"
    _tiny(DEMO_DATA, plain, max_images=40)
    cache, base = FeatureCache.open(views_cache), FeatureCache.open(plain)
    n = base.n_rows
    tags = cache.view_tags()
    splits = cache.read("splits")["splits"]
    train = int((base.read("splits")["splits"] == "train").sum())
    assert 36 <= train <= 40 and cache.n_views == K + 1 and cache.n_rows == n + K * train
    assert tags[:n].tolist() == [0] * n and np.bincount(tags).tolist() == [n, train, train]
    for split in ("val", "test"):  # plain only, the same rows as the plain cache
        assert (tags[splits == split] == 0).all()
        assert cache.view_rows(split).shape == (1, len(base.rows(split)))
        assert np.array_equal(cache.arrays(split)[0], base.arrays(split)[0])
    # The first n rows are the plain cache, row for row; the views follow, view-major, the same images.
    with h5py.File(views_cache) as f, h5py.File(plain) as g:
        assert np.array_equal(f["features"][:n], g["features"][()])
        assert list(f["paths"].asstr()[:n]) == list(g["paths"].asstr()[()])
        assert "views" not in g
    blocks = cache.view_rows("train")
    paths = cache.read("paths")["paths"]
    assert blocks.shape == (K + 1, train) and all((paths[b] == paths[blocks[0]]).all() for b in blocks)
    X = cache.read("features")["features"]
    assert not np.allclose(X[blocks[0]], X[blocks[1]]) and not np.allclose(X[blocks[1]], X[blocks[2]])
    assert cache.read("splits", plain=True)["splits"].tolist() == base.read("splits")["splits"].tolist()
    fp = cache.fingerprint_inputs["views"]
    assert fp["count"] == K and fp["augment"] == "light" and fp["params"]["degrees"] == 5
    assert "views" not in base.fingerprint_inputs and base.n_views == 1
    assert np.array_equal(base.rows("train", views=True), base.rows("train"))  # no views: the plain rows


def test_views_are_the_same_across_worker_counts_batch_sizes_and_a_resume(views_cache, tmp_path, monkeypatch,
                                                                          tiny_backbone):
    from featcache.cache.parts import PartStore

    other = tmp_path / "other.h5"
    _demo_views(other, workers=2, batch_size=3)
    resumed = tmp_path / "resumed.h5"
    real, saved = PartStore.save, []

    def save_then_die(self, chunk):
        if saved:
            raise KeyboardInterrupt  # killed after the first committed chunk
        saved.append(chunk.index)
        real(self, chunk)

    monkeypatch.setattr(PartStore, "save", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        _demo_views(resumed, chunk_rows=16)
    monkeypatch.setattr(PartStore, "save", real)
    summary = _demo_views(resumed, chunk_rows=16)
    assert summary["resumed_rows"] == 16
    reference = FeatureCache.open(views_cache).read("features", "views", "paths")
    for path in (other, resumed):
        got = FeatureCache.open(path).read("features", "views", "paths")
        assert list(got["paths"]) == list(reference["paths"]) and np.array_equal(got["views"], reference["views"])
        assert np.allclose(got["features"], reference["features"], atol=1e-5)


def test_a_view_depends_on_its_image_and_view_only():
    import torch

    from featcache.decode.augment import augment_params, augmented_views, torchvision_transform

    transform = torchvision_transform(augment_params("strong"))
    images = torch.randint(0, 255, (3, 3, 32, 32), dtype=torch.uint8)
    keys = ["a.jpeg", "b.jpeg", "c.jpeg"]
    torch.manual_seed(1)
    before = torch.rand(1)
    torch.manual_seed(1)
    both = augmented_views(images, keys, 2, transform, seed=0)  # view 1 of a, b, c, then view 2
    assert torch.equal(torch.rand(1), before)  # the caller's random stream is untouched
    alone = augmented_views(images[1:2], keys[1:2], 2, transform, seed=0)
    assert torch.equal(both[[1, 4]], alone)
    assert not torch.equal(both[1], both[4]) and not torch.equal(both[1], images[1])
    assert not torch.equal(augmented_views(images[1:2], keys[1:2], 1, transform, seed=1)[0], alone[0])


def test_other_views_settings_are_refused(views_cache, tmp_path, tiny_backbone, monkeypatch):
    import shutil

    views_cache = shutil.copy(views_cache, tmp_path / "views.h5")
    with pytest.raises(UserError, match=r"holds a different cache \(views: cache has .*this run has null"):
        _tiny(DEMO_DATA, views_cache, max_images=40)  # a views cache is never taken for a plain one
    with pytest.raises(UserError, match="views: cache has .*this run has .*strong"):
        _tiny(DEMO_DATA, views_cache, max_images=40, aug_views=K, augment="strong")
    assert _demo_views(views_cache)["status"] == "up to date"
    out = tmp_path / "cut.h5"
    from featcache.cache.parts import PartStore

    def die(self, chunk):
        raise KeyboardInterrupt

    with monkeypatch.context() as patched:
        patched.setattr(PartStore, "save", die)
        with pytest.raises(KeyboardInterrupt):
            _demo_views(out, chunk_rows=16)
    with pytest.raises(UserError, match=r"interrupted extraction with --aug-views 2 --augment light, this run asks "
                                        r"for --aug-views 3 --augment light; rerun with its flags"):
        _tiny(DEMO_DATA, out, max_images=40, aug_views=3, augment="light", chunk_rows=16)
    assert _tiny(DEMO_DATA, out, max_images=40, aug_views=3, augment="light", chunk_rows=16,
                 overwrite=True)["view_rows"] == 3 * len(FeatureCache.open(views_cache).rows("train"))


@pytest.mark.parametrize("argv, message", [
    (["--aug-views", "2"], "--aug-views 2 needs --augment light or strong"),
    (["--augment", "light"], "--augment light describes the augmented views of --aug-views K; give --aug-views too"),
    (["--aug-views", "2", "--augment", "heavy"], "--augment takes none, light, strong, tutorial, got 'heavy'"),
    (["--aug-views", "-1", "--augment", "light"], "--aug-views"),
])
def test_view_flag_mistakes_exit_2_in_one_line(argv, message, tmp_path, capsys):
    status = main(["extract", str(DEMO_DATA), "--out", str(tmp_path / "c.h5"), "--weights", "none", *argv])
    err = capsys.readouterr().err
    assert status == 2 and message in flat(err) and "Traceback" not in err and not (tmp_path / "c.h5").exists()


@pytest.mark.parametrize("kind", ["logistic", "sweep", "knn", "mlp"])
def test_heads_train_on_every_view_and_choose_and_test_on_plain_rows(kind, views_cache, tmp_path, monkeypatch):
    from featcache.fit import fit_head
    from featcache.heads import HEADS

    cls, seen = HEADS[kind], {}
    real = cls.candidates.__func__

    def spy(klass, train, val, *rest):
        seen.update(train=len(train[0]), val=len(val[0]))
        return real(klass, train, val, *rest)

    monkeypatch.setattr(cls, "candidates", classmethod(spy))
    metrics = fit_head(views_cache, tmp_path / "run", heads=kind, epochs=2, n_resamples=20)
    cache = FeatureCache.open(views_cache)
    images = {s: len(cache.rows(s)) for s in ("train", "val", "test")}
    assert seen == {"train": (K + 1) * images["train"], "val": images["val"]}
    assert metrics["n_train"] == images["train"] and metrics["train_views"]["rows"] == (K + 1) * images["train"]
    assert metrics["test"]["n"] == images["test"]
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert {s: sum(c.values()) for s, c in run["counts"].items()} == images
    predictions = (tmp_path / "run" / "predictions.csv").read_text().splitlines()
    assert len(predictions) == 1 + images["val"] + images["test"]
    if kind == "knn":  # its train rows, kept by reference, read back with their views
        from featcache.eval.rundir import RunRecord

        head, _ = RunRecord(tmp_path / "run").read_head()
        assert len(head.train_) == (K + 1) * images["train"]
        X = cache.arrays("test")[0]
        assert head.predict_proba(X).shape == (images["test"], 2)


def test_a_curve_point_carries_every_view_of_its_images(views_cache, train_images, tmp_path):
    from featcache.curve import curve

    record = curve([str(views_cache)], tmp_path / "curve", fractions=[0.5, 1.0], repeats=1, heads="logistic",
                   n_resamples=20)
    full = next(p for p in record["points"] if p["value"] == 1.0)
    half = next(p for p in record["points"] if p["value"] == 0.5)
    assert full["train_images"] == train_images and full["train_rows"] == (K + 1) * train_images
    assert half["train_rows"] == (K + 1) * half["train_images"] and half["train_images"] < train_images
    assert sum(full["train_per_class"].values()) == train_images


def _with_test_labels_permuted(src, dst):
    import shutil

    shutil.copy(src, dst)
    with h5py.File(dst, "r+") as f:
        splits = f["splits"].asstr()[()]
        rows = np.flatnonzero(splits == "test")
        labels = f["labels"][()]
        labels[rows] = np.random.default_rng(0).permutation(labels[rows])
        f["labels"][...] = labels
    return dst


def test_the_views_ablation_chooses_on_validation_only(views_cache, train_images, tmp_path):
    from featcache.report.analysis import views_ablation

    rows = views_ablation(FeatureCache.open(views_cache), "logistic", n_resamples=20)
    assert [(r["augmented_views"], r["train_images"], r["train_rows"]) for r in rows] == \
        [(0, train_images, train_images), (K, train_images, (K + 1) * train_images)]
    shuffled = views_ablation(FeatureCache.open(_with_test_labels_permuted(views_cache, tmp_path / "p.h5")),
                              "logistic", n_resamples=20)
    assert [(r["head"], r["val_auroc"]) for r in shuffled] == [(r["head"], r["val_auroc"]) for r in rows]
    assert [r["test_auroc"] for r in shuffled] != [r["test_auroc"] for r in rows]


def test_the_report_compares_0_and_k_views(views_cache, train_images, tmp_path):
    from featcache.fit import fit_head
    from featcache.report.document import build_report

    fit_head(views_cache, tmp_path / "run", n_resamples=20)
    facts = build_report([str(tmp_path / "run")], tmp_path / "report")
    rows = facts["augmented_views"]
    assert [(r["augmented_views"], r["train_rows"], r["augment"]) for r in rows] == \
        [(0, train_images, "light"), (K, (K + 1) * train_images, "light")]
    text = flat((tmp_path / "report" / "report.md").read_text())
    assert "Augmented views in the cache" in text and f"| {K} | {train_images} | {(K + 1) * train_images} |" in text
    assert sum(facts["class_balance"]["train"].values()) == train_images  # images, not their views
