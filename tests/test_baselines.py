"""Tests for lipapers.baselines: metrics against sklearn and hand examples, popularity against the world's v1 helper,
the trees finding a planted cross that logistic regression cannot, and bad input."""
import numpy as np
import polars as pl
import pytest
from sklearn.metrics import log_loss, roc_auc_score

import lipapers.world
from lipapers.baselines import METHODS, calibration_error, evaluate, popularity, ranking_baselines


def _data(n, cross, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, 3))
    p = 1 / (1 + np.exp(-(X[:, 0] - 0.5 * X[:, 1] + cross * X[:, 0] * X[:, 1] - 1)))
    return X, (rng.random(n) < p).astype(int), p, rng.integers(0, 30, n)


def test_world_exposes_the_module():
    assert lipapers.world.baselines.ranking_baselines is ranking_baselines


def test_calibration_error_hand_examples():
    y = np.array([0] * 900 + [1] * 100)
    assert calibration_error(y, np.full(1000, 0.1)) == pytest.approx(0.0, abs=1e-12)
    assert calibration_error(y, np.full(1000, 0.3)) == pytest.approx(0.2, abs=1e-12)
    p = np.r_[np.full(500, 0.2), np.full(500, 0.6)]  # two bins: rates 0.2 and 0.4 -> |0| and |0.2|, weights 1/2
    yy = np.r_[np.arange(500) < 100, np.arange(500) < 200].astype(int)
    assert calibration_error(yy, p, n_bins=2) == pytest.approx(0.1, abs=1e-12)


def test_evaluate_matches_sklearn():
    X, y, p, _ = _data(4_000, 0.0)
    r = evaluate(y, {"oracle": p}).row(0, named=True)
    assert r["auc"] == pytest.approx(roc_auc_score(y, p)) and r["log_loss"] == pytest.approx(log_loss(y, p))
    assert r["n"] == 4_000 and r["ece"] < 0.03


def test_popularity_equals_world_helper():
    _, y, _, items = _data(3_000, 0.0)
    tr = pl.DataFrame({"post_id": items[:2000], "click": y[:2000]})
    te = pl.DataFrame({"post_id": items[2000:], "click": y[2000:]})
    np.testing.assert_allclose(popularity(items[:2000], y[:2000], items[2000:]), lipapers.world.popularity_scores(tr, te))


def test_trees_find_a_cross_logistic_regression_cannot():
    X, y, p, it = _data(16_000, 2.0)
    r = ranking_baselines(X[:8000], y[:8000], X[8000:], y[8000:], it[:8000], it[8000:], oracle=p[8000:])
    auc = dict(zip(r["method"], r["auc"]))
    assert r["method"].to_list() == list(METHODS)
    assert auc["oracle"] > auc["gbdt"] > auc["logistic_regression"] + 0.03 and auc["popularity"] < 0.56
    X, y, p, it = _data(16_000, 0.0)  # negative control: additive logit, no gain from trees
    r = ranking_baselines(X[:8000], y[:8000], X[8000:], y[8000:], methods=("logistic_regression", "gbdt"))
    a = dict(zip(r["method"], r["auc"]))
    assert a["gbdt"] < a["logistic_regression"] + 0.005


def test_bad_input():
    X, y, p, it = _data(100, 0.0)
    with pytest.raises(ValueError, match="unknown methods \\['svm'\\]"):
        ranking_baselines(X, y, X, y, methods=("svm",))
    with pytest.raises(ValueError, match="train: y must have shape \\(100,\\)"):
        ranking_baselines(X, y[:50], X, y, methods=("gbdt",))
    with pytest.raises(ValueError, match="y must hold only 0 and 1"):
        ranking_baselines(X, y * 2, X, y, methods=("gbdt",))
    with pytest.raises(ValueError, match="popularity needs items_train"):
        ranking_baselines(X, y, X, y, methods=("popularity",))
    with pytest.raises(ValueError, match="oracle needs"):
        ranking_baselines(X, y, X, y, methods=("oracle",))
    with pytest.raises(ValueError, match="train has 3 features, test has 2"):
        ranking_baselines(X, y, X[:, :2], y, methods=("gbdt",))
    with pytest.raises(ValueError, match="scores\\['a'\\] has shape"):
        evaluate(y, {"a": p[:10]})
