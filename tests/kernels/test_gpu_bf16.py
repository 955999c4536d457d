"""bf16 (and compiled-Triton) checks: need a CUDA device; skipped on this project's CPU-only machines.

The Triton interpreter computes bf16 arithmetic wrongly, so bf16 is only tested on a GPU. Same references and
tolerance table as the CPU tests (tolerances.py, bf16 rows).
"""

import pytest
import torch
import torch.nn.functional as F

import lipapers.kernels as K
from tolerances import as64, check, leaf

pytestmark = pytest.mark.gpu
BF16 = torch.bfloat16


def _grads(out, ins, up):
    return torch.autograd.grad(out, [t for t in ins if t.requires_grad], up)


def test_bf16_norms_glu_rope():
    dev = "cuda"
    x, w, b = (leaf(torch.randn(s, device=dev), BF16) for s in ((64, 1000), (1000,), (1000,)))
    for name, f, ins in (
        ("rms_norm", lambda x, w, b, be: K.rms_norm(x, w, backend=be), (x, w, b)),
        ("layer_norm", lambda x, w, b, be: K.layer_norm(x, w, b, backend=be), (x, w, b)),
        ("swiglu", lambda x, w, b, be: K.swiglu(x, x * 0.5 + 1, backend=be), (x, w, b)),
        ("geglu", lambda x, w, b, be: K.geglu(x, x * 0.5 + 1, backend=be), (x, w, b)),
    ):
        out = f(*ins, "triton")
        up = torch.randn_like(out)
        g = torch.autograd.grad(out, [t for t in ins], up, allow_unused=True)
        ins64 = [as64(t) for t in ins]
        out64 = f(*ins64, "torch")
        g64 = torch.autograd.grad(out64, ins64, up.double(), allow_unused=True)
        check(out, out64, BF16)
        for a, r in zip(g, g64):
            if a is not None:
                check(a, r, BF16, "matmul")  # weight grads are reductions over 64 rows
    q, k = leaf(torch.randn(2, 8, 33, 64, device=dev), BF16), leaf(torch.randn(2, 2, 33, 64, device=dev), BF16)
    cos, sin = torch.randn(33, 64, device=dev).to(BF16), torch.randn(33, 64, device=dev).to(BF16)
    out = K.rope(q, k, cos, sin, backend="triton")
    out64 = K.rope(as64(q), as64(k), cos.double(), sin.double(), backend="torch")
    for a, r in zip(out, out64):
        check(a, r, BF16)


def test_bf16_losses():
    dev = "cuda"
    z = leaf(torch.randn(37, 32011, device=dev) * 2, BF16)
    y = torch.randint(0, 32011, (37,), device=dev)
    y[:3] = -100
    loss = K.cross_entropy(z, y, backend="triton")
    (dz,) = torch.autograd.grad(loss, z)
    z64 = as64(z)
    loss64 = F.cross_entropy(z64, y)
    (dz64,) = torch.autograd.grad(loss64, z64)
    check(loss, loss64, BF16), check(dz, dz64, BF16)
    x, W = leaf(torch.randn(300, 256, device=dev), BF16), leaf(torch.randn(5003, 256, device=dev) / 16, BF16)
    t = torch.randint(0, 5003, (300,), device=dev)
    loss = K.fused_linear_cross_entropy(x, W, t, backend="triton")
    g = torch.autograd.grad(loss, (x, W))
    x64, W64 = as64(x), as64(W)
    loss64 = F.cross_entropy(x64 @ W64.t(), t)
    g64 = torch.autograd.grad(loss64, (x64, W64))
    check(loss, loss64, BF16, "matmul")
    for a, r in zip(g, g64):
        check(a, r, BF16, "matmul")
