"""Generalised Jensen-Shannon divergence on log-probs, one program per row, gradient computed in forward.

X = log Q (student), Y = log P (teacher), M = beta P + (1 - beta) Q:
    JSD_beta = beta KL(P||M) + (1 - beta) KL(Q||M) = sum beta P (Y - log M) + (1 - beta) Q (X - log M)
    dJSD/dX  = (1 - beta) Q (X - log M)
The general formula is identically 0 at beta in {0, 1}, so the endpoints are the two KL directions
(GKD / Liger convention): beta = 0 -> forward KL(P||Q) = sum P (Y - X), dX = -P;
beta = 1 -> reverse KL(Q||P) = sum Q (X - Y), dX = Q (X - Y + 1).
Rows whose label is ignore_index give 0 loss and 0 gradient. Used directly (`jsd`) and per chunk by the
fused-linear JSD (`jsd_chunk_triton`).
"""

import torch
import triton
import triton.language as tl

from .triton_cross_entropy import vocab_block


@triton.jit
def _jsd_kernel(X, Y, LABEL, DX, LOSS, stride_x, stride_y, stride_dx, n_cols, ignore_index, beta, scale,
                HAS_LABEL: tl.constexpr, MODE: tl.constexpr, BLOCK: tl.constexpr):
    # MODE: 0 forward KL (beta=0), 1 reverse KL (beta=1), 2 general beta
    row = tl.program_id(0).to(tl.int64)
    cols0 = tl.arange(0, BLOCK)
    valid = True
    if HAS_LABEL:
        valid = tl.load(LABEL + row) != ignore_index
    loss = 0.0
    for start in range(0, n_cols, BLOCK):
        cols = start + cols0
        mask = cols < n_cols
        x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        y = tl.load(Y + row * stride_y + cols, mask=mask, other=0.0).to(tl.float32)
        if MODE == 0:
            p = tl.exp(y)
            term = p * (y - x)
            dx = -p
        elif MODE == 1:
            q = tl.exp(x)
            term = q * (x - y)
            dx = q * (x - y + 1.0)
        else:
            p = tl.exp(y)
            q = tl.exp(x)
            log_m = tl.log(beta * p + (1.0 - beta) * q)
            term = beta * p * (y - log_m) + (1.0 - beta) * q * (x - log_m)
            dx = (1.0 - beta) * q * (x - log_m)
        loss += tl.sum(tl.where(mask, term, 0.0), axis=0)
        dx = tl.where(valid, dx * scale, 0.0)
        tl.store(DX + row * stride_dx + cols, dx.to(DX.dtype.element_ty), mask=mask)
    tl.store(LOSS + row, tl.where(valid, loss, 0.0))


def jsd_chunk_triton(x, y, label, beta, ignore_index, scale):
    """Row losses (fp32, unscaled) and dloss/dx * scale; same contract as `reference.jsd_chunk_torch`."""
    x = x if x.stride(-1) == 1 else x.contiguous()
    y = y if y.stride(-1) == 1 else y.contiguous()
    n_rows, n_cols = x.shape
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    loss = torch.empty(n_rows, dtype=torch.float32, device=x.device)
    if n_rows:
        mode = 0 if beta == 0.0 else (1 if beta == 1.0 else 2)
        _jsd_kernel[(n_rows,)](
            x, y, x if label is None else label.contiguous(), dx, loss, x.stride(0), y.stride(0), dx.stride(0), n_cols,
            ignore_index, float(beta), float(scale), HAS_LABEL=label is not None, MODE=mode, BLOCK=vocab_block(n_cols),
        )
    return loss, dx


class JSDFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, y, label, beta, ignore_index):
        n = x.shape[0] if label is None else int((label != ignore_index).sum())
        n = max(n, 1)
        rows, dx = jsd_chunk_triton(x, y, label, beta, ignore_index, 1.0 / n)
        ctx.save_for_backward(dx)
        return rows.sum() / n

    @staticmethod
    def backward(ctx, grad_out):
        (dx,) = ctx.saved_tensors
        if not bool(grad_out == 1):
            dx = dx * grad_out.to(dx.dtype)
        return dx, None, None, None, None


def jsd(input, target, label=None, beta=0.5, ignore_index=-100):
    return JSDFunction.apply(input, target, label, float(beta), ignore_index)
