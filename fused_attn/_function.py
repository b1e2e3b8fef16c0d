"""The autograd layer: the launchers registered as torch.library custom ops.

`fused_attn::attention_forward` and `fused_attn::attention_backward` have fake (meta)
implementations, so torch.compile and torch.export trace through them without a graph break,
and the forward has an autograd formula (torch builds the autograd.Function from it) that saves
q, k, v, o and lse, O(S) memory, and calls the backward op with the gradients of o and of the lse
(both outputs are differentiable). Dropout saves only its seed: the backward regenerates the mask.

Output layouts are part of an op's contract (a fake tensor must have the real one's strides):
o, dq, dk, dv are allocated like `_launch._empty_like_layout` of the matching input, so a
(B, S, H, D) view in gives a (B, S, H, D)-backed result out; a launcher result with other
strides (a head dim padded to 16) is copied into that layout. Packed (varlen) results are
contiguous (total, H, D) tensors.
"""
from __future__ import annotations

from typing import Any

import torch

from fused_attn._launch import (AttentionParams, _empty_like_layout, _layout_strides, attention_backward,
                                attention_forward)

# The ops' inputs after q, k, v, in schema order. torch.library takes flat typed inputs, so this
# table is the one place the list is written: AttentionParams holds the same fields by name, and
# `op_args` / `_params` convert between the two.
OP_PARAMS: tuple[tuple[str, str], ...] = (
    ("bias", "Tensor?"), ("alibi_slopes", "Tensor?"), ("cu_seqlens_q", "Tensor?"), ("cu_seqlens_k", "Tensor?"),
    ("dropout_seed", "Tensor?"), ("sinks", "Tensor?"), ("scale", "float"), ("window_left", "SymInt"),
    ("window_right", "SymInt"), ("softcap", "float"), ("dropout_p", "float"), ("max_seqlen_q", "SymInt"),
    ("max_seqlen_k", "SymInt"),
)
_PARAMS_SCHEMA = ", ".join(f"{kind} {name}" for name, kind in OP_PARAMS)
_TENSOR_PARAMS = sum(kind == "Tensor?" for _, kind in OP_PARAMS)  # leading: autograd saves them
_BIAS, _SINKS = (next(i for i, (name, _) in enumerate(OP_PARAMS) if name == wanted) for wanted in ("bias", "sinks"))


def op_args(params: AttentionParams) -> tuple[Any, ...]:
    """The ops' inputs after q, k, v (and the backward's own), in schema order."""
    return tuple(getattr(params, name) for name, _ in OP_PARAMS)


def _params(args: tuple[Any, ...]) -> AttentionParams:
    return AttentionParams(**{name: value for (name, _), value in zip(OP_PARAMS, args, strict=True)})


def _contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    strides, running = [], 1
    for size in reversed(shape):
        strides.append(running)
        running *= size
    return tuple(reversed(strides))


def _in_layout_of(ref: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
    shape = tuple(result.shape)
    if ref.dim() == 3:  # packed input: results are plain contiguous (total, H, D)
        if result.stride() == _contiguous_strides(shape):
            return result
        return torch.empty(shape, dtype=result.dtype, device=result.device).copy_(result)
    if result.stride() == _layout_strides(ref, shape):  # the usual case: no allocation, no copy
        return result
    return _empty_like_layout(ref, shape, result.dtype).copy_(result)


def _as_4d(t: torch.Tensor) -> torch.Tensor:
    """(total, H, D) packed input as the (1, H, total, D) view the launchers index."""
    return t.unsqueeze(0).transpose(1, 2) if t.dim() == 3 else t


def _from_4d(ref: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return t[0].transpose(0, 1) if ref.dim() == 3 else t


@torch.library.custom_op("fused_attn::attention_forward", mutates_args=(),
                         schema=f"(Tensor q, Tensor k, Tensor v, {_PARAMS_SCHEMA}) -> (Tensor, Tensor)")
def attention_forward_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *params: Any
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """o (B, Hq, Sq, Dv) in q's dtype, lse (B, Hq, Sq) float32; for packed input (q (total_q, Hq, D)
    with cu_seqlens) o (total_q, Hq, Dv) and lse (Hq, total_q). `params`: `op_args(AttentionParams)`
    (causal is window_right = 0; `dropout_seed` an int64 scalar tensor, read only when dropout_p > 0;
    `sinks` (Hq,) merged into the softmax denominator and so into the lse). Inputs are validated
    by the caller."""
    o, lse = attention_forward(_as_4d(q), _as_4d(k), _as_4d(v), _params(params))
    return _in_layout_of(q, _from_4d(q, o)), lse


@attention_forward_op.register_fake
def _(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *params: Any) -> tuple[torch.Tensor, torch.Tensor]:
    if q.dim() == 3:
        total_q, heads_q, _ = q.shape
        return q.new_empty((total_q, heads_q, v.shape[2])), q.new_empty((heads_q, total_q), dtype=torch.float32)
    batch, heads_q, seq_q, _ = q.shape
    o = _empty_like_layout(q, (batch, heads_q, seq_q, v.shape[3]), q.dtype)
    return o, q.new_empty((batch, heads_q, seq_q), dtype=torch.float32)


@torch.library.custom_op(
    "fused_attn::attention_backward", mutates_args=(),
    schema=f"(Tensor do, Tensor q, Tensor k, Tensor v, Tensor o, Tensor lse, bool bias_grad, Tensor? dlse, "
           f"{_PARAMS_SCHEMA}) -> (Tensor, Tensor, Tensor, Tensor, Tensor)")
def attention_backward_op(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                          lse: torch.Tensor, bias_grad: bool, dlse: torch.Tensor | None, *params: Any
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """dq, dk, dv with the shapes and dtypes of q, k, v, the float32 score gradient
    (B, Hq, Sq, Sk) when `bias_grad` (an empty tensor otherwise) and the float32 gradient of
    the sinks (Hq,) when there are sinks (an empty tensor otherwise), for the gradient `do` of o
    and, when given, `dlse` of lse (lse's shape). `params` as in the forward. Deterministic: no
    atomics."""
    dq, dk, dv, dbias, dsinks = attention_backward(_as_4d(do), _as_4d(q), _as_4d(k), _as_4d(v), _as_4d(o), lse,
                                                   _params(params), bias_grad, dlse)
    if dbias is None:
        dbias = q.new_empty((0,), dtype=torch.float32)
    if dsinks is None:
        dsinks = q.new_empty((0,), dtype=torch.float32)
    return (_in_layout_of(q, _from_4d(q, dq)), _in_layout_of(k, _from_4d(k, dk)), _in_layout_of(v, _from_4d(v, dv)),
            dbias, dsinks)


@attention_backward_op.register_fake
def _(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor, lse: torch.Tensor,
      bias_grad: bool, dlse: torch.Tensor | None, *params: Any
      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    sinks = params[_SINKS]
    dsinks = q.new_empty((0,) if sinks is None else (sinks.shape[0],), dtype=torch.float32)
    if q.dim() == 3:
        grads = tuple(t.new_empty(t.shape) for t in (q, k, v))
        return (*grads, q.new_empty((0,), dtype=torch.float32), dsinks)  # type: ignore[return-value]
    batch, heads_q, seq_q, _ = q.shape
    dbias_shape = (batch, heads_q, seq_q, k.shape[2]) if bias_grad else (0,)
    grads = tuple(_empty_like_layout(t, tuple(t.shape), t.dtype) for t in (q, k, v))
    return (*grads, q.new_empty(dbias_shape, dtype=torch.float32), dsinks)  # type: ignore[return-value]


def _setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[torch.Tensor, torch.Tensor]) -> None:
    q, k, v, *params = inputs
    o, lse = output
    # The tensor parameters lead the list: saved (O(S) memory with o and lse), the rest kept as is.
    ctx.save_for_backward(q, k, v, o, lse, *params[:_TENSOR_PARAMS])
    ctx.settings = tuple(params[_TENSOR_PARAMS:])
    # An unused lse then arrives as None, not as a tensor of zeros allocated for every backward.
    ctx.set_materialize_grads(False)


def _backward(ctx: Any, do: torch.Tensor | None, dlse: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
    """Gradients of q, k, v, a float mask (bias) and the sinks from those of o and of lse: the lse
    is differentiable (d lse / d score = p), which attention sinks and merging partial results over
    key blocks need."""
    q, k, v, o, lse, *tensor_params = ctx.saved_tensors
    params = (*tensor_params, *ctx.settings)
    bias, sinks = params[_BIAS], params[_SINKS]
    bias_grad = bias is not None and ctx.needs_input_grad[3 + _BIAS]
    if do is None:  # only the lse was used
        do = torch.zeros_like(o)
    dq, dk, dv, dbias, dsinks = attention_backward_op(do, q, k, v, o, lse, bias_grad, dlse, *params)
    param_grads: list[torch.Tensor | None] = [None] * len(OP_PARAMS)
    if bias_grad:
        param_grads[_BIAS] = dbias.to(bias.dtype)
    if sinks is not None and ctx.needs_input_grad[3 + _SINKS]:
        param_grads[_SINKS] = dsinks.to(sinks.dtype)
    return (dq, dk, dv, *param_grads)


attention_forward_op.register_autograd(_backward, setup_context=_setup_context)


def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, params: AttentionParams
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """The differentiable forward op: o, lse."""
    return attention_forward_op(q, k, v, *op_args(params))
