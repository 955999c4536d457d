import pytest
import torch
import torch.nn.functional as F

import lipapers.kernels as K
from tolerances import CPU_DTYPES, as64, check, leaf


@pytest.mark.parametrize("shape", [(2, 8, 64), (5, 123), (3, 7, 41)])
@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("bias", [True, False])
def test_layer_norm_fwd_bwd(shape, dtype, bias):
    g = torch.Generator().manual_seed(1)
    x = leaf(torch.randn(shape, generator=g) * 3 + 1, dtype)
    w = leaf(torch.randn(shape[-1], generator=g), dtype)
    b = leaf(torch.randn(shape[-1], generator=g), dtype) if bias else None
    ins = [t for t in (x, w, b) if t is not None]
    y = K.layer_norm(x, w, b, backend="triton")
    dy = torch.randn(y.shape, generator=g).to(dtype)
    grads = torch.autograd.grad(y, ins, dy)
    ins64 = [as64(t) for t in ins]
    # the reference here is torch.nn.functional itself, in float64
    y64 = F.layer_norm(ins64[0], (shape[-1],), ins64[1], ins64[2] if bias else None, 1e-5)
    grads64 = torch.autograd.grad(y64, ins64, dy.double())
    check(y, y64, dtype)
    for a, r in zip(grads, grads64):
        check(a, r, dtype)


def test_layer_norm_errors():
    with pytest.raises(ValueError, match="weight/bias"):
        K.layer_norm(torch.randn(3, 8), torch.ones(8), torch.zeros(5))
