"""Rotary position embedding, HF layout and rotate-half convention, q and k in one launch.

Forward (x = [x1, x2] halves of head_dim, rot(x) = [-x2, x1]):
    y = x * cos + rot(x) * sin   ->   y1 = x1 c1 - x2 s1,   y2 = x2 c2 + x1 s2
Backward is the transpose of that linear map (rot^T(g) = [g2, -g1]):
    dx1 = g1 c1 + g2 s2,   dx2 = g2 c2 - g1 s1
(for HF's cos/sin, whose halves are equal, this is the forward with sin negated). One program per
(batch, head) walks the tokens in (tokens, head_dim/2) tiles; q and k are two launches of the same kernel.
Outputs are new contiguous tensors; cos/sin get no gradient.
"""

import torch
import triton
import triton.language as tl


@triton.jit
def _rope_kernel(X, Y, COS, SIN, x_sb, x_sh, x_st, y_sb, y_sh, y_st, cos_sb, cos_st, n_heads, n_tokens, half,
                 BACKWARD: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    # one program per (batch, head); a (tokens, head_dim/2) tile at a time
    pid = tl.program_id(0).to(tl.int64)
    b = pid // n_heads
    h = pid % n_heads
    d = tl.arange(0, BLOCK_D)[None, :]
    for t0 in range(0, n_tokens, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)[:, None]
        mask = (t < n_tokens) & (d < half)
        cp = COS + b * cos_sb + t * cos_st + d
        sp = SIN + b * cos_sb + t * cos_st + d
        c1 = tl.load(cp, mask=mask, other=0.0).to(tl.float32)
        c2 = tl.load(cp + half, mask=mask, other=0.0).to(tl.float32)
        s1 = tl.load(sp, mask=mask, other=0.0).to(tl.float32)
        s2 = tl.load(sp + half, mask=mask, other=0.0).to(tl.float32)
        xp = X + b * x_sb + h * x_sh + t * x_st + d
        x1 = tl.load(xp, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(xp + half, mask=mask, other=0.0).to(tl.float32)
        if BACKWARD:
            y1 = x1 * c1 + x2 * s2
            y2 = x2 * c2 - x1 * s1
        else:
            y1 = x1 * c1 - x2 * s1
            y2 = x2 * c2 + x1 * s2
        yp = Y + b * y_sb + h * y_sh + t * y_st + d
        tl.store(yp, y1.to(Y.dtype.element_ty), mask=mask)
        tl.store(yp + half, y2.to(Y.dtype.element_ty), mask=mask)


def _rope_one(x, cos3, sin3, backward):
    if x.stride(-1) != 1:
        x = x.contiguous()
    B, n_heads, T, D = x.shape
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if x.numel():
        block_d = triton.next_power_of_2(D // 2)
        block_t = max(1, min(triton.next_power_of_2(T), 4096 // block_d))
        _rope_kernel[(B * n_heads,)](
            x, y, cos3, sin3, x.stride(0), x.stride(1), x.stride(2), y.stride(0), y.stride(1), y.stride(2),
            cos3.stride(0), cos3.stride(1), n_heads, T, D // 2, BACKWARD=backward, BLOCK_T=block_t, BLOCK_D=block_d,
        )
    return y


def _rope_launch(q, k, cos, sin, backward):
    B, _, T, D = q.shape
    cos3 = cos if cos.ndim == 3 else cos.unsqueeze(0)
    sin3 = sin if sin.ndim == 3 else sin.unsqueeze(0)
    if cos3.shape[0] == 1:  # shared over the batch: stride 0, no copy
        cos3, sin3 = cos3.contiguous().expand(B, T, D), sin3.contiguous().expand(B, T, D)
    else:
        cos3, sin3 = cos3.contiguous(), sin3.contiguous()
    return _rope_one(q, cos3, sin3, backward), _rope_one(k, cos3, sin3, backward)


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
