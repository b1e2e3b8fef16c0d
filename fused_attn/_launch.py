"""Typed launchers: allocate outputs, pick a config, compute the grid, launch the kernels.

Inputs are validated by the callers (fused_attn._checks) before anything here runs.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import math
import os
import threading
from dataclasses import dataclass
from typing import Callable, Iterator, TypeVar

import torch
import triton
from triton.runtime.errors import OutOfResources
from triton.runtime.jit import JITFunction

from fused_attn.kernels import attention as _kernels
from fused_attn.kernels import configs as _configs
from fused_attn._warnings import warn_once
from fused_attn.kernels.configs import INTERPRETER_CONFIGS, AttentionConfigs, KernelConfig, preprocess_block_m

_MAX_GRID = 2**31 - 1
_config_override: contextvars.ContextVar[AttentionConfigs | None] = contextvars.ContextVar(
    "fused_attn_config_override", default=None)
# The Triton interpreter patches triton.language module-wide while a kernel runs, so two threads
# interpreting at once corrupt each other's launch (InterpreterError). Compiled launches need no lock.
_INTERPRETER_LOCK = threading.RLock()
_Launcher = TypeVar("_Launcher", bound=Callable)


def interpreting() -> bool:
    """True when the kernels were built by the Triton interpreter (TRITON_INTERPRET=1 at import)."""
    return not isinstance(_kernels._attn_fwd, JITFunction)


def _serialized_when_interpreting(launcher: _Launcher) -> _Launcher:
    """Run `launcher` under a process-wide lock when the kernels are interpreted."""
    @functools.wraps(launcher)
    def run(*args, **kwargs):
        if not interpreting():
            return launcher(*args, **kwargs)
        with _INTERPRETER_LOCK:
            return launcher(*args, **kwargs)
    return run  # type: ignore[return-value]


def _check_kernel_config(name: str, config: object) -> None:
    if not isinstance(config, KernelConfig):
        raise TypeError(f"configs.{name} must be a fused_attn.KernelConfig, got {type(config).__name__}")
    for field_name in ("block_m", "block_n", "num_warps", "num_stages"):
        value = getattr(config, field_name)
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"configs.{name}.{field_name} must be an int, got {type(value).__name__}")
    for field_name in ("block_m", "block_n"):  # tl.dot needs 16, tl.arange a power of two
        value = getattr(config, field_name)
        if value < 16 or value & (value - 1):
            raise ValueError(f"configs.{name}.{field_name} must be a power of two >= 16, got {value}")
    if config.num_warps < 1 or config.num_warps & (config.num_warps - 1):
        raise ValueError(f"configs.{name}.num_warps must be a power of two >= 1, got {config.num_warps}")
    if config.num_stages < 1:
        raise ValueError(f"configs.{name}.num_stages must be >= 1, got {config.num_stages}")


@contextlib.contextmanager
def override_configs(configs: AttentionConfigs) -> Iterator[None]:
    """Launch every kernel inside the block with `configs` instead of the table's choice.
    Each KernelConfig needs blocks that are powers of two >= 16, a power-of-two warp count and at
    least one stage; anything else raises a ValueError or TypeError here, before any launch."""
    if not isinstance(configs, AttentionConfigs):
        raise TypeError(f"configs must be a fused_attn.AttentionConfigs, got {type(configs).__name__}")
    for name in ("forward", "backward_dkdv", "backward_dq"):
        _check_kernel_config(name, getattr(configs, name))
    token = _config_override.set(configs)
    try:
        yield
    finally:
        _config_override.reset(token)


def check_device(t: torch.Tensor, head_dim: int = 0) -> None:
    """Kernels run on CUDA tensors, or on CPU tensors under the interpreter; say so otherwise.
    `head_dim`: the largest of the call's q/k and v head dims, checked against the card."""
    if t.device.type == "cuda":
        if interpreting():
            raise ValueError("q is a CUDA tensor but TRITON_INTERPRET=1 is set: the interpreter runs "
                             "CPU tensors only; unset TRITON_INTERPRET or move q, k, v to the CPU")
        check_dtype_on_device(t, head_dim)
        return
    if t.device.type == "cpu":
        if not interpreting():
            raise ValueError("q is a CPU tensor and the Triton interpreter is off: move q, k, v to a "
                             "CUDA device, or set TRITON_INTERPRET=1 in the environment before "
                             "importing triton or fused_attn to run the kernels on the CPU (slowly)")
        return
    raise ValueError(f"q is on device type '{t.device.type}'; fused_attn runs on 'cuda' "
                     "(or 'cpu' under TRITON_INTERPRET=1)")


@functools.lru_cache(maxsize=None)
def device_row(device_index: int) -> tuple[int, int, int]:
    """(capability, shared memory per block in bytes, the config table's row) of a CUDA device."""
    major, minor = torch.cuda.get_device_capability(device_index)
    properties = torch.cuda.get_device_properties(device_index)
    shared = getattr(properties, "shared_memory_per_block_optin", None)
    if not shared:
        shared = triton.runtime.driver.active.utils.get_device_properties(device_index)["max_shared_mem"]
    capability = major * 10 + minor
    return capability, int(shared), _configs.table_capability(capability, int(shared))


def device_fallback_reason(q: torch.Tensor, head_dim: int = 0) -> str | None:
    """Why the kernels cannot serve this call on q's GPU, or None: bf16 before capability 8.0, or
    a head dim (`head_dim`: the largest of q/k and v) over what the card's shared memory allows
    (configs.max_head_dim). The drop-in wrappers fall back to torch for it, where `attention` raises."""
    if q.device.type != "cuda" or interpreting():
        return None
    capability, _, row = device_row(q.device.index if q.device.index is not None else torch.cuda.current_device())
    if q.dtype == torch.bfloat16 and capability < 80:
        return f"bf16 on a GPU of capability {capability // 10}.{capability % 10} (no bf16 arithmetic)"
    limit = _configs.max_head_dim(row, q.element_size())
    if head_dim > limit:
        return (f"a head dim of {head_dim} in {str(q.dtype).replace('torch.', '')} on a GPU of capability "
                f"{capability // 10}.{capability % 10} (at most {limit}: no tile of a larger head dim fits its shared "
                "memory)")
    return None


def check_dtype_on_device(q: torch.Tensor, head_dim: int = 0) -> None:
    """bf16 needs capability 8.0, and head dims over 256 a card whose shared memory holds their
    tiles: refuse them before any launch; warn once that Turing (sm_75) runs without tensor cores
    (Triton lowers tl.dot to FMA there)."""
    if q.device.type != "cuda" or interpreting():
        return
    capability, _, row = device_row(q.device.index if q.device.index is not None else torch.cuda.current_device())
    if q.dtype == torch.bfloat16 and capability < 80:
        raise ValueError(f"q has dtype torch.bfloat16, which a GPU of capability {capability // 10}.{capability % 10} "
                         "cannot compute in; use torch.float16 or torch.float32 on this card")
    reason = device_fallback_reason(q, head_dim)
    if reason is not None:
        raise ValueError(f"q, k, v: {reason}; use smaller head dims on this card, or a card with more shared memory")
    if not _configs.TARGETS[row].tensor_cores:
        warn_once(_WARNED, ("no tensor cores", row),
                  f"fused_attn on capability {capability // 10}.{capability % 10} ({_configs.TARGETS[row].cards}): "
                  "Triton lowers tl.dot to FMA instructions here, without tensor cores; the kernels are correct "
                  "but slow (torch.nn.functional.scaled_dot_product_attention may be faster on this card)",
                  category=RuntimeWarning, stacklevel=2)


ENV_TMA = "FUSED_ATTN_TMA"
# Device-side TMA descriptors (tl.make_tensor_descriptor) exist from Triton 3.4 on; older Tritons
# keep the pointer loads.
_TRITON_HAS_TMA = hasattr(triton.language, "make_tensor_descriptor") and hasattr(triton, "set_allocator")


def use_tma(q: torch.Tensor, kernel: str, head_dim: int, variant: str) -> bool:
    """Whether `kernel` ("forward", "backward_dkdv", "backward_dq") loads its streamed tiles (K/V
    in the forward and dQ, Q/dO in dK/dV) through TMA descriptors for this call: on GPUs of
    capability 9.0 and newer where configs.uses_tma says the compile report showed it pays.
    FUSED_ATTN_TMA=0 turns it off; under the interpreter it is off unless FUSED_ATTN_TMA=1 (the
    tests run the descriptor path that way, for every call). Both paths give the same numbers:
    the descriptors zero-fill what the masked loads fill with zeros."""
    setting = os.environ.get(ENV_TMA, "").strip()
    if setting not in ("", "0", "1"):
        raise ValueError(f"{ENV_TMA} is {setting!r}: expected 0 (pointer loads), 1 (TMA where the device has it) "
                         "or unset (the default: TMA where the compile report chose it)")
    if setting == "0" or not _TRITON_HAS_TMA:
        return False
    if interpreting():
        return setting == "1"
    return q.device.type == "cuda" and _configs.uses_tma(_row(q), kernel, head_dim, q.element_size(), variant)


def _row(q: torch.Tensor) -> int:
    return device_row(q.device.index if q.device.index is not None else torch.cuda.current_device())[2]


def _tma_scratch(size: int, alignment: int, stream: int | None) -> torch.Tensor:
    """Global memory for the descriptors that the kernels build on the device (128 bytes each)."""
    return torch.empty(size, dtype=torch.int8, device="cuda")


def _ensure_tma_allocator() -> None:
    """Kernels that build TMA descriptors need Triton's scratch allocator; install one backed by
    torch's caching allocator unless the user has set their own (it is per thread or context in
    newer Tritons, so this runs before every such launch: the backward runs on autograd's thread)."""
    try:  # a private module: if a later Triton moves it, install ours (the launch needs one)
        from triton.runtime import _allocation

        current = _allocation._allocator
        current = current.get() if hasattr(current, "get") else current
        missing = isinstance(current, _allocation.NullAllocator)
    except (ImportError, AttributeError):
        missing = True
    if missing:
        triton.set_allocator(_tma_scratch)


_WARNED: set[object] = set()


def _variant_key(flags: dict[str, object]) -> str:
    return _configs.variant_key(bool(flags["BIAS_KIND"]), bool(flags["HAS_DROPOUT"]))


def _kernel_candidates(kernel: str, q: torch.Tensor, head_dim: int, head_dim_v: int, variant: str,
                       seq_q: int, seq_k: int, run: Callable[[KernelConfig], None] | None = None
                       ) -> tuple[KernelConfig, ...]:
    """Tiles to launch `kernel` ("forward", "backward_dkdv", "backward_dq") with, in order: the
    first runs; the rest are retried if a launch runs out of resources. An override_configs block
    or the interpreter pins one; otherwise the table's vetted list for this card, reordered by
    the user's tuning results (fused_attn.tune) when there are any."""
    override = _config_override.get()
    if override is not None:
        return (getattr(override, kernel),)
    if interpreting():
        return (getattr(INTERPRETER_CONFIGS, kernel),)
    device_index = q.device.index if q.device.index is not None else torch.cuda.current_device()
    _, shared, row = device_row(device_index)
    size = 4 if q.element_size() >= 4 else 2
    table = _configs.candidates(row, max(head_dim, head_dim_v), size, variant, shared)[kernel]
    from fused_attn import tune  # late: tune imports this module

    key = tune.TuneKey(kernel=kernel, head_dim=_configs.head_dim_bucket(max(head_dim, head_dim_v)),
                       dtype=tune.dtype_name(q.dtype), variant=variant,
                       even_d=_padded(head_dim) == head_dim and _padded(head_dim_v) == head_dim_v,
                       seq_bucket=tune.seq_bucket(max(seq_q, seq_k)))
    return tune.choose(key, q.device, table, run)


_OUT_OF_RESOURCES: set[tuple[object, ...]] = set()


def _launch_tiled(kernel: str, candidates: tuple[KernelConfig, ...], q: torch.Tensor,
                  launch: Callable[[KernelConfig], None], specialization: tuple[object, ...]) -> None:
    """Launch with the first tile that fits the card: a tile that runs out of shared memory or
    registers here (a card the table does not know exactly) is skipped from then on for the same
    kernel and specialization (`specialization`: the head-dim blocks and flags, which change what
    a tile needs), with a one-time warning, and the next smaller vetted tile is tried. Triton
    raises OutOfResources when it loads the kernel, before anything runs: no output is half-written."""
    last_error: Exception | None = None
    for cfg in candidates:
        key = (q.device, kernel, q.dtype, specialization, cfg)
        if key in _OUT_OF_RESOURCES:
            continue
        try:
            launch(cfg)
            return
        except OutOfResources as exc:
            _OUT_OF_RESOURCES.add(key)
            last_error = exc
            warn_once(_WARNED, key, f"fused_attn: the {kernel} tile {cfg} needs more resources than this GPU has "
                      f"({exc}); using the next smaller vetted tile", category=RuntimeWarning, stacklevel=2)
    if last_error is None:
        raise RuntimeError(f"fused_attn: every vetted {kernel} tile ran out of resources on this GPU earlier")
    raise last_error


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


def _bias_args(bias: torch.Tensor | None, q: torch.Tensor) -> tuple[tuple[object, ...], int]:
    """(pointer, 4 strides) for the kernels' BIAS argument, and BIAS_KIND: 0 none, 1 float
    added to the scores, 2 bool (True attends). A broadcast dimension has stride 0."""
    if bias is None:
        return (q, 0, 0, 0, 0), 0
    strides = tuple(bias.stride(i) if bias.shape[i] > 1 else 0 for i in range(4))
    return (bias, *strides), 2 if bias.dtype == torch.bool else 1


@dataclass(frozen=True)
class Variant:
    """Everything about a call besides q, k, v: validated by fused_attn._checks before it gets here.

    window_left / window_right: -1 is unbounded; causal is window_right = 0 (merged in by the caller).
    softcap: 0 is off. dropout_p: 0 is off, and then dropout_seed is unused.
    cu_seqlens_q / cu_seqlens_k: int32 (num_seqs + 1,) for packed input, with max_seqlen_q / _k.
    sinks: float32 (Hq,) contiguous, one attention-sink logit per query head, or None.
    """

    scale: float
    window_left: int = -1
    window_right: int = -1
    softcap: float = 0.0
    bias: torch.Tensor | None = None
    alibi_slopes: torch.Tensor | None = None
    dropout_p: float = 0.0
    dropout_seed: int = 0
    cu_seqlens_q: torch.Tensor | None = None
    cu_seqlens_k: torch.Tensor | None = None
    max_seqlen_q: int = 0
    max_seqlen_k: int = 0
    sinks: torch.Tensor | None = None

    @property
    def is_varlen(self) -> bool:
        return self.cu_seqlens_q is not None


def _window_bound(size: int, seq_q: int, seq_k: int) -> int:
    """A window side as the kernels take it: -1 when it cannot exclude any key (no band edge to
    mask, and no int32 overflow in the kernels' index arithmetic for huge sizes)."""
    return -1 if size < 0 or size >= seq_q + seq_k else size


def _variant_args(variant: Variant, q: torch.Tensor, stride_lse: tuple[int, int], seq_q: int, seq_k: int
                  ) -> tuple[tuple[tuple[object, ...], tuple[object, ...]], dict[str, object]]:
    """The kernels' arguments from LSE's strides up to CU_SEQLENS_K and from window_left up to
    dropout_seed, and the variant constexprs. `q` stands in for absent pointers (never read).
    seq_q, seq_k: the (longest) lengths, which bound the window sizes that matter."""
    window_left = _window_bound(variant.window_left, seq_q, seq_k)
    window_right = _window_bound(variant.window_right, seq_q, seq_k)
    bias_args, bias_kind = _bias_args(variant.bias, q)
    # The kernels read slopes and boundaries through raw pointers as dense arrays: make them so.
    slopes = None if variant.alibi_slopes is None else variant.alibi_slopes.contiguous()
    alibi_args = (q, 0) if slopes is None else (slopes, slopes.stride(0) if slopes.dim() == 2 else 0)
    cu_q = variant.cu_seqlens_q.contiguous() if variant.is_varlen else q
    cu_k = variant.cu_seqlens_k.contiguous() if variant.is_varlen else q
    softcap = variant.softcap
    args = (*stride_lse, *bias_args, *alibi_args, cu_q, cu_k)
    tail = (window_left, window_right,
            variant.scale / softcap if softcap > 0 else 0.0, softcap * math.log2(math.e),
            variant.dropout_p, variant.dropout_seed)
    flags = {"LIMIT_LEFT": window_left >= 0, "LIMIT_RIGHT": window_right >= 0,
             "BIAS_KIND": bias_kind, "HAS_ALIBI": slopes is not None, "HAS_SOFTCAP": softcap > 0,
             "HAS_DROPOUT": variant.dropout_p > 0, "IS_VARLEN": variant.is_varlen}
    return (args, tail), flags


def _problem(q: torch.Tensor, k: torch.Tensor, variant: Variant) -> tuple[int, int, int]:
    """(sequences, longest query length, longest key length): what the grid is sized by."""
    if variant.is_varlen:
        return variant.cu_seqlens_q.shape[0] - 1, variant.max_seqlen_q, variant.max_seqlen_k
    return q.shape[0], q.shape[2], k.shape[2]


def _lse_strides(q: torch.Tensor, variant: Variant) -> tuple[int, int]:
    """lse is (B, Hq, Sq) for padded input and (Hq, total_q) for packed input, as in FlashAttention-2."""
    heads_q, seq_q = q.shape[1], q.shape[2]
    return (0, seq_q) if variant.is_varlen else (heads_q * seq_q, seq_q)


@_serialized_when_interpreting
def attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, variant: Variant
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """o (B, Hq, Sq, Dv) in q's dtype and lse (B, Hq, Sq) float32, natural log.

    Packed input arrives as (1, H, total, D) views of (total, H, D) tensors; lse is then (Hq, total_q)."""
    _, heads_q, seq_q, _ = q.shape
    heads_kv, head_dim_v_out = k.shape[1], v.shape[3]
    batch, max_q, max_k = _problem(q, k, variant)
    lse_shape = (heads_q, seq_q) if variant.is_varlen else (q.shape[0], heads_q, seq_q)
    lse = torch.empty(lse_shape, dtype=torch.float32, device=q.device)
    if batch * heads_q * max_q == 0 or max_k == 0:
        o = _empty_like_layout(q, (q.shape[0], heads_q, seq_q, head_dim_v_out), q.dtype)
        lse.fill_(-math.inf)  # no key at all: every row attends to nothing (or only to its sink)
        if variant.sinks is not None:
            lse.copy_(variant.sinks.view(-1, 1) if variant.is_varlen else variant.sinks.view(1, -1, 1).expand_as(lse))
        return o.zero_(), lse
    q, k, v = _aligned(q), _aligned(k), _aligned(v)
    head_dim, head_dim_v = q.shape[3], v.shape[3]
    o = _empty_like_layout(q, (q.shape[0], heads_q, seq_q, head_dim_v), q.dtype)
    block_d, block_dv = _padded(head_dim), _padded(head_dim_v)
    (args, tail), flags = _variant_args(variant, q, _lse_strides(q, variant), max_q, max_k)
    tma = use_tma(q, "forward", max(head_dim, head_dim_v), _variant_key(flags))
    if tma and q.is_cuda:
        _ensure_tma_allocator()

    sinks = variant.sinks
    flags["HAS_SINKS"] = sinks is not None  # the forward's epilogue only: the backward reads the merged lse

    def launch(cfg: KernelConfig) -> None:
        _kernels._attn_fwd[_grid(triton.cdiv(max_q, cfg.block_m) * batch * heads_q)](
            q, k, v, o, lse, sinks if sinks is not None else lse,
            *_strides3(q), *_strides3(k), *_strides3(v), *_strides3(o), *args,
            heads_q, heads_q // heads_kv, max_q, max_k, head_dim, head_dim_v, variant.scale * math.log2(math.e),
            *tail,
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_D=block_d, BLOCK_DV=block_dv,
            EVEN_D=block_d == head_dim, EVEN_DV=block_dv == head_dim_v, **flags, SCALE_POSITIVE=variant.scale > 0,
            USE_TMA=tma, num_warps=cfg.num_warps, num_stages=cfg.num_stages, **_kernel_flags(q),
        )

    specialization = (block_d, block_dv, block_d == head_dim, block_dv == head_dim_v, tma,
                      tuple(sorted(flags.items())))
    _launch_tiled("forward", _kernel_candidates("forward", q, head_dim, head_dim_v, _variant_key(flags),
                                                max_q, max_k, launch), q, launch, specialization)
    return o[..., :head_dim_v_out], lse


@_serialized_when_interpreting
def attention_backward(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       o: torch.Tensor, lse: torch.Tensor, variant: Variant, bias_grad: bool = False,
                       dlse: torch.Tensor | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """dq, dk, dv with the shapes, dtypes and layouts of q, k, v, with `bias_grad` the float32
    gradient of the scores, (B, Hq, Sq, Sk) (the bias's gradient before broadcasting is undone),
    and with sinks their float32 gradient (Hq,) (else None). `dlse`, the gradient of the lse
    (lse's shape), when the caller used the lse. Deterministic: no atomics.

    The forward's lse already holds the sinks, so the kernels' p = exp(score - lse) are the
    probabilities of the real keys; a sink only adds its own gradient, p_sink * (dlse - rowsum(dO * O))
    = -p_sink * delta per row, summed here over batch and rows."""
    _, heads_q, seq_q, head_dim_out = q.shape
    heads_kv, seq_k, head_dim_v_out = k.shape[1], k.shape[2], v.shape[3]
    batch, max_q, max_k = _problem(q, k, variant)
    dbias = torch.zeros((batch, heads_q, seq_q, seq_k), dtype=torch.float32, device=q.device) if bias_grad else None
    if batch * heads_q * max_q == 0 or max_k == 0:
        # No key: a sink-only row has lse = sink and o = 0, so only dlse reaches the sink.
        dsinks = None if variant.sinks is None else _sink_grad(variant.sinks, lse, -dlse if dlse is not None else None,
                                                               variant.is_varlen)
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v), dbias, dsinks
    if do.stride(-1) != 1:
        do = do.contiguous()
    q, k, v, o, do = _aligned(q), _aligned(k), _aligned(v), _aligned(o), _aligned(do)
    head_dim, head_dim_v = q.shape[3], v.shape[3]
    dq = _empty_like_layout(q, tuple(q.shape), q.dtype)
    dk = _empty_like_layout(k, tuple(k.shape), k.dtype)
    dv = _empty_like_layout(v, tuple(v.shape), v.dtype)
    block_d, block_dv = _padded(head_dim), _padded(head_dim_v)
    flags = _kernel_flags(q)
    qk_scale_log2 = variant.scale * math.log2(math.e)

    # delta and lse_log2 have lse's layout: (B, Hq, Sq), or (Hq, total_q) for packed input (then q.shape[0] is 1).
    lse = lse.contiguous()
    delta, lse_log2 = torch.empty_like(lse), torch.empty_like(lse)
    if dlse is not None:
        dlse = dlse.to(torch.float32).contiguous()
    pre_block = preprocess_block_m(block_dv, q.element_size())
    _kernels._attn_bwd_preprocess[_grid(triton.cdiv(seq_q, pre_block) * q.shape[0] * heads_q)](
        o, do, lse, dlse if dlse is not None else lse, delta, lse_log2, *_strides3(o), *_strides3(do),
        heads_q, seq_q, head_dim_v, BLOCK_M=pre_block, BLOCK_DV=block_dv, HAS_DLSE=dlse is not None,
    )
    dsinks = None if variant.sinks is None else _sink_grad(variant.sinks, lse, delta, variant.is_varlen)

    (args, tail), variant_flags = _variant_args(variant, q, _lse_strides(q, variant), max_q, max_k)
    key = _variant_key(variant_flags)
    tma_dkdv, tma_dq = (use_tma(q, kernel, max(head_dim, head_dim_v), key)
                        for kernel in ("backward_dkdv", "backward_dq"))
    if (tma_dkdv or tma_dq) and q.is_cuda:
        _ensure_tma_allocator()

    def launch_dkdv(cfg: KernelConfig) -> None:
        _kernels._attn_bwd_dkdv[_grid(triton.cdiv(max_k, cfg.block_n) * batch * heads_kv)](
            q, k, v, do, lse_log2, delta, dk, dv,
            *_strides3(q), *_strides3(k), *_strides3(v), *_strides3(do), *_strides3(dk), *_strides3(dv),
            *args[:7], dbias if dbias is not None else lse, *args[7:],
            heads_q, heads_kv, heads_q // heads_kv, max_q, max_k, head_dim, head_dim_v, qk_scale_log2, variant.scale,
            *tail,
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_D=block_d, BLOCK_DV=block_dv,
            EVEN_D=block_d == head_dim, EVEN_DV=block_dv == head_dim_v, STORE_DBIAS=dbias is not None,
            **variant_flags, USE_TMA=tma_dkdv, num_warps=cfg.num_warps, num_stages=cfg.num_stages, **flags,
        )

    def launch_dq(cfg: KernelConfig) -> None:
        _kernels._attn_bwd_dq[_grid(triton.cdiv(max_q, cfg.block_m) * batch * heads_q)](
            q, k, v, do, lse_log2, delta, dq,
            *_strides3(q), *_strides3(k), *_strides3(v), *_strides3(do), *_strides3(dq), *args,
            heads_q, heads_q // heads_kv, max_q, max_k, head_dim, head_dim_v, qk_scale_log2, variant.scale,
            *tail,
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_D=block_d, BLOCK_DV=block_dv,
            EVEN_D=block_d == head_dim, EVEN_DV=block_dv == head_dim_v, **variant_flags,
            USE_TMA=tma_dq, num_warps=cfg.num_warps, num_stages=cfg.num_stages, **flags,
        )

    specialization = (block_d, block_dv, block_d == head_dim, block_dv == head_dim_v, dbias is not None,
                      tuple(sorted(variant_flags.items())))
    for kernel, launch, tma in (("backward_dkdv", launch_dkdv, tma_dkdv), ("backward_dq", launch_dq, tma_dq)):
        _launch_tiled(kernel, _kernel_candidates(kernel, q, head_dim, head_dim_v, key, max_q, max_k, launch), q, launch,
                      (*specialization, tma))
    return dq[..., :head_dim_out], dk[..., :head_dim_out], dv[..., :head_dim_v_out], dbias, dsinks


def _sink_grad(sinks: torch.Tensor, lse: torch.Tensor, delta: torch.Tensor | None, is_varlen: bool) -> torch.Tensor:
    """float32 (Hq,): d loss / d sink_h = -sum over batch and rows of p_sink * delta, p_sink =
    exp(sink_h - lse) (0 for a row whose lse is -inf: no key and a -inf sink). lse and delta are
    (B, Hq, Sq), or (Hq, total_q) for packed input. A fixed-order torch reduction: deterministic."""
    if delta is None:
        return torch.zeros_like(sinks)
    head_axis = 0 if is_varlen else 1
    shape = [1] * lse.dim()
    shape[head_axis] = -1
    p_sink = torch.exp(sinks.view(shape) - lse).masked_fill(lse == -math.inf, 0.0)
    other_axes = [axis for axis in range(lse.dim()) if axis != head_axis]
    return -(p_sink * delta).sum(dim=other_axes)


@_serialized_when_interpreting
def dropout_mask(batch: int, heads: int, seq_q: int, seq_k: int, dropout_p: float, seed: int,
                 device: torch.device) -> torch.Tensor:
    """Bool (batch, heads, seq_q, seq_k): True where the kernels keep a probability."""
    mask = torch.empty((batch, heads, seq_q, seq_k), dtype=torch.int8, device=device)
    if mask.numel() == 0:
        return mask.bool()
    block_m, block_n = 32, 64
    programs = triton.cdiv(seq_q, block_m) * triton.cdiv(seq_k, block_n) * batch * heads
    _kernels._dropout_mask[_grid(programs)](mask, heads, seq_q, seq_k, dropout_p, seed,
                                             BLOCK_M=block_m, BLOCK_N=block_n)
    return mask.bool()


@_serialized_when_interpreting
def attention_probs(q: torch.Tensor, k: torch.Tensor, lse: torch.Tensor, rows: torch.Tensor, heads: torch.Tensor,
                    variant: Variant) -> torch.Tensor:
    """float32 (B, len(heads), len(rows), Sk): exp(score - lse) of the chosen query rows and heads.
    rows, heads: int32 index tensors on q's device."""
    batch, heads_q, seq_q, _ = q.shape
    heads_kv, seq_k = k.shape[1], k.shape[2]
    probs = torch.empty((batch, heads.shape[0], rows.shape[0], seq_k), dtype=torch.float32, device=q.device)
    if probs.numel() == 0:
        return probs
    q, k = _aligned(q), _aligned(k)
    head_dim = q.shape[3]
    block_m, block_n, block_d = 32, 64, _padded(head_dim)
    (args, tail), flags = _variant_args(variant, q, (0, 0), seq_q, seq_k)
    programs = triton.cdiv(rows.shape[0], block_m) * triton.cdiv(seq_k, block_n) * batch * heads.shape[0]
    _kernels._attn_probs[_grid(programs)](
        q, k, lse, probs, rows, heads, *_strides3(q), *_strides3(k), heads_q * seq_q, seq_q,
        *probs.stride()[:3], *args[2:9],
        heads.shape[0], rows.shape[0], heads_q // heads_kv, seq_q, seq_k, head_dim, variant.scale * math.log2(math.e),
        *tail[:4], BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, EVEN_D=block_d == head_dim,
        **{name: flags[name] for name in ("LIMIT_LEFT", "LIMIT_RIGHT", "BIAS_KIND", "HAS_ALIBI", "HAS_SOFTCAP")},
        **_kernel_flags(q))
    return probs


@_serialized_when_interpreting
def attention_stats(q: torch.Tensor, k: torch.Tensor, variant: Variant
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(lse, entropy, max_prob) float32 (B, Hq, Sq) and received float32 (B, Hq, Sk), O(S) memory."""
    batch, heads_q, seq_q, _ = q.shape
    heads_kv, seq_k = k.shape[1], k.shape[2]
    lse = torch.empty((batch, heads_q, seq_q), dtype=torch.float32, device=q.device)
    entropy, max_prob = torch.empty_like(lse), torch.empty_like(lse)
    received = torch.empty((batch, heads_q, seq_k), dtype=torch.float32, device=q.device)
    if batch * heads_q * seq_q == 0 or seq_k == 0:  # no query or no key: nothing attends
        return lse.fill_(-math.inf), entropy.zero_(), max_prob.zero_(), received.zero_()
    q, k = _aligned(q), _aligned(k)
    head_dim = q.shape[3]
    block_d = _padded(head_dim)
    (args, tail), flags = _variant_args(variant, q, (0, 0), seq_q, seq_k)
    key = _variant_key(flags)
    flags = {name: flags[name] for name in ("LIMIT_LEFT", "LIMIT_RIGHT", "BIAS_KIND", "HAS_ALIBI", "HAS_SOFTCAP")}
    common = (*_strides3(q), *_strides3(k), *args[2:9], heads_q, heads_q // heads_kv, seq_q, seq_k, head_dim,
              variant.scale * math.log2(math.e), *tail[:4])

    # The forward's and dQ's tiles: the same score tile shapes, without v and its accumulator.
    def launch_rows(cfg: KernelConfig) -> None:
        _kernels._attn_row_stats[_grid(triton.cdiv(seq_q, cfg.block_m) * batch * heads_q)](
            q, k, lse, entropy, max_prob, *common, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_D=block_d,
            EVEN_D=block_d == head_dim, **flags, num_warps=cfg.num_warps, num_stages=cfg.num_stages, **_kernel_flags(q))

    def launch_cols(cfg: KernelConfig) -> None:
        _kernels._attn_col_sums[_grid(triton.cdiv(seq_k, cfg.block_n) * batch * heads_q)](
            q, k, lse, received, *common, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_D=block_d,
            EVEN_D=block_d == head_dim, **flags, num_warps=cfg.num_warps, num_stages=cfg.num_stages, **_kernel_flags(q))

    # Table tiles only (no tuning: these kernels are not what the tuner times).
    specialization = (block_d, block_d == head_dim, tuple(sorted(flags.items())))
    for name, kernel, launch in (("row_stats", "forward", launch_rows), ("col_sums", "backward_dq", launch_cols)):
        _launch_tiled(name, _kernel_candidates(kernel, q, head_dim, head_dim, key, seq_q, seq_k), q, launch,
                      specialization)
    return lse, entropy, max_prob, received
