"""Rotary position embedding, HF layout and rotate-half convention, q and k in one launch.

Forward (x = [x1, x2] halves of head_dim, rot(x) = [-x2, x1]):
    y = x * cos + rot(x) * sin   ->   y1 = x1 c1 - x2 s1,   y2 = x2 c2 + x1 s2
Backward is the transpose of that linear map (rot^T(g) = [g2, -g1]):
    dx1 = g1 c1 + g2 s2,   dx2 = g2 c2 - g1 s1
(for HF's cos/sin, whose halves are equal, this is the forward with sin negated). One program per
(batch, token) handles all q heads and all k heads as a (heads, head_dim/2) tile, reading cos/sin once.
Outputs are new contiguous tensors; cos/sin get no gradient.
"""

import torch
import triton
import triton.language as tl


@triton.jit
def _rope_tile(X, Y, x_stride_b, x_stride_h, x_stride_t, y_stride_b, y_stride_h, y_stride_t, b, t, n_heads, c1, c2,
               s1, s2, half, BACKWARD: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    h = tl.arange(0, BLOCK_H)[:, None]
    d = tl.arange(0, BLOCK_D)[None, :]
    mask = (h < n_heads) & (d < half)
    xp = X + b * x_stride_b + t * x_stride_t + h * x_stride_h + d
    yp = Y + b * y_stride_b + t * y_stride_t + h * y_stride_h + d
    x1 = tl.load(xp, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(xp + half, mask=mask, other=0.0).to(tl.float32)
    if BACKWARD:
        y1 = x1 * c1 + x2 * s2
        y2 = x2 * c2 - x1 * s1
    else:
        y1 = x1 * c1 - x2 * s1
        y2 = x2 * c2 + x1 * s2
    tl.store(yp, y1.to(Y.dtype.element_ty), mask=mask)
    tl.store(yp + half, y2.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _rope_kernel(Q, K, QO, KO, COS, SIN, q_sb, q_sh, q_st, k_sb, k_sh, k_st, qo_sb, qo_sh, qo_st, ko_sb, ko_sh,
                 ko_st, cos_sb, cos_st, n_tokens, n_qh, n_kh, half, BACKWARD: tl.constexpr, BLOCK_QH: tl.constexpr,
                 BLOCK_KH: tl.constexpr, BLOCK_D: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    b = pid // n_tokens
    t = pid % n_tokens
    d = tl.arange(0, BLOCK_D)[None, :]
    dm = d < half
    cp = COS + b * cos_sb + t * cos_st + d
    sp = SIN + b * cos_sb + t * cos_st + d
    c1 = tl.load(cp, mask=dm, other=0.0).to(tl.float32)
    c2 = tl.load(cp + half, mask=dm, other=0.0).to(tl.float32)
    s1 = tl.load(sp, mask=dm, other=0.0).to(tl.float32)
    s2 = tl.load(sp + half, mask=dm, other=0.0).to(tl.float32)
    _rope_tile(Q, QO, q_sb, q_sh, q_st, qo_sb, qo_sh, qo_st, b, t, n_qh, c1, c2, s1, s2, half, BACKWARD, BLOCK_QH,
               BLOCK_D)
    _rope_tile(K, KO, k_sb, k_sh, k_st, ko_sb, ko_sh, ko_st, b, t, n_kh, c1, c2, s1, s2, half, BACKWARD, BLOCK_KH,
               BLOCK_D)


def _rope_launch(q, k, cos, sin, backward):
    if q.stride(-1) != 1:
        q = q.contiguous()
    if k.stride(-1) != 1:
        k = k.contiguous()
    B, n_qh, T, D = q.shape
    n_kh = k.shape[1]
    cos3 = cos if cos.ndim == 3 else cos.unsqueeze(0)
    sin3 = sin if sin.ndim == 3 else sin.unsqueeze(0)
    cos3, sin3 = cos3.expand(B, T, D).contiguous(), sin3.expand(B, T, D).contiguous()
    qo, ko = torch.empty(q.shape, dtype=q.dtype, device=q.device), torch.empty(k.shape, dtype=k.dtype, device=k.device)
    if B * T:
        _rope_kernel[(B * T,)](
            q, k, qo, ko, cos3, sin3, q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            qo.stride(0), qo.stride(1), qo.stride(2), ko.stride(0), ko.stride(1), ko.stride(2), cos3.stride(0),
            cos3.stride(1), T, n_qh, n_kh, D // 2, BACKWARD=backward, BLOCK_QH=triton.next_power_of_2(n_qh),
            BLOCK_KH=triton.next_power_of_2(n_kh), BLOCK_D=triton.next_power_of_2(D // 2),
        )
    return qo, ko


class RopeFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, cos, sin):
        ctx.save_for_backward(cos, sin)
        return _rope_launch(q, k, cos, sin, backward=False)

    @staticmethod
    def backward(ctx, dq, dk):
        cos, sin = ctx.saved_tensors
        dq = torch.zeros_like(dq) if dq is None else dq
        dk = torch.zeros_like(dk) if dk is None else dk
        dq, dk = _rope_launch(dq, dk, cos, sin, backward=True)
        return dq, dk, None, None


def rope(q, k, cos, sin):
    return RopeFunction.apply(q, k, cos, sin)
