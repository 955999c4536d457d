import pytest
import torch
import torch.nn.functional as F

import lipapers.kernels as K
from tolerances import CPU_DTYPES, as64, check, leaf


@pytest.mark.parametrize("op", ["swiglu", "geglu"])
@pytest.mark.parametrize("shape", [(2, 8, 64), (5, 123), (3, 7, 41), (4097,)])
@pytest.mark.parametrize("dtype", CPU_DTYPES)
def test_glu_fwd_bwd(op, shape, dtype):
    g = torch.Generator().manual_seed(2)
    a = leaf(torch.randn(shape, generator=g) * 4, dtype)  # wide range: saturated sigmoid/tanh too
    b = leaf(torch.randn(shape, generator=g), dtype)
    a0, b0 = a.detach().clone(), b.detach().clone()
    c = getattr(K, op)(a, b, backend="triton")
    dc = torch.randn(c.shape, generator=g).to(dtype)
    da, db = torch.autograd.grad(c, (a, b), dc)
    a64, b64 = as64(a), as64(b)
    act = F.silu(a64) if op == "swiglu" else F.gelu(a64, approximate="tanh")  # torch.nn.functional reference
    c64 = act * b64
    da64, db64 = torch.autograd.grad(c64, (a64, b64), dc.double())
    check(c, c64, dtype), check(da, da64, dtype), check(db, db64, dtype)
    assert torch.equal(a.detach(), a0) and torch.equal(b.detach(), b0)  # not overwritten (Liger writes in place)


def test_glu_noncontiguous_and_errors():
    a, b = torch.randn(7, 12).t(), torch.randn(7, 12).t()
    check(K.swiglu(a, b, backend="triton"), K.swiglu(a.double(), b.double(), backend="torch"), torch.float32)
    with pytest.raises(ValueError, match="same shape"):
        K.swiglu(torch.randn(3, 4), torch.randn(3, 5))
