"""Where attention goes, without materializing all of S x S.

`attention_probs` recomputes the exact normalized probabilities of chosen query rows and heads
from the lse that `fused_attn.attention(..., return_lse=True)` returns; `attention_stats` gives,
in O(S) memory, the attention each key receives (column sums), and each query's entropy and
largest probability. Both run Triton kernels that share the forward's score code, so every
option that changes the scores (causal, window, ALiBi, softcap, attn_mask) means the same here.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from fused_attn import _launch
from fused_attn._checks import (check_alibi_slopes, check_attention_inputs, check_attn_mask, check_flag,
                                check_softcap, check_window)
from fused_attn._launch import check_device


@dataclass(frozen=True)
class AttentionStats:
    """Per query (B, Hq, Sq): lse, entropy (nats) and max_prob; per key (B, Hq, Sk): received, the
    sum over queries of the probability each query gives it (a query's row sums to 1, so received
    sums to the number of queries that see a key). float32. Rows with no visible key have lse
    -inf, entropy 0 and max_prob 0."""
    lse: torch.Tensor
    entropy: torch.Tensor
    max_prob: torch.Tensor
    received: torch.Tensor


def _params(q: torch.Tensor, k: torch.Tensor, causal: bool, scale: float | None, window: tuple[int, int] | None,
             alibi_slopes: torch.Tensor | None, softcap: float, attn_mask: torch.Tensor | None) -> _launch.AttentionParams:
    check_flag("causal", causal)
    # v is not needed: k stands in so the shared checks see a full (q, k, v) triple.
    scale = check_attention_inputs(q, k, k, scale)
    bias = check_attn_mask(attn_mask, q, k)
    window_left, window_right = check_window(window, causal)
    slopes = check_alibi_slopes(alibi_slopes, q.shape[0], q.shape[1], q.device)
    check_device(q)
    return _launch.AttentionParams(scale=scale, window_left=window_left, window_right=window_right,
                                   softcap=check_softcap(softcap, scale), bias=bias, alibi_slopes=slopes)


def _indices(name: str, value: torch.Tensor | Sequence[int] | range | None, size: int, device: torch.device
             ) -> torch.Tensor:
    """int32 indices into a dimension of `size` on `device` (all of them for None)."""
    if value is None:
        return torch.arange(size, dtype=torch.int32, device=device)
    if isinstance(value, torch.Tensor):
        if value.dtype.is_floating_point or value.dtype == torch.bool or value.dim() != 1:
            raise TypeError(f"{name} must be a 1-D integer tensor or a sequence of ints, got "
                            f"{str(value.dtype).replace('torch.', '')} of shape {tuple(value.shape)}")
        indices = value.tolist()
    else:
        iterable = hasattr(value, "__iter__") and not isinstance(value, (str, bytes))
        if not iterable or not all(isinstance(i, int) and not isinstance(i, bool) for i in value):
            raise TypeError(f"{name} must be a 1-D integer tensor or a sequence of ints, got {value!r}")
        indices = list(value)
    bad = [i for i in indices if not -size <= i < size]
    if bad:
        raise ValueError(f"{name} must index a dimension of size {size}, got {bad[:5]}")
    return torch.tensor([i % size for i in indices], dtype=torch.int32, device=device)


def attention_probs(q: torch.Tensor, k: torch.Tensor, lse: torch.Tensor, *, causal: bool = False,
                    scale: float | None = None, rows: torch.Tensor | Sequence[int] | None = None,
                    heads: torch.Tensor | Sequence[int] | None = None, window: tuple[int, int] | None = None,
                    alibi_slopes: torch.Tensor | None = None, softcap: float = 0.0,
                    attn_mask: torch.Tensor | None = None) -> torch.Tensor:
    """The exact softmax probabilities of chosen query rows and heads, float32
    (B, len(heads), len(rows), Sk), from the lse of the forward: a slice of a 64k-token attention
    map costs len(rows) x Sk, not Sk x Sk.

    Args:
        q: (B, Hq, Sq, D), k: (B, Hkv, Sk, D), as given to `fused_attn.attention`.
        lse: (B, Hq, Sq) from `fused_attn.attention(q, k, v, ..., return_lse=True)` with the same
            options (the probabilities are exp(score - lse)).
        rows: query indices (default all); heads: query-head indices (default all). Negative
            indices count from the end.
        causal, scale, window, alibi_slopes, softcap, attn_mask: as in `fused_attn.attention`.
            Dropout does not change the probabilities: these are the undropped ones.

    Each row sums to 1 over keys (0 for a row with no visible key).
    """
    params = _params(q, k, causal, scale, window, alibi_slopes, softcap, attn_mask)
    batch, heads_q, seq_q = q.shape[:3]
    if not isinstance(lse, torch.Tensor):
        raise TypeError(f"lse must be a torch.Tensor, got {type(lse).__name__}")
    if tuple(lse.shape) != (batch, heads_q, seq_q) or lse.dtype != torch.float32 or lse.device != q.device:
        raise ValueError(f"lse must be float32 of shape (batch, heads_q, seq_q) = {(batch, heads_q, seq_q)} on "
                         f"{q.device}, as attention(..., return_lse=True) returns it; got "
                         f"{str(lse.dtype).replace('torch.', '')} {tuple(lse.shape)} on {lse.device}")
    row_index = _indices("rows", rows, seq_q, q.device)
    head_index = _indices("heads", heads, heads_q, q.device)
    return _launch.attention_probs(q, k, lse.contiguous(), row_index, head_index, params)


def attention_stats(q: torch.Tensor, k: torch.Tensor, *, causal: bool = False, scale: float | None = None,
                    window: tuple[int, int] | None = None, alibi_slopes: torch.Tensor | None = None,
                    softcap: float = 0.0, attn_mask: torch.Tensor | None = None) -> AttentionStats:
    """Summaries of the whole attention map in O(S) memory (two fused passes, no S x S anywhere):
    for every key the total attention it receives from all queries, and for every query its
    entropy and its largest probability (and lse). Works at 64k tokens and more on a GPU.

    Args: q (B, Hq, Sq, D), k (B, Hkv, Sk, D), and the score options of `fused_attn.attention`.
    Returns: an `AttentionStats` of float32 tensors.
    """
    params = _params(q, k, causal, scale, window, alibi_slopes, softcap, attn_mask)
    return AttentionStats(*_launch.attention_stats(q, k, params))
