"""WxC-mini (lipapers.wxc): determinism, leak checks (negative controls), metrics vs scikit-learn, baselines vs
references, bad input. Small sizes only; presets build the expensive things."""
import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score, brier_score_loss, r2_score, roc_auc_score
from sklearn.neighbors import NearestNeighbors

from lipapers import wxc as W

torch.set_num_threads(1)


def _real_available():
    try:
        W.navy_winds()
        return True
    except W.DataError:
        return False


real = pytest.mark.skipif(not _real_available(), reason="Debian ferret-datasets not installed")


@pytest.mark.parametrize("name,kw", [("ar1", dict(n=200)), ("noise", dict(n=200)), ("analog_twin", dict(n=600)),
                                     ("turbulence", dict(n=1000))])
def test_same_seed_identical_arrays(name, kw):
    a, b = (W.load_task(name, seed=5, cache=False, **kw) for _ in range(2))
    assert W.task_sha(a) == W.task_sha(b)
    assert W.task_sha(a)["test"] != W.task_sha(W.load_task(name, seed=6, cache=False, **kw))["test"]


def test_cache_returns_same_object_and_key_has_sha():
    a = W.load_task("ar1", n=150)
    assert W.load_task("ar1", n=150) is a and W._source_sha("ar1") == ""


def _plant_test_time(t):
    s, x = t.train, t.test
    tr = W.Split(*[np.concatenate([a, b[:1]]) for a, b in zip((s.X, s.y, s.t, s.t_out), (x.X, x.y, x.t, x.t_out))])
    return replace(t, train=tr)


def test_check_split_rejects_a_test_time_in_training():
    t = W.load_task("ar1", n=200)
    W.check_split(t)  # the clean split passes
    with pytest.raises(ValueError, match="'ar1'.*times"):
        W.check_split(_plant_test_time(t))


def test_check_split_rejects_statistics_fitted_on_all_times():
    t = W.load_task("ar1", n=200)
    with pytest.raises(ValueError, match="fit_t"):
        W.check_split(replace(t, fit_t=np.arange(200)))


def test_check_split_rejects_random_split_and_small_gap():
    with pytest.raises(ValueError, match="times"):
        W.check_split(W.load_task("ar1", n=200, split="random"))
    t = W.load_task("ar1", n=200)
    with pytest.raises(ValueError, match="gap"):
        W.check_split(replace(t, gap=t.decorr - 1))


@real
def test_navy_climatology_from_all_years_is_rejected():
    W.check_split(W._navy("tiny", 0))
    with pytest.raises(ValueError, match="fit_t"):
        W.check_split(W._navy("tiny", 0, clim_from="all"))


def test_temporal_split_bad_input():
    t = np.arange(20)
    with pytest.raises(ValueError, match="unordered"):
        W.temporal_split(t, 10, 5, 1)
    with pytest.raises(ValueError, match="gap must be"):
        W.temporal_split(t, 5, 10, -1)
    with pytest.raises(ValueError, match="overlaps"):
        W.temporal_split(t, 5, 6, 2)
    with pytest.raises(ValueError, match="empty"):
        W.temporal_split(t, 5, 50, 1)


def test_metrics_equal_sklearn():
    rng = np.random.default_rng(0)
    y = rng.random(700) < 0.05
    s = np.round(rng.random(700) + 0.7 * y, 2)
    assert W.roc_auc(s, y) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert W.pr_auc(s, y) == pytest.approx(average_precision_score(y, s), abs=1e-12)
    p = rng.random(700)
    assert W.brier(p, y) == pytest.approx(brier_score_loss(y, p), abs=1e-12)
    a, b = rng.standard_normal((30, 4, 3, 5)), rng.standard_normal((30, 4, 3, 5))
    mse, r2 = W.by_level(a, b)
    for c in range(4):
        assert r2[c] == pytest.approx(r2_score(b[:, c].ravel(), a[:, c].ravel()), abs=1e-10)
        assert mse[c] == pytest.approx(((a[:, c] - b[:, c]) ** 2).mean(), abs=1e-12)


def test_acc_by_hand():
    f, y = np.array([[1.0, 2.0, 0.0], [1.0, -1.0, 2.0]]), np.array([[2.0, 1.0, 1.0], [0.0, 1.0, 1.0]])
    c = np.array([0.5, 0.5, 0.5])
    fa, ya = f - c, y - c
    want = np.mean([(fa[i] * ya[i]).sum() / math.sqrt((fa[i] ** 2).sum() * (ya[i] ** 2).sum()) for i in range(2)])
    assert W.acc(f, y, c) == pytest.approx(want, abs=1e-12)
    # series: correlation over time of anomalies
    fs, ys = np.array([1.0, 2.0, 3.0]), np.array([1.0, 3.0, 2.0])
    assert W.acc(fs, ys, 2.0) == pytest.approx((0 * 1 + (-1) * (-1) + 1 * 0) / math.sqrt(2 * 2), abs=1e-12)


def test_analog_neighbours_equal_sklearn():
    t = W.load_task("analog_twin", n=600)
    for emb in ("raw", "pca"):
        a = W.Analog(emb, k=3).fit(t)
        q = a.emb(t.test.X.reshape(len(t.test), -1))
        ref = NearestNeighbors(n_neighbors=3).fit(a.lib).kneighbors(q)[1]
        np.testing.assert_array_equal(a.neighbours(t), ref)


def test_persistence_rmse_matches_ar1_theory():
    rho, n = 0.6, 3000
    t = W.load_task("ar1", n=n, rho=rho, cache=False)
    r = W.evaluate(t, W.Persistence().predict(t))["rmse"]
    # 600 test steps × 512 correlated cells: allow 4 % (about 3 standard errors of the RMSE here)
    assert r == pytest.approx(math.sqrt(2 * (1 - rho)), rel=0.04)
    o = W.evaluate(t, W.Oracle().predict(t))["rmse"]
    assert o == pytest.approx(math.sqrt(1 - rho**2), rel=0.04)


def test_linear_approaches_oracle_on_ar1_and_ties_climatology_on_noise():
    t = W.load_task("ar1", n=600)
    lin, orc, per = (W.evaluate(t, m.fit(t).predict(t))["rmse"] for m in (W.Linear(), W.Oracle(), W.Persistence()))
    # 360 training fields for a 32 x 512 map: about 6 % above the optimum here, but below persistence
    assert orc < lin < min(1.08 * orc, per)
    z = W.load_task("noise", n=600)
    lin, cl = (W.evaluate(z, m.fit(z).predict(z))["rmse"] for m in (W.Linear(), W.Climatology()))
    assert abs(lin / cl - 1) < 0.03


def test_unet_commutes_with_longitude_rolls():
    torch.manual_seed(0)
    for levels in (1, 2, 3):
        net = W.UNetNet(3, 2, 4, levels, periodic=True).eval()
        x = torch.randn(2, 3, 8, 24)
        with torch.no_grad():
            torch.testing.assert_close(net(x.roll(2**levels, -1)), net(x).roll(2**levels, -1), rtol=1e-5, atol=1e-5)


def test_unet_rejects_indivisible_grid():
    with pytest.raises(ValueError, match="divisible by 2\\*\\*levels = 4"):
        W.UNetNet(1, 1, 4, 2)(torch.randn(1, 1, 10, 16))


def test_turbnet_class_weights_by_hand():
    y = np.array([0.0, 1.0, 0.0, 0.0])
    assert W.class_weights(y) == (0.25, 0.75)
    logits = torch.tensor([0.5, -0.3, 1.2, -2.0])
    yt = torch.tensor(y, dtype=torch.float32)
    bce = lambda s, t: -(t * math.log(1 / (1 + math.exp(-s))) + (1 - t) * math.log(1 - 1 / (1 + math.exp(-s))))
    want = np.mean([(0.75 if t else 0.25) * bce(s, t) for s, t in zip(logits.tolist(), y)])
    assert W.weighted_bce(logits, yt, (0.25, 0.75)).item() == pytest.approx(want, abs=1e-6)
    net = W.TurbMLP(7)
    assert [m.out_features for m in net if isinstance(m, torch.nn.Linear)] == [100, 60, 60, 40, 20, 1]


def test_turbulence_prevalence_and_rule():
    t = W.load_task("turbulence", n=20000)
    assert 0.015 < t.train.y.mean() < 0.05
    cols, ri = W.turbulence_columns(np.random.default_rng(1), 500)
    np.testing.assert_allclose(W.richardson(cols.astype(np.float64)), ri, rtol=1e-3, atol=1e-6)


def test_bad_input_errors():
    with pytest.raises(ValueError, match="valid: turbulence"):
        W.load_task("hurricanes")
    with pytest.raises(ValueError, match="valid: tiny, paper, gpu"):
        W.load_task("ar1", preset="huge")
    t = W.load_task("ar1", n=200)
    bad = replace(t, train=replace(t.train, X=np.where(np.arange(t.train.X.size).reshape(t.train.X.shape) == 3, np.nan, t.train.X)))
    with pytest.raises(ValueError, match="'ar1'.*non-finite values in train.X"):
        W.Linear().fit(bad)
    with pytest.raises(ValueError, match="no persistence"):
        W.Persistence().predict(W.load_task("turbulence", n=1000))
    with pytest.raises(ValueError, match="unknown"):
        W.run_wxc("hurricanes", "tiny", 0, {})
    with pytest.raises(ValueError, match="embed must be"):
        W.Analog("cosine")


def test_missing_package_names_the_install(monkeypatch, tmp_path):
    with pytest.raises(W.DataError, match="apt-get install -y ferret-datasets"):
        W.navy_winds(tmp_path / "monthly_navy_winds.cdf")
    monkeypatch.setattr(W, "pkg_dir", lambda name, install=None: (_ for _ in ()).throw(W.DataError(f"install it with: {install}")))
    with pytest.raises(W.DataError, match="pvlib==0.16.1"):
        W.tmy3()


def _ar1(rng, n, rho):
    x = np.empty(n)
    x[0] = rng.standard_normal()
    for t in range(1, n):
        x[t] = rho * x[t - 1] + math.sqrt(1 - rho**2) * rng.standard_normal()
    return x


Z = 1.959963984540054 + 0.8416212335729143  # the MDE factor: z_0.975 + z_0.8


def test_block_bootstrap_variance_equals_its_exact_value():
    x, L = _ar1(np.random.default_rng(0), 120, 0.6), 6
    blocks = np.array([x[j:j + L].mean() for j in range(len(x) - L + 1)])
    exact = (L / len(x)) * blocks.var()  # Var*(mean*) for L dividing n (Künsch 1989)
    se = W.block_bootstrap(x, L, n_boot=40_000).mde / Z
    assert abs(se**2 / exact - 1) < 0.04


def test_block_bootstrap_of_length_one_is_the_iid_bootstrap():
    x = np.random.default_rng(1).standard_normal(50)
    se = W.block_bootstrap(x, 1, n_boot=40_000).mde / Z
    assert abs(se**2 / (x.var() / len(x)) - 1) < 0.04


def test_block_bootstrap_matches_the_bartlett_long_run_variance_of_statsmodels():
    import statsmodels.api as sm
    x, L = _ar1(np.random.default_rng(2), 3000, 0.5), 20
    hac = sm.OLS(x, np.ones_like(x)).fit(cov_type="HAC", cov_kwds=dict(maxlags=L - 1, use_correction=False))
    se = W.block_bootstrap(x, L, n_boot=20_000).mde / Z  # Bartlett weights 1 − h/(maxlags + 1) = 1 − h/L
    assert abs(se / float(hac.bse[0]) - 1) < 0.08


def test_block_intervals_cover_on_autocorrelated_series_where_iid_ones_do_not():
    rng, cover = np.random.default_rng(3), {1: 0, 10: 0}
    for r in range(200):
        x = _ar1(rng, 150, 0.6)  # true mean 0; long-run sd twice the iid sd
        for L in cover:
            p = W.block_bootstrap(x, L, n_boot=1000, seed=r)
            cover[L] += p.lo <= 0 <= p.hi
    assert cover[10] / 200 >= 0.85 and cover[1] / 200 <= 0.80, cover


def test_block_bootstrap_bad_input():
    with pytest.raises(ValueError, match="block must be in 1…5"):
        W.block_bootstrap(np.zeros(5), 6)
    with pytest.raises(ValueError, match="block must be in"):
        W.block_bootstrap(np.zeros(5), 0)
    with pytest.raises(ValueError, match="NaNs"):
        W.block_bootstrap(np.array([1.0, np.nan, 2.0]), 1)
