"""lipapers.gravity_waves: the known flux operator (locality and kernel support by perturbation and Jacobian,
conservation, critical levels by hand, longitude equivariance), the COADS loader on a fake classic-netCDF file, the
models against hand-built references (stencil = column with identity taps, exact receptive field, attention gate by hand,
gates fixed to 1 = plain U-Net, roll equivariance), ridge against sklearn, W1 against scipy, bad inputs, determinism."""
import math

import numpy as np
import pytest
import torch
from dataclasses import replace

from lipapers import gravity_waves as G

torch.set_num_threads(1)
F64 = dict(atol=1e-10, rtol=1e-10)  # float64 operator checks
F32 = dict(atol=1e-5, rtol=1e-5)  # float32 model checks


def _inputs(cfg, seed=0, T=2):
    g = torch.Generator().manual_seed(seed)
    S = torch.rand(T, cfg.n_lat, cfg.n_lon, generator=g, dtype=torch.float64)
    u, v = torch.randn(2, T, cfg.n_levels, cfg.n_lat, cfg.n_lon, generator=g, dtype=torch.float64)
    return S, u + 0.5, v


def _cfg(**kw):
    return G.GWConfig(**{**dict(n_lat=12, n_lon=16, n_levels=4, n_times=20), **kw})


def _changed_columns(cfg, at=(6, 8)):
    "Columns x' whose inputs, when perturbed, change F at column `at` (perturbation, robust to the step functions)."
    S, u, v = _inputs(cfg)
    base = G.gw_flux(S, u, v, cfg)[:, :, at[0], at[1]]
    hit = np.zeros((cfg.n_lat, cfg.n_lon), bool)
    for i in range(cfg.n_lat):
        for j in range(cfg.n_lon):
            S2, u2, v2 = S.clone(), u.clone(), v.clone()
            S2[:, i, j] += 0.7; u2[:, :, i, j] *= -1.3; v2[:, :, i, j] += 0.9
            hit[i, j] = not torch.allclose(G.gw_flux(S2, u2, v2, cfg)[:, :, at[0], at[1]], base, **F64)
    return hit


def _disc(cfg, at, radius):
    i, j = np.meshgrid(np.arange(cfg.n_lat), np.arange(cfg.n_lon), indexing="ij")
    dj = (j - at[1] + cfg.n_lon // 2) % cfg.n_lon - cfg.n_lon // 2
    return (i - at[0]) ** 2 + dj**2 < radius**2


def test_local_flux_depends_on_the_column_only():
    hit = _changed_columns(_cfg(extent=3.0, local=True))
    assert hit.sum() == 1 and hit[6, 8]


@pytest.mark.parametrize("e", [1.0, 2.5])
def test_flux_support_is_the_kernel_disc(e):
    cfg = _cfg(extent=e)
    hit = _changed_columns(cfg)
    assert not (hit & ~_disc(cfg, (6, 8), e + 0.5)).any()  # nothing outside |Δ| < e + ½ (top level)
    assert hit.sum() > 1  # and it is nonlocal
    S, u, v = _inputs(cfg)  # the Jacobian wrt S at column (6, 8), top-level uw (no filtering): zero outside the disc
    S.requires_grad_(True)
    G.gw_flux(S, u, v, replace(cfg, vertical=False))[0, cfg.n_levels - 1, 6, 8].backward()
    nz = (S.grad[0] != 0).numpy()
    assert not (nz & ~_disc(cfg, (6, 8), e + 0.5)).any() and nz.sum() > 1


def test_kernels_are_normalised_without_filtering():
    cfg = _cfg(extent=3.0, vertical=False)
    S, u, v = _inputs(cfg)
    Fl = G.gw_flux(S, u, v, cfg)
    sp = torch.sqrt(u[:, 0] ** 2 + v[:, 0] ** 2)
    for k in range(cfg.n_levels):
        torch.testing.assert_close(Fl[:, k].sum((1, 2)), (S * u[:, 0] / sp).sum((1, 2)), **F64)
        torch.testing.assert_close(Fl[:, cfg.n_levels + k].sum((1, 2)), (S * v[:, 0] / sp).sum((1, 2)), **F64)


def test_reversed_wind_column_is_filtered():
    cfg = _cfg(extent=0.0)
    S = torch.zeros(1, 12, 16, dtype=torch.float64); S[0, 5, 5] = 2.0
    u = torch.ones(1, 4, 12, 16, dtype=torch.float64); v = torch.zeros_like(u)
    u[0, 2, 5, 5] = -0.5  # the source column's wind turns against its surface wind at level 2
    Fl = G.gw_flux(S, u, v, cfg)
    np.testing.assert_allclose(Fl[0, :4, 5, 5].numpy(), [2, 2, 0, 0], atol=1e-10)  # absorbed at level 2 and above
    np.testing.assert_allclose(G.gw_flux(S, u, v, replace(cfg, vertical=False))[0, :4, 5, 5].numpy(), [2] * 4, atol=1e-10)


def test_rolling_in_longitude_rolls_the_fluxes():
    cfg = _cfg(extent=2.5)
    S, u, v = _inputs(cfg)
    r = lambda a: torch.roll(a, 5, -1)
    torch.testing.assert_close(G.gw_flux(r(S), r(u), r(v), cfg), r(G.gw_flux(S, u, v, cfg)), **F64)


def test_simulate_is_seeded_and_shaped():
    cfg = G.GWConfig(n_lat=16, n_lon=32, n_levels=4, n_times=60, seed=3)
    a, b, c = G.simulate(cfg), G.simulate(cfg), G.simulate(replace(cfg, seed=4))
    assert a.x.shape == (60, 18, 16, 32) and a.y.shape == (60, 8, 16, 32)
    assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y) and not torch.equal(a.y, c.y)
    assert torch.isfinite(a.x).all() and torch.isfinite(a.y).all()
    d = G.split_gw(a)
    assert d.gap == 44 and len(d.x_train) + d.gap + len(d.x_test) == 60


@pytest.mark.parametrize("kw, msg", [
    (dict(extent=-0.5), "extent must be in [0, 16]"), (dict(n_lat=16, n_lon=32, extent=9.0), "extent must be in [0, 8]"),
    (dict(forcing="era5"), "forcing must be one of ['synthetic', 'coads']"), (dict(n_levels=1), "n_levels must be an int ≥ 2"),
    (dict(rho=1.0), "rho must be in [0, 1)")])
def test_bad_config(kw, msg):
    with pytest.raises(ValueError) as e: G.GWConfig(**kw)
    assert msg in str(e.value)


def test_coads_missing_names_the_package(tmp_path):
    with pytest.raises(FileNotFoundError, match="ferret-datasets"):
        G.simulate(G.GWConfig(n_lat=16, n_lon=32, n_times=50, forcing="coads", data_dir=str(tmp_path)))


def _fake_ferret(d, nan_relief=False):
    from scipy.io import netcdf_file
    lat, lon = np.linspace(-89, 89, 90), np.arange(21, 380, 2.0)  # COADS's grid starts at 21°E
    with netcdf_file(d / "coads_climatology.cdf", "w") as f:
        f.createDimension("TIME", 12); f.createDimension("COADSY", 90); f.createDimension("COADSX", 180)
        f.createVariable("COADSY", "f", ("COADSY",))[:] = lat
        f.createVariable("COADSX", "f", ("COADSX",))[:] = lon
        for name, val in (("UWND", 5.0), ("VWND", -2.0)):
            a = np.full((12, 90, 180), val, np.float32); a[:, 40:50, 10:40] = -1e34; a[:, 85:, :] = -1e34  # land, polar cap
            var = f.createVariable(name, "f", ("TIME", "COADSY", "COADSX")); var[:] = a; var.missing_value = np.float32(-1e34)
    with netcdf_file(d / "etopo60.cdf", "w") as f:
        f.createDimension("ETOPO60Y", 180); f.createDimension("ETOPO60X", 360)
        f.createVariable("ETOPO60Y", "f", ("ETOPO60Y",))[:] = np.arange(-89.5, 90)
        f.createVariable("ETOPO60X", "f", ("ETOPO60X",))[:] = np.arange(20.5, 380)
        r = np.full((180, 360), -3000.0, np.float32); r[100:110, 50:80] = 2000.0
        if nan_relief: r[0, 0] = np.nan
        f.createVariable("ROSE", "f", ("ETOPO60Y", "ETOPO60X"))[:] = r


def test_coads_loader_on_a_fake_file(tmp_path):
    _fake_ferret(tmp_path)
    cfg = G.GWConfig(n_lat=16, n_lon=32, n_levels=4, n_times=50, forcing="coads", data_dir=str(tmp_path))
    h, sfc = G.coads_forcing(cfg)
    assert sfc.shape == (2, 50, 16, 32) and np.isfinite(sfc).all()
    np.testing.assert_allclose(sfc[0], 5.0 / 8, rtol=1e-6); np.testing.assert_allclose(sfc[1], -2.0 / 8, rtol=1e-6)  # land filled
    assert 0 < h.max() <= 1.0 and h.min() == 0.0  # 2,000 m / 2,000 m at most; ocean depths set to 0
    sim = G.simulate(cfg)
    assert torch.isfinite(sim.y).all()


def test_coads_nan_relief_is_an_error(tmp_path):
    _fake_ferret(tmp_path, nan_relief=True)
    with pytest.raises(ValueError, match="ROSE has 1 NaN"):
        G.simulate(G.GWConfig(n_lat=16, n_lon=32, n_times=50, forcing="coads", data_dir=str(tmp_path)))


C = G.GWConfig(n_lat=8, n_lon=16, n_levels=3, n_times=50)


def test_stencil_with_identity_taps_is_the_column_model():
    torch.manual_seed(0)
    for r in (1, 2):
        st, col = G.StencilNet(C, radius=r, hidden=16), G.ColumnMLP(C, hidden=16)
        col.load_state_dict(st.mlp.state_dict())
        with torch.no_grad():
            for c in st.convs: c.weight.zero_(); c.bias.zero_(); c.weight[:, :, 1, 1] = torch.eye(C.n_in)
        x = torch.randn(3, C.n_in, 8, 16)
        torch.testing.assert_close(st(x), col(x), **F32)


@pytest.mark.parametrize("r", [1, 2])
def test_stencil_receptive_field_is_exact(r):
    torch.manual_seed(r)
    st = G.StencilNet(C, radius=r, hidden=16).double()
    x = torch.randn(1, C.n_in, 8, 16, dtype=torch.float64, requires_grad=True)
    st(x)[0, :, 4, 0].sum().backward()  # column at lon 0: the stencil wraps across the dateline
    nz = (x.grad[0].abs().sum(0) > 0).numpy()
    i, j = np.meshgrid(np.arange(8), np.arange(16), indexing="ij")
    dj = (j + 8) % 16 - 8
    assert (nz == ((abs(i - 4) <= r) & (abs(dj) <= r))).all()


def test_attention_gate_by_hand_and_fixed_gates():
    torch.manual_seed(0)
    c = G.GWConfig(n_lat=8, n_lon=16, n_levels=2, n_times=50)
    au = G.UNet(c, (4, 8, 16))
    au.train(); au(torch.randn(4, c.n_in, 8, 16)); au.eval()  # non-trivial BN running statistics
    gt = au.gates[1]
    x, g = torch.randn(2, 4, 8, 16), torch.randn(2, 4, 8, 16)
    F_ = torch.nn.functional
    a = F_.relu(F_.conv2d(x, gt.wx.weight, gt.wx.bias) + F_.conv2d(g, gt.wg.weight, gt.wg.bias))
    a = F_.conv2d(a, gt.psi.weight, gt.psi.bias)
    a = (a - gt.bn.running_mean.view(1, -1, 1, 1)) / torch.sqrt(gt.bn.running_var.view(1, -1, 1, 1) + gt.bn.eps)
    a = torch.sigmoid(a * gt.bn.weight.view(1, -1, 1, 1) + gt.bn.bias.view(1, -1, 1, 1))
    torch.testing.assert_close(gt(x, g), x * a, **F32)
    pu = G.UNet(c, (4, 8, 16), attention=False).eval()
    missing, unexpected = pu.load_state_dict(au.state_dict(), strict=False)
    assert not missing and all(k.startswith("gates.") for k in unexpected)
    for gg in au.gates: gg.fixed = 1.0
    xx = torch.randn(2, c.n_in, 8, 16)
    torch.testing.assert_close(au(xx), pu(xx), **F32)


@pytest.mark.parametrize("name, shift", [("stencil3", 3), ("stencil5", 5), ("unet", 8), ("attn_unet", 8)])
def test_models_commute_with_longitude_rolls(name, shift):
    c = G.GWConfig(n_lat=8, n_lon=32, n_levels=2, n_times=50)
    torch.manual_seed(0)
    m = G.make_model(name, c, hidden=16, unet_width=4).eval()
    x = torch.randn(2, c.n_in, 8, 32)
    with torch.no_grad():
        torch.testing.assert_close(m(torch.roll(x, shift, -1)), torch.roll(m(x), shift, -1), **F32)


def test_model_input_errors():
    for name in G.METHODS:
        m = G.make_model(name, C, hidden=8, unet_width=4) if name not in ("unet", "attn_unet") else None
        if m is None: continue
        with pytest.raises(ValueError, match=r"\(B, 14, 8, 16\)"): m(torch.randn(2, 13, 8, 16))
        with pytest.raises(ValueError, match=r"\(B, C, lat, lon\)"): m(torch.randn(14, 8, 16))
    with pytest.raises(ValueError, match=r"divisible by 2\*\*3 = 8"): G.UNet(G.GWConfig(n_lat=12, n_lon=16, n_times=50))
    with pytest.raises(ValueError, match="patch=4"): G.PatchAttention(G.GWConfig(n_lat=6, n_lon=16, n_times=50))
    with pytest.raises(ValueError, match="radius must be 1"): G.StencilNet(C, radius=3)
    with pytest.raises(ValueError, match="valid: ridge, mlp"): G.parse_methods("mlp,cnn")


def test_ridge_equals_sklearn():
    from sklearn.linear_model import Ridge
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(6, C.n_in, 8, 16, generator=g), torch.randn(6, C.n_out, 8, 16, generator=g)
    m = G.ColumnRidge(C, alpha=3.0).fit(x, y, chunk=4)
    X, Y = (a.permute(0, 2, 3, 1).reshape(-1, a.shape[1]).double().numpy() for a in (x, y))
    ref = Ridge(alpha=3.0).fit(X, Y)
    np.testing.assert_allclose(m.lin.weight[:, :, 0, 0].detach().numpy(), ref.coef_, atol=1e-5)
    np.testing.assert_allclose(m.lin.bias.detach().numpy(), ref.intercept_, atol=1e-5)


def test_w1_equals_scipy():
    from scipy.stats import wasserstein_distance
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(997, generator=g, dtype=torch.float64), 2 * torch.rand(997, generator=g, dtype=torch.float64)
    assert G.w1(a, b) == pytest.approx(wasserstein_distance(a.numpy(), b.numpy()), rel=1e-12)


def test_flops_hand_count():
    c = G.GWConfig(n_lat=8, n_lon=16, n_levels=2, n_times=50)
    assert G.flops_per_sample(G.ColumnMLP(c, hidden=4, n_layers=1), c) == 2 * 128 * (10 * 4 + 4 * 4)
    pa = G.PatchAttention(c, patch=4, d_model=8, n_layers=1, n_heads=2, hidden=4)
    n, d = 8, 8  # 8 tokens of width 8: embed, q/k/v/out, QKᵀ and AV, FFN, unpatch, then the column head on 128 cells
    macs = n * (10 * 16) * d + 4 * n * d * d + 2 * n * n * d + n * (d * 16 + 16 * d) + n * d * 128 + 128 * (18 * 4 + 4 * 4 + 4 * 4)
    assert G.flops_per_sample(pa, c) == 2 * macs


def test_train_and_evaluate_are_seeded():
    cfg = G.GWConfig(n_lat=8, n_lon=16, n_levels=2, n_times=80)
    data = G.split_gw(G.simulate(cfg))
    with pytest.raises(ValueError, match="lr must be"): G.train_gw(G.ColumnMLP(cfg), data, 1, 4, (1e-3, 1e-4))
    runs = [G.run_gw(cfg, ["ridge", "mlp", "stencil3"], 2, 4, (1e-4, 3e-3), hidden=16, data=data)[0] for _ in range(2)]
    keep = lambda df: df.filter(df["metric"] != "sec_epoch").sort("method", "metric", "level")
    assert keep(runs[0]).equals(keep(runs[1]))
    nm = dict(runs[0].filter(runs[0]["metric"] == "nmse").select("method", "value").iter_rows())
    assert all(math.isfinite(v) for v in nm.values()) and len(nm) == 3
