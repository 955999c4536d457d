"""RMSNorm: y = x * rstd * (w + offset), rstd = 1 / sqrt(mean(x^2) + eps), one row (or a tile of up to 16
short rows) per program in forward.

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
    return min(n_rows, 2)


@triton.jit
def _rms_norm_fwd_kernel(X, Y, W, RSTD, stride_x, stride_y, n_rows, n_cols, eps, offset, BLOCK_ROWS: tl.constexpr,
                         BLOCK_SIZE: tl.constexpr):
    # a (BLOCK_ROWS, BLOCK_SIZE) tile: several short rows per program
    rows = tl.program_id(0).to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)[:, None]
    cols = tl.arange(0, BLOCK_SIZE)[None, :]
    mask = (rows < n_rows) & (cols < n_cols)
    x = tl.load(X + rows * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(W + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
    mean_sq = tl.sum(x * x, axis=1) / n_cols
    rstd = 1.0 / tl.sqrt(mean_sq + eps)  # libdevice.rsqrt is a stub in the interpreter
    tl.store(RSTD + rows, rstd[:, None], mask=rows < n_rows)
    y = x * rstd[:, None] * (w + offset)
    tl.store(Y + rows * stride_y + cols, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _rms_norm_bwd_kernel(DY, X, W, RSTD, DX, DW_PART, stride_dy, stride_x, stride_dx, n_rows, n_cols, offset,
                         rows_per_program, BLOCK_ROWS: tl.constexpr, BLOCK_SIZE: tl.constexpr):
    # each program owns rows [pid * rows_per_program, ...) and walks them in (BLOCK_ROWS, BLOCK_SIZE) tiles,
    # accumulating its dw partial in fp32 registers
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_SIZE)[None, :]
    w = tl.load(W + cols, mask=cols < n_cols, other=0.0).to(tl.float32) + offset
    dw_acc = tl.zeros((BLOCK_SIZE,), dtype=tl.float32)
    row_start = pid * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, n_rows)
    for r0 in range(row_start, row_end, BLOCK_ROWS):
        rows = (r0 + tl.arange(0, BLOCK_ROWS)[:, None]).to(tl.int64)
        mask = (rows < row_end) & (cols < n_cols)
        dy = tl.load(DY + rows * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
        x = tl.load(X + rows * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + rows, mask=rows < row_end, other=0.0)
        dyw = dy * w
        dot = tl.sum(dyw * x, axis=1)[:, None]
        dx = rstd * (dyw - x * (rstd * rstd * dot / n_cols))
        tl.store(DX + rows * stride_dx + cols, dx.to(DX.dtype.element_ty), mask=mask)
        dw_acc += tl.sum(dy * x * rstd, axis=0)
    tl.store(DW_PART + pid * n_cols + tl.arange(0, BLOCK_SIZE), dw_acc, mask=tl.arange(0, BLOCK_SIZE) < n_cols)


def _block_rows(n_rows, bs):
    """Rows per tile: up to 16 short rows, keeping a tile <= 4096 elements."""
    return max(1, min(16, 4096 // bs, triton.next_power_of_2(max(n_rows, 1))))


def rms_norm_forward(x2, w, eps, offset):
    n_rows, n_cols = x2.shape
    y = torch.empty_like(x2)
    rstd = torch.empty(n_rows, dtype=torch.float32, device=x2.device)
    if n_rows:
        bs = block_size(n_cols)
        block_rows = _block_rows(n_rows, bs)
        _rms_norm_fwd_kernel[(triton.cdiv(n_rows, block_rows),)](x2, y, w, rstd, x2.stride(0), y.stride(0), n_rows,
                                                                 n_cols, eps, offset, BLOCK_ROWS=block_rows,
                                                                 BLOCK_SIZE=bs)
    return y, rstd


def rms_norm_backward(dy, x2, w, rstd, offset):
    n_rows, n_cols = x2.shape
    dx = torch.empty_like(x2)
    P = max(num_programs_for_dw(n_rows, x2.device), 1)
    rows_per_program = triton.cdiv(n_rows, P)
    dw_part = torch.zeros(P, n_cols, dtype=torch.float32, device=x2.device)
    if n_rows:
        bs = block_size(n_cols)
        _rms_norm_bwd_kernel[(P,)](dy, x2, w, rstd, dx, dw_part, dy.stride(0), x2.stride(0), dx.stride(0), n_rows,
                                   n_cols, offset, rows_per_program, BLOCK_ROWS=_block_rows(rows_per_program, bs),
                                   BLOCK_SIZE=bs)
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
