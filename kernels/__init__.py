"""Hand-written Triton kernels for LLM training (Liger-Kernel chapter), shipped as `lipapers.kernels`.

Functional API: every op takes `backend`:
- "auto":   Triton when the tensors are on CUDA, PyTorch otherwise;
- "triton": the hand-written kernels (on CPU they run in the Triton interpreter, `TRITON_INTERPRET=1`,
            which is set automatically when no CUDA device exists, before the kernels are first imported);
- "torch":  readable PyTorch (`kernels/reference.py`); for the fused-linear losses a chunked
            implementation that never holds the (rows x vocab) logits, so the memory saving is real on CPU.

Inputs are never modified in place. Layers: `@triton.jit` kernel -> launcher -> `autograd.Function` ->
functional op here -> `nn.Module` in `kernels/modules.py` -> model patch in `kernels/patch.py`.
"""

import importlib
import os

import torch

from . import reference as _ref

__all__ = [
    "BACKENDS", "rms_norm", "layer_norm", "rope", "swiglu", "geglu", "cross_entropy", "fused_linear_cross_entropy",
    "jsd", "fused_linear_jsd", "flce_chunk_rows", "resolve_backend",
]

BACKENDS = ("auto", "triton", "torch")
REDUCTIONS = ("mean", "sum", "none")
TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
flce_chunk_rows = _ref.flce_chunk_rows


def resolve_backend(backend, *tensors):
    """Map "auto" to "triton" (all tensors on CUDA) or "torch"; validate the name."""
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not valid; choose one of {BACKENDS}")
    if backend == "auto":
        return "triton" if all(t.is_cuda for t in tensors if t is not None) else "torch"
    return backend


def _triton(name):
    """Import kernels/triton_<name>.py on first use; on a machine without CUDA switch Triton to its interpreter first.
    (The files carry a `triton_` prefix so that no submodule shadows the function of the same name in this package.)"""
    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
    return importlib.import_module(f"{__name__}.triton_{name}")


def _check_float(name, t, backend):
    if not torch.is_tensor(t):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    ok = TRITON_DTYPES if backend == "triton" else TRITON_DTYPES + (torch.float64,)
    if t.dtype not in ok:
        raise TypeError(f"{name} has dtype {t.dtype}; backend={backend!r} supports {ok}")


def _check_reduction(reduction):
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction={reduction!r} is not valid; choose one of {REDUCTIONS}")


def _check_target(target, n, name="target"):
    if not torch.is_tensor(target) or target.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{name} must be an int64/int32 tensor of class indices")
    if target.numel() != n:
        raise ValueError(f"{name} has {target.numel()} elements, expected {n} (one per row)")


# ---------------------------------------------------------------------------------------------------------


def rms_norm(x, weight, eps=1e-6, offset=0.0, backend="auto"):
    """RMSNorm over the last dim: x * rsqrt(mean(x^2) + eps) * (weight + offset) (offset 1 for Gemma)."""
    backend = resolve_backend(backend, x, weight)
    _check_float("x", x, backend), _check_float("weight", weight, backend)
    if weight.shape != (x.shape[-1],):
        raise ValueError(f"weight shape {tuple(weight.shape)} must be ({x.shape[-1]},) = x.shape[-1:]")
    if backend == "torch":
        return _ref.rms_norm(x, weight, eps, offset)
    return _triton("rms_norm").rms_norm(x, weight, eps, offset)


def layer_norm(x, weight, bias, eps=1e-5, backend="auto"):
    """LayerNorm over the last dim with affine weight and (optional, may be None) bias."""
    backend = resolve_backend(backend, x, weight, bias)
    _check_float("x", x, backend), _check_float("weight", weight, backend)
    if weight.shape != (x.shape[-1],) or (bias is not None and bias.shape != (x.shape[-1],)):
        raise ValueError(f"weight/bias must have shape ({x.shape[-1]},) = x.shape[-1:]")
    if backend == "torch":
        return _ref.layer_norm(x, weight, bias, eps)
    return _triton("layer_norm").layer_norm(x, weight, bias, eps)


def rope(q, k, cos, sin, backend="auto"):
    """Rotary embedding (HF rotate-half); q (B, Hq, T, D), k (B, Hk, T, D), cos/sin (T, D) or (B, T, D)."""
    backend = resolve_backend(backend, q, k, cos, sin)
    for n, t in (("q", q), ("k", k), ("cos", cos), ("sin", sin)):
        _check_float(n, t, backend)
    if q.ndim != 4 or k.ndim != 4:
        raise ValueError(f"q and k must be 4-D (batch, heads, seq, head_dim); got {q.ndim}-D and {k.ndim}-D")
    B, _, T, D = q.shape
    if k.shape[0] != B or k.shape[2:] != (T, D):
        raise ValueError(f"k shape {tuple(k.shape)} must match q {tuple(q.shape)} except in heads")
    if D % 2:
        raise ValueError(f"head_dim={D} must be even for rotate-half RoPE")
    if cos.shape != sin.shape or cos.shape not in ((T, D), (B, T, D), (1, T, D)):
        raise ValueError(f"cos/sin shape {tuple(cos.shape)} must be (T, D)=({T}, {D}) or (B, T, D)")
    if backend == "torch":
        return _ref.rope(q, k, cos, sin)
    return _triton("rope").rope(q, k, cos, sin)


def _check_glu(gate, up, backend):
    _check_float("gate", gate, backend), _check_float("up", up, backend)
    if gate.shape != up.shape:
        raise ValueError(f"gate {tuple(gate.shape)} and up {tuple(up.shape)} must have the same shape")


def swiglu(gate, up, backend="auto"):
    """silu(gate) * up (the Llama MLP activation)."""
    backend = resolve_backend(backend, gate, up)
    _check_glu(gate, up, backend)
    if backend == "torch":
        return _ref.swiglu(gate, up)
    return _triton("swiglu").swiglu(gate, up)


def geglu(gate, up, backend="auto"):
    """gelu_tanh(gate) * up (Gemma's MLP activation)."""
    backend = resolve_backend(backend, gate, up)
    _check_glu(gate, up, backend)
    if backend == "torch":
        return _ref.geglu(gate, up)
    return _triton("swiglu").geglu(gate, up)


def cross_entropy(logits, target, ignore_index=-100, label_smoothing=0.0, reduction="mean", backend="auto"):
    """Cross-entropy of (N, V) logits; like F.cross_entropy, except "mean" over zero valid rows gives 0, not NaN."""
    backend = resolve_backend(backend, logits)
    _check_float("logits", logits, backend), _check_reduction(reduction)
    if logits.ndim != 2:
        raise ValueError(f"logits must be 2-D (rows, vocab); got shape {tuple(logits.shape)}")
    _check_target(target, logits.shape[0])
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing={label_smoothing} must be in [0, 1]")
    if backend == "torch":
        return _ref.cross_entropy(logits, target, ignore_index, label_smoothing, reduction)
    return _triton("cross_entropy").cross_entropy(logits, target, ignore_index, label_smoothing, reduction)


def fused_linear_cross_entropy(x, weight, target, bias=None, ignore_index=-100, label_smoothing=0.0,
                               reduction="mean", backend="auto", chunk_rows=None):
    """CE(x @ weight.T + bias, target) chunked over rows: the (N, V) logits are never materialised.

    x (N, H) (leading dims are flattened), weight (V, H), target N ints. For "mean"/"sum" the gradients are
    computed during the forward pass, chunk by chunk; chunk rows = `flce_chunk_rows(N, H, V)` (~H, so one
    logits chunk is about the size of the weight; `chunk_rows` overrides it). "none" recomputes the chunks in
    backward.
    """
    backend = resolve_backend(backend, x, weight, bias)
    _check_float("x", x, backend), _check_float("weight", weight, backend), _check_reduction(reduction)
    if weight.ndim != 2 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"weight must be (V, H) with H = x.shape[-1]; got x {tuple(x.shape)}, weight {tuple(weight.shape)}")
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"bias shape {tuple(bias.shape)} must be ({weight.shape[0]},)")
    if x.dtype != weight.dtype:
        raise TypeError(f"x ({x.dtype}) and weight ({weight.dtype}) must have the same dtype")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing={label_smoothing} must be in [0, 1]")
    if chunk_rows is not None and (isinstance(chunk_rows, bool) or not isinstance(chunk_rows, int) or chunk_rows < 1):
        raise ValueError(f"chunk_rows={chunk_rows!r} must be None (our rule) or an int >= 1")
    x2 = x.reshape(-1, x.shape[-1])
    _check_target(target, x2.shape[0])
    target = target.reshape(-1)
    if backend == "torch":
        ce_chunk = _ref.ce_chunk_torch
    else:
        ce_chunk = _triton("fused_linear_cross_entropy").ce_chunk_triton
    out = _ref.fused_linear_cross_entropy(x2.contiguous(), weight.contiguous(), target, bias, ignore_index,
                                          label_smoothing, reduction, ce_chunk, chunk_rows)
    return out.reshape(x.shape[:-1]) if reduction == "none" else out


def jsd(input, target, label=None, beta=0.5, ignore_index=-100, backend="auto"):
    """Generalised JSD of student log-probs `input` and teacher log-probs `target`, both (N, V).

    M = beta P + (1 - beta) Q (P teacher, Q student); beta=0 is forward KL(P||Q), beta=1 reverse KL(Q||P).
    Summed over the vocab, averaged over rows with label != ignore_index (all rows when label is None).
    """
    backend = resolve_backend(backend, input, target)
    _check_float("input", input, backend), _check_float("target", target, backend)
    if input.ndim != 2 or input.shape != target.shape:
        raise ValueError(f"input {tuple(input.shape)} and target {tuple(target.shape)} must be equal (N, V)")
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta={beta} must be in [0, 1]")
    if label is not None:
        _check_target(label, input.shape[0], "label")
    if backend == "torch":
        return _ref.jsd(input, target, label, beta, ignore_index)
    return _triton("jsd").jsd(input, target, label, beta, ignore_index)


def fused_linear_jsd(student_input, student_weight, teacher_input, teacher_weight, label=None, beta=0.5,
                     ignore_index=-100, temperature=1.0, backend="auto"):
    """JSD(log_softmax(xs Ws^T / t), log_softmax(xt Wt^T / t)) chunked over rows; gradients for the student only."""
    backend = resolve_backend(backend, student_input, student_weight)
    for n, t in (("student_input", student_input), ("student_weight", student_weight),
                 ("teacher_input", teacher_input), ("teacher_weight", teacher_weight)):
        _check_float(n, t, backend)
    xs, xt = student_input.reshape(-1, student_input.shape[-1]), teacher_input.reshape(-1, teacher_input.shape[-1])
    if xs.shape[0] != xt.shape[0] or student_weight.shape[0] != teacher_weight.shape[0]:
        raise ValueError("student and teacher need the same number of rows and the same vocab size")
    if xs.shape[1] != student_weight.shape[1] or xt.shape[1] != teacher_weight.shape[1]:
        raise ValueError("each weight must be (V, H) with H = its input's last dim")
    if not 0.0 <= beta <= 1.0 or temperature <= 0:
        raise ValueError(f"beta={beta} must be in [0, 1] and temperature={temperature} > 0")
    if label is not None:
        _check_target(label, xs.shape[0], "label")
        label = label.reshape(-1)
    chunk = _ref.jsd_chunk_torch if backend == "torch" else _triton("jsd").jsd_chunk_triton
    return _ref.fused_linear_jsd(xs.contiguous(), student_weight, xt.contiguous(), teacher_weight, label, beta,
                                 ignore_index, temperature, chunk)


def __getattr__(name):
    # nn.Module drop-ins and model patches, imported on first access
    if name in ("RMSNorm", "LayerNorm", "SwiGLUMLP", "GEGLUMLP", "CrossEntropyLoss",
                "FusedLinearCrossEntropyLoss", "JSDLoss", "FusedLinearJSDLoss"):
        return getattr(importlib.import_module(f"{__name__}.modules"), name)
    if name in ("patch_llama", "unpatch_llama", "patch_lm", "unpatch_lm"):
        return getattr(importlib.import_module(f"{__name__}.patch"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
