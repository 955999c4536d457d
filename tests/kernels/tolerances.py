"""Per-dtype tolerances for the kernel tests, in one place, and the comparison helper.

Every kernel output/gradient is compared with the same op computed in float64 by the readable reference
(`lipapers.kernels.reference`, itself checked against torch.nn.functional / transformers). The bound is
|kernel - ref64| <= atol + rtol * |ref64| (torch.testing.assert_close).

- float32: all arithmetic is fp32 inside the kernels, so errors are a few ulps times the reduction length;
  1e-5 is ~80 ulp (2^-23 = 1.2e-7) relative, which covers row reductions over <= a few thousand elements.
- float16: inputs/outputs are rounded to fp16 (eps 2^-10 = 9.8e-4, so one rounding of an O(1..10) value is
  up to ~5e-3 absolute); the kernels compute in fp32, so 1e-2 is about two fp16 roundings of O(10) values.
- "matmul" (fused-linear losses) in float16: the GEMMs themselves run in fp16 on CPU (K = hidden terms),
  so their outputs carry ~sqrt(H) fp16 roundings: 3e-2.
bf16 is not tested on CPU: the Triton interpreter computes bf16 arithmetic wrongly (tests marked gpu).
"""

import torch

TOL = {
    ("elementwise", torch.float32): dict(atol=1e-5, rtol=1e-5),
    ("elementwise", torch.float16): dict(atol=1e-2, rtol=1e-2),
    ("elementwise", torch.bfloat16): dict(atol=6e-2, rtol=2e-2),
    ("matmul", torch.float32): dict(atol=1e-5, rtol=1e-5),
    ("matmul", torch.float16): dict(atol=3e-2, rtol=3e-2),
    ("matmul", torch.bfloat16): dict(atol=1e-1, rtol=5e-2),
}

CPU_DTYPES = [torch.float32, torch.float16]


def check(actual, expected64, dtype, kind="elementwise"):
    """assert_close of a kernel result (any dtype) against a float64 reference with the tolerance for dtype."""
    assert actual.dtype in (dtype, torch.float32), f"unexpected result dtype {actual.dtype} for input {dtype}"
    assert torch.isfinite(actual).all(), "non-finite values in kernel output"
    torch.testing.assert_close(actual.double(), expected64.double(), **TOL[(kind, dtype)])


def leaf(t, dtype, requires_grad=True):
    """A fresh leaf tensor of `dtype` from a float32 sample."""
    return t.to(dtype).detach().requires_grad_(requires_grad)


def as64(t):
    """The same values in float64 as a new leaf (grad enabled if t had it)."""
    return t.detach().double().requires_grad_(t.requires_grad)
