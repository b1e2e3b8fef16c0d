"""The autograd layer: the launchers registered as torch.library custom ops.

`fused_attn::attention_forward` and `fused_attn::attention_backward` have fake (meta)
implementations, so torch.compile and torch.export trace through them without a graph break,
and the forward has an autograd formula (torch builds the autograd.Function from it) that saves
q, k, v, o and lse, O(S) memory, and calls the backward op.

Output layouts are part of an op's contract (a fake tensor must have the real one's strides):
o, dq, dk, dv are allocated like `_launch._empty_like_layout` of the matching input, so a
(B, S, H, D) view in gives a (B, S, H, D)-backed result out; a launcher result with other
strides (a head dim padded to 16) is copied into that layout.
"""
from __future__ import annotations

from typing import Any

import torch

from fused_attn._launch import _empty_like_layout, _layout_strides, attention_backward, attention_forward


def _in_layout_of(ref: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
    shape = tuple(result.shape)
    if result.stride() == _layout_strides(ref, shape):  # the usual case: no allocation, no copy
        return result
    return _empty_like_layout(ref, shape, result.dtype).copy_(result)


@torch.library.custom_op("fused_attn::attention_forward", mutates_args=())
def attention_forward_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None,
                         causal: bool, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """o (B, Hq, Sq, Dv) in q's dtype, lse (B, Hq, Sq) float32. `bias`: None, or 4-D and
    broadcastable to (B, Hq, Sq, Sk), float (added) or bool (True attends). Inputs are validated
    by the caller."""
    o, lse = attention_forward(q, k, v, causal, scale, bias)
    return _in_layout_of(q, o), lse


@attention_forward_op.register_fake
def _(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None, causal: bool,
      scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    batch, heads_q, seq_q, _ = q.shape
    o = _empty_like_layout(q, (batch, heads_q, seq_q, v.shape[3]), q.dtype)
    return o, q.new_empty((batch, heads_q, seq_q), dtype=torch.float32)


@torch.library.custom_op("fused_attn::attention_backward", mutates_args=())
def attention_backward_op(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                          o: torch.Tensor, lse: torch.Tensor, bias: torch.Tensor | None, causal: bool,
                          scale: float, bias_grad: bool
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """dq, dk, dv with the shapes and dtypes of q, k, v, and the float32 score gradient
    (B, Hq, Sq, Sk) when `bias_grad` (an empty tensor otherwise). Deterministic: no atomics."""
    dq, dk, dv, dbias = attention_backward(do, q, k, v, o, lse, causal, scale, bias, bias_grad)
    if dbias is None:
        dbias = q.new_empty((0,), dtype=torch.float32)
    return _in_layout_of(q, dq), _in_layout_of(k, dk), _in_layout_of(v, dv), dbias


@attention_backward_op.register_fake
def _(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
      lse: torch.Tensor, bias: torch.Tensor | None, causal: bool, scale: float,
      bias_grad: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    batch, heads_q, seq_q, _ = q.shape
    dbias_shape = (batch, heads_q, seq_q, k.shape[2]) if bias_grad else (0,)
    grads = tuple(_empty_like_layout(t, tuple(t.shape), t.dtype) for t in (q, k, v))
    return (*grads, q.new_empty(dbias_shape, dtype=torch.float32))  # type: ignore[return-value]


def _setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[torch.Tensor, torch.Tensor]) -> None:
    q, k, v, bias, causal, scale = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse, bias)
    ctx.causal, ctx.scale = causal, scale
    ctx.mark_non_differentiable(lse)


def _backward(ctx: Any, do: torch.Tensor, _dlse: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
    q, k, v, o, lse, bias = ctx.saved_tensors
    bias_grad = bias is not None and ctx.needs_input_grad[3]
    dq, dk, dv, dbias = attention_backward_op(do, q, k, v, o, lse, bias, ctx.causal, ctx.scale, bias_grad)
    return dq, dk, dv, dbias.to(bias.dtype) if bias_grad else None, None, None


attention_forward_op.register_autograd(_backward, setup_context=_setup_context)
