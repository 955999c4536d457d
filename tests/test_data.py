"""Tests for lipapers.data: loaders read what was verified, check it, split it, and fail with the install command."""
import csv
import gzip
import importlib.util
import struct

import numpy as np
import polars as pl
import pytest
import torch

import lipapers.data as D


def test_movielens_schema_and_counts():
    ml = D.movielens_100k()
    assert ml.ratings.schema == pl.Schema({"user_id": pl.Int32, "item_id": pl.Int32, "rating": pl.Int8, "timestamp": pl.Int64})
    assert ml.ratings.shape == (100_000, 4) and ml.users.shape == (943, 5) and ml.items.height == 1682
    assert ml.ratings["user_id"].n_unique() == 943 and ml.ratings["item_id"].n_unique() == 1682
    assert set(ml.ratings["rating"].unique()) == {1, 2, 3, 4, 5}
    assert ml.items.schema["genres"] == pl.List(pl.String)
    # independent reference: parse the same file with the csv module
    path = D.pkg_dir("recbole") / "dataset_example" / "ml-100k" / "ml-100k.inter"
    with open(path) as f:
        rows = list(csv.reader(f, delimiter="\t"))[1:]
    assert sum(int(r[2]) for r in rows) == ml.ratings["rating"].cast(pl.Int64).sum()
    assert (int(rows[0][0]), int(rows[0][1]), int(float(rows[0][3]))) == tuple(ml.ratings.row(0)[i] for i in (0, 1, 3))


def test_time_split_past_and_future():
    r = D.movielens_100k().ratings
    tr, te = D.time_split(r, test_frac=0.25)
    assert tr["timestamp"].max() < te["timestamp"].min()
    assert tr.height + te.height == r.height and abs(te.height / r.height - 0.25) < 0.01
    with pytest.raises(ValueError, match="test_frac"):
        D.time_split(r, test_frac=1.5)
    with pytest.raises(ValueError, match="no column 'when'"):
        D.time_split(r, time_col="when")


def test_open_bandit():
    for policy in ("random", "bts"):
        o = D.open_bandit(policy, "all")
        assert o.log.height == 10_000 and o.items.height == 80
        assert set(o.log["position"].unique()) == {1, 2, 3}
        assert o.log["propensity"].is_between(0, 1, closed="right").all()
        assert o.log["timestamp"].dtype == pl.Datetime("us", "UTC")
    men = D.open_bandit("random", "men")
    assert len([c for c in men.log.columns if c.startswith("affinity_")]) == men.items.height
    assert D.open_bandit("random").log["click"].sum() == 38  # DATA.md: 38 clicks under the random policy
    with pytest.raises(ValueError, match="campaign in"):
        D.open_bandit("random", "kids")


def test_shakespeare():
    works = D.shakespeare_works()
    assert works.height == 42 and works["n_chars"].sum() == 5_057_198
    text = D.shakespeare_text()
    assert text.startswith(works["text"][0]) and "To be, or not to be" in text
    tr, va = D.shakespeare_text("train"), D.shakespeare_text("val", val_frac=0.1)
    assert tr + va == text and abs(len(va) / len(text) - 0.1) < 1e-3
    with pytest.raises(ValueError, match="split must be one of"):
        D.shakespeare_text("test")


def test_fashion_mnist_against_idx_header():
    X, y = D.fashion_mnist("test")
    assert X.shape == (10_000, 28, 28) and X.dtype == torch.uint8 and y.dtype == torch.int64
    # independent reference: the IDX header carries magic, count, rows, cols (big-endian)
    raw = gzip.open(D.FASHION_DIR / "t10k-images-idx3-ubyte.gz").read()
    assert struct.unpack(">4i", raw[:16]) == (2051, 10_000, 28, 28)
    assert X[123].numpy().tobytes() == raw[16 + 123 * 784 : 16 + 124 * 784]
    assert torch.bincount(y).tolist() == [1000] * 10 and len(D.FASHION_CLASSES) == 10
    with pytest.raises(ValueError, match="'train' or 'test'"):
        D.fashion_mnist("val")


def test_fashion_mnist_missing_or_different(tmp_path):
    with pytest.raises(D.DataError, match="apt-get install -y dataset-fashion-mnist"):
        D.fashion_mnist(root=tmp_path)
    for name in D._FM_SHA:  # same names, wrong content
        (tmp_path / name).write_bytes(gzip.compress(b"\0" * 64))
    with pytest.raises(D.DataError, match="sha256"):
        D.fashion_mnist("test", root=tmp_path)


def test_missing_package_and_changed_file(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "recbole" else real(n, *a))
    with pytest.raises(D.DataError, match=r"pip install --no-deps recbole==1\.2\.1"):
        D.movielens_100k()
    monkeypatch.setattr(importlib.util, "find_spec", real)
    monkeypatch.setitem(D._ML_SHA, "user", "0" * 64)
    with pytest.raises(D.DataError, match="different version"):
        D.movielens_100k()
    monkeypatch.setattr(D, "_SHK_SHA", "0" * 64)
    with pytest.raises(D.DataError, match=r"shakespeare==0\.6"):
        D.shakespeare_works()


def test_digits_split():
    Xa, ya = D.digits("all")
    Xtr, ytr = D.digits("train", seed=3)
    Xte, yte = D.digits("test", seed=3)
    assert Xa.shape == (1797, 8, 8) and len(ytr) + len(yte) == 1797
    # partition of the full set: multiset of images equal
    key = lambda X: sorted(map(bytes, X.reshape(len(X), -1).numpy()))
    assert key(torch.cat([Xtr, Xte])) == key(Xa)
    assert torch.equal(D.digits("train", seed=3)[1], ytr) and not torch.equal(D.digits("train", seed=4)[1], ytr)
    # stratified: each class's test share close to test_frac
    share = np.bincount(yte.numpy()) / np.bincount(ya.numpy())
    assert np.all(np.abs(share - 0.25) < 0.02)


def test_load_dispatcher():
    assert D.load("digits", split="all")[0].shape == (1797, 8, 8)
    assert D.load("open_bandit", policy="bts").log.height == 10_000
    with pytest.raises(ValueError, match="valid names: .*fashion_mnist"):
        D.load("cifar10")
