"""The naive attention that tests and benchmarks compare against.

It materializes the (Sq, Sk) score matrix in the inputs' dtype, exactly as plain PyTorch
would, with the semantics of `fused_attn.attention`. Call it on float64 copies for a golden
result, or in the low precision dtype to see PyTorch's own rounding error.
"""
from __future__ import annotations

import torch

from fused_attn._checks import check_attention_inputs, check_attn_mask, check_window


def causal_mask(seq_q: int, seq_k: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Bool (Sq, Sk), True where query i may see key j: j <= i + Sk - Sq (bottom-right aligned)."""
    return window_mask(seq_q, seq_k, (-1, 0), device)


def window_mask(seq_q: int, seq_k: int, window: tuple[int, int],
                device: torch.device | str | None = None) -> torch.Tensor:
    """Bool (Sq, Sk), True where query i may see key j under window (left, right), -1 unbounded:
    i + Sk - Sq - left <= j <= i + Sk - Sq + right (bottom-right aligned)."""
    left, right = window
    offset = _diagonal_offset(seq_q, seq_k, device)  # j - (i + Sk - Sq)
    visible = torch.ones(seq_q, seq_k, dtype=torch.bool, device=device)
    if right >= 0:
        visible &= offset <= right
    if left >= 0:
        visible &= offset >= -left
    return visible


def _diagonal_offset(seq_q: int, seq_k: int, device: torch.device | str | None) -> torch.Tensor:
    rows = torch.arange(seq_q, device=device)[:, None]
    cols = torch.arange(seq_k, device=device)[None, :]
    return cols - (rows + seq_k - seq_q)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
              scale: float | None = None, return_lse: bool = False, attn_mask: torch.Tensor | None = None,
              window: tuple[int, int] | None = None, alibi_slopes: torch.Tensor | None = None,
              softcap: float = 0.0, dropout_p: float = 0.0, dropout_mask: torch.Tensor | None = None,
              sinks: torch.Tensor | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Naive attention. q (B, Hq, Sq, D), k (B, Hkv, Sk, D), v (B, Hkv, Sk, Dv) -> o (B, Hq, Sq, Dv),
    and lse (B, Hq, Sq) float32 (float64 for float64 inputs) when return_lse. `attn_mask`, `window`,
    `alibi_slopes`, `softcap` and `sinks` as in `fused_attn.attention` (a sink is one more score
    column holding the sink logit, softmaxed with the keys and then dropped). Dropout needs its mask given:
    `dropout_mask` bool, broadcastable to (B, Hq, Sq, Sk) (True keeps), applied with `dropout_p`'s
    1 / (1 - p) scaling (`fused_attn.dropout_mask` gives the kernels' mask). Differentiable."""
    scale = check_attention_inputs(
        q, k, v, scale, allowed_dtypes=(torch.float16, torch.bfloat16, torch.float32, torch.float64),
        require_unit_stride=False)
    group = q.shape[1] // k.shape[1]
    if group > 1:
        k = k.repeat_interleave(group, dim=1)
        v = v.repeat_interleave(group, dim=1)
    seq_q, seq_k = q.shape[2], k.shape[2]
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    if softcap > 0:
        scores = softcap * torch.tanh(scores / softcap)
    if alibi_slopes is not None:
        slopes = alibi_slopes.to(scores.dtype)
        slopes = slopes[None, :, None, None] if slopes.dim() == 1 else slopes[:, :, None, None]
        scores = scores - slopes * _diagonal_offset(seq_q, seq_k, q.device).abs().to(scores.dtype)
    visible = window_mask(seq_q, seq_k, check_window(window, causal), q.device)
    bias = check_attn_mask(attn_mask, q, k)
    if bias is not None and bias.dtype == torch.bool:
        visible = visible & bias
    elif bias is not None:
        scores = scores + bias.to(scores.dtype)
        visible = visible & (bias != float("-inf"))
    if sinks is not None:  # the sink column: visible unless its logit is -inf, never dropped out
        batch, heads_q = q.shape[0], q.shape[1]
        sink_column = sinks.to(scores.dtype)[None, :, None, None].expand(batch, heads_q, seq_q, 1)
        scores = torch.cat([scores.expand(batch, heads_q, seq_q, seq_k), sink_column], dim=-1)
        visible = torch.cat([visible.expand(batch, heads_q, seq_q, seq_k), sink_column != float("-inf")], dim=-1)
    has_key = visible.any(dim=-1, keepdim=True)  # (Sq, 1), or (B, Hq, Sq, 1) with a mask
    # Rows with no visible key get finite scores so softmax and its gradient stay NaN-free,
    # then their probabilities are zeroed: the output is 0 and the lse is -inf.
    scores = scores.masked_fill(~visible, float("-inf")).masked_fill(~has_key, 0.0)
    probs = torch.softmax(scores, dim=-1).masked_fill(~has_key, 0.0)
    if sinks is not None:
        probs = probs[..., :seq_k]
    if dropout_p > 0:
        if dropout_mask is None:
            raise ValueError("dropout_p > 0 needs dropout_mask (True keeps); fused_attn.dropout_mask gives the kernels'")
        probs = probs.masked_fill(~dropout_mask, 0.0) / (1.0 - dropout_p)
    out = torch.matmul(probs.to(v.dtype), v)
    if not return_lse:
        return out
    lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    lse = torch.logsumexp(scores.to(lse_dtype), dim=-1).masked_fill(~has_key.squeeze(-1), float("-inf"))
    return out, lse


def attention_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                     cu_seqlens_k: torch.Tensor, *, return_lse: bool = False,
                     alibi_slopes: torch.Tensor | None = None, dropout_mask: torch.Tensor | None = None,
                     **kwargs: object) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Naive packed attention: `attention` on each sequence in turn. q (total_q, Hq, D), k, v
    (total_k, Hkv, D/Dv) -> o (total_q, Hq, Dv), and lse (Hq, total_q) with return_lse.
    alibi_slopes (Hq,) or (num_seqs, Hq); dropout_mask (num_seqs, Hq, max_q, max_k) as
    `fused_attn.dropout_mask` gives it; other keywords as in `attention`."""
    bounds_q, bounds_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    outs, lses = [], []
    for seq, (q0, q1, k0, k1) in enumerate(zip(bounds_q[:-1], bounds_q[1:], bounds_k[:-1], bounds_k[1:])):
        one = [t[None].transpose(1, 2) for t in (q[q0:q1], k[k0:k1], v[k0:k1])]
        slopes = alibi_slopes if alibi_slopes is None or alibi_slopes.dim() == 1 else alibi_slopes[seq]
        mask = None if dropout_mask is None else dropout_mask[seq:seq + 1, :, :q1 - q0, :k1 - k0]
        out, lse = attention(*one, return_lse=True, alibi_slopes=slopes, dropout_mask=mask, **kwargs)  # type: ignore[arg-type]
        outs.append(out[0].transpose(0, 1))
        lses.append(lse[0])
    out, lse = torch.cat(outs), torch.cat(lses, dim=1)
    return (out, lse) if return_lse else out
