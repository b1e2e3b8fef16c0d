"""The naive attention that tests and benchmarks compare against.

It materializes the (Sq, Sk) score matrix in the inputs' dtype, exactly as plain PyTorch
would, with the semantics of `fused_attn.attention`. Call it on float64 copies for a golden
result, or in the low precision dtype to see PyTorch's own rounding error.
"""
from __future__ import annotations

import torch

from fused_attn._checks import check_attention_inputs, check_attn_mask


def causal_mask(seq_q: int, seq_k: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Bool (Sq, Sk), True where query i may see key j: j <= i + Sk - Sq (bottom-right aligned)."""
    rows = torch.arange(seq_q, device=device)[:, None]
    cols = torch.arange(seq_k, device=device)[None, :]
    return cols <= rows + (seq_k - seq_q)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
              scale: float | None = None, return_lse: bool = False, attn_mask: torch.Tensor | None = None
              ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Naive attention. q (B, Hq, Sq, D), k (B, Hkv, Sk, D), v (B, Hkv, Sk, Dv) -> o (B, Hq, Sq, Dv),
    and lse (B, Hq, Sq) float32 (float64 for float64 inputs) when return_lse. `attn_mask` as in
    `fused_attn.attention` (bool: True attends; float: added to the scaled scores). Differentiable."""
    scale = check_attention_inputs(
        q, k, v, scale, allowed_dtypes=(torch.float16, torch.bfloat16, torch.float32, torch.float64),
        require_unit_stride=False)
    group = q.shape[1] // k.shape[1]
    if group > 1:
        k = k.repeat_interleave(group, dim=1)
        v = v.repeat_interleave(group, dim=1)
    seq_q, seq_k = q.shape[2], k.shape[2]
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    if causal:
        visible = causal_mask(seq_q, seq_k, q.device)
    else:
        visible = torch.ones(seq_q, seq_k, dtype=torch.bool, device=q.device)
    bias = check_attn_mask(attn_mask, q, k)
    if bias is not None and bias.dtype == torch.bool:
        visible = visible & bias
    elif bias is not None:
        scores = scores + bias.to(scores.dtype)
        visible = visible & (bias != float("-inf"))
    has_key = visible.any(dim=-1, keepdim=True)  # (Sq, 1), or (B, Hq, Sq, 1) with a mask
    # Rows with no visible key get finite scores so softmax and its gradient stay NaN-free,
    # then their probabilities are zeroed: the output is 0 and the lse is -inf.
    scores = scores.masked_fill(~visible, float("-inf")).masked_fill(~has_key, 0.0)
    probs = torch.softmax(scores, dim=-1).masked_fill(~has_key, 0.0)
    out = torch.matmul(probs.to(v.dtype), v)
    if not return_lse:
        return out
    lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    lse = torch.logsumexp(scores.to(lse_dtype), dim=-1).masked_fill(~has_key.squeeze(-1), float("-inf"))
    return out, lse
