import pytest
import torch

import lipapers.kernels as K
from tolerances import CPU_DTYPES, as64, check, leaf


def hf_cos_sin(B, T, D, per_batch, generator):
    """cos/sin as transformers builds them: positions x inverse frequencies, duplicated halves."""
    inv = 1.0 / (10000 ** (torch.arange(0, D, 2).float() / D))
    pos = torch.randint(0, 50, (B, T), generator=generator).float() if per_batch else torch.arange(T).float()
    f = pos[..., None] * inv
    emb = torch.cat((f, f), dim=-1)
    return emb.cos(), emb.sin()


@pytest.mark.parametrize("B,Hq,Hk,T,D", [(2, 4, 2, 7, 16), (1, 3, 3, 5, 10), (3, 1, 1, 9, 6)])
@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("per_batch", [False, True])
def test_rope_fwd_bwd(B, Hq, Hk, T, D, dtype, per_batch):
    g = torch.Generator().manual_seed(3)
    q = leaf(torch.randn(B, T, Hq, D, generator=g).transpose(1, 2), dtype)  # HF: view then transpose
    k = leaf(torch.randn(B, Hk, T, D, generator=g), dtype)
    cos, sin = hf_cos_sin(B, T, D, per_batch, g)
    cos, sin = cos.to(dtype), sin.to(dtype)
    qr, kr = K.rope(q, k, cos, sin, backend="triton")
    dq_out, dk_out = torch.randn(qr.shape, generator=g).to(dtype), torch.randn(kr.shape, generator=g).to(dtype)
    dq, dk = torch.autograd.grad((qr, kr), (q, k), (dq_out, dk_out))
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb  # HF's own implementation

    q64, k64 = as64(q), as64(k)
    c64, s64 = cos.double(), sin.double()
    if not per_batch:
        c64, s64 = c64.expand(B, T, D), s64.expand(B, T, D)
    qr64, kr64 = apply_rotary_pos_emb(q64, k64, c64, s64)
    dq64, dk64 = torch.autograd.grad((qr64, kr64), (q64, k64), (dq_out.double(), dk_out.double()))
    for a, r in ((qr, qr64), (kr, kr64), (dq, dq64), (dk, dk64)):
        check(a, r, dtype)


def test_rope_general_cos_sin_backward():
    """Halves of cos/sin that differ (not HF's duplicated layout) exercise the transpose in the backward."""
    g = torch.Generator().manual_seed(4)
    q, k = torch.randn(2, 3, 5, 8, generator=g, requires_grad=True), torch.randn(2, 1, 5, 8, generator=g, requires_grad=True)
    cos, sin = torch.randn(5, 8, generator=g), torch.randn(5, 8, generator=g)
    out = K.rope(q, k, cos, sin, backend="triton")
    grads = torch.autograd.grad(out, (q, k), (torch.ones_like(out[0]), torch.ones_like(out[1])))
    q64, k64 = as64(q), as64(k)
    out64 = K.rope(q64, k64, cos.double(), sin.double(), backend="torch")
    grads64 = torch.autograd.grad(out64, (q64, k64), (torch.ones_like(out64[0]), torch.ones_like(out64[1])))
    for a, r in zip(out + grads, out64 + grads64):
        check(a, r, torch.float32)


def test_rope_errors():
    q, k = torch.randn(1, 2, 4, 6), torch.randn(1, 2, 4, 6)
    with pytest.raises(ValueError, match="cos/sin shape"):
        K.rope(q, k, torch.randn(4, 5), torch.randn(4, 5))
    with pytest.raises(ValueError, match="even"):
        K.rope(torch.randn(1, 2, 4, 5), torch.randn(1, 2, 4, 5), torch.randn(4, 5), torch.randn(4, 5))
    with pytest.raises(ValueError, match="4-D"):
        K.rope(torch.randn(2, 4, 6), k, torch.randn(4, 6), torch.randn(4, 6))
