"""Gated activations on flat blocks: SwiGLU c = silu(a) * b and GeGLU c = gelu_tanh(a) * b.

Forward reads a, b and writes c (3 passes over N*I elements instead of eager's 5: silu(a) is never stored).
Backward recomputes the activation from a instead of saving it:
    SwiGLU: da = dc * b * s * (1 + a (1 - s)),  s = sigmoid(a);    db = dc * silu(a)
    GeGLU:  u = k (a + 0.044715 a^3), t = tanh(u), k = sqrt(2/pi)
            da = dc * b * (0.5 (1 + t) + 0.5 a (1 - t^2) k (1 + 3 * 0.044715 a^2));  db = dc * gelu_tanh(a)
Outputs are new tensors (inputs are not overwritten). tanh is written via exp: the libdevice tanh is a stub
in the Triton interpreter.
"""

import torch
import triton
import triton.language as tl

BLOCK_SIZE = 1024  # elements per program; the interpreter's cost grows with the number of programs


@triton.jit
def _tanh(u):
    # tanh(|u|) = (1 - e) / (1 + e), e = exp(-2|u|) in (0, 1]: no overflow; odd symmetry for the sign
    e = tl.exp(-2.0 * tl.abs(u))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(u >= 0, t, -t)


@triton.jit
def _glu_fwd_kernel(A, B, C, n, GELU: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    a = tl.load(A + offs, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(B + offs, mask=mask, other=0.0).to(tl.float32)
    if GELU:
        act = 0.5 * a * (1.0 + _tanh(0.7978845608028654 * (a + 0.044715 * a * a * a)))
    else:
        act = a * tl.sigmoid(a)
    tl.store(C + offs, (act * b).to(C.dtype.element_ty), mask=mask)


@triton.jit
def _glu_bwd_kernel(DC, A, B, DA, DB, n, GELU: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    dc = tl.load(DC + offs, mask=mask, other=0.0).to(tl.float32)
    a = tl.load(A + offs, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(B + offs, mask=mask, other=0.0).to(tl.float32)
    if GELU:
        k = 0.7978845608028654
        t = _tanh(k * (a + 0.044715 * a * a * a))
        act = 0.5 * a * (1.0 + t)
        dact = 0.5 * (1.0 + t) + 0.5 * a * (1.0 - t * t) * k * (1.0 + 3.0 * 0.044715 * a * a)
    else:
        s = tl.sigmoid(a)
        act = a * s
        dact = s * (1.0 + a * (1.0 - s))
    tl.store(DA + offs, (dc * b * dact).to(DA.dtype.element_ty), mask=mask)
    tl.store(DB + offs, (dc * act).to(DB.dtype.element_ty), mask=mask)


class GLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b, gelu):
        a, b = a.contiguous(), b.contiguous()
        c = torch.empty_like(a)
        n = a.numel()
        if n:
            _glu_fwd_kernel[(triton.cdiv(n, BLOCK_SIZE),)](a, b, c, n, GELU=gelu, BLOCK=BLOCK_SIZE)
        ctx.save_for_backward(a, b)
        ctx.gelu = gelu
        return c

    @staticmethod
    def backward(ctx, dc):
        a, b = ctx.saved_tensors
        dc = dc.contiguous()
        da, db = torch.empty_like(a), torch.empty_like(b)
        n = a.numel()
        if n:
            _glu_bwd_kernel[(triton.cdiv(n, BLOCK_SIZE),)](dc, a, b, da, db, n, GELU=ctx.gelu, BLOCK=BLOCK_SIZE)
        return da, db, None


def swiglu(gate, up):
    return GLUFunction.apply(gate, up, False)


def geglu(gate, up):
    return GLUFunction.apply(gate, up, True)
