"""Input validation shared by the kernels' entry points and the reference.

Every check runs before any kernel launches and raises a ValueError or TypeError that names
the argument and says what was expected.
"""
from __future__ import annotations

import math

import torch

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256


def check_attention_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None,
                           *, allowed_dtypes: tuple[torch.dtype, ...] = SUPPORTED_DTYPES,
                           require_unit_stride: bool = True) -> float:
    """Validate q (B, Hq, Sq, D), k (B, Hkv, Sk, D), v (B, Hkv, Sk, Dv); return the scale to use."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must have 4 dimensions (batch, heads, seq, head_dim), got shape {tuple(t.shape)}")
        if t.dtype not in allowed_dtypes:
            names = ", ".join(str(d).replace("torch.", "") for d in allowed_dtypes)
            raise TypeError(f"{name} has dtype {str(t.dtype).replace('torch.', '')}; expected one of {names}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k and v must share one dtype, got q={q.dtype}, k={k.dtype}, v={v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k and v must be on one device, got q={q.device}, k={k.device}, v={v.device}")
    batch, heads_q, _, head_dim = q.shape
    if k.shape[0] != batch or v.shape[0] != batch:
        raise ValueError(f"k and v must have batch size {batch} like q, got k={k.shape[0]}, v={v.shape[0]}")
    if v.shape[1] != k.shape[1]:
        raise ValueError(f"v must have as many heads as k ({k.shape[1]}), got {v.shape[1]}")
    if v.shape[2] != k.shape[2]:
        raise ValueError(f"v must have the sequence length of k ({k.shape[2]}), got {v.shape[2]}")
    if k.shape[3] != head_dim:
        raise ValueError(f"k must have head_dim {head_dim} like q, got {k.shape[3]}")
    heads_kv = k.shape[1]
    if heads_kv == 0 or heads_q % heads_kv != 0:
        raise ValueError(f"q's heads ({heads_q}) must be a multiple of k's and v's heads ({heads_kv})")
    for name, dim in (("q/k head_dim", head_dim), ("v head_dim", v.shape[3])):
        if not 1 <= dim <= MAX_HEAD_DIM:
            raise ValueError(f"{name} must be between 1 and {MAX_HEAD_DIM}, got {dim}")
    if require_unit_stride:
        for name, t in (("q", q), ("k", k), ("v", v)):
            if t.stride(-1) != 1 and t.shape[-1] > 1:
                raise ValueError(f"{name} must have a unit stride in its last dimension (head_dim), got "
                                 f"strides {t.stride()}; call .contiguous() first")
    if scale is None:
        return 1.0 / math.sqrt(head_dim)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a float or None, got {type(scale).__name__}")
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale}")
    return float(scale)


def check_attn_mask(attn_mask: torch.Tensor | None, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor | None:
    """Validate a mask for q (B, Hq, Sq, D), k (B, Hkv, Sk, D) and return it as a 4-D view
    broadcast to (B, Hq, Sq, Sk) (no copy: broadcast dimensions get stride 0).

    bool: True where a query may attend to a key. float16/bfloat16/float32: added to the scores
    (-inf removes a key)."""
    if attn_mask is None:
        return None
    if not isinstance(attn_mask, torch.Tensor):
        raise TypeError(f"attn_mask must be a torch.Tensor or None, got {type(attn_mask).__name__}")
    if attn_mask.dtype != torch.bool and not attn_mask.dtype.is_floating_point:
        raise TypeError(f"attn_mask has dtype {str(attn_mask.dtype).replace('torch.', '')}; expected bool "
                        "(True attends) or a float dtype (added to the scores)")
    if attn_mask.device != q.device:
        raise ValueError(f"attn_mask must be on q's device {q.device}, got {attn_mask.device}")
    target = (q.shape[0], q.shape[1], q.shape[2], k.shape[2])
    if attn_mask.dim() > 4:
        raise ValueError(f"attn_mask must have at most 4 dimensions, got shape {tuple(attn_mask.shape)}")
    try:
        return attn_mask.expand(target) if attn_mask.dim() == 4 else attn_mask[(None,) * (4 - attn_mask.dim())].expand(target)
    except RuntimeError:
        raise ValueError(f"attn_mask of shape {tuple(attn_mask.shape)} does not broadcast to (batch, heads_q, "
                         f"seq_q, seq_k) = {target}") from None
