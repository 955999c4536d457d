"""LayerNorm: y = (x - mean) * rstd * w + b, one program per row; backward recomputes x_hat.

    x_hat = (x - mean) * rstd,   g = dy * w
    dx = rstd * (g - x_hat * mean(g * x_hat) - mean(g)),   dw = sum_rows dy * x_hat,   db = sum_rows dy.
Forward saves mean and rstd (2N fp32). dw/db are accumulated per program in fp32 over a block of rows;
the (P, H) partials are summed on the host. All arithmetic is fp32.
"""

import torch
import triton
import triton.language as tl

from .triton_rms_norm import block_size, num_programs_for_dw


@triton.jit
def _layer_norm_fwd_kernel(X, Y, W, B, MEAN, RSTD, stride_x, stride_y, n_cols, eps, HAS_BIAS: tl.constexpr,
                           BLOCK_SIZE: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_SIZE)
    mask = cols < n_cols
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=0) / n_cols
    xc = tl.where(mask, x - mean, 0.0)
    var = tl.sum(xc * xc, axis=0) / n_cols
    rstd = 1.0 / tl.sqrt(var + eps)
    tl.store(MEAN + row, mean)
    tl.store(RSTD + row, rstd)
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    y = xc * rstd * w
    if HAS_BIAS:
        y += tl.load(B + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + row * stride_y + cols, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _layer_norm_bwd_kernel(DY, X, W, MEAN, RSTD, DX, DW_PART, DB_PART, stride_dy, stride_x, stride_dx, n_rows,
                           n_cols, rows_per_program, BLOCK_SIZE: tl.constexpr):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_SIZE)
    mask = cols < n_cols
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    dw_acc = tl.zeros((BLOCK_SIZE,), dtype=tl.float32)
    db_acc = tl.zeros((BLOCK_SIZE,), dtype=tl.float32)
    row_start = pid * rows_per_program
    for i in range(0, rows_per_program):
        row = (row_start + i).to(tl.int64)
        if row < n_rows:
            dy = tl.load(DY + row * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
            x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
            mean = tl.load(MEAN + row)
            rstd = tl.load(RSTD + row)
            x_hat = tl.where(mask, (x - mean) * rstd, 0.0)
            g = dy * w
            c1 = tl.sum(g * x_hat, axis=0) / n_cols
            c2 = tl.sum(g, axis=0) / n_cols
            dx = rstd * (g - x_hat * c1 - c2)
            tl.store(DX + row * stride_dx + cols, dx.to(DX.dtype.element_ty), mask=mask)
            dw_acc += dy * x_hat
            db_acc += dy
    tl.store(DW_PART + pid * n_cols + cols, dw_acc, mask=mask)
    tl.store(DB_PART + pid * n_cols + cols, db_acc, mask=mask)


class LayerNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, b, eps):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if x2.stride(-1) != 1:
            x2 = x2.contiguous()
        n_rows, n_cols = x2.shape
        w = w.contiguous()
        y = torch.empty_like(x2)
        mean = torch.empty(n_rows, dtype=torch.float32, device=x.device)
        rstd = torch.empty(n_rows, dtype=torch.float32, device=x.device)
        if n_rows:
            _layer_norm_fwd_kernel[(n_rows,)](x2, y, w, w if b is None else b.contiguous(), mean, rstd, x2.stride(0),
                                              y.stride(0), n_cols, eps, HAS_BIAS=b is not None,
                                              BLOCK_SIZE=block_size(n_cols))
        ctx.save_for_backward(x2, w, mean, rstd)
        ctx.has_bias, ctx.b_dtype = b is not None, None if b is None else b.dtype
        return y.reshape(shape)

    @staticmethod
    def backward(ctx, dy):
        x2, w, mean, rstd = ctx.saved_tensors
        n_rows, n_cols = x2.shape
        dy2 = dy.reshape(-1, n_cols)
        if dy2.stride(-1) != 1:
            dy2 = dy2.contiguous()
        dx = torch.empty_like(x2)
        P = max(num_programs_for_dw(n_rows, x2.device), 1)
        dw_part = torch.zeros(P, n_cols, dtype=torch.float32, device=x2.device)
        db_part = torch.zeros(P, n_cols, dtype=torch.float32, device=x2.device)
        if n_rows:
            _layer_norm_bwd_kernel[(P,)](dy2, x2, w, mean, rstd, dx, dw_part, db_part, dy2.stride(0), x2.stride(0),
                                         dx.stride(0), n_rows, n_cols, triton.cdiv(n_rows, P),
                                         BLOCK_SIZE=block_size(n_cols))
        db = db_part.sum(0).to(ctx.b_dtype) if ctx.has_bias else None
        return dx.reshape(dy.shape), dw_part.sum(0).to(w.dtype), db, None


def layer_norm(x, weight, bias, eps=1e-5):
    return LayerNormFunction.apply(x, weight, bias, float(eps))
