"""Readable PyTorch implementations of every op (the `backend="torch"` path of `lipapers.kernels`).

The elementwise/row-wise ops are plain eager PyTorch (autograd does the backward). The two fused-linear
losses are chunked `torch.autograd.Function`s that compute the gradients inside the forward pass, one
row-chunk at a time, so the full (rows x vocab) logits never exist; they give the memory saving on CPU too.
The chunk loop is shared with the Triton backend, which only swaps the per-chunk loss kernel.
"""

import math

import torch
import torch.nn.functional as F

# --------------------------------------------------------------------------------------------------------
# Norms, RoPE, gated activations


def rms_norm(x, weight, eps=1e-6, offset=0.0):
    """y = x / sqrt(mean(x^2) + eps) * (weight + offset), computed in fp32 and cast back to x.dtype."""
    xf = x.float()
    rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (xf * rstd * (weight.float() + offset)).to(x.dtype)


def layer_norm(x, weight, bias, eps=1e-5):
    """Standard LayerNorm over the last dim, computed in fp32 and cast back to x.dtype."""
    xf = x.float()
    b = None if bias is None else bias.float()
    return F.layer_norm(xf, (x.shape[-1],), weight.float(), b, eps).to(x.dtype)


def rotate_half(x):
    """HF convention: [x1, x2] -> [-x2, x1] on the last dim."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rope(q, k, cos, sin):
    """Rotary embedding, HF layout: q (B, Hq, T, D), k (B, Hk, T, D), cos/sin (T, D) or (B, T, D)."""
    cos, sin = cos.unsqueeze(-3), sin.unsqueeze(-3)  # broadcast over heads
    q_rot = (q.float() * cos + rotate_half(q.float()) * sin).to(q.dtype)
    k_rot = (k.float() * cos + rotate_half(k.float()) * sin).to(k.dtype)
    return q_rot, k_rot


def swiglu(gate, up):
    """silu(gate) * up, in fp32, cast back."""
    return (F.silu(gate.float()) * up.float()).to(gate.dtype)


def geglu(gate, up):
    """gelu_tanh(gate) * up, in fp32, cast back."""
    return (F.gelu(gate.float(), approximate="tanh") * up.float()).to(gate.dtype)


# --------------------------------------------------------------------------------------------------------
# Cross-entropy


def _normalizer(target, ignore_index, reduction):
    """Divisor of the summed loss: number of non-ignored rows for "mean" (at least 1, so all-ignored gives 0)."""
    if reduction != "mean":
        return 1.0
    return max(int((target != ignore_index).sum()), 1)


def cross_entropy(logits, target, ignore_index=-100, label_smoothing=0.0, reduction="mean"):
    """F.cross_entropy in fp32, except that "mean" over zero non-ignored rows returns 0 instead of NaN."""
    loss = F.cross_entropy(
        logits.float(), target, ignore_index=ignore_index, label_smoothing=label_smoothing, reduction="none"
    )
    if reduction == "none":
        return loss
    total = loss.sum()
    return total / _normalizer(target, ignore_index, reduction)


def ce_chunk_torch(z, target, ignore_index, label_smoothing, scale, grad):
    """Loss of each row of one logits chunk `z` (c, V); if `grad`, overwrite `z` with dloss/dz * scale.

    scale: a float, or a (c,) tensor of per-row factors. Loss is returned unscaled in fp32, shape (c,).
    Ignored rows get loss 0 and gradient 0. Works in place on `z` (the caller owns it), so no second
    (c, V) buffer is ever allocated for fp32 logits.
    """
    V = z.shape[-1]
    zf = z if z.dtype in (torch.float32, torch.float64) else z.float()
    valid = target != ignore_index
    tgt = torch.where(valid, target, 0)
    z_y = zf.gather(1, tgt[:, None]).squeeze(1)
    mean_z = zf.mean(-1) if label_smoothing > 0 else None
    m = zf.amax(-1)
    zf.sub_(m[:, None]).exp_()  # zf = exp(z - max), in place
    s = zf.sum(-1)
    lse = m + s.log()
    loss = lse - z_y
    if label_smoothing > 0:
        loss = (1 - label_smoothing) * loss + label_smoothing * (lse - mean_z)
    loss = torch.where(valid, loss, 0.0)
    if grad:
        # dL/dz = softmax(z) - (1-eps) onehot - eps/V, zero on ignored rows, times scale; all in place
        r = valid.to(zf.dtype) * (scale if torch.is_tensor(scale) else float(scale))
        zf.mul_((r / s)[:, None])
        if label_smoothing > 0:
            zf.sub_((r * (label_smoothing / V))[:, None])
        zf.scatter_add_(1, tgt[:, None], (-(1 - label_smoothing) * r)[:, None])
        if zf is not z:
            z.copy_(zf)
    return loss


# --------------------------------------------------------------------------------------------------------
# Fused linear cross-entropy (chunked)


def flce_chunk_rows(n_rows, hidden, vocab, min_rows=512):
    """Rows per chunk: c = max(H rounded up to a multiple of 64, min_rows), capped at n_rows.

    With c ~= H the (c x V) logits chunk is about as large as the (V x H) weight, so the memory above the inputs is
    dX (N H) + dW (V H) + one chunk (~V H): about twice the unavoidable gradients, independent of N.
    The floor of 512 rows keeps the GEMMs and the row-wise passes efficient when H is small: measured on the
    2-core CPU (N=1024, H=128, V=8192, fp32, fwd+bwd, median of 15 interleaved repeats, time / naive):
    c=128: 2.28x, 256: 1.41x, 512: 0.91x, 1024: 0.80x. (Liger uses c ~= N H / V, ~32 thin chunks.)
    """
    rows = max(min_rows, 64 * math.ceil(hidden / 64))
    return max(1, min(n_rows, rows))


def _flce_loop(x, weight, target, bias, ignore_index, label_smoothing, reduction, ce_chunk, need_grad,
               grad_scale=None, chunk_rows=None):
    """The chunk loop shared by the torch and Triton FLCE. Returns (loss_rows fp32 (N,), dx, dw, db).

    grad_scale: None (use 1/n_valid for "mean", 1 for "sum") or a (N,) tensor of per-row upstream grads.
    """
    N, H = x.shape
    V = weight.shape[0]
    c = chunk_rows or flce_chunk_rows(N, H, V)
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32  # loss and dW/db accumulation dtype
    loss_rows = torch.empty(N, dtype=acc, device=x.device)
    dx = torch.empty_like(x) if need_grad[0] else None
    dw = torch.zeros(V, H, dtype=acc, device=x.device) if need_grad[1] else None
    db = torch.zeros(V, dtype=acc, device=x.device) if (bias is not None and need_grad[2]) else None
    any_grad = any(g is not None for g in (dx, dw, db))
    scale = 1.0 / _normalizer(target, ignore_index, reduction) if grad_scale is None else None
    z = torch.empty(min(c, N), V, dtype=x.dtype, device=x.device)  # one logits buffer, reused
    for s in range(0, N, c):
        e = min(s + c, N)
        xc, zc = x[s:e], z[: e - s]
        if bias is None:
            torch.mm(xc, weight.t(), out=zc)
        else:
            torch.addmm(bias, xc, weight.t(), out=zc)
        sc = scale if grad_scale is None else grad_scale[s:e].to(acc)
        loss_rows[s:e] = ce_chunk(zc, target[s:e], ignore_index, label_smoothing, sc, any_grad)
        if not any_grad:
            continue
        if dx is not None:
            torch.mm(zc, weight, out=dx[s:e])  # dX_c = dZ_c W
        if dw is not None:
            if acc == zc.dtype:
                dw.addmm_(zc.t(), xc)  # dW += dZ_c^T X_c
            else:
                dw.add_(torch.mm(zc.t(), xc).to(acc))
        if db is not None:
            db.add_(zc.to(acc).sum(0))
    return loss_rows, dx, dw, db


def _reduce(loss_rows, target, ignore_index, reduction):
    if reduction == "none":
        return loss_rows
    return loss_rows.sum() / _normalizer(target, ignore_index, reduction)


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """CE(x W^T + b, target) without materialising the logits; gradients computed in forward for mean/sum."""

    @staticmethod
    def forward(ctx, x, weight, target, bias, ignore_index, label_smoothing, reduction, ce_chunk, chunk_rows=None):
        need = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[3])
        eager = reduction != "none"
        loss_rows, dx, dw, db = _flce_loop(
            x, weight, target, bias, ignore_index, label_smoothing, reduction, ce_chunk,
            need if eager else (False, False, False), chunk_rows=chunk_rows,
        )
        ctx.reduction, ctx.args, ctx.need = reduction, (ignore_index, label_smoothing, ce_chunk), need
        ctx.chunk_rows = chunk_rows
        ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)
        if eager:
            ctx.save_for_backward(dx, dw, db)
        else:  # per-row upstream grads must enter dZ before the dW GEMM: recompute in backward
            ctx.save_for_backward(x, weight, target, bias)
        return _reduce(loss_rows, target, ignore_index, reduction)

    @staticmethod
    def backward(ctx, grad_out):
        if ctx.reduction != "none":
            dx, dw, db = ctx.saved_tensors
            if not bool(grad_out == 1):  # loss.backward() passes 1: return the saved grads without a copy
                dx, dw, db = (None if t is None else t * grad_out.to(t.dtype) for t in (dx, dw, db))
        else:
            x, weight, target, bias = ctx.saved_tensors
            ignore_index, label_smoothing, ce_chunk = ctx.args
            _, dx, dw, db = _flce_loop(
                x, weight, target, bias, ignore_index, label_smoothing, "none", ce_chunk, ctx.need,
                grad_scale=grad_out, chunk_rows=ctx.chunk_rows,
            )
        w_dtype, b_dtype = ctx.dtypes
        dw = dw if dw is None or dw.dtype == w_dtype else dw.to(w_dtype)
        db = db if db is None or db.dtype == b_dtype else db.to(b_dtype)
        return dx, dw, None, db, None, None, None, None, None


def fused_linear_cross_entropy(x, weight, target, bias=None, ignore_index=-100, label_smoothing=0.0,
                               reduction="mean", ce_chunk=ce_chunk_torch, chunk_rows=None):
    """Chunked CE(x @ weight.T + bias, target); x (N, H), weight (V, H), target (N,); chunk_rows None = our rule."""
    return ChunkedLinearCrossEntropy.apply(x, weight, target, bias, ignore_index, label_smoothing, reduction,
                                           ce_chunk, chunk_rows)


# --------------------------------------------------------------------------------------------------------
# Generalised Jensen-Shannon divergence (distillation)


def jsd(input, target, label=None, beta=0.5, ignore_index=-100):
    """Generalised JSD between student log-probs `input` (N, V) and teacher log-probs `target` (N, V).

    M = beta P + (1 - beta) Q with P = exp(target) (teacher), Q = exp(input) (student);
    JSD_beta = beta KL(P || M) + (1 - beta) KL(Q || M). Endpoints (Liger/GKD convention):
    beta = 0 -> forward KL(P || Q), beta = 1 -> reverse KL(Q || P). Summed over V, averaged over the rows
    whose `label` != ignore_index (all rows if label is None; 0 if none is valid).
    """
    dt = torch.float64 if input.dtype == torch.float64 else torch.float32
    x, y = input.to(dt), target.to(dt)
    if beta == 0.0:
        rows = (y.exp() * (y - x)).sum(-1)
    elif beta == 1.0:
        rows = (x.exp() * (x - y)).sum(-1)
    else:
        p, q = y.exp(), x.exp()
        log_m = torch.log(beta * p + (1 - beta) * q)
        rows = beta * (p * (y - log_m)).sum(-1) + (1 - beta) * (q * (x - log_m)).sum(-1)
    if label is None:
        return rows.sum() / max(rows.shape[0], 1)
    valid = label != ignore_index
    return torch.where(valid, rows, 0.0).sum() / max(int(valid.sum()), 1)


def jsd_chunk_torch(x, y, label, beta, ignore_index, scale):
    """Row losses (fp32, unscaled) and dloss/dx * scale for one chunk of student log-probs x, teacher y.

    dX = (1 - beta) Q (X - log M) for 0 < beta < 1; -P for beta = 0; Q (X - Y + 1) for beta = 1.
    """
    dt = torch.float64 if x.dtype == torch.float64 else torch.float32
    x, y = x.to(dt), y.to(dt)
    if beta == 0.0:
        p = y.exp()
        rows, g = (p * (y - x)).sum(-1), -p
    elif beta == 1.0:
        q = x.exp()
        rows, g = (q * (x - y)).sum(-1), q * (x - y + 1)
    else:
        p, q = y.exp(), x.exp()
        log_m = torch.log(beta * p + (1 - beta) * q)
        rows = beta * (p * (y - log_m)).sum(-1) + (1 - beta) * (q * (x - log_m)).sum(-1)
        g = (1 - beta) * q * (x - log_m)
    if label is not None:
        valid = (label != ignore_index).to(dt)
        rows, g = rows * valid, g * valid[:, None]
    return rows, g * scale


class ChunkedLinearJSD(torch.autograd.Function):
    """JSD(log_softmax(x_s W_s^T / T), log_softmax(x_t W_t^T / T)) chunked over rows, grads in forward."""

    @staticmethod
    def forward(ctx, xs, ws, xt, wt, label, beta, ignore_index, temperature, jsd_chunk):
        N, H = xs.shape
        V = ws.shape[0]
        c = flce_chunk_rows(N, H, V)
        n = N if label is None else max(int((label != ignore_index).sum()), 1)
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        dx = torch.empty_like(xs) if need_x else None
        dt = torch.float64 if xs.dtype == torch.float64 else torch.float32  # accumulation dtype
        dw = torch.zeros(V, H, dtype=dt, device=xs.device) if need_w else None
        total = torch.zeros((), dtype=dt, device=xs.device)
        for s in range(0, N, c):
            e = min(s + c, N)
            zs = (xs[s:e] @ ws.t()).to(dt) / temperature
            zt = (xt[s:e] @ wt.t()).to(dt) / temperature
            logq = torch.log_softmax(zs, -1)
            logp = torch.log_softmax(zt, -1)
            lab = None if label is None else label[s:e]
            rows, g = jsd_chunk(logq, logp, lab, beta, ignore_index, 1.0 / n)
            total += rows.sum()
            if dx is None and dw is None:
                continue
            # through log_softmax: dz = g - softmax(z) * sum(g); then through / T
            gz = (g - logq.exp() * g.sum(-1, keepdim=True)) / temperature
            gz = gz.to(xs.dtype)
            if dx is not None:
                torch.mm(gz, ws, out=dx[s:e])
            if dw is not None:
                dw.add_((gz.t() @ xs[s:e]).to(dt))
        ctx.save_for_backward(dx, None if dw is None else dw.to(ws.dtype))
        return total / n

    @staticmethod
    def backward(ctx, grad_out):
        dx, dw = ctx.saved_tensors
        if not bool(grad_out == 1):
            dx = None if dx is None else dx * grad_out.to(dx.dtype)
            dw = None if dw is None else dw * grad_out.to(dw.dtype)
        return dx, dw, None, None, None, None, None, None, None


def fused_linear_jsd(student_input, student_weight, teacher_input, teacher_weight, label=None, beta=0.5,
                     ignore_index=-100, temperature=1.0, jsd_chunk=jsd_chunk_torch):
    """Chunked distillation loss; the teacher side gets no gradient."""
    return ChunkedLinearJSD.apply(
        student_input, student_weight, teacher_input.detach(), teacher_weight.detach(), label, beta,
        ignore_index, temperature, jsd_chunk,
    )
