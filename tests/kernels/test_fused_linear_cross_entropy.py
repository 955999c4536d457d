import pytest
import torch
import torch.nn.functional as F

import lipapers.kernels as K
import lipapers.kernels.reference as R
from tolerances import CPU_DTYPES, as64, check, leaf


def unfused64(x, w, b, y, **kw):
    """The naive computation in float64: F.cross_entropy(x @ W.T + b, y)."""
    logits = x @ w.t() if b is None else x @ w.t() + b
    return F.cross_entropy(logits, y, **kw)


@pytest.fixture(params=[None, 8], ids=["auto_chunk", "chunk8"])
def chunk_rows(request, monkeypatch):
    """Default chunking (one chunk at these sizes) and a forced 8-row chunk (several chunks, a partial last one)."""
    if request.param is not None:
        monkeypatch.setattr(R, "flce_chunk_rows", lambda *a, **k: request.param)
    return request.param


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("bias", [False, True])
def test_flce_vs_unfused(backend, dtype, reduction, bias, chunk_rows):
    B, T, H, V = 3, 7, 31, 123  # N = 21 rows, H and V not powers of two
    g = torch.Generator().manual_seed(7)
    x = leaf(torch.randn(B, T, H, generator=g), dtype)
    w = leaf(torch.randn(V, H, generator=g) / H**0.5, dtype)
    b = leaf(torch.randn(V, generator=g), dtype) if bias else None
    y = torch.randint(0, V, (B, T), generator=g)
    y[0, :3] = -100
    ins = [t for t in (x, w, b) if t is not None]
    loss = K.fused_linear_cross_entropy(x, w, y, b, label_smoothing=0.1, reduction=reduction, backend=backend)
    up = torch.rand(loss.shape, generator=g) + 0.5
    grads = torch.autograd.grad(loss, ins, up)
    ins64 = [as64(t) for t in ins]
    x64, w64, b64 = ins64[0], ins64[1], (ins64[2] if bias else None)
    loss64 = unfused64(x64.reshape(-1, H), w64, b64, y.reshape(-1), label_smoothing=0.1, reduction=reduction)
    loss64 = loss64.reshape(B, T) if reduction == "none" else loss64
    grads64 = torch.autograd.grad(loss64, ins64, up.double())
    check(loss, loss64, dtype, "matmul")
    for a, r in zip(grads, grads64):
        assert a.dtype == dtype
        check(a, r, dtype, "matmul")


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_flce_all_ignored_empty_and_no_grad(backend):
    x, w = torch.randn(5, 6, requires_grad=True), torch.randn(11, 6, requires_grad=True)
    loss = K.fused_linear_cross_entropy(x, w, torch.full((5,), -100), backend=backend)
    dx, dw = torch.autograd.grad(loss, (x, w))
    assert loss.item() == 0.0 and torch.count_nonzero(dx) == 0 and torch.count_nonzero(dw) == 0
    e = torch.randn(0, 6, requires_grad=True)
    loss = K.fused_linear_cross_entropy(e, w, torch.zeros(0, dtype=torch.long), backend=backend)
    loss.backward()
    assert loss.item() == 0.0 and e.grad.shape == (0, 6)
    with torch.no_grad():  # inference: loss only, no gradient buffers
        y = torch.randint(0, 11, (5,))
        ref = F.cross_entropy(x.double() @ w.double().t(), y)
        check(K.fused_linear_cross_entropy(x, w, y, backend=backend), ref, torch.float32)


def test_flce_chunk_rows_rule():
    assert K.flce_chunk_rows(2048, 512, 32768) == 512  # chunk logits (512 x V) = size of W (V x 512)
    assert K.flce_chunk_rows(100, 512, 32768) == 100  # capped at N
    assert K.flce_chunk_rows(4096, 31, 1000) == 512  # floor of 512 rows for small H
    assert K.flce_chunk_rows(8192, 4000, 128256) == 4032  # H rounded up to a multiple of 64


def test_flce_errors():
    x, w = torch.randn(4, 6), torch.randn(9, 6)
    with pytest.raises(ValueError, match="weight must be"):
        K.fused_linear_cross_entropy(x, torch.randn(9, 5), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="bias shape"):
        K.fused_linear_cross_entropy(x, w, torch.zeros(4, dtype=torch.long), bias=torch.zeros(3))
    with pytest.raises(TypeError, match="same dtype"):
        K.fused_linear_cross_entropy(x.half(), w, torch.zeros(4, dtype=torch.long))


def test_flce_matches_liger_peer():
    """Optional peer: liger-kernel 0.8.5's FLCE in the interpreter (fp32)."""
    lf = pytest.importorskip("liger_kernel.transformers.functional")
    g = torch.Generator().manual_seed(8)
    x = torch.randn(19, 24, generator=g, requires_grad=True)
    w = torch.randn(70, 24, generator=g, requires_grad=True)
    y = torch.randint(0, 70, (19,), generator=g)
    y[:2] = -100
    ours = K.fused_linear_cross_entropy(x, w, y, backend="triton")
    g_ours = torch.autograd.grad(ours, (x, w))
    xl, wl = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    peer = lf.liger_fused_linear_cross_entropy(xl, wl, y)
    g_peer = torch.autograd.grad(peer, (xl, wl))
    torch.testing.assert_close(ours, peer, atol=1e-5, rtol=1e-5)
    for a, p in zip(g_ours, g_peer):
        torch.testing.assert_close(a, p, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("rows", [1, 5, 21, 64])
def test_flce_explicit_chunk_rows_match_the_default(rows):
    """`chunk_rows` (e.g. Liger's rule, compared in the chapter) changes only the memory/time trade-off, not the result."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(21, 31, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(123, 31, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 123, (21,), generator=g)
    for reduction in ("mean", "none"):
        ref = K.fused_linear_cross_entropy(x, w, y, reduction=reduction, backend="torch")
        out = K.fused_linear_cross_entropy(x, w, y, reduction=reduction, backend="torch", chunk_rows=rows)
        torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-12)
        up = torch.randn_like(out)
        torch.testing.assert_close(torch.autograd.grad(out, (x, w), up), torch.autograd.grad(ref, (x, w), up))


@pytest.mark.parametrize("bad", [0, -3, 2.5, True])
def test_flce_rejects_bad_chunk_rows(bad):
    x, w = torch.randn(4, 6), torch.randn(9, 6)
    with pytest.raises(ValueError, match="chunk_rows"):
        K.fused_linear_cross_entropy(x, w, torch.zeros(4, dtype=torch.long), chunk_rows=bad)
