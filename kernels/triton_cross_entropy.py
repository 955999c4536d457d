"""Cross-entropy with the gradient computed in the forward pass, one program per row, two passes over V.

Pass 1 (online softmax): running max m and sum d = sum exp(z - m) over vocab blocks (plus sum z for label
smoothing); lse = m + log d. Loss = (1 - eps)(lse - z_y) + eps (lse - mean z).
Pass 2: dL/dz = (softmax(z) - (1 - eps) onehot(y) - eps / V) * scale_row, written to G (which may alias Z:
the fused-linear loss overwrites its own logits chunk). Rows whose target is ignore_index get loss 0 and
gradient 0. Bytes per row: 2 reads of V logits + 1 write of V gradients (eager: ~5 passes and 2 extra
(N, V) buffers for log-softmax and its gradient).
"""

import torch
import triton
import triton.language as tl


def vocab_block(n_cols):
    """Vocab block width: whole row up to 4096 columns (fewer loop iterations; also far cheaper in the interpreter)."""
    return min(triton.next_power_of_2(max(n_cols, 1)), 4096)


@triton.jit
def _ce_kernel(Z, G, TARGET, SCALE, LOSS, stride_z, stride_g, n_cols, ignore_index, label_smoothing,
               COMPUTE_GRAD: tl.constexpr, SMOOTH: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    z_row = Z + row * stride_z
    g_row = G + row * stride_g
    y = tl.load(TARGET + row)
    cols0 = tl.arange(0, BLOCK)
    if y == ignore_index:
        tl.store(LOSS + row, 0.0)
        if COMPUTE_GRAD:
            for start in range(0, n_cols, BLOCK):
                cols = start + cols0
                tl.store(g_row + cols, tl.zeros((BLOCK,), dtype=tl.float32).to(G.dtype.element_ty),
                         mask=cols < n_cols)
    else:
        # pass 1: online log-sum-exp
        m = -float("inf")
        d = 0.0
        sum_z = 0.0
        for start in range(0, n_cols, BLOCK):
            cols = start + cols0
            z = tl.load(z_row + cols, mask=cols < n_cols, other=-float("inf")).to(tl.float32)
            m_new = tl.maximum(m, tl.max(z, axis=0))
            d = d * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), axis=0)
            m = m_new
            if SMOOTH:
                sum_z += tl.sum(tl.where(cols < n_cols, z, 0.0), axis=0)
        lse = m + tl.log(d)
        z_y = tl.load(z_row + y).to(tl.float32)
        loss = lse - z_y
        if SMOOTH:
            loss = (1.0 - label_smoothing) * loss + label_smoothing * (lse - sum_z / n_cols)
        tl.store(LOSS + row, loss)
        if COMPUTE_GRAD:
            # pass 2: gradient, scaled
            scale = tl.load(SCALE + row)
            for start in range(0, n_cols, BLOCK):
                cols = start + cols0
                mask = cols < n_cols
                z = tl.load(z_row + cols, mask=mask, other=0.0).to(tl.float32)
                g = tl.exp(z - lse)
                if SMOOTH:
                    g = g - label_smoothing / n_cols
                g = tl.where(cols == y, g - (1.0 - label_smoothing), g)
                tl.store(g_row + cols, (g * scale).to(G.dtype.element_ty), mask=mask)


def ce_forward(z, target, ignore_index, label_smoothing, scale, grad_out_buf):
    """Row losses (fp32) of logits z (N, V); if grad_out_buf is given, write dL/dz * scale into it.

    scale: (N,) fp32 tensor of per-row factors. grad_out_buf may be z itself (in place).
    """
    n_rows, n_cols = z.shape
    loss = torch.empty(n_rows, dtype=torch.float32, device=z.device)
    if n_rows == 0:
        return loss
    g = z if grad_out_buf is None else grad_out_buf
    _ce_kernel[(n_rows,)](
        z, g, target, scale, loss, z.stride(0), g.stride(0), n_cols, ignore_index, float(label_smoothing),
        COMPUTE_GRAD=grad_out_buf is not None, SMOOTH=label_smoothing > 0, BLOCK=vocab_block(n_cols),
    )
    return loss


class CrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, ignore_index, label_smoothing, reduction):
        z = logits if logits.stride(-1) == 1 else logits.contiguous()
        target = target.contiguous()
        n_valid = max(int((target != ignore_index).sum()), 1) if reduction == "mean" else 1
        scale = torch.full((z.shape[0],), 1.0 / n_valid, dtype=torch.float32, device=z.device)
        grad = torch.empty_like(z, memory_format=torch.contiguous_format) if logits.requires_grad else None
        loss = ce_forward(z, target, ignore_index, label_smoothing, scale, grad)
        ctx.save_for_backward(grad)
        ctx.reduction = reduction
        return loss if reduction == "none" else loss.sum() / n_valid

    @staticmethod
    def backward(ctx, grad_out):
        (grad,) = ctx.saved_tensors
        if ctx.reduction == "none":
            return grad * grad_out[:, None].to(grad.dtype), None, None, None, None
        if bool(grad_out == 1):
            return grad, None, None, None, None
        return grad * grad_out.to(grad.dtype), None, None, None, None


def cross_entropy(logits, target, ignore_index=-100, label_smoothing=0.0, reduction="mean"):
    return CrossEntropyFunction.apply(logits, target, ignore_index, float(label_smoothing), reduction)
