"""nn.Module drop-ins over the functional API (each takes `backend="auto"|"triton"|"torch"`)."""

import torch
from torch import nn

import sys

K = sys.modules[__package__]  # the functional API (lipapers.kernels)


def _check(backend):
    if backend not in K.BACKENDS:
        raise ValueError(f"backend={backend!r} is not valid; choose one of {K.BACKENDS}")
    return backend


class RMSNorm(nn.Module):
    """RMSNorm with weight initialised to ones (offset=1 with zeros gives Gemma's parameterisation)."""

    def __init__(self, hidden_size, eps=1e-6, offset=0.0, backend="auto"):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size) - offset)
        self.eps, self.offset, self.backend = eps, offset, _check(backend)

    def forward(self, x):
        return K.rms_norm(x, self.weight, self.eps, self.offset, backend=self.backend)

    def extra_repr(self):
        return f"{self.weight.shape[0]}, eps={self.eps}, offset={self.offset}, backend={self.backend!r}"


class LayerNorm(nn.Module):
    def __init__(self, hidden_size, eps=1e-5, bias=True, backend="auto"):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.bias = nn.Parameter(torch.zeros(hidden_size)) if bias else None
        self.eps, self.backend = eps, _check(backend)

    def forward(self, x):
        return K.layer_norm(x, self.weight, self.bias, self.eps, backend=self.backend)


class SwiGLUMLP(nn.Module):
    """Llama MLP: down(silu(gate(x)) * up(x)), with the activation fused."""

    act = staticmethod(K.swiglu)

    def __init__(self, hidden_size, intermediate_size, bias=False, backend="auto"):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=bias)
        self.backend = _check(backend)

    def forward(self, x):
        return self.down_proj(type(self).act(self.gate_proj(x), self.up_proj(x), backend=self.backend))


class GEGLUMLP(SwiGLUMLP):
    """Gemma MLP: down(gelu_tanh(gate(x)) * up(x))."""

    act = staticmethod(K.geglu)


class CrossEntropyLoss(nn.Module):
    def __init__(self, ignore_index=-100, label_smoothing=0.0, reduction="mean", backend="auto"):
        super().__init__()
        self.ignore_index, self.label_smoothing, self.reduction = ignore_index, label_smoothing, reduction
        self.backend = _check(backend)

    def forward(self, logits, target):
        return K.cross_entropy(logits, target, self.ignore_index, self.label_smoothing, self.reduction, self.backend)


class FusedLinearCrossEntropyLoss(CrossEntropyLoss):
    """forward(x, weight, target, bias=None): CE of x @ weight.T + bias without materialising the logits."""

    def forward(self, x, weight, target, bias=None):
        return K.fused_linear_cross_entropy(x, weight, target, bias, self.ignore_index, self.label_smoothing,
                                            self.reduction, self.backend)


class JSDLoss(nn.Module):
    """forward(student_logprobs, teacher_logprobs, label=None): generalised JSD (beta=0 forward KL, 1 reverse KL)."""

    def __init__(self, beta=0.5, ignore_index=-100, backend="auto"):
        super().__init__()
        self.beta, self.ignore_index, self.backend = beta, ignore_index, _check(backend)

    def forward(self, input, target, label=None):
        return K.jsd(input, target, label, self.beta, self.ignore_index, self.backend)


class FusedLinearJSDLoss(JSDLoss):
    """forward(student_input, student_weight, teacher_input, teacher_weight, label=None)."""

    def __init__(self, beta=0.5, ignore_index=-100, temperature=1.0, backend="auto"):
        super().__init__(beta, ignore_index, backend)
        self.temperature = temperature

    def forward(self, student_input, student_weight, teacher_input, teacher_weight, label=None):
        return K.fused_linear_jsd(student_input, student_weight, teacher_input, teacher_weight, label, self.beta,
                                  self.ignore_index, self.temperature, self.backend)
