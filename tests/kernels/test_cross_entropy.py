import pytest
import torch
import torch.nn.functional as F

import lipapers.kernels as K
from tolerances import CPU_DTYPES, as64, check, leaf

# (rows, vocab): V below one block, V > 4096 (several vocab blocks, last one partial), a single row
SHAPES = [(13, 77), (6, 5003), (1, 31)]


@pytest.mark.parametrize("N,V", SHAPES)
@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_cross_entropy_vs_functional(N, V, dtype, reduction, label_smoothing):
    g = torch.Generator().manual_seed(5)
    z = leaf(torch.randn(N, V, generator=g) * 3, dtype)
    y = torch.randint(0, V, (N,), generator=g)
    y[::4] = -100 if N > 1 else y[::4]
    z0 = z.detach().clone()
    loss = K.cross_entropy(z, y, label_smoothing=label_smoothing, reduction=reduction, backend="triton")
    up = torch.randn(loss.shape, generator=g)
    (dz,) = torch.autograd.grad(loss, z, up)
    z64 = as64(z)
    loss64 = F.cross_entropy(z64, y, label_smoothing=label_smoothing, reduction=reduction)
    (dz64,) = torch.autograd.grad(loss64, z64, up.double())
    check(loss, loss64, dtype), check(dz, dz64, dtype)
    assert torch.equal(z.detach(), z0)  # logits not overwritten (Liger's CE writes the gradient into them)


def test_cross_entropy_all_ignored_and_empty():
    z = torch.randn(4, 10, requires_grad=True)
    for backend in ("triton", "torch"):
        loss = K.cross_entropy(z, torch.full((4,), -100), backend=backend)
        (dz,) = torch.autograd.grad(loss, z)
        assert loss.item() == 0.0 and not torch.isnan(loss) and torch.count_nonzero(dz) == 0
    e = torch.randn(0, 10, requires_grad=True)
    loss = K.cross_entropy(e, torch.zeros(0, dtype=torch.long), backend="triton")
    assert loss.item() == 0.0


def test_cross_entropy_noncontiguous():
    z = torch.randn(40, 9).t()  # (9, 40) with row stride 1... transposed: last-dim stride 9
    y = torch.randint(0, 40, (9,))
    check(K.cross_entropy(z, y, backend="triton"), F.cross_entropy(z.double(), y), torch.float32)


def test_cross_entropy_errors():
    with pytest.raises(ValueError, match="reduction"):
        K.cross_entropy(torch.randn(3, 5), torch.zeros(3, dtype=torch.long), reduction="avg")
    with pytest.raises(ValueError, match="expected 3"):
        K.cross_entropy(torch.randn(3, 5), torch.zeros(4, dtype=torch.long))
    with pytest.raises(TypeError, match="int64"):
        K.cross_entropy(torch.randn(3, 5), torch.zeros(3))
    with pytest.raises(ValueError, match="2-D"):
        K.cross_entropy(torch.randn(2, 3, 5), torch.zeros(6, dtype=torch.long))


def test_cross_entropy_matches_liger_peer():
    """Optional peer: liger-kernel 0.8.5's CE (runs under the interpreter as shipped); clone, it writes in place."""
    lf = pytest.importorskip("liger_kernel.transformers.functional")
    g = torch.Generator().manual_seed(6)
    z = torch.randn(9, 300, generator=g, requires_grad=True)
    y = torch.randint(0, 300, (9,), generator=g)
    y[2] = -100
    ours = K.cross_entropy(z, y, label_smoothing=0.05, backend="triton")
    (d_ours,) = torch.autograd.grad(ours, z)
    zl = z.detach().clone().requires_grad_()
    peer = lf.liger_cross_entropy(zl, y, label_smoothing=0.05)
    (d_peer,) = torch.autograd.grad(peer, zl)
    torch.testing.assert_close(ours, peer, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(d_ours, d_peer, atol=1e-6, rtol=1e-5)
