"""One-call, reversible patches that route a model's norms, RoPE, MLP activation and loss through
`lipapers.kernels`.

- `patch_llama(model, ...)` for a transformers `LlamaForCausalLM` (or its `LlamaModel`): RMSNorm and MLP
  forwards are replaced per instance (parameters and state_dict are untouched); RoPE is swapped in the
  `modeling_llama` module (it is a module-level function there, so this part is process-wide while any
  patched model exists); the causal-LM loss becomes the fused linear cross-entropy, which returns
  `logits=None` whenever `labels` are given (that is the point: no (B, T, V) logits).
- `unpatch_llama(model)` restores everything.
- `patch_lm(model)` / `unpatch_lm(model)` for `lipapers.lm.LM`, which already dispatches every op through
  `lipapers.kernels`: it switches `model.backend` to "triton" and back.
"""

import sys
import types

import torch

K = sys.modules[__package__]

_ROPE_STATE = {"count": 0, "orig": None}


def _rms_forward(self, hidden_states):
    return K.rms_norm(hidden_states, self.weight, self.variance_epsilon, 0.0, backend=self._lipapers_backend)


def _mlp_forward(self, x):
    act = K.geglu if self._lipapers_act == "geglu" else K.swiglu
    return self.down_proj(act(self.gate_proj(x), self.up_proj(x), backend=self._lipapers_backend))


def _make_rope(backend):
    def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1, **_):
        if unsqueeze_dim != 1:  # (B, T, H, D) layout: use the reference
            return _ROPE_STATE["orig"](q, k, cos, sin, unsqueeze_dim)
        return K.rope(q, k, cos.to(q.dtype), sin.to(q.dtype), backend=backend)

    return apply_rotary_pos_emb


def _causal_lm_forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                       inputs_embeds=None, labels=None, use_cache=None, logits_to_keep=0, **kwargs):
    if labels is None:
        return self._lipapers_orig_forward(input_ids=input_ids, attention_mask=attention_mask,
                                           position_ids=position_ids, past_key_values=past_key_values,
                                           inputs_embeds=inputs_embeds, use_cache=use_cache,
                                           logits_to_keep=logits_to_keep, **kwargs)
    from transformers.modeling_outputs import CausalLMOutputWithPast

    num_items = kwargs.pop("num_items_in_batch", None)
    shift_labels = kwargs.pop("shift_labels", None)
    out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                     past_key_values=past_key_values, inputs_embeds=inputs_embeds, use_cache=use_cache, **kwargs)
    h = out.last_hidden_state
    if shift_labels is None:  # same shift as transformers' ForCausalLMLoss: pad with -100, drop the first
        shift_labels = torch.nn.functional.pad(labels, (0, 1), value=-100)[..., 1:]
    head = self.lm_head
    red = "mean" if num_items is None else "sum"
    loss = K.fused_linear_cross_entropy(h.reshape(-1, h.shape[-1]), head.weight, shift_labels.reshape(-1).to(h.device),
                                        head.bias, ignore_index=-100, reduction=red, backend=self._lipapers_backend)
    if num_items is not None:
        loss = loss / (num_items.to(loss.device) if torch.is_tensor(num_items) else num_items)
    return CausalLMOutputWithPast(loss=loss, logits=None, past_key_values=out.past_key_values,
                                  hidden_states=out.hidden_states, attentions=out.attentions)


def patch_llama(model, rms_norm=True, rope=True, swiglu=True, fused_linear_cross_entropy=True, backend="auto"):
    """Route a transformers Llama model's ops through lipapers.kernels; returns the model. Undo with unpatch_llama."""
    from transformers.models.llama import modeling_llama as ml

    if backend not in K.BACKENDS:
        raise ValueError(f"backend={backend!r} is not valid; choose one of {K.BACKENDS}")
    if getattr(model, "_lipapers_patch", None):
        raise RuntimeError("model is already patched; call unpatch_llama(model) first")
    patched = {"modules": [], "rope": False, "loss": False}
    for m in model.modules():
        if rms_norm and isinstance(m, ml.LlamaRMSNorm):
            m._lipapers_backend = backend
            m.forward = types.MethodType(_rms_forward, m)
            patched["modules"].append(m)
        elif swiglu and isinstance(m, ml.LlamaMLP):
            act = m.config.hidden_act
            if act in ("silu", "swish"):
                m._lipapers_act = "swiglu"
            elif act in ("gelu_pytorch_tanh", "gelu_tanh"):
                m._lipapers_act = "geglu"
            else:
                continue  # unsupported activation: leave this MLP alone
            m._lipapers_backend = backend
            m.forward = types.MethodType(_mlp_forward, m)
            patched["modules"].append(m)
    if rope:
        if _ROPE_STATE["count"] == 0:
            _ROPE_STATE["orig"] = ml.apply_rotary_pos_emb
            ml.apply_rotary_pos_emb = _make_rope(backend)
        _ROPE_STATE["count"] += 1
        patched["rope"] = True
    if fused_linear_cross_entropy and isinstance(model, ml.LlamaForCausalLM):
        model._lipapers_backend = backend
        model._lipapers_orig_forward = model.forward
        model.forward = types.MethodType(_causal_lm_forward, model)
        patched["loss"] = True
    model._lipapers_patch = patched
    return model


def unpatch_llama(model):
    """Undo patch_llama (instance forwards removed, module-level RoPE restored when no patched model remains)."""
    from transformers.models.llama import modeling_llama as ml

    patched = getattr(model, "_lipapers_patch", None)
    if not patched:
        raise RuntimeError("model is not patched")
    for m in patched["modules"]:
        del m.forward
    if patched["rope"]:
        _ROPE_STATE["count"] -= 1
        if _ROPE_STATE["count"] == 0:
            ml.apply_rotary_pos_emb = _ROPE_STATE["orig"]
            _ROPE_STATE["orig"] = None
    if patched["loss"]:
        del model.forward
        del model._lipapers_orig_forward
    del model._lipapers_patch
    return model


def patch_lm(model, backend="triton"):
    """Make a lipapers.lm.LM run its ops on `backend` (it dispatches through lipapers.kernels); undo with unpatch_lm."""
    if getattr(model, "_lipapers_prev_backend", None) is not None:
        raise RuntimeError("model is already patched; call unpatch_lm(model) first")
    model._lipapers_prev_backend = model.backend
    model.backend = backend
    return model


def unpatch_lm(model):
    prev = getattr(model, "_lipapers_prev_backend", None)
    if prev is None:
        raise RuntimeError("model is not patched")
    model.backend = prev
    del model._lipapers_prev_backend
    return model
