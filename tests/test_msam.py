"""Tests for lipapers.msam: SAM / mSAM optimizers (loop and vmap), distributed mSAM (2 gloo ranks on CPU), the flatness
measures, and the experiment functions (arms, training with matched-loss checkpoints, result rows, tables).

Tolerances: the optimizer tests run in float64; "exact" means torch.equal (the same floating-point operations in the
same order), otherwise rtol=atol=1e-12 (float64 reassociation only). Power iteration is compared at rtol 1e-6 after
convergence to tol 1e-12; Hutchinson's estimate must lie within 3 of its own standard errors of the exact trace.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call, grad

from lipapers.core import Timing
from lipapers.msam import (
    LOSS_LEVELS,
    SAM,
    DistributedMicroBatchSAM,
    MicroBatchSAM,
    VmapMicroBatchSAM,
    arm_m,
    arm_optimizer,
    arm_rhos,
    arm_table,
    at_level,
    batch_order,
    best_rho,
    by_m,
    closure_for,
    cost_rows,
    curve_rows,
    evaluate,
    final_rows,
    fit,
    flatness,
    flatness_rows,
    hessian_max_eig,
    hessian_trace,
    m_sharpness,
    make_task,
    matched_level,
    mlp,
    parse_arms,
    spawn_msam,
    step_costs,
    train_arm,
    train_msam_single,
    vs_m_figure,
)

F64 = dict(rtol=1e-12, atol=1e-12)


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny float64 problems: one thread avoids oversubscribing the shared 2-core machine (and matches the ranks)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _problem(n=48, d=5, width=7, k=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g, dtype=torch.float64)
    Y = torch.randint(0, k, (n,), generator=g)
    torch.manual_seed(seed)
    model = mlp(d, width, k).double()
    return model, X, Y


def _clone(model):
    m = mlp(model[1].in_features, model[1].out_features, model[-1].out_features).double()
    m.load_state_dict(model.state_dict())
    return m


def _train(model, opt, X, Y, steps=4, bs=16):
    return fit(model, opt, X, Y, batch_order(len(X), bs, 2, seed=1)[:steps])


def _params(model):
    return [p.detach().clone() for p in model.parameters()]


# --- independent functional reference of the update ---------------------------------------------


def _reference_msam_sgd(model, X, Y, rho, m, lr):
    """mSAM (m=1: SAM) + plain SGD written directly from the papers' update with torch.func."""
    w = {k: v.detach().clone() for k, v in model.named_parameters()}

    def L(p, x, y):
        return F.cross_entropy(functional_call(model, p, (x,)), y)

    gbar = {k: torch.zeros_like(v) for k, v in w.items()}
    for x, y in zip(X.chunk(m), Y.chunk(m)):
        g = grad(L)(w, x, y)
        norm = torch.sqrt(sum((t**2).sum() for t in g.values()))
        eps = {k: rho * g[k] / norm for k in w}
        gt = grad(L)({k: w[k] + eps[k] for k in w}, x, y)
        gbar = {k: gbar[k] + gt[k] / m for k in w}
    return [w[k] - lr * gbar[k] for k, _ in model.named_parameters()]


@pytest.mark.parametrize("m", [1, 4])
def test_step_matches_functional_reference(m):
    model, X, Y = _problem()
    x, y = X[:16], Y[:16]
    ref = _reference_msam_sgd(model, x, y, rho=0.2, m=m, lr=0.3)
    opt = (SAM(model.parameters(), torch.optim.SGD, rho=0.2, lr=0.3) if m == 1
           else MicroBatchSAM(model.parameters(), torch.optim.SGD, rho=0.2, micro_batches=m, lr=0.3))
    opt.step(closure_for(model), x, y)
    for p, r in zip(model.parameters(), ref):
        torch.testing.assert_close(p.detach(), r, **F64)


def test_returned_loss_is_loss_at_w():
    model, X, Y = _problem()
    before = F.cross_entropy(model(X[:16]), Y[:16]).detach()
    opt = MicroBatchSAM(model.parameters(), torch.optim.SGD, rho=0.1, micro_batches=4, lr=0.1)
    loss = opt.step(closure_for(model), X[:16], Y[:16])
    torch.testing.assert_close(loss, before, **F64)  # mean of equal-size micro-batch means = batch mean


@pytest.mark.parametrize("base,kw", [(torch.optim.SGD, dict(lr=0.1, momentum=0.9)), (torch.optim.Adam, dict(lr=1e-2))])
def test_m1_equals_sam_exactly(base, kw):
    model, X, Y = _problem()
    other = _clone(model)
    _train(model, SAM(model.parameters(), base, rho=0.1, **kw), X, Y)
    _train(other, MicroBatchSAM(other.parameters(), base, rho=0.1, micro_batches=1, **kw), X, Y)
    for p, q in zip(model.parameters(), other.parameters()):
        assert torch.equal(p, q)
    # and the run did move the weights differently from m=2 (the comparison can fail)
    third = _clone(_problem()[0])
    _train(third, MicroBatchSAM(third.parameters(), base, rho=0.1, micro_batches=2, **kw), X, Y)
    assert not torch.allclose(next(model.parameters()), next(third.parameters()))


@pytest.mark.parametrize("base,kw", [(torch.optim.SGD, dict(lr=0.1, momentum=0.9)), (torch.optim.Adam, dict(lr=1e-2))])
def test_rho0_equals_base_optimizer(base, kw):
    model, X, Y = _problem()
    sam, msam = _clone(model), _clone(model)
    _train(model, base(model.parameters(), **kw), X, Y)
    _train(sam, SAM(sam.parameters(), base, rho=0.0, **kw), X, Y)
    _train(msam, MicroBatchSAM(msam.parameters(), base, rho=0.0, micro_batches=4, **kw), X, Y)
    for p, q, r in zip(model.parameters(), sam.parameters(), msam.parameters()):
        assert torch.equal(p, q)  # same gradient, same base step
        torch.testing.assert_close(r, p, **F64)  # mean of 4 micro-batch gradients: reassociation only


@pytest.mark.parametrize("rho", [0.05, 0.7])
def test_ascent_step_has_norm_rho(rho):
    model, X, Y = _problem()
    opt = SAM(model.parameters(), torch.optim.SGD, rho=rho, lr=0.1)
    w0 = _params(model)
    F.cross_entropy(model(X), Y).backward()
    reported = opt.first_step()
    eps = torch.cat([(p.detach() - q).reshape(-1) for p, q in zip(model.parameters(), w0)])
    assert math.isclose(eps.norm().item(), rho, rel_tol=1e-9)
    assert math.isclose(reported, rho, rel_tol=1e-9)
    # the direction is the gradient's
    g = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    assert math.isclose(torch.dot(eps, g).item(), rho * g.norm().item(), rel_tol=1e-9)
    opt.restore()
    for p, q in zip(model.parameters(), w0):
        assert torch.equal(p, q)


def test_adaptive_ascent_has_norm_rho_in_scaled_coordinates():
    model, X, Y = _problem()
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.3, adaptive=True, lr=0.1)
    w0 = _params(model)
    F.cross_entropy(model(X), Y).backward()
    opt.first_step()
    scaled = torch.cat([((p.detach() - q) / q.abs()).reshape(-1) for p, q in zip(model.parameters(), w0)])
    assert math.isclose(scaled.norm().item(), 0.3, rel_tol=1e-9)  # ‖T_w^{-1} ε‖ = ρ


def test_msam_each_micro_batch_ascent_has_norm_rho():
    model, X, Y = _problem()
    opt = MicroBatchSAM(model.parameters(), torch.optim.SGD, rho=0.25, micro_batches=3, lr=0.1)
    norms = []
    orig = opt.first_step
    opt.first_step = lambda: norms.append(orig()) or norms[-1]
    opt.step(closure_for(model), X[:24], Y[:24])
    assert len(norms) == 3 and all(math.isclose(n, 0.25, rel_tol=1e-9) for n in norms)


# --- errors ----------------------------------------------------------------------------------------


def test_bad_inputs_raise_clear_errors():
    model, X, Y = _problem()
    opt = MicroBatchSAM(model.parameters(), torch.optim.SGD, rho=0.1, micro_batches=4, lr=0.1)
    with pytest.raises(ValueError, match="does not split into micro_batches=4"):
        opt.step(closure_for(model), X[:18], Y[:18])
    with pytest.raises(ValueError, match="rho must be a finite number >= 0"):
        SAM(model.parameters(), torch.optim.SGD, rho=-0.1, lr=0.1)
    with pytest.raises(ValueError, match="rho must be a finite number >= 0"):
        MicroBatchSAM(model.parameters(), torch.optim.SGD, rho=-1.0, micro_batches=2, lr=0.1)
    with pytest.raises(ValueError, match="micro_batches must be an int >= 1"):
        MicroBatchSAM(model.parameters(), torch.optim.SGD, rho=0.1, micro_batches=0, lr=0.1)
    with pytest.raises(TypeError, match="torch.optim.Optimizer class"):
        SAM(model.parameters(), torch.optim.SGD(model.parameters(), lr=0.1), rho=0.1)
    with pytest.raises(TypeError, match="needs a closure"):
        SAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.1).step(None)
    with pytest.raises(RuntimeError, match="initialised process group"):
        DistributedMicroBatchSAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.1)
    with pytest.raises(ValueError, match="divisible by 4"):
        m_sharpness(model, F.cross_entropy, X[:10], Y[:10], rho=0.1, m=4)


# --- distributed: 2 gloo ranks on CPU == single-process m=2 --------------------------------------


def test_distributed_two_ranks_equal_single_process_m2():
    g = torch.Generator().manual_seed(3)
    X = torch.randn(64, 6, generator=g, dtype=torch.float64)
    Y = torch.randint(0, 3, (64,), generator=g)
    spec = dict(X=X, Y=Y, order=batch_order(64, 16, 2, seed=0), sizes=(6, 8, 3), seed=0, rho=0.1, lr=0.1,
                momentum=0.9, dtype=torch.float64)
    single2, single1 = train_msam_single(spec, 2), train_msam_single(spec, 1)  # one thread, like the ranks
    dist2 = spawn_msam(spec, world_size=2, timeout=600)  # generous: two fresh interpreters on a loaded machine
    assert len(dist2["losses"]) == len(single2["losses"]) == 8
    torch.testing.assert_close(torch.tensor(dist2["losses"]), torch.tensor(single2["losses"]), **F64)
    for p, q in zip(dist2["params"], single2["params"]):
        torch.testing.assert_close(p, q, **F64)
    # it is really mSAM with m=2, not full-batch SAM
    assert not torch.allclose(dist2["params"][0], single1["params"][0], rtol=1e-6, atol=1e-8)


# --- flatness measures -----------------------------------------------------------------------------


def _full_hessian(model, X, Y):
    names = [k for k, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    sizes = [p.numel() for p in model.parameters()]
    w = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def f(flat):
        ps = dict(zip(names, [t.reshape(s) for t, s in zip(flat.split(sizes), shapes)]))
        return F.cross_entropy(functional_call(model, ps, (X,)), Y)

    return torch.autograd.functional.hessian(f, w)


def test_power_iteration_matches_eigvalsh():
    model, X, Y = _problem(n=40, d=3, width=4, k=3, seed=2)
    H = _full_hessian(model, X, Y)
    ev = torch.linalg.eigvalsh(H)
    dominant = ev[ev.abs().argmax()].item()
    lam = hessian_max_eig(model, F.cross_entropy, X, Y, iters=3000, tol=1e-13, seed=0)
    assert math.isclose(lam, dominant, rel_tol=1e-6), (lam, dominant, ev[-3:])


def test_hutchinson_within_its_standard_error():
    model, X, Y = _problem(n=40, d=3, width=4, k=3, seed=2)
    exact = torch.trace(_full_hessian(model, X, Y)).item()
    est, se = hessian_trace(model, F.cross_entropy, X, Y, n_probes=100, seed=0)
    assert se > 0
    assert abs(est - exact) <= 3 * se, (est, se, exact)
    # the standard error shrinks like 1/sqrt(n): 4x the probes, about half the error bar
    _, se4 = hessian_trace(model, F.cross_entropy, X, Y, n_probes=400, seed=1)
    assert 0.35 < se4 / se < 0.65


def test_m_sharpness_matches_brute_force_in_1d():
    # y = w x with squared loss: L_S(w + e) is a convex parabola in e, so the max over |e| <= rho is at an end point,
    # and one normalized gradient step reaches the right one.
    g = torch.Generator().manual_seed(0)
    x = torch.randn(12, 1, generator=g, dtype=torch.float64)
    y = 0.7 * x[:, 0] + 0.3 * torch.randn(12, generator=g, dtype=torch.float64)
    model = torch.nn.Linear(1, 1, bias=False).double()
    with torch.no_grad():
        model.weight.fill_(0.2)

    def loss(out, t):
        return ((out[:, 0] - t) ** 2).mean()

    rho, m = 0.3, 4
    grid = torch.linspace(-rho, rho, 2001, dtype=torch.float64)
    brute = []
    for xs, ys in zip(x.split(m), y.split(m)):
        base = loss(xs * 0.2, ys)
        brute.append(max(loss(xs * (0.2 + e), ys) for e in grid) - base)
    expected = torch.stack(brute).mean().item()
    assert math.isclose(m_sharpness(model, loss, x, y, rho=rho, m=m), expected, rel_tol=1e-9)
    assert math.isclose(m_sharpness(model, loss, x, y, rho=rho, m=m, steps=3), expected, rel_tol=1e-9)
    # sets of 1 sample are sharper than one set of all 12 (the mSAM papers' premise, exact here)
    assert m_sharpness(model, loss, x, y, rho=rho, m=1) >= m_sharpness(model, loss, x, y, rho=rho, m=12)


def test_state_dict_round_trip_resumes_exactly():
    model, X, Y = _problem()
    other = _clone(model)
    kw = dict(rho=0.1, micro_batches=2, lr=0.1, momentum=0.9)
    order = batch_order(len(X), 16, 2, seed=1)
    opt = MicroBatchSAM(model.parameters(), torch.optim.SGD, **kw)
    fit(model, opt, X, Y, order)  # uninterrupted: 6 steps
    opt2 = MicroBatchSAM(other.parameters(), torch.optim.SGD, **kw)
    fit(other, opt2, X, Y, order[:3])
    sd = opt2.state_dict()
    assert sd["param_groups"][0]["rho"] == 0.1
    opt3 = MicroBatchSAM(other.parameters(), torch.optim.SGD, rho=0.5, micro_batches=2, lr=0.1, momentum=0.9)
    opt3.load_state_dict(sd)  # restores rho=0.1 and the momentum buffers
    assert opt3.param_groups[0]["rho"] == 0.1 and opt3.param_groups is opt3.base_optimizer.param_groups
    fit(other, opt3, X, Y, order[3:])
    for p, q in zip(model.parameters(), other.parameters()):
        assert torch.equal(p, q)


# --- vectorized mSAM ---------------------------------------------------------------------------------


@pytest.mark.parametrize("m", [1, 4])
def test_vmap_msam_matches_loop_and_reference(m):
    model, X, Y = _problem()
    other = _clone(model)
    kw = dict(rho=0.2, lr=0.3, momentum=0.9)
    _train(model, MicroBatchSAM(model.parameters(), torch.optim.SGD, micro_batches=m, **kw), X, Y)
    vm = VmapMicroBatchSAM(other, torch.optim.SGD, micro_batches=m, **kw)
    _train(other, vm, X, Y)
    for p, q in zip(model.parameters(), other.parameters()):
        torch.testing.assert_close(q, p, **F64)
    # one step against the independent functional reference, and the loss returned is the loss at w
    model, X, Y = _problem(seed=5)
    ref = _reference_msam_sgd(model, X[:16], Y[:16], rho=0.2, m=m, lr=0.3)
    before = F.cross_entropy(model(X[:16]), Y[:16]).detach()
    loss = VmapMicroBatchSAM(model, torch.optim.SGD, rho=0.2, micro_batches=m, lr=0.3).step(None, X[:16], Y[:16])
    torch.testing.assert_close(loss, before, **F64)
    for p, r in zip(model.parameters(), ref):
        torch.testing.assert_close(p.detach(), r, **F64)


# --- experiment functions ----------------------------------------------------------------------------


def test_arms_parse_check_and_build():
    assert [arm_m(a) for a in ("sgd", "sam", "msam4", "msam16")] == [0, 1, 4, 16]
    assert parse_arms("sgd, msam16 ,sam", 32) == ["sgd", "msam16", "sam"]
    with pytest.raises(ValueError, match="arm must be one of"):
        parse_arms("sgd,msam3", 128)
    with pytest.raises(ValueError, match="must not repeat"):
        parse_arms("sam,sam", 128)
    with pytest.raises(ValueError, match="divisible by the m=16 of arm 'msam16'"):
        parse_arms("msam16", 24)
    with pytest.raises(ValueError, match="at least one"):
        parse_arms(" , ", 128)
    assert arm_rhos(["sgd", "sam", "msam16"], 0.05, dict(msam16=0.2)) == dict(sgd=0.0, sam=0.05, msam16=0.2)
    with pytest.raises(ValueError, match="rho must be"):
        arm_rhos(["sam"], -1.0, {})
    model = _problem()[0]
    assert type(arm_optimizer("sgd", model, 0.1, 0.0)) is torch.optim.SGD
    assert type(arm_optimizer("sam", model, 0.1, 0.1)) is SAM
    assert arm_optimizer("msam4", model, 0.1, 0.1).micro_batches == 4
    assert type(arm_optimizer("msam4", model, 0.1, 0.1, vectorized=True)) is VmapMicroBatchSAM


def test_make_task_validation_split_and_noise():
    a = make_task("fashion_mnist", 3000, 50, label_noise=0.4, seed=1, n_val=300)
    b = make_task("fashion_mnist", 3000, 50, label_noise=0.4, seed=1)
    assert torch.equal(a["X"], b["X"]) and torch.equal(a["Y"], b["Y"])  # the validation split does not move training
    assert a["Xv"].shape == (300, 784) and b["Xv"].shape == (0, 784)
    flipped = (a["Y"] != a["Y_clean"]).float().mean().item()
    assert abs(flipped - 0.36) < 0.03  # 40 % re-drawn, 1 in 10 re-drawn to the true class
    train_rows = {r.numpy().tobytes() for r in a["X"]}
    assert sum(r.numpy().tobytes() in train_rows for r in a["Xv"]) <= 1  # disjoint images (Fashion-MNIST has rare duplicates)
    with pytest.raises(ValueError, match="dataset must be one of"):
        make_task("cifar10")


def _tiny_task(n=96, d=6, k=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    X, Y = torch.randn(n, d, generator=g), torch.randint(0, k, (n,), generator=g)
    return dict(X=X, Y=Y, Y_clean=Y, Xv=X[:20], Yv=Y[:20], Xt=X[20:40], Yt=Y[20:40], n_classes=k)


def test_train_arm_curve_and_first_crossing_checkpoints():
    task = _tiny_task()
    run = train_arm(task, "msam4", rho=0.05, lr=0.2, epochs=10, batch_size=16, width=32, seed=0)
    curve = run["curve"]
    assert [r["epoch"] for r in curve] == list(range(1, 11)) and len(run["step_seconds"]) == 10 * 6
    assert curve[-1]["train_loss"] < curve[0]["train_loss"]  # it trains
    losses = [r["train_loss"] for r in curve]
    assert set(run["ckpts"]) == {lv for lv in LOSS_LEVELS if min(losses) <= lv}
    for lv, (epoch, _) in run["ckpts"].items():
        assert losses[epoch - 1] <= lv and all(x > lv for x in losses[: epoch - 1])  # the first crossing
        acc, loss = evaluate(at_level(run, lv), task["X"], task["Y"])
        assert math.isclose(loss, losses[epoch - 1], rel_tol=1e-6)  # the weights of that epoch, not later ones
    final_acc, final_loss = evaluate(run["model"], task["X"], task["Y"])
    assert math.isclose(final_acc, curve[-1]["train_acc"]) and math.isclose(final_loss, losses[-1])
    sparse = train_arm(task, "sgd", rho=0.0, lr=0.2, epochs=6, batch_size=16, width=8, seed=0, eval_every=4)
    assert ["test_acc" in r for r in sparse["curve"]] == [False, False, False, True, False, True]
    assert len(curve_rows(sparse)) == 6 * 2 + 2 * 2
    # same seed, same arm: the same run
    again = train_arm(task, "msam4", rho=0.05, lr=0.2, epochs=10, batch_size=16, width=32, seed=0)
    assert [r["train_loss"] for r in again["curve"]] == losses


def test_rows_from_runs():
    task = _tiny_task()
    runs = {a: train_arm(task, a, rho=0.05, lr=0.2, epochs=6, batch_size=16, width=16, seed=1) for a in ("sgd", "sam")}
    lv = matched_level(runs)
    assert lv == min(set(runs["sgd"]["ckpts"]) & set(runs["sam"]["ckpts"]))
    assert matched_level({"a": dict(ckpts={1.0: 0}), "b": dict(ckpts={0.8: 0})}) is None
    fr = final_rows(runs, label_noise=0.4)
    gain = [r for r in fr if r["metric"] == "sam_gain"]
    test = {r["method"]: r["value"] for r in fr if r["metric"] == "test_acc"}
    assert gain[0]["method"] == "noisy" and math.isclose(gain[0]["value"], test["sam"] - test["sgd"])
    assert final_rows(runs, 0.0)[-1]["method"] == "clean"
    assert len(curve_rows(runs["sgd"])) == 6 * 4
    rows = flatness_rows(runs, task["X"][:32], task["Y"][:32], iters=5, probes=4, seed=0)
    assert {r["metric"] for r in rows} == {f"{k}_{t}" for k in ("lambda_max", "hessian_trace", "hessian_trace_se")
                                            for t in ("matched", "final")}
    direct = flatness(at_level(runs["sam"], lv), task["X"][:32], task["Y"][:32], 5, 4, 0)["lambda_max"]
    got = [r["value"] for r in rows if r["method"] == "sam" and r["metric"] == "lambda_max_matched"]
    assert got == [direct] and all(r["train_loss_at"] == lv for r in rows if r["metric"].endswith("_matched"))


def test_cost_rows_and_step_costs():
    t = dict(sgd=Timing(0.01, 0.009, 0.011, 5, "cpu"), sam=Timing(0.02, 0.019, 0.021, 5, "cpu"),
             msam4=Timing(0.05, 0.04, 0.06, 5, "cpu"))
    rows = {(r["method"], r["metric"]): r["value"] for r in cost_rows(t)}
    assert math.isclose(rows[("msam4", "step_time_vs_sgd")], 5.0) and math.isclose(rows[("msam4", "step_time_vs_sam")], 2.5)
    assert rows[("sgd", "sec_per_step")] == 0.01
    timings = step_costs(_tiny_task(), ["sgd", "sam", "msam4"], dict(sgd=0.0, sam=0.05, msam4=0.05), batch_size=16,
                         width=8, repeats=2)
    assert set(timings) == {"sgd", "sam", "msam4", "msam4_vmap"} and all(x.median > 0 for x in timings.values())


def test_best_rho_and_arm_table():
    import polars as pl

    f = pl.DataFrame(dict(method=["sgd", "sam", "sam", "sam", "msam16", "msam16"], metric=["val_acc"] * 6,
                          rho=[0.0, 0.05, 0.1, 0.1, 0.02, 0.2], value=[60.0, 70.0, 72.0, 69.0, 66.0, 66.0]))
    assert best_rho(f) == dict(sam=0.1, msam16=0.02)  # sam: mean(72, 69) = 70.5 > 70; msam16: a tie, the smaller rho
    with pytest.raises(ValueError, match="val_acc rows"):
        best_rho(f.filter(pl.col("method") == "sgd"))
    t = arm_table(f, ["val_acc"])
    assert t["method"].to_list() == ["sgd", "sam", "msam16"] and t["n"].to_list() == [1, 3, 2]
    assert t.filter(pl.col("method") == "sam")["val_acc"].item() == "70.33 ± 1.53"


def test_by_m_orders_arms_by_m_and_drops_non_arms():
    import polars as pl

    arms = ["msam16", "sgd", "msam4_vmap", "sam", "msam4", "sgd", "msam4"]
    f = pl.DataFrame(dict(seed=[1, 1, 1, 1, 0, 0, 1], method=arms,
                          metric=["lambda_max_matched"] * 6 + ["test_acc"],
                          value=[3.0, 15.0, 9.0, 4.0, 2.5, 14.0, 80.0]))
    d = by_m(f, "lambda_max_matched")
    assert d.rows() == [(0, "sgd", 0, 14.0), (0, "msam4", 4, 2.5), (1, "sgd", 0, 15.0), (1, "sam", 1, 4.0),
                        (1, "msam16", 16, 3.0)]  # the vmap timing arm and the other metric are left out
    fig = vs_m_figure(f, "lambda_max_matched", log=True)
    assert [t.name for t in fig.data] == ["seed 0", "seed 1"] and list(fig.data[1].x) == ["sgd", "sam", "msam16"]
    assert fig.layout.yaxis.type == "log"
