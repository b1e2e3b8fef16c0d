"""Public functional entry point."""
from __future__ import annotations

import torch

from fused_attn._checks import check_attention_inputs, check_attn_mask
from fused_attn._function import attention_forward_op
from fused_attn._launch import check_device


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
              scale: float | None = None, return_lse: bool = False, attn_mask: torch.Tensor | None = None
              ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Exact attention softmax(q k^T * scale) v, computed tile by tile without the S x S matrix.

    Args:
        q: (B, Hq, Sq, D) queries.
        k: (B, Hkv, Sk, D) keys; Hq must be a multiple of Hkv (GQA/MQA, k is never expanded).
        v: (B, Hkv, Sk, Dv) values.
        causal: mask aligned bottom-right, as in FlashAttention-2: query i sees key j when
            j <= i + Sk - Sq. With Sq = 3, Sk = 5 (x = visible)::

                k: 0 1 2 3 4
                q0 x x x . .
                q1 x x x x .
                q2 x x x x x

            and with Sq = 5, Sk = 3 the first two rows see no key; they return zeros and
            an lse of -inf::

                k: 0 1 2
                q0 . . .
                q1 . . .
                q2 x . .
                q3 x x .
                q4 x x x

            Note that torch's `scaled_dot_product_attention(is_causal=True)` aligns top-left;
            the two agree only when Sq == Sk.
        scale: multiplies q k^T; defaults to 1 / sqrt(D).
        return_lse: also return the natural-log softmax denominator.
        attn_mask: optional, broadcastable to (B, Hq, Sq, Sk), read tile by tile inside the kernels
            (never expanded in memory). bool: True where a query may attend to a key. float: added
            to the scaled scores (-inf removes a key); it gets a gradient when it requires grad
            (that gradient is materialized at (B, Hq, Sq, Sk) float32 before being summed over
            broadcast dimensions). Combines with `causal`. A row left with no key returns zeros
            and an lse of -inf, never NaN.

    Returns:
        o (B, Hq, Sq, Dv) in the inputs' dtype, and with return_lse also lse (B, Hq, Sq) float32.

    D and Dv may be any size from 1 to 256. Inputs may have any strides as long as the last one
    is 1, so a (B, S, H, D) tensor passed as ``x.transpose(1, 2)`` runs without a copy; a head
    dim or stride that is not a multiple of 16 elements is first copied into a zero-padded buffer
    (exact) so the kernels can use vector loads.
    Dtypes: float16, bfloat16, float32 (float32 matmuls use TF32 when
    ``torch.backends.cuda.matmul.allow_tf32`` is set, as torch's do). Gradients flow to q, k, v.
    """
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    if not isinstance(return_lse, bool):
        raise TypeError(f"return_lse must be a bool, got {type(return_lse).__name__}")
    scale = check_attention_inputs(q, k, v, scale)
    bias = check_attn_mask(attn_mask, q, k)
    check_device(q)
    o, lse = attention_forward_op(q, k, v, bias, causal, scale)
    return (o, lse) if return_lse else o
