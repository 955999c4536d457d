import pytest
import torch

import lipapers.kernels as K
from tolerances import CPU_DTYPES, as64, check, leaf

SHAPES = [(2, 8, 64), (5, 123), (3, 7, 41), (1, 1, 1)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("offset", [0.0, 1.0])
def test_rms_norm_fwd_bwd(shape, dtype, offset):
    g = torch.Generator().manual_seed(0)
    x = leaf(torch.randn(shape, generator=g) * 2 + 0.5, dtype)
    w = leaf(torch.randn(shape[-1], generator=g), dtype)
    x_before = x.detach().clone()
    y = K.rms_norm(x, w, eps=1e-6, offset=offset, backend="triton")
    dy = torch.randn(y.shape, generator=g).to(dtype)
    dx, dw = torch.autograd.grad(y, (x, w), dy)
    x64, w64 = as64(x), as64(w)
    y64 = K.rms_norm(x64, w64, eps=1e-6, offset=offset, backend="torch")
    dx64, dw64 = torch.autograd.grad(y64, (x64, w64), dy.double())
    assert y.dtype == dtype and dx.dtype == dtype and dw.dtype == dtype
    check(y, y64, dtype), check(dx, dx64, dtype), check(dw, dw64, dtype)
    assert torch.equal(x.detach(), x_before)  # input untouched


def test_rms_norm_reference_matches_transformers():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    m = LlamaRMSNorm(37, eps=1e-6).double()
    with torch.no_grad():
        m.weight.normal_()
    x = torch.randn(4, 5, 37, dtype=torch.float64)
    torch.testing.assert_close(K.rms_norm(x, m.weight, 1e-6, backend="torch"), m(x))


def test_rms_norm_noncontiguous_and_empty():
    x = torch.randn(6, 10, 33).transpose(0, 1)  # non-contiguous rows
    w = torch.randn(33)
    check(K.rms_norm(x, w, backend="triton"), K.rms_norm(x.double(), w.double(), backend="torch"), torch.float32)
    e = torch.randn(0, 17, requires_grad=True)
    y = K.rms_norm(e, torch.ones(17), backend="triton")
    assert y.shape == (0, 17)
    y.sum().backward()
    assert e.grad.shape == (0, 17)


def test_rms_norm_errors():
    with pytest.raises(ValueError, match="weight shape"):
        K.rms_norm(torch.randn(3, 8), torch.ones(7))
    with pytest.raises(ValueError, match="backend"):
        K.rms_norm(torch.randn(3, 8), torch.ones(8), backend="cuda")
    with pytest.raises(TypeError, match="dtype"):
        K.rms_norm(torch.randn(3, 8).double(), torch.ones(8).double(), backend="triton")


@pytest.mark.gpu
def test_rms_norm_bf16_gpu():
    x = leaf(torch.randn(64, 4096, device="cuda"), torch.bfloat16)
    w = leaf(torch.randn(4096, device="cuda"), torch.bfloat16)
    y = K.rms_norm(x, w, backend="triton")
    dx, dw = torch.autograd.grad(y, (x, w), torch.ones_like(y))
    x64, w64 = as64(x), as64(w)
    y64 = K.rms_norm(x64, w64, backend="torch")
    dx64, dw64 = torch.autograd.grad(y64, (x64, w64), torch.ones_like(y64))
    check(y, y64, torch.bfloat16), check(dx, dx64, torch.bfloat16), check(dw, dw64, torch.bfloat16, "matmul")
