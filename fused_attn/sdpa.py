"""`fused_attn.scaled_dot_product_attention`: torch's SDPA signature and semantics.

Runs on the kernels: bool masks (True attends) and float masks (added to the scores) of any
shape broadcastable to (..., Hq, L, S), read tile by tile, with a gradient for a float mask that
requires grad; `is_causal` aligned top-left as torch does (for L != S the top-left triangle is
passed as a mask); GQA with `enable_gqa`; any `scale`; and dropout, applied whenever dropout_p > 0
as torch's function does (it has no training flag). The dropout seed is drawn from torch's default
CPU generator, so `torch.manual_seed` makes a call repeatable, and `fused_attn.dropout_seed()`
after re-seeding returns the seed a call used: `fused_attn.dropout_mask` then gives its mask for
the shape the kernels see, leading dimensions flattened into the batch ((N, ..., Hq, L, S) ->
(N * ..., Hq, L, S); 3-D inputs have one head).

A row that the mask leaves without any key returns zeros, as torch 2.13's math backend does (older
torch releases returned NaN there); NaN and infinite scores propagate as in torch. Calls the kernels
cannot take (fewer than 3 dimensions, another dtype or device, a head dim of q, k or v over 512,
dropout_p = 1) run torch's function after a one-time warning.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from fused_attn._checks import unsupported_reason
from fused_attn._warnings import warn_once
from fused_attn.api import attention

_WARNED: set[str] = set()


def _fallback_reason(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, dropout_p: float) -> str | None:
    if dropout_p == 1.0:  # torch returns zeros; the kernels' 1 / (1 - p) scaling takes p < 1
        return "dropout_p=1"
    if query.dim() < 3:
        return f"{query.dim()}-D inputs"
    return unsupported_reason(query, max(query.shape[-1], key.shape[-1]), value.shape[-1])


def scaled_dot_product_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                                 attn_mask: torch.Tensor | None = None, dropout_p: float = 0.0,
                                 is_causal: bool = False, scale: float | None = None,
                                 enable_gqa: bool = False) -> torch.Tensor:
    """Drop-in for `torch.nn.functional.scaled_dot_product_attention`.

    query (N, ..., Hq, L, E), key (N, ..., Hkv, S, E), value (N, ..., Hkv, S, Ev) -> (N, ..., Hq, L, Ev),
    or 3-D (N, L, E) inputs. Hkv must equal Hq unless ``enable_gqa`` (then Hq % Hkv == 0), as in
    torch. Differentiable. Calls the kernels cannot serve run torch's function (see the module).
    """
    if query.dim() != key.dim() or query.dim() != value.dim():
        raise ValueError(f"query, key and value must have the same number of dimensions, got "
                         f"{query.dim()}, {key.dim()}, {value.dim()}")
    if query.dim() >= 4 and key.shape[-3] != query.shape[-3] and not enable_gqa:
        raise ValueError(f"key has {key.shape[-3]} heads and query {query.shape[-3]}: pass enable_gqa=True "
                         "for grouped-query attention (as torch requires)")
    if is_causal and attn_mask is not None:
        raise ValueError("pass either attn_mask or is_causal=True, not both (as torch requires)")
    reason = _fallback_reason(query, key, value, dropout_p)
    if reason is not None:
        warn_once(_WARNED, reason, f"fused_attn.scaled_dot_product_attention: {reason}; these calls run torch's "
                  "scaled_dot_product_attention instead (warned once per reason)", stacklevel=2)
        return F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p,
                                              is_causal=is_causal, scale=scale, enable_gqa=enable_gqa)
    seq_q, seq_k = query.shape[-2], key.shape[-2]
    if is_causal and seq_q != seq_k:  # torch's top-left triangle differs from the kernels' bottom-right
        attn_mask = torch.ones(seq_q, seq_k, dtype=torch.bool, device=query.device).tril()
        is_causal = False
    if query.dim() == 3:  # (N, L, E): one head
        mask = None if attn_mask is None else attn_mask.unsqueeze(-3) if attn_mask.dim() == 3 else attn_mask
        return attention(query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1), causal=is_causal,
                         scale=scale, attn_mask=mask, dropout_p=dropout_p).squeeze(1)
    lead = query.shape[:-3]
    flat = [t.reshape(-1, *t.shape[-3:]) for t in (query, key, value)]  # a view when the leading dims allow
    if attn_mask is not None:
        full = (*lead, query.shape[-3], seq_q, seq_k)
        attn_mask = attn_mask.expand(full).reshape(-1, *full[-3:])  # a view unless batch dims must merge
    out = attention(*flat, causal=is_causal, scale=scale, attn_mask=attn_mask, dropout_p=dropout_p)
    return out.reshape(*lead, *out.shape[-3:])
