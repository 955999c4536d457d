"""Chapter 51 (lipapers.sgd_stability): the mean-square operator against brute force and limiting cases, η* against
bisection, σ on hand examples, the closed forms and Lyapunov exponents of the diagonal instance, the simulator
against tr Tᵗ(M0), per-example Hessians against hvp_fn and Gauss–Newton, and every bad input. float64 throughout."""
import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from lipapers.msam import hvp_fn, mlp
from lipapers.sgd_stability import (
    _flat, agreement, c_b, coherence, coherence_critical_lr, critical_lr, diagonal_closed_form, diagonal_instance,
    diagonal_lyapunov, diagonal_rho, escape_rate, factors, fit_minimum, gd_critical_lr, kron_operator, make_hessians,
    ms_spectral_radius, mse, observed_critical_lr, per_example_hessians, range_basis, simulate_linear_sgd,
    stability_operator)

torch.set_num_threads(1)
D = torch.float64


def rand_psd(n, d, rank=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(n, d, rank or d, generator=g, dtype=D)
    return A @ A.transpose(1, 2)


def brute_rho(Hs, eta, B, replacement):
    """E[(I−ηĤ)⊗(I−ηĤ)] over every batch, its spectral radius."""
    n, d, _ = Hs.shape
    bs = itertools.product(range(n), repeat=B) if replacement else itertools.combinations(range(n), B)
    Ms = [torch.eye(d, dtype=D) - eta * Hs[list(b)].mean(0) for b in bs]
    return torch.linalg.eigvals(sum(torch.kron(M, M) for M in Ms) / len(Ms)).abs().max().item()


# --- coherence -------------------------------------------------------------------------------------------------
def test_coherence_identical_rank1_is_n():
    a = torch.randn(5, dtype=D)
    assert coherence((a[:, None] * a)[None].expand(9, 5, 5).clone()) == pytest.approx(9, rel=1e-12)


def test_coherence_orthogonal_ranges_is_1():
    Hs = torch.diag_embed(torch.eye(7, dtype=D) * torch.arange(1, 8, dtype=D)[:, None])
    assert coherence(Hs) == pytest.approx(1, rel=1e-12)


@pytest.mark.parametrize("sigma", [1, 3, 10, 20])
def test_coherence_diagonal_instance_is_sigma(sigma):
    assert coherence(diagonal_instance(20, sigma)) == pytest.approx(sigma, rel=1e-12)


def test_coherence_rotation_invariant():
    Hs = rand_psd(6, 4, 2); Q = torch.linalg.qr(torch.randn(4, 4, dtype=D))[0]
    assert coherence(Q @ Hs @ Q.T) == pytest.approx(coherence(Hs), rel=1e-10)


# --- the operator -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("replacement", [True, False])
@pytest.mark.parametrize("eta", [0.05, 0.3])
def test_rho_kron_lanczos_brute_force(replacement, eta):
    Hs = rand_psd(4, 3, seed=1)
    ref = brute_rho(Hs, eta, 2, replacement)
    assert ms_spectral_radius(Hs, eta, 2, replacement, method="kron") == pytest.approx(ref, rel=1e-10)
    assert ms_spectral_radius(Hs, eta, 2, replacement, method="lanczos") == pytest.approx(ref, rel=1e-8)


def test_rho_brute_force_rank_deficient_and_b3():
    Hs = rand_psd(5, 4, 1, seed=2)  # rank-1 H_i: range(H) has dimension 4 here; B = 3
    for rep in (True, False):
        assert ms_spectral_radius(Hs, 0.1, 3, rep) == pytest.approx(brute_rho(Hs, 0.1, 3, rep), rel=1e-10)


def test_operator_matches_kron_matrix():
    Hs = rand_psd(5, 3, 2, seed=3); M = torch.randn(3, 3, dtype=D); M = M + M.T
    T, K = stability_operator(Hs, 0.2, 2), kron_operator(Hs, 0.2, 2)
    torch.testing.assert_close(T(M).T.reshape(-1), K @ M.T.reshape(-1), rtol=1e-12, atol=1e-12)


def test_identical_hessians_give_gd_multiplier():
    H = rand_psd(1, 4, seed=4)[0]; lam = torch.linalg.eigvalsh(H)
    Hs = H.expand(6, 4, 4).clone(); eta = 1.5 / lam.max().item()
    ref = ((1 - eta * lam) ** 2).max().item()
    for B, rep in ((1, True), (3, False), (6, True)):
        assert ms_spectral_radius(Hs, eta, B, rep) == pytest.approx(ref, rel=1e-10)


def test_full_batch_without_replacement_is_gd():
    Hs = rand_psd(5, 3, 1, seed=5); lam = torch.linalg.eigvalsh(Hs.mean(0))
    assert c_b(5, 5, replacement=False) == 0
    assert ms_spectral_radius(Hs, 0.3, 5, False) == pytest.approx(((1 - 0.3 * lam) ** 2).max().item(), rel=1e-10)


def test_factors_reconstruct_indefinite():
    Hs = rand_psd(4, 3, seed=6) - 2 * torch.eye(3, dtype=D)
    F_, s = factors(Hs, tol=1e-14)
    torch.testing.assert_close(F_.transpose(1, 2) @ (s[:, :, None] * F_), Hs, rtol=0, atol=1e-12)


def test_range_basis_drops_null_space():
    Hs = torch.zeros(3, 5, 5, dtype=D); Hs[:, :2, :2] = rand_psd(3, 2, seed=7)
    h, Hr = range_basis(Hs)
    assert Hr.shape == (3, 2, 2) and (h > 0).all()


def test_one_by_one():
    Hs = torch.tensor([[[1.0]], [[3.0]]], dtype=D)  # d = 1: T = E(1 − ηĥ)² exactly
    ref = sum((1 - 0.4 * (Hs[i] + Hs[j]).item() / 2) ** 2 for i in range(2) for j in range(2)) / 4
    assert ms_spectral_radius(Hs, 0.4, 2) == pytest.approx(ref, rel=1e-12)


# --- η* ----------------------------------------------------------------------------------------------------------
def bisect_rho(Hs, B, rep, lo=1e-6, hi=None):
    hi = hi or 2.0 / torch.linalg.eigvalsh(Hs.mean(0))[-1].item() * 1.001
    for _ in range(200):
        m = (lo + hi) / 2
        if ms_spectral_radius(Hs, m, B, rep) > 1: hi = m
        else: lo = m
        if hi - lo < 1e-14 * hi: break
    return (lo + hi) / 2


@pytest.mark.parametrize("replacement", [True, False])
@pytest.mark.parametrize("B", [1, 2, 4])
def test_critical_lr_is_bisection(replacement, B):
    Hs = rand_psd(6, 4, 1, seed=8)
    ref = bisect_rho(Hs, B, replacement)
    assert critical_lr(Hs, B, replacement) == pytest.approx(ref, rel=1e-9)
    assert critical_lr(Hs, B, replacement, method="lanczos") == pytest.approx(ref, rel=1e-8)


def test_critical_lr_limits():
    Hs = rand_psd(5, 3, 1, seed=9); eg = gd_critical_lr(Hs.mean(0))
    assert critical_lr(Hs, 5, replacement=False) == pytest.approx(eg, rel=1e-10)
    assert critical_lr(Hs, 1) < critical_lr(Hs, 2) < critical_lr(Hs, 5) < eg


# --- diagonal instance: closed forms, σ-predictor, Lyapunov ------------------------------------------------------
def test_diagonal_rho_is_operator():
    for sigma, B in ((1, 1), (3, 2), (5, 7), (12, 4), (12, 12)):
        Hs = diagonal_instance(12, sigma)
        for rep in (True, False):
            assert diagonal_rho(12, sigma, B, 0.5, rep) == pytest.approx(ms_spectral_radius(Hs, 0.5, B, rep), rel=1e-12)


def test_closed_forms_match_operator_off_ties():
    n, eta, checked = 100, 0.5, 0
    for sigma in range(1, 51):
        for B in range(1, 50):
            rho = diagonal_rho(n, sigma, B, eta)
            if abs(rho - 1) < 1e-12: continue  # a tie: the strict inequalities and ρ = 1 disagree by definition
            assert diagonal_closed_form(n, sigma, B, eta) == (rho > 1), (sigma, B, rho)
            checked += 1
    assert checked > 2400


def test_note_examples():
    assert all(diagonal_rho(100, 1, B, 0.5) > 1 for B in range(1, 99))
    assert [diagonal_rho(100, 10, B, 0.5) > 1 for B in (8, 9)] == [True, False]
    assert all(diagonal_rho(100, 50, B, 0.5) <= 1 for B in range(1, 101))


def test_sigma_predictor_is_e1_boundary_of_diagonal_instance():
    for sigma, B in ((2, 3), (10, 8), (25, 1)):
        e = coherence_critical_lr(2.0, sigma, 100, B)
        c = 1 / B; h = 200 / sigma
        assert (1 - 2 * e) ** 2 + e**2 * c * (2 * h - 4) == pytest.approx(1, rel=1e-12)
        assert critical_lr(diagonal_instance(100, sigma), B, method="lanczos") <= e * (1 + 1e-9)  # η* = min over axes


def test_sigma_predictor_equals_gd_rule_when_fully_coherent():
    assert coherence_critical_lr(3.0, 7, 7, 2) == pytest.approx(2 / 3, rel=1e-14)
    assert coherence_critical_lr(3.0, 2, 7, 7, replacement=False) == pytest.approx(2 / 3, rel=1e-14)


@pytest.mark.parametrize("sigma,B,ref", [(2, 32, -0.080), (5, 16, -0.186), (10, 8, -0.102)])
def test_lyapunov_exponents(sigma, B, ref):
    assert diagonal_lyapunov(100, sigma, B, 0.5) == pytest.approx(ref, abs=5e-4)
    assert diagonal_rho(100, sigma, B, 0.5) > 1  # mean-square unstable, yet typical runs converge


# --- simulation ----------------------------------------------------------------------------------------------------
def test_monte_carlo_second_moment_within_3se():
    Hs = rand_psd(5, 3, 1, seed=10); eta, B, R = 0.25, 2, 20000
    h, Hr = range_basis(Hs); T = stability_operator(Hr, eta, B); M = torch.eye(len(h), dtype=D) / len(h)
    exact = [M.trace().item()]
    for _ in range(8): M = T(M); exact.append(M.trace().item())
    x = simulate_linear_sgd(Hs, eta, B, 8, R, seed=3)[:, :, 0].exp()
    z = (x.mean(1) - torch.tensor(exact, dtype=D)) / (x.std(1) / math.sqrt(R))
    assert z.abs().max() < 3, z


def test_simulation_without_replacement_full_batch_is_deterministic_gd():
    Hs = rand_psd(4, 3, 1, seed=11); lam = torch.linalg.eigvalsh(Hs.mean(0)); eta = 0.9 * 2 / lam.max().item()
    logn = simulate_linear_sgd(Hs, eta, 4, 30, 8, replacement=False)[:, :, 0]
    assert (logn[-1] - logn[0]).max() < 0  # below 2/λ_max, GD contracts every run


def test_several_etas_share_batches():
    Hs = rand_psd(5, 3, 1, seed=12)
    both = simulate_linear_sgd(Hs, torch.tensor([0.1, 0.2], dtype=D), 2, 10, 16, seed=4)
    one = simulate_linear_sgd(Hs, 0.2, 2, 10, 16, seed=4)
    torch.testing.assert_close(both[:, :, 1], one[:, :, 0], rtol=1e-12, atol=1e-12)


def test_observed_boundary_negative_control_identical():
    a = torch.randn(4, dtype=D); Hs = (a[:, None] * a)[None].expand(6, 4, 4).clone()
    eg = gd_critical_lr(Hs.mean(0))
    for notion in ("ms", "as"):
        assert observed_critical_lr(Hs, 2, notion, steps=30, repeats=16) == pytest.approx(eg, rel=0.03)


def test_agreement_hand_example():
    rows = [dict(B=1, a=0.5, observed_ms=0.5), dict(B=2, a=2.0, observed_ms=1.0)]
    # grid η/η_GD = 0.1..1.3 → 2g ∈ 0.2..2.6: B=1 agrees everywhere; B=2 disagrees for 2g in (1, 2]: g = 0.6..1.0
    assert agreement(rows, "a") == pytest.approx(100 * (26 - 5) / 26)


# --- networks -----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def interpolating():
    torch.manual_seed(0)
    X, Y = torch.randn(7, 3, dtype=D), torch.randn(7, dtype=D)
    net = mlp(3, 6, 1, depth=1).double()
    assert fit_minimum(net, mse, X, Y) <= 1e-8
    return net, X, Y


def test_mean_of_per_example_hessians_is_hvp(interpolating):
    net, X, Y = interpolating
    Hs = per_example_hessians(net, mse, X, Y)
    v = [torch.randn_like(p) for p in net.parameters()]
    Hv = torch.cat([t.reshape(-1) for t in hvp_fn(net, mse, X, Y)(v)])
    torch.testing.assert_close(Hs.mean(0) @ torch.cat([t.reshape(-1) for t in v]), Hv, rtol=1e-10, atol=1e-12)


def test_exact_hessian_is_gauss_newton_at_interpolation(interpolating):
    from torch.func import functional_call
    net, X, Y = interpolating
    Hs = per_example_hessians(net, mse, X, Y); w, unflat = _flat(net)
    J = torch.func.jacrev(lambda w: functional_call(net, unflat(w), (X,)).reshape(-1))(w)
    torch.testing.assert_close(Hs, J[:, :, None] * J[:, None, :], rtol=0, atol=1e-6)


def test_cross_entropy_weight_decay_hessians():
    torch.manual_seed(1)
    X, y = torch.randn(12, 4, dtype=D), torch.randint(0, 3, (12,))
    net = mlp(4, 0, 3, depth=0).double(); wd = 0.05
    assert fit_minimum(net, F.cross_entropy, X, y, weight_decay=wd) <= 1e-8
    Hs = per_example_hessians(net, F.cross_entropy, X, y, weight_decay=wd)
    assert torch.linalg.eigvalsh(Hs)[:, 0].min() >= wd - 1e-10
    w, unflat = _flat(net)
    from torch.func import functional_call
    L = lambda w: F.cross_entropy(functional_call(net, unflat(w), (X,)), y) + 0.5 * wd * (w**2).sum()
    torch.testing.assert_close(Hs.mean(0), torch.func.hessian(L)(w), rtol=1e-10, atol=1e-12)


def test_escape_rate_inside_and_far_outside(interpolating):
    net, X, Y = interpolating
    lam = torch.linalg.eigvalsh(per_example_hessians(net, mse, X, Y).mean(0))[-1].item()
    assert escape_rate(net, mse, X, Y, 0.05 / lam, 2, steps=50, repeats=8) == 0
    assert escape_rate(net, mse, X, Y, 4.0 / lam, 7, steps=50, repeats=8, replacement=False) == 1


# --- bad input ----------------------------------------------------------------------------------------------------
def test_bad_hessians():
    with pytest.raises(ValueError, match=r"shape \(n, d, d\)"): coherence(torch.zeros(2, 3, 4, dtype=D))
    with pytest.raises(ValueError, match="H_1 is not symmetric"):
        coherence(torch.stack([torch.eye(2, dtype=D), torch.tensor([[1.0, 1.0], [0.0, 1.0]], dtype=D)]))
    neg = torch.stack([torch.eye(2, dtype=D), torch.eye(2, dtype=D), torch.diag(torch.tensor([1.0, -0.1], dtype=D))])
    with pytest.raises(ValueError, match="H_2 has eigenvalue .* check_psd=False"): ms_spectral_radius(neg, 0.1, 1)
    assert ms_spectral_radius(neg, 0.1, 1, check_psd=False) > 0  # allowed when asked
    with pytest.raises(ValueError, match="all zero"): critical_lr(torch.zeros(3, 2, 2, dtype=D), 1)
    with pytest.raises(TypeError, match="torch.Tensor"): coherence([[1.0]])


@pytest.mark.parametrize("B", [0, 5, 2.0, True])
def test_bad_batch_size(B):
    with pytest.raises(ValueError, match=r"batch_size must be an int in \[1, n=4\]"): critical_lr(rand_psd(4, 2), B)


@pytest.mark.parametrize("eta", [0.0, -1.0, float("nan"), float("inf")])
def test_bad_eta(eta):
    with pytest.raises(ValueError, match="eta must be a finite number > 0"): ms_spectral_radius(rand_psd(3, 2), eta, 1)


def test_kron_too_large_and_bad_method():
    Hs = rand_psd(2, 61, 61)
    with pytest.raises(ValueError, match="method='kron' needs d <= 60"): ms_spectral_radius(Hs, 0.001, 1)
    with pytest.raises(ValueError, match="method must be one of"): critical_lr(rand_psd(3, 2), 1, method="power")


def test_not_at_minimum_named_before_any_hessian():
    torch.manual_seed(2)
    net = mlp(3, 4, 1, depth=1).double(); X, Y = torch.randn(5, 3, dtype=D), torch.randn(5, dtype=D)
    with pytest.raises(ValueError, match=r"not at a minimum: gradient norm \d"): per_example_hessians(net, mse, X, Y)
    with pytest.raises(TypeError, match="float64"): per_example_hessians(mlp(3, 4, 1, 1), mse, X.float(), Y.float())


def test_bad_names():
    with pytest.raises(ValueError, match="testbed must be one of"): make_hessians("cifar", 4, 4)
    with pytest.raises(ValueError, match="notion must be one of"): observed_critical_lr(rand_psd(3, 2), 1, "median")
    with pytest.raises(ValueError, match="sigma must be in"): coherence_critical_lr(1.0, 0.5, 4, 1)


def test_sigma_predictor_overshoots_on_a_sign_cycle():
    """Unit rows at 0°, 60°, 120°, B = 1: η* = 2 exactly (T(I) = I − (2η − η²)H), σ = 2, η_σ = 8/3, and ρ(T(η_σ)) > 1
    by brute force over the three batches: the σ-only predictor is not one-sided (claim C3r)."""
    ang = torch.tensor([0.0, 60.0, 120.0], dtype=D).deg2rad()
    a = torch.stack([ang.cos(), ang.sin()], 1); Hs = a[:, :, None] * a[:, None, :]
    assert critical_lr(Hs, 1) == pytest.approx(2.0, abs=1e-10)
    assert coherence(Hs) == pytest.approx(2.0, abs=1e-12)
    e_sig = coherence_critical_lr(torch.linalg.eigvalsh(Hs.mean(0))[-1].item(), coherence(Hs), 3, 1)
    assert e_sig == pytest.approx(8 / 3, abs=1e-10)
    Ms = [torch.eye(2, dtype=D) - e_sig * H for H in Hs]
    brute = torch.linalg.eigvals(sum(torch.kron(M, M) for M in Ms) / 3).abs().max().item()
    assert brute == pytest.approx(ms_spectral_radius(Hs, e_sig, 1), abs=1e-10) and brute > 1
