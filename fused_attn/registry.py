"""fused_attn as the kernel behind torch SDPA's flash backend on CUDA.

torch (2.9 and later) keeps a registry of flash-attention implementations
(`torch.nn.attention.register_flash_attention_impl`). `activate()` registers fused_attn there
and activates it: the CUDA kernels of ``aten::_scaled_dot_product_flash_attention`` and its
backward are replaced by fused_attn's launchers, so an unmodified model that calls
`F.scaled_dot_product_attention` and lands on the flash backend runs these kernels.
`deactivate()` puts torch's own kernels back.

Semantics are the flash backend's: q, k, v (B, H, S, D), `is_causal` with Sq == Sk (where top-left
and bottom-right alignment agree), and dropout. The dropout seed is drawn with
`fused_attn.dropout_seed()` from torch's default CPU generator (so `torch.manual_seed` makes a call
repeatable) and travels to the backward in element 0 of the op's `rng_state` output, which torch's
autograd hands back as `philox_seed`; the backward regenerates the mask from it. A call outside
that (return_debug_mask, causal with Sq != Sk, another dtype, a head dim over 512) raises a
RuntimeError that names the reason rather than computing something else; without `activate()`
nothing changes.
"""
from __future__ import annotations

import torch

from fused_attn._checks import check_attention_inputs, check_dropout, unsupported_reason
from fused_attn._function import attention_backward_op, forward, op_args
from fused_attn._launch import AttentionParams
from fused_attn.api import dropout_seed

IMPL_NAME = "fused_attn"
_OPS = ("_scaled_dot_product_flash_attention", "_scaled_dot_product_flash_attention_backward")


def _unsupported(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, is_causal: bool,
                 return_debug_mask: bool = False) -> str | None:
    if return_debug_mask:
        return "return_debug_mask=True"
    if is_causal and query.shape[2] != key.shape[2]:
        return "is_causal with Sq != Sk (SDPA aligns top-left, fused_attn bottom-right)"
    return unsupported_reason(query, query.shape[-1], value.shape[-1])


def _like(ref: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
    """`result` in `ref`'s memory layout, as the aten op's meta function promises.

    Not `_function._in_layout_of`: aten's contract is torch.empty_like(query) (any permutation of
    the dimensions is kept), while fused_attn's ops promise (B, H, S, D) or (B, S, H, D) backing."""
    if result.stride() == ref.stride():  # the usual case (a dense ref): no allocation, no copy
        return result
    out = torch.empty_like(ref, dtype=result.dtype)
    return result if out.stride() == result.stride() else out.copy_(result)


def sdpa_flash_forward(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, dropout_p: float = 0.0,
                       is_causal: bool = False, return_debug_mask: bool = False, *,
                       scale: float | None = None) -> tuple:
    """``aten::_scaled_dot_product_flash_attention`` on fused_attn's kernels; same outputs:
    (out, logsumexp, cum_seq_q, cum_seq_k, max_q, max_k, rng_state, philox_offset, debug_mask)."""
    reason = _unsupported(query, key, value, is_causal, return_debug_mask)
    if reason is not None:
        raise RuntimeError(f"fused_attn (activated as SDPA's flash backend) cannot run this call: {reason}; "
                           "call fused_attn.deactivate() to use torch's flash kernels")
    scale = check_attention_inputs(query, key, value, scale)
    dropout_p = check_dropout(dropout_p)
    seed = dropout_seed() if dropout_p > 0 else None
    out, lse = forward(query, key, value, AttentionParams(scale=scale, window_right=0 if is_causal else -1,
                                                          dropout_p=dropout_p, dropout_seed=seed))
    # torch's contract: a uint64 (2,) philox (seed, offset); the kernels' RNG needs only the seed.
    if seed is None:
        rng_state = torch.zeros((2,), dtype=torch.uint64, device=query.device)
    else:
        rng_state = torch.tensor([int(seed), 0], dtype=torch.uint64, device=query.device)
    philox_offset = torch.zeros((), dtype=torch.uint64, device=query.device)
    debug_mask = torch.empty(0, dtype=query.dtype, device=query.device)
    return _like(query, out), lse, None, None, query.shape[2], key.shape[2], rng_state, philox_offset, debug_mask


def sdpa_flash_backward(grad_out: torch.Tensor, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                        out: torch.Tensor, logsumexp: torch.Tensor, cum_seq_q: torch.Tensor | None,
                        cum_seq_k: torch.Tensor | None, max_q: int, max_k: int, dropout_p: float, is_causal: bool,
                        philox_seed: torch.Tensor, philox_offset: torch.Tensor, *,
                        scale: float | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``aten::_scaled_dot_product_flash_attention_backward`` on fused_attn's kernels: dq, dk, dv."""
    reason = _unsupported(query, key, value, is_causal)
    if reason is not None:
        raise RuntimeError(f"fused_attn (activated as SDPA's flash backend) cannot run this backward: {reason}")
    scale = check_attention_inputs(query, key, value, scale)
    dropout_p = check_dropout(dropout_p)
    seed = None
    if dropout_p > 0:  # the forward's seed, from its rng_state; the ops take an int64 CPU scalar
        seed = philox_seed[0].cpu().to(torch.int64)
    params = AttentionParams(scale=scale, window_right=0 if is_causal else -1, dropout_p=dropout_p, dropout_seed=seed)
    dq, dk, dv, _, _ = attention_backward_op(grad_out, query, key, value, out, logsumexp, False, None,
                                             *op_args(params))
    return _like(query, dq), _like(key, dk), _like(value, dv)


class _Handle:
    """What torch's registry keeps while fused_attn is active; `remove` restores torch's kernels."""

    def __init__(self) -> None:
        self.library: torch.library.Library | None = torch.library.Library("aten", "IMPL", "CUDA")
        self.library.impl(_OPS[0], sdpa_flash_forward, "CUDA")
        self.library.impl(_OPS[1], sdpa_flash_backward, "CUDA")

    def remove(self) -> None:
        if self.library is not None:
            self.library._destroy()
            self.library = None


def _registry():
    attention = torch.nn.attention
    if not hasattr(attention, "register_flash_attention_impl"):
        raise RuntimeError(f"torch {torch.__version__} has no flash-attention registry "
                           "(torch.nn.attention.register_flash_attention_impl, torch 2.9 and later)")
    return attention


def activate() -> None:
    """Make fused_attn the kernel behind `F.scaled_dot_product_attention`'s flash backend on CUDA.
    Replaces any other activated implementation; `deactivate()` undoes it."""
    attention = _registry()
    if IMPL_NAME not in attention.list_flash_attention_impls():
        attention.register_flash_attention_impl(IMPL_NAME, register_fn=_Handle)
    attention.activate_flash_attention_impl(IMPL_NAME)


def deactivate() -> None:
    """Put torch's own flash kernels back if fused_attn is the active implementation."""
    attention = _registry()
    if attention.current_flash_attention_impl() == IMPL_NAME:
        attention.restore_flash_attention_impl()


def is_active() -> bool:
    """True while fused_attn serves SDPA's flash backend."""
    attention = torch.nn.attention
    return hasattr(attention, "current_flash_attention_impl") and attention.current_flash_attention_impl() == IMPL_NAME
