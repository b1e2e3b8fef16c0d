"""Input validation shared by the kernels' entry points and the reference.

Every check runs before any kernel launches and raises a ValueError or TypeError that names
the argument and says what was expected.
"""
from __future__ import annotations

import math

import torch

from fused_attn._launch import device_fallback_reason, interpreting

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 512  # q/k and v head dims; the config table has a bucket for each power of two up to it
FLOAT32_MAX = float(torch.finfo(torch.float32).max)
FLOAT32_TINY = float(torch.finfo(torch.float32).tiny)  # smallest normal float32
# A window side this large cannot exclude a key (no sequence is that long); larger ones are
# clamped to it so every side fits the ops' int64 and the reference's arithmetic.
MAX_WINDOW = 2**62


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def unsupported_reason(q: torch.Tensor, head_dim: int, head_dim_v: int = 0) -> str | None:
    """Why the kernels cannot serve an attention call whose tensors have q's dtype and device and
    these head dims (q/k and v), or None when they can.

    The one answer the drop-in entry points (`sdpa`, `nn.MultiheadAttention`, the SDPA-flash
    `registry`, `hf`) ask before handing a call to torch or the model's eager code; each adds only
    the reasons its own arguments bring. `attention` itself raises for the same calls instead."""
    if q.dtype not in SUPPORTED_DTYPES:
        names = ", ".join(_dtype_name(d) for d in SUPPORTED_DTYPES)
        return f"dtype {_dtype_name(q.dtype)} (the kernels take {names})"
    widest = max(head_dim, head_dim_v)
    if widest > MAX_HEAD_DIM:
        return f"a head dim of {widest} (the kernels take up to {MAX_HEAD_DIM})"
    runnable = "cpu" if interpreting() else "cuda"
    if q.device.type != runnable:
        return f"{q.device.type} tensors (the kernels run on CUDA, or on the CPU under TRITON_INTERPRET=1)"
    return device_fallback_reason(q, widest)



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
    return check_scale(scale, head_dim)


def check_scale(scale: float | None, head_dim: int) -> float:
    """The softmax scale to use: 1 / sqrt(head_dim) when None, else a finite float whose base-2
    form fits float32."""
    if scale is None:
        return 1.0 / math.sqrt(head_dim)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a float or None, got {type(scale).__name__}")
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale}")
    if abs(scale) * math.log2(math.e) > FLOAT32_MAX:  # the kernels take scale * log2(e) in float32
        raise ValueError(f"scale must be at most {FLOAT32_MAX / math.log2(math.e):.3g} in magnitude (float32 "
                         f"after the base-2 conversion), got {scale}")
    return float(scale)


def check_attn_mask(attn_mask: torch.Tensor | None, q: torch.Tensor, k: torch.Tensor | None = None, *,
                    seq_k: int | None = None) -> torch.Tensor | None:
    """Validate a mask for q (B, Hq, Sq, D), k (B, Hkv, Sk, D) (or Sk given as seq_k) and return it
    as a 4-D view broadcast to (B, Hq, Sq, Sk) (no copy: broadcast dimensions get stride 0).

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
    target = (q.shape[0], q.shape[1], q.shape[2], k.shape[2] if seq_k is None else seq_k)
    if attn_mask.dim() > 4:
        raise ValueError(f"attn_mask must have at most 4 dimensions, got shape {tuple(attn_mask.shape)}")
    try:
        return attn_mask.expand(target) if attn_mask.dim() == 4 else attn_mask[(None,) * (4 - attn_mask.dim())].expand(target)
    except RuntimeError:
        raise ValueError(f"attn_mask of shape {tuple(attn_mask.shape)} does not broadcast to (batch, heads_q, "
                         f"seq_q, seq_k) = {target}") from None


def check_flag(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return value


def check_window(window: tuple[int, int] | None, causal: bool) -> tuple[int, int]:
    """(left, right) keys each query may see around its diagonal, -1 for unbounded; causal is
    right = 0. A right bound above 0 contradicts causal and is refused rather than dropped."""
    if window is None:
        left, right = -1, -1
    else:
        if (not isinstance(window, (tuple, list)) or len(window) != 2
                or any(isinstance(w, bool) or not isinstance(w, int) for w in window)):
            raise TypeError(f"window must be a pair of ints (left, right), -1 for unbounded, got {window!r}")
        left, right = window
        if left < -1 or right < -1:
            raise ValueError(f"window sizes must be >= 0, or -1 for unbounded, got {tuple(window)}")
        left, right = min(left, MAX_WINDOW), min(right, MAX_WINDOW)
    if causal:
        if right > 0:
            raise ValueError(f"window={tuple(window)} lets queries see {right} keys past the diagonal, but causal=True "  # type: ignore[arg-type]
                             "allows none: pass window=(left, 0), or causal=False")
        right = 0
    return left, right


def _check_float(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return float(value)


def check_softcap(softcap: float, scale: float | None = None) -> float:
    """softcap >= 0 (0 is off). The kernels compute with scale / softcap and softcap * log2(e) in
    float32: both must be normal float32 numbers (not overflowing to inf, not flushed to 0), which
    holds for every softcap between about 1e-37 and 1e37 at usual scales."""
    softcap = _check_float("softcap", softcap)
    if softcap < 0:
        raise ValueError(f"softcap must be >= 0 (0 turns it off), got {softcap}")
    if softcap > 0:
        factors = [softcap * math.log2(math.e)]
        if scale is not None and scale != 0:
            factors.append(abs(scale) / softcap)
        if not all(FLOAT32_TINY <= factor <= FLOAT32_MAX for factor in factors):
            raise ValueError(f"softcap={softcap!r} with scale={scale!r} is out of float32 range: scale / softcap "
                             "and softcap * log2(e) must lie between 1.2e-38 and 3.4e38")
    return softcap


def check_dropout(dropout_p: float) -> float:
    dropout_p = _check_float("dropout_p", dropout_p)
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    return dropout_p


def check_alibi_slopes(alibi_slopes: torch.Tensor | None, batch: int, heads_q: int, device: torch.device
                       ) -> torch.Tensor | None:
    """Slopes (Hq,) or (B, Hq) as a contiguous float32 tensor (a copy when needed; never the
    caller's tensor modified). The kernels compute no gradient for them."""
    if alibi_slopes is None:
        return None
    if not isinstance(alibi_slopes, torch.Tensor):
        raise TypeError(f"alibi_slopes must be a torch.Tensor or None, got {type(alibi_slopes).__name__}")
    if not alibi_slopes.dtype.is_floating_point:
        raise TypeError(f"alibi_slopes must have a float dtype, got {str(alibi_slopes.dtype).replace('torch.', '')}")
    if tuple(alibi_slopes.shape) not in ((heads_q,), (batch, heads_q)):
        raise ValueError(f"alibi_slopes must have shape (heads_q,) = ({heads_q},) or (batch, heads_q) = "
                         f"({batch}, {heads_q}), got {tuple(alibi_slopes.shape)}")
    if alibi_slopes.device != device:
        raise ValueError(f"alibi_slopes must be on q's device {device}, got {alibi_slopes.device}")
    if alibi_slopes.requires_grad and torch.is_grad_enabled():
        raise ValueError("alibi_slopes requires grad, but the kernels compute no gradient for the slopes: "
                         "pass alibi_slopes.detach()")
    return alibi_slopes.detach().to(torch.float32).contiguous()


def check_sinks(sinks: torch.Tensor | None, heads_q: int, device: torch.device) -> torch.Tensor | None:
    """Attention sinks: a float tensor (Hq,), one logit per query head, on q's device; it may
    require grad (a learnable sink gets its gradient). Returned as given: the op copies it to
    float32 for the kernels, so autograd still sees the caller's tensor."""
    if sinks is None:
        return None
    if not isinstance(sinks, torch.Tensor):
        raise TypeError(f"sinks must be a torch.Tensor or None, got {type(sinks).__name__}")
    if not sinks.dtype.is_floating_point:
        raise TypeError(f"sinks must have a float dtype, got {str(sinks.dtype).replace('torch.', '')}")
    if tuple(sinks.shape) != (heads_q,):
        raise ValueError(f"sinks must have shape (heads_q,) = ({heads_q},): one logit per query head, "
                         f"got {tuple(sinks.shape)}")
    if sinks.device != device:
        raise ValueError(f"sinks must be on q's device {device}, got {sinks.device}")
    return sinks


def check_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                 cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int) -> int:
    """Validate packed q (total_q, Hq, D), k (total_k, Hkv, D), v (total_k, Hkv, Dv) and their
    sequence boundaries; return the number of sequences. Reads cu_seqlens on the host: a wrong
    boundary or a max_seqlen below the longest sequence would otherwise compute garbage. Under
    torch.compile only shapes and dtypes are checked (reading values would break the graph)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 3:
            raise ValueError(f"{name} must have 3 dimensions (total_tokens, heads, head_dim) for packed "
                             f"sequences, got shape {tuple(t.shape)}")
    lengths = {}
    for name, cu, total, longest in (("cu_seqlens_q", cu_seqlens_q, q.shape[0], max_seqlen_q),
                                     ("cu_seqlens_k", cu_seqlens_k, k.shape[0], max_seqlen_k)):
        if not isinstance(cu, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(cu).__name__}")
        if cu.dtype != torch.int32 or cu.dim() != 1 or cu.shape[0] < 1:
            raise ValueError(f"{name} must be a 1-D int32 tensor of sequence starts plus the total, got "
                             f"dtype {str(cu.dtype).replace('torch.', '')} and shape {tuple(cu.shape)}")
        if cu.device != q.device:
            raise ValueError(f"{name} must be on q's device {q.device}, got {cu.device}")
        max_name = "max_seqlen_" + name[-1]
        if isinstance(longest, bool) or not isinstance(longest, int):
            raise TypeError(f"{max_name} must be an int, got {type(longest).__name__}")
        lengths[name] = cu.shape[0]
        if torch.compiler.is_compiling():  # values are data: torch.compile cannot read them without a graph break
            continue
        bounds = cu.tolist()
        if bounds[0] != 0 or bounds[-1] != total or any(b > a for a, b in zip(bounds[1:], bounds[:-1])):
            raise ValueError(f"{name} must start at 0, never decrease and end at the total token count {total}, "
                             f"got {bounds if len(bounds) <= 8 else bounds[:4] + ['...'] + bounds[-2:]}")
        actual = max((b - a for a, b in zip(bounds[:-1], bounds[1:])), default=0)
        if longest < actual:
            raise ValueError(f"{max_name} is {longest} but {name} holds a sequence of length {actual}")
    if lengths["cu_seqlens_q"] != lengths["cu_seqlens_k"]:
        raise ValueError(f"cu_seqlens_q and cu_seqlens_k must describe the same number of sequences, got "
                         f"{lengths['cu_seqlens_q'] - 1} and {lengths['cu_seqlens_k'] - 1}")
    return lengths["cu_seqlens_q"] - 1
