"""Typed launchers: allocate outputs, pick a config, compute the grid, launch the kernels.

Inputs are validated by the callers (fused_attn._checks) before anything here runs.
"""
from __future__ import annotations

import contextlib
import contextvars
import math
from typing import Iterator

import torch
import triton
from triton.runtime.jit import JITFunction

from fused_attn.kernels import attention as _kernels
from fused_attn.kernels.configs import INTERPRETER_CONFIGS, AttentionConfigs, lookup, preprocess_block_m

_MAX_GRID = 2**31 - 1
_config_override: contextvars.ContextVar[AttentionConfigs | None] = contextvars.ContextVar(
    "fused_attn_config_override", default=None)


def interpreting() -> bool:
    """True when the kernels were built by the Triton interpreter (TRITON_INTERPRET=1 at import)."""
    return not isinstance(_kernels._attn_fwd, JITFunction)


@contextlib.contextmanager
def override_configs(configs: AttentionConfigs) -> Iterator[None]:
    """Launch every kernel inside the block with `configs` instead of the table's choice."""
    token = _config_override.set(configs)
    try:
        yield
    finally:
        _config_override.reset(token)


def check_device(t: torch.Tensor) -> None:
    """Kernels run on CUDA tensors, or on CPU tensors under the interpreter; say so otherwise."""
    if t.device.type == "cuda":
        if interpreting():
            raise ValueError("q is a CUDA tensor but TRITON_INTERPRET=1 is set: the interpreter runs "
                             "CPU tensors only; unset TRITON_INTERPRET or move q, k, v to the CPU")
        return
    if t.device.type == "cpu":
        if not interpreting():
            raise ValueError("q is a CPU tensor and the Triton interpreter is off: move q, k, v to a "
                             "CUDA device, or set TRITON_INTERPRET=1 in the environment before "
                             "importing triton or fused_attn to run the kernels on the CPU (slowly)")
        return
    raise ValueError(f"q is on device type '{t.device.type}'; fused_attn runs on 'cuda' "
                     "(or 'cpu' under TRITON_INTERPRET=1)")


def _select_configs(q: torch.Tensor, head_dim: int, head_dim_v: int) -> AttentionConfigs:
    override = _config_override.get()
    if override is not None:
        return override
    if interpreting():
        return INTERPRETER_CONFIGS
    major, minor = torch.cuda.get_device_capability(q.device)
    return lookup(major * 10 + minor, max(head_dim, head_dim_v), q.element_size())


def _padded(dim: int) -> int:
    return max(16, triton.next_power_of_2(dim))


def _kernel_flags(q: torch.Tensor) -> dict[str, object]:
    if q.dtype == torch.float32:
        precision = "tf32" if torch.backends.cuda.matmul.allow_tf32 and q.is_cuda else "ieee"
    else:
        precision = "tf32"  # ignored by tl.dot for 16-bit operands
    return {"EMULATE_BF16": interpreting() and q.dtype == torch.bfloat16, "INPUT_PRECISION": precision}


def _keeps_bshd(ref: torch.Tensor, heads: int, seq: int) -> bool:
    return ref.stride(1) < ref.stride(2) and heads > 1 and seq > 1


def _layout_strides(ref: torch.Tensor, shape: tuple[int, ...]) -> tuple[int, int, int, int]:
    """The strides `_empty_like_layout(ref, shape, ...)` gives, without allocating."""
    batch, heads, seq, dim = shape
    if _keeps_bshd(ref, heads, seq):
        return (seq * heads * dim, dim, heads * dim, 1)
    return (heads * seq * dim, seq * dim, dim, 1)


def _empty_like_layout(ref: torch.Tensor, shape: tuple[int, int, int, int], dtype: torch.dtype) -> torch.Tensor:
    """Allocate (B, H, S, D); when `ref` is a (B, S, H, D) tensor seen through .transpose(1, 2),
    keep that layout so the caller can transpose back without a copy."""
    batch, heads, seq, dim = shape
    if _keeps_bshd(ref, heads, seq):
        return torch.empty((batch, seq, heads, dim), dtype=dtype, device=ref.device).transpose(1, 2)
    return torch.empty(shape, dtype=dtype, device=ref.device)


def _round_up(n: int, multiple: int) -> int:
    return (n + multiple - 1) // multiple * multiple


def _aligned(t: torch.Tensor) -> torch.Tensor:
    """`t` itself when its head dim, strides and address allow 16-element vector loads, else a
    zero-padded copy with the head dim rounded up to a multiple of 16.

    Every shipped config is compiled (and checked for spills) for aligned inputs only: with an odd
    head dim each load becomes a masked scalar load that keeps a 64-bit address per element, and
    the kernels spill. Zero columns change neither q k^T nor the kept columns of p v, so the copy
    is exact; FlashAttention-2 pads head dims the same way. Common head dims (64, 128) and their
    (B, S, H, D) views need no copy."""
    dim = t.shape[-1]
    strides_ok = all(stride % 16 == 0 for stride, size in zip(t.stride()[:-1], t.shape[:-1]) if size > 1)
    if dim % 16 == 0 and strides_ok and t.data_ptr() % 16 == 0:
        return t
    padded = t.new_zeros(*t.shape[:-1], _round_up(dim, 16))
    padded[..., :dim] = t
    return padded


def _grid(programs: int) -> tuple[int]:
    if programs > _MAX_GRID:
        raise ValueError(f"the problem needs {programs} programs, more than one launch allows ({_MAX_GRID})")
    return (programs,)


def _strides3(t: torch.Tensor) -> tuple[int, int, int]:
    # A dimension of size 1 is only ever indexed at 0: report stride 0 so an arbitrary stride
    # there does not select a kernel specialization for unaligned strides.
    return tuple(t.stride(i) if t.shape[i] > 1 else 0 for i in range(3))  # type: ignore[return-value]


def _bias_args(bias: torch.Tensor | None, q: torch.Tensor) -> tuple[object, ...]:
    """(pointer, 4 strides) for the kernels' BIAS argument, and BIAS_KIND: 0 none, 1 float
    added to the scores, 2 bool (True attends). A broadcast dimension has stride 0."""
    if bias is None:
        return (q, 0, 0, 0, 0), 0
    strides = tuple(bias.stride(i) if bias.shape[i] > 1 else 0 for i in range(4))
    return (bias, *strides), 2 if bias.dtype == torch.bool else 1


def attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool,
                      scale: float, bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """o (B, Hq, Sq, Dv) in q's dtype and lse (B, Hq, Sq) float32, natural log. `bias`, if given,
    is 4-D and broadcastable to (B, Hq, Sq, Sk): float (added to the scores) or bool (True attends)."""
    batch, heads_q, seq_q, _ = q.shape
    heads_kv, seq_k, head_dim_v_out = k.shape[1], k.shape[2], v.shape[3]
    lse = torch.empty((batch, heads_q, seq_q), dtype=torch.float32, device=q.device)
    if batch * heads_q * seq_q == 0 or seq_k == 0:
        o = _empty_like_layout(q, (batch, heads_q, seq_q, head_dim_v_out), q.dtype)
        return o.zero_(), lse.fill_(-math.inf)  # no key at all: every row attends to nothing
    q, k, v = _aligned(q), _aligned(k), _aligned(v)
    head_dim, head_dim_v = q.shape[3], v.shape[3]
    o = _empty_like_layout(q, (batch, heads_q, seq_q, head_dim_v), q.dtype)
    cfg = _select_configs(q, head_dim, head_dim_v).forward
    block_d, block_dv = _padded(head_dim), _padded(head_dim_v)
    bias_args, bias_kind = _bias_args(bias, q)
    _kernels._attn_fwd[_grid(triton.cdiv(seq_q, cfg.block_m) * batch * heads_q)](
        q, k, v, o, lse,
        *_strides3(q), *_strides3(k), *_strides3(v), *_strides3(o), *bias_args,
        heads_q, heads_q // heads_kv, seq_q, seq_k, head_dim, head_dim_v, scale * math.log2(math.e),
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_D=block_d, BLOCK_DV=block_dv,
        CAUSAL=causal, EVEN_D=block_d == head_dim, EVEN_DV=block_dv == head_dim_v, BIAS_KIND=bias_kind,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, **_kernel_flags(q),
    )
    return o[..., :head_dim_v_out], lse


def attention_backward(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       o: torch.Tensor, lse: torch.Tensor, causal: bool, scale: float,
                       bias: torch.Tensor | None = None, bias_grad: bool = False
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """dq, dk, dv with the shapes, dtypes and layouts of q, k, v, and with `bias_grad` the float32
    gradient of the scores, (B, Hq, Sq, Sk) (the bias's gradient before broadcasting is undone).
    Deterministic: no atomics."""
    batch, heads_q, seq_q, head_dim_out = q.shape
    heads_kv, seq_k, head_dim_v_out = k.shape[1], k.shape[2], v.shape[3]
    dbias = torch.zeros((batch, heads_q, seq_q, seq_k), dtype=torch.float32, device=q.device) if bias_grad else None
    if batch * heads_q * seq_q == 0 or seq_k == 0:
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v), dbias
    if do.stride(-1) != 1:
        do = do.contiguous()
    q, k, v, o, do = _aligned(q), _aligned(k), _aligned(v), _aligned(o), _aligned(do)
    head_dim, head_dim_v = q.shape[3], v.shape[3]
    dq = _empty_like_layout(q, tuple(q.shape), q.dtype)
    dk = _empty_like_layout(k, tuple(k.shape), k.dtype)
    dv = _empty_like_layout(v, tuple(v.shape), v.dtype)
    configs = _select_configs(q, head_dim, head_dim_v)
    block_d, block_dv = _padded(head_dim), _padded(head_dim_v)
    flags = _kernel_flags(q)
    qk_scale_log2 = scale * math.log2(math.e)

    delta = torch.empty((batch, heads_q, seq_q), dtype=torch.float32, device=q.device)
    pre_block = preprocess_block_m(block_dv, q.element_size())
    _kernels._attn_bwd_preprocess[_grid(triton.cdiv(seq_q, pre_block) * batch * heads_q)](
        o, do, delta, *_strides3(o), *_strides3(do), heads_q, seq_q, head_dim_v,
        BLOCK_M=pre_block, BLOCK_DV=block_dv,
    )

    bias_args, bias_kind = _bias_args(bias, q)
    cfg = configs.backward_dkdv
    _kernels._attn_bwd_dkdv[_grid(triton.cdiv(seq_k, cfg.block_n) * batch * heads_kv)](
        q, k, v, do, lse, delta, dk, dv,
        *_strides3(q), *_strides3(k), *_strides3(v), *_strides3(do), *_strides3(dk), *_strides3(dv),
        *bias_args, dbias if dbias is not None else lse,
        heads_q, heads_kv, heads_q // heads_kv, seq_q, seq_k, head_dim, head_dim_v, qk_scale_log2, scale,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_D=block_d, BLOCK_DV=block_dv, CAUSAL=causal,
        EVEN_D=block_d == head_dim, EVEN_DV=block_dv == head_dim_v, BIAS_KIND=bias_kind,
        STORE_DBIAS=dbias is not None,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, **flags,
    )

    cfg = configs.backward_dq
    _kernels._attn_bwd_dq[_grid(triton.cdiv(seq_q, cfg.block_m) * batch * heads_q)](
        q, k, v, do, lse, delta, dq,
        *_strides3(q), *_strides3(k), *_strides3(v), *_strides3(do), *_strides3(dq), *bias_args,
        heads_q, heads_q // heads_kv, seq_q, seq_k, head_dim, head_dim_v, qk_scale_log2, scale,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_D=block_d, BLOCK_DV=block_dv, CAUSAL=causal,
        EVEN_D=block_d == head_dim, EVEN_DV=block_dv == head_dim_v, BIAS_KIND=bias_kind,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, **flags,
    )
    return dq[..., :head_dim_out], dk[..., :head_dim_out], dv[..., :head_dim_v_out], dbias
