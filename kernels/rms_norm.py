"""RMSNorm: y = x * rstd * (w + offset), rstd = 1 / sqrt(mean(x^2) + eps), one program per row.

Forward saves only rstd (N fp32) besides x and w. Backward recomputes x_hat from x and rstd:
    dx = rstd * (dy*(w+o) - x * rstd^2 * mean(dy*(w+o)*x)),   dw = sum_rows dy * x * rstd.
dw is accumulated per program in fp32 registers over a block of rows and the (P, H) partials are summed
on the host, so no (N, H) fp32 buffer exists. All arithmetic is fp32; loads upcast, stores cast back.
"""

import torch
import triton
import triton.language as tl


def block_size(n_cols):
    """One block covers a whole row (power of two >= n_cols)."""
    return triton.next_power_of_2(n_cols)


def num_programs_for_dw(n_rows, device):
    """Programs that each accumulate a dw partial: the SM count on CUDA, a small number on CPU."""
    if device.type == "cuda":
        return min(n_rows, torch.cuda.get_device_properties(device).multi_processor_count)
    return min(n_rows, 4)


@triton.jit
def _rms_norm_fwd_kernel(X, Y, W, RSTD, stride_x, stride_y, n_cols, eps, offset, BLOCK_SIZE: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_SIZE)
    mask = cols < n_cols
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    mean_sq = tl.sum(x * x, axis=0) / n_cols
    rstd = 1.0 / tl.sqrt(mean_sq + eps)  # libdevice.rsqrt is a stub in the interpreter
    tl.store(RSTD + row, rstd)
    y = x * rstd * (w + offset)
    tl.store(Y + row * stride_y + cols, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _rms_norm_bwd_kernel(DY, X, W, RSTD, DX, DW_PART, stride_dy, stride_x, stride_dx, n_rows, n_cols, offset,
                         rows_per_program, BLOCK_SIZE: tl.constexpr):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_SIZE)
    mask = cols < n_cols
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32) + offset
    dw_acc = tl.zeros((BLOCK_SIZE,), dtype=tl.float32)
    row_start = pid * rows_per_program
    for i in range(0, rows_per_program):
        row = (row_start + i).to(tl.int64)
        if row < n_rows:
            dy = tl.load(DY + row * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
            x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
            rstd = tl.load(RSTD + row)
            dyw = dy * w
            dot = tl.sum(dyw * x, axis=0)
            dx = rstd * (dyw - x * (rstd * rstd * dot / n_cols))
            tl.store(DX + row * stride_dx + cols, dx.to(DX.dtype.element_ty), mask=mask)
            dw_acc += dy * x * rstd
    tl.store(DW_PART + pid * n_cols + cols, dw_acc, mask=mask)


def rms_norm_forward(x2, w, eps, offset):
    n_rows, n_cols = x2.shape
    y = torch.empty_like(x2)
    rstd = torch.empty(n_rows, dtype=torch.float32, device=x2.device)
    if n_rows:
        _rms_norm_fwd_kernel[(n_rows,)](x2, y, w, rstd, x2.stride(0), y.stride(0), n_cols, eps, offset,
                                        BLOCK_SIZE=block_size(n_cols))
    return y, rstd


def rms_norm_backward(dy, x2, w, rstd, offset):
    n_rows, n_cols = x2.shape
    dx = torch.empty_like(x2)
    P = max(num_programs_for_dw(n_rows, x2.device), 1)
    rows_per_program = triton.cdiv(n_rows, P)
    dw_part = torch.zeros(P, n_cols, dtype=torch.float32, device=x2.device)
    if n_rows:
        _rms_norm_bwd_kernel[(P,)](dy, x2, w, rstd, dx, dw_part, dy.stride(0), x2.stride(0), dx.stride(0), n_rows,
                                   n_cols, offset, rows_per_program, BLOCK_SIZE=block_size(n_cols))
    return dx, dw_part.sum(0).to(w.dtype)


class RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, eps, offset):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if x2.stride(-1) != 1:
            x2 = x2.contiguous()
        w = w.contiguous()
        y, rstd = rms_norm_forward(x2, w, eps, offset)
        ctx.save_for_backward(x2, w, rstd)
        ctx.offset = offset
        return y.reshape(shape)

    @staticmethod
    def backward(ctx, dy):
        x2, w, rstd = ctx.saved_tensors
        dy2 = dy.reshape(-1, x2.shape[-1])
        if dy2.stride(-1) != 1:
            dy2 = dy2.contiguous()
        dx, dw = rms_norm_backward(dy2, x2, w, rstd, ctx.offset)
        return dx.reshape(dy.shape), dw, None, None


def rms_norm(x, weight, eps=1e-6, offset=0.0):
    return RMSNormFunction.apply(x, weight, float(eps), float(offset))
