"""LiMAML (lipapers.meta_embed): meta-gradients against a closed form, vmap against a loop, serving against the
adapted model, task construction, and bad input."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score

from lipapers import meta_embed as me
from lipapers.world import World, WorldConfig

ALPHA = 0.3


def linear_model(d_meta=4, d_item=3, k=2, seed=0):
    """Linear meta block and linear logistic head (hidden=()), float64."""
    torch.manual_seed(seed)
    m = me.LiMAML(me.MetaBlock(d_meta, (), k), me.GlobalBlock(k, d_item, ())).double()
    for p in m.parameters():
        torch.nn.init.normal_(p, std=0.5)
    return m


def design(m, meta, x):
    """Z (n, |θm|): the logit is Z θm + const; θm = (A row-major, b) of the meta block's output layer."""
    g = m.glob
    v = g.head.weight[0, : g.k] + g.cross(x)  # (n, k): coefficient of ME in the logit
    return torch.cat([(v[:, :, None] * meta[None, None, :]).flatten(1), v], 1)


def flat(m):
    return torch.cat([m.meta.out.weight.flatten(), m.meta.out.bias])


def support_loss_flat(m, theta, meta, x, y, w):
    """Support loss as a function of the flat θm (for torch.autograd.functional.hessian)."""
    k, d = m.meta.out.weight.shape
    pm = {"out.weight": theta[: k * d].reshape(k, d), "out.bias": theta[k * d :]}
    return me._task_loss(m, pm, me._params(m)[1], meta, x, y, w)


def test_second_order_meta_gradient_matches_hand_unrolled_closed_form():
    m, t = linear_model(), me.toy_tasks(T=3, S=6, Q=5, d_meta=4, d_item=3, seed=1, dtype=torch.float64)
    auto = torch.autograd.grad(me.maml_loss(m, t, 2, ALPHA, first_order=False), [m.meta.out.weight, m.meta.out.bias])
    auto = torch.cat([auto[0].flatten(), auto[1]])
    with torch.no_grad():
        c = m(t.meta, t.qx) - torch.einsum("tnp,p->tn", torch.stack([design(m, t.meta[i], t.qx[i]) for i in range(3)]),
                                            flat(m))  # the logit's θm-free part, query
        cs = m(t.meta, t.sx) - torch.stack([design(m, t.meta[i], t.sx[i]) for i in range(3)]) @ flat(m)
    total = torch.zeros_like(flat(m))
    for i in range(len(t)):
        Zs, Zq = design(m, t.meta[i], t.sx[i]).detach(), design(m, t.meta[i], t.qx[i]).detach()
        ws, wq = t.sm[i] / t.sm[i].sum().clamp_min(1), t.qm[i] / t.qm[i].sum().clamp_min(1)
        th = [flat(m).detach()]
        H = []
        for _ in range(2):
            p = torch.sigmoid(Zs @ th[-1] + cs[i])
            H.append(Zs.T @ torch.diag(ws * p * (1 - p)) @ Zs)
            th.append(th[-1] - ALPHA * Zs.T @ (ws * (p - t.sy[i])))
            # the closed-form Hessian equals autograd's Hessian of the support loss
            Ha = torch.autograd.functional.hessian(lambda z: support_loss_flat(m, z, t.meta[i], t.sx[i], t.sy[i],
                                                                               t.sm[i]), th[-2])
            torch.testing.assert_close(H[-1], Ha, atol=1e-10, rtol=0)
        gq = Zq.T @ (wq * (torch.sigmoid(Zq @ th[2] + c[i]) - t.qy[i]))
        I = torch.eye(len(gq), dtype=gq.dtype)
        total += (I - ALPHA * H[0]) @ (I - ALPHA * H[1]) @ gq
    torch.testing.assert_close(auto, total / len(t), atol=1e-10, rtol=0)


def grads(f, m, t, *a):
    return torch.cat([g.flatten() for g in torch.autograd.grad(f(m, t, *a), list(m.parameters()))])


@pytest.mark.parametrize("first_order", [True, False])
@pytest.mark.parametrize("full", [False, True])
def test_vmap_equals_loop(first_order, full):
    m = me.limaml(6, 5, k=3, hidden=(7,)).double()
    t = me.toy_tasks(T=5, S=4, Q=3, seed=2, dtype=torch.float64)
    a = (2, ALPHA, first_order, full)
    torch.testing.assert_close(me.maml_loss(m, t, *a), me.maml_loss_loop(m, t, *a), atol=1e-12, rtol=0)
    torch.testing.assert_close(grads(me.maml_loss, m, t, *a), grads(me.maml_loss_loop, m, t, *a), atol=1e-12, rtol=0)


def test_first_order_is_query_gradient_at_detached_adapted_params():
    m, t = me.limaml(6, 5, k=3, hidden=(7,)).double(), me.toy_tasks(seed=3, dtype=torch.float64)
    pa = {k: v.detach().requires_grad_() for k, v in me.inner_adapt(m, t.support(), 3, ALPHA).items()}
    pg = me._params(m)[1]
    ql = torch.stack([me._task_loss(m, {k: v[i] for k, v in pa.items()}, pg, t.meta[i], t.qx[i], t.qy[i], t.qm[i])
                      for i in range(len(t))]).mean()
    ref = [g.sum(0) for g in torch.autograd.grad(ql, list(pa.values()))]
    fo = torch.autograd.grad(me.maml_loss(m, t, 3, ALPHA, True), list(m.meta.parameters()))
    for a, b in zip(ref, fo):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)


def test_zero_steps_is_the_plain_training_gradient():
    m, t = me.limaml(6, 5, k=3, hidden=(7,)).double(), me.toy_tasks(seed=4, dtype=torch.float64)
    l = F.binary_cross_entropy_with_logits(m(t.meta, t.qx), t.qy, reduction="none")
    plain = lambda m_, t_: ((l * t.qm).sum(1) / t.qm.sum(1)).mean()
    torch.testing.assert_close(grads(me.maml_loss, m, t, 0, ALPHA), grads(plain, m, t), atol=1e-12, rtol=0)


def test_serving_matches_adapted_model_and_training_me():
    m, t = me.limaml(6, 5, k=4, hidden=(8,)), me.toy_tasks(T=6, seed=5)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    E = me.meta_embeddings(m, t, 2, ALPHA)
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in before.items())  # nothing mutated
    assert E.me.dtype == np.float32 and E.me.shape == (6, 4)
    d = (me.serve(m, E, t.member, t.qx) - me.adapted_logits(m, t, 2, ALPHA)).abs().max().item()
    assert d <= 1e-6
    pm, pg = me._params(m)
    for i in range(len(t)):  # the ME inside the training loss for the same support (no train/serve skew)
        a, _ = me._adapt_one(m, pm, pg, t.meta[i], t.sx[i], t.sy[i], t.sm[i], 2, ALPHA, False)
        inside = torch.func.functional_call(m.meta, a, (t.meta[i : i + 1],))[0]
        torch.testing.assert_close(inside, torch.as_tensor(E.me[i]), atol=1e-6, rtol=0)
    with torch.no_grad():  # task 0 has an empty support: the meta-init ME
        torch.testing.assert_close(m.meta(t.meta[:1])[0], torch.as_tensor(E.me[0]), atol=1e-6, rtol=0)


def test_inner_adapt_leaves_global_params_bit_identical():
    m, t = me.limaml(6, 5, k=4, hidden=(8,)), me.toy_tasks(seed=6)
    g0 = [p.clone() for p in m.glob.parameters()]
    pa = me.inner_adapt(m, t.support(), 3, ALPHA)
    assert set(pa) == set(dict(m.meta.named_parameters()))
    assert all(torch.equal(a, b) for a, b in zip(g0, m.glob.parameters()))


@pytest.fixture(scope="module")
def world_tasks():
    w = World(WorldConfig(seed=0, n_members=200, n_posts=300, n_jobs=50, activity_skew=1.0, heterogeneity=2.0))
    imps = w.feed_impressions(6000)
    return w, imps, me.member_tasks(w, me.day(21), imps=imps)


def test_member_tasks_support_precedes_query_and_buckets(world_tasks):
    w, imps, t = world_tasks
    me.check_tasks(t)
    st = torch.where(t.sm.bool(), t.st, -1).max(1).values
    qt = torch.where(t.qm.bool(), t.qt, 2**62).min(1).values
    assert bool((st < me.day(21)).all()) and bool((qt >= me.day(21)).all()) and bool((st < qt).all())
    assert (t.bucket == w.activity_bucket(np.arange(200))).all()
    n_support = imps.filter(imps["timestamp"] < me.day(21)).group_by("member_id").len()
    got = t.sm.sum(1).numpy()
    for mid, n in n_support.iter_rows():
        assert got[mid] == min(n, 20)


def test_bucket_auc_is_sklearn(world_tasks):
    _, _, t = world_tasks
    p = np.random.default_rng(0).random(t.qm.shape)
    mask = t.qm.bool().numpy()
    a = me.bucket_auc(t, p)
    assert a["all"] == pytest.approx(roc_auc_score(t.qy.numpy()[mask], p[mask]), abs=1e-12)


def test_bad_input():
    m, t = me.limaml(6, 5, k=4, hidden=(8,)), me.toy_tasks(seed=7)
    with pytest.raises(ValueError, match="steps must be an int ≥ 0"):
        me.maml_loss(m, t, -1)
    with pytest.raises(ValueError, match="alpha must be > 0"):
        me.inner_adapt(m, t.support(), 1, 0.0)
    with pytest.raises(ValueError, match="widths disagree"):
        me.LiMAML(me.MetaBlock(6, (8,), 4), me.GlobalBlock(5, 5))
    bad = me.toy_tasks(seed=7)
    bad.meta[3, 0] = float("nan")
    with pytest.raises(ValueError, match=r"NaN/inf in meta of members \[3\]"):
        me.fit_limaml(m, bad, 1)
    late = me.toy_tasks(seed=7)
    late.st = late.st + 100
    with pytest.raises(ValueError, match=r"support later than query for members \[1, 2, 3\]"):
        me.meta_embeddings(m, late)
    E = me.meta_embeddings(m, t)
    with pytest.raises(ValueError, match=r"unknown member ids \[9\]"):
        me.serve(m, E, [0, 9], t.qx[:2, 0])


def test_degenerate_buckets_get_no_auc_row_by_rule(world_tasks):
    "A bucket with one label class is not scored (rule in `scorable`); a constant scorer reads 0.5 and is kept."
    _, _, t = world_tasks
    assert me.scorable([0, 1]) and not me.scorable([1, 1, 1]) and not me.scorable([0]) and not me.scorable([])
    t2 = t[torch.arange(len(t))]
    mask = t2.qm.bool()
    no_click = ~((t2.qy * mask).sum(1) > 0)          # members without a query click form a one-class bucket
    assert no_click.any() and (~no_click).any()
    t2.bucket = np.where(no_click.numpy(), "sparse", "heavy")
    p = np.random.default_rng(1).random(t2.qm.shape)
    a = me.bucket_auc(t2, p)
    assert "sparse" not in a and "medium" not in a and set(a) == {"all", "heavy"}
    heavy = mask.numpy() & ~no_click.numpy()[:, None]
    assert a["heavy"] == pytest.approx(roc_auc_score(t2.qy.numpy()[heavy], p[heavy]), abs=1e-12)
    assert set(me.bucket_auc(t2, np.zeros(t2.qm.shape)).values()) == {0.5}
    t2.qy = torch.zeros_like(t2.qy)
    with pytest.raises(ValueError, match="single class"):
        me.bucket_auc(t2, p)
