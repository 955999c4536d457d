import pytest
import torch

import lipapers.kernels as K
from tolerances import CPU_DTYPES, as64, check, leaf


def kl(p_log, q_log):
    """KL(P || Q) per row from log-probs, float64 (torch.nn.functional.kl_div's convention, summed)."""
    return torch.nn.functional.kl_div(q_log, p_log, log_target=True, reduction="none").sum(-1)


def test_jsd_endpoints_are_the_two_kl_directions():
    g = torch.Generator().manual_seed(9)
    x = torch.log_softmax(torch.randn(6, 40, generator=g, dtype=torch.float64), -1)  # student log Q
    y = torch.log_softmax(torch.randn(6, 40, generator=g, dtype=torch.float64), -1)  # teacher log P
    torch.testing.assert_close(K.jsd(x, y, beta=0.0, backend="torch"), kl(y, x).mean())  # forward KL(P||Q)
    torch.testing.assert_close(K.jsd(x, y, beta=1.0, backend="torch"), kl(x, y).mean())  # reverse KL(Q||P)
    # beta = 0.5: the classic JSD, 0.5 KL(P||M) + 0.5 KL(Q||M), M the average
    m = torch.log(0.5 * (x.exp() + y.exp()))
    torch.testing.assert_close(K.jsd(x, y, beta=0.5, backend="torch"), (0.5 * kl(y, m) + 0.5 * kl(x, m)).mean())


@pytest.mark.parametrize("beta", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("N,V", [(11, 300), (3, 4500)])
def test_jsd_fwd_bwd(beta, dtype, N, V):
    g = torch.Generator().manual_seed(10)
    x = leaf(torch.log_softmax(torch.randn(N, V, generator=g) * 2, -1), dtype)
    y = torch.log_softmax(torch.randn(N, V, generator=g) * 2, -1).to(dtype)
    label = torch.randint(0, V, (N,), generator=g)
    label[0] = -100
    loss = K.jsd(x, y, label, beta=beta, backend="triton")
    (dx,) = torch.autograd.grad(loss * 1.7, x)
    x64 = as64(x)
    loss64 = K.jsd(x64, y.double(), label, beta=beta, backend="torch")
    (dx64,) = torch.autograd.grad(loss64 * 1.7, x64)
    check(loss, loss64, dtype), check(dx, dx64, dtype)


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("dtype", CPU_DTYPES)
def test_fused_linear_jsd(backend, beta, dtype, monkeypatch):
    import lipapers.kernels.reference as R

    monkeypatch.setattr(R, "flce_chunk_rows", lambda *a, **k: 8)  # several chunks
    g = torch.Generator().manual_seed(11)
    N, Hs, Ht, V, temp = 21, 13, 9, 97, 2.0
    xs, ws = leaf(torch.randn(N, Hs, generator=g), dtype), leaf(torch.randn(V, Hs, generator=g), dtype)
    xt, wt = torch.randn(N, Ht, generator=g).to(dtype), torch.randn(V, Ht, generator=g).to(dtype)
    label = torch.randint(0, V, (N,), generator=g)
    label[:4] = -100
    loss = K.fused_linear_jsd(xs, ws, xt, wt, label, beta=beta, temperature=temp, backend=backend)
    grads = torch.autograd.grad(loss, (xs, ws))
    xs64, ws64 = as64(xs), as64(ws)
    logq = torch.log_softmax(xs64 @ ws64.t() / temp, -1)
    logp = torch.log_softmax(xt.double() @ wt.double().t() / temp, -1)
    loss64 = K.jsd(logq, logp, label, beta=beta, backend="torch")
    grads64 = torch.autograd.grad(loss64, (xs64, ws64))
    check(loss, loss64, dtype, "matmul")
    for a, r in zip(grads, grads64):
        check(a, r, dtype, "matmul")


def test_jsd_errors():
    with pytest.raises(ValueError, match="beta"):
        K.jsd(torch.randn(2, 3), torch.randn(2, 3), beta=1.5)
    with pytest.raises(ValueError, match="must be equal"):
        K.jsd(torch.randn(2, 3), torch.randn(2, 4))
