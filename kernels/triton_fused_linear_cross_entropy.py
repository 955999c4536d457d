"""Fused linear cross-entropy, Triton flavour: the chunk loop of `reference._flce_loop` (torch GEMMs, one
reused (chunk x V) logits buffer, gradients computed in forward) with the per-chunk loss + gradient done by
the Triton cross-entropy kernel, in place over the logits chunk.

Memory above inputs: dX (N H) + dW (V H, fp32 accumulator for half precision) + one chunk (c V), with
c = flce_chunk_rows(N, H, V) ~= H, so the chunk is about the size of the weight.
"""

import torch

from .triton_cross_entropy import ce_forward


def ce_chunk_triton(z, target, ignore_index, label_smoothing, scale, grad):
    """Same contract as `reference.ce_chunk_torch`: row losses; if grad, z <- dL/dz * scale in place."""
    if not torch.is_tensor(scale):
        scale = torch.full((z.shape[0],), float(scale), dtype=torch.float32, device=z.device)
    return ce_forward(z, target.contiguous(), ignore_index, label_smoothing, scale.float().contiguous(),
                      z if grad else None)
