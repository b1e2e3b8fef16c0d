"""Typed launchers: allocate outputs, pick a config, compute the grid, launch the kernels.

Inputs are validated by the callers (fused_attn._checks) before anything here runs.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import inspect
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
                       even_d=_configs.head_dim_bucket(head_dim) == head_dim
                       and _configs.head_dim_bucket(head_dim_v) == head_dim_v,
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


def _strides(t: torch.Tensor, names: tuple[str, ...]) -> dict[str, int]:
    """The kernels' stride arguments `names` for t's leading dimensions, by name. A dimension of
    size 1 (or broadcast) is only ever indexed at 0: it gets stride 0, so an arbitrary stride there
    does not select a kernel specialization for unaligned strides."""
    return {name: t.stride(i) if t.shape[i] > 1 else 0 for i, name in enumerate(names)}


def _bhs_strides(t: torch.Tensor, name: str, rows: str) -> dict[str, int]:
    """stride_{name}b, stride_{name}h, stride_{name}{rows} of a (B, H, S, D) tensor."""
    return _strides(t, (f"stride_{name}b", f"stride_{name}h", f"stride_{name}{rows}"))


@dataclass(frozen=True)
class AttentionParams:
    """Everything about an attention call besides q, k, v (validated by fused_attn._checks before
    it gets here): what the custom ops take, by name (`_function.op_args` flattens it).

    window_left / window_right: -1 is unbounded; causal is window_right = 0 (merged in by the caller).
    softcap: 0 is off. dropout_p: 0 is off; dropout_seed is then unused, else an int64 scalar tensor.
    cu_seqlens_q / cu_seqlens_k: int32 (num_seqs + 1,) for packed input, with max_seqlen_q / _k.
    sinks: (Hq,), one attention-sink logit per query head, or None.
    """

    scale: float
    window_left: int = -1
    window_right: int = -1
    softcap: float = 0.0
    bias: torch.Tensor | None = None
    alibi_slopes: torch.Tensor | None = None
    dropout_p: float = 0.0
    dropout_seed: torch.Tensor | None = None
    cu_seqlens_q: torch.Tensor | None = None
    cu_seqlens_k: torch.Tensor | None = None
    max_seqlen_q: int = 0
    max_seqlen_k: int = 0
    sinks: torch.Tensor | None = None

    @property
    def is_varlen(self) -> bool:
        return self.cu_seqlens_q is not None

    @property
    def kernel_sinks(self) -> torch.Tensor | None:
        """The sinks as the kernels read them: a dense float32 array."""
        return None if self.sinks is None else self.sinks.detach().to(torch.float32).contiguous()


def _window_bound(size: int, seq_q: int, seq_k: int) -> int:
    """A window side as the kernels take it: -1 when it cannot exclude any key (no band edge to
    mask, and no int32 overflow in the kernels' index arithmetic for huge sizes)."""
    return -1 if size < 0 or size >= seq_q + seq_k else size


# The constexprs that select a score variant: launch specializations are keyed by them.
_SCORE_FLAGS = ("LIMIT_LEFT", "LIMIT_RIGHT", "BIAS_KIND", "HAS_ALIBI", "HAS_SOFTCAP", "HAS_DROPOUT", "IS_VARLEN")


_BIAS_STRIDES = ("stride_bias_b", "stride_bias_h", "stride_bias_m", "stride_bias_n")


def _score_arguments(params: AttentionParams, seq_q: int, seq_k: int) -> dict[str, object]:
    """Every kernel argument that describes how scores are formed (mask, ALiBi, softcap, window,
    dropout, packing), by the kernels' parameter names, with the constexpr flags that go with
    them; each kernel takes the ones it names (`_run_kernel`). Absent pointers are None (their
    flag is off, so no kernel reads them). seq_q, seq_k: the (longest) lengths, which bound the window
    sizes that matter. BIAS_KIND: 0 none, 1 float added to the scores, 2 bool (True attends)."""
    window_left = _window_bound(params.window_left, seq_q, seq_k)
    window_right = _window_bound(params.window_right, seq_q, seq_k)
    bias = params.bias
    # The kernels read slopes and boundaries through raw pointers as dense arrays: make them so.
    slopes = None if params.alibi_slopes is None else params.alibi_slopes.contiguous()
    softcap = params.softcap
    dropout = params.dropout_p > 0
    return {
        "BIAS": bias,
        **({name: 0 for name in _BIAS_STRIDES} if bias is None else _strides(bias, _BIAS_STRIDES)),
        "ALIBI": slopes,
        "stride_alibi_b": slopes.stride(0) if slopes is not None and slopes.dim() == 2 else 0,
        "CU_SEQLENS_Q": params.cu_seqlens_q.contiguous() if params.is_varlen else None,
        "CU_SEQLENS_K": params.cu_seqlens_k.contiguous() if params.is_varlen else None,
        "window_left": window_left, "window_right": window_right,
        "softcap_in": params.scale / softcap if softcap > 0 else 0.0,
        "softcap_out_log2": softcap * math.log2(math.e),
        "dropout_p": params.dropout_p,
        "dropout_seed": int(params.dropout_seed.item()) if dropout and params.dropout_seed is not None else 0,
        "LIMIT_LEFT": window_left >= 0, "LIMIT_RIGHT": window_right >= 0,
        "BIAS_KIND": 0 if bias is None else 2 if bias.dtype == torch.bool else 1,
        "HAS_ALIBI": slopes is not None, "HAS_SOFTCAP": softcap > 0, "HAS_DROPOUT": dropout,
        "IS_VARLEN": params.is_varlen,
    }


def _score_flags(arguments: dict[str, object]) -> tuple[tuple[str, object], ...]:
    return tuple((name, arguments[name]) for name in _SCORE_FLAGS)


def _variant_key(arguments: dict[str, object]) -> str:
    return _configs.variant_key(bool(arguments["BIAS_KIND"]), bool(arguments["HAS_DROPOUT"]))


def _run_kernel(kernel: JITFunction, programs: int, shared: dict[str, object], cfg: KernelConfig | None = None,
                **arguments: object) -> None:
    """kernel[grid](...) by keyword: `arguments`, the entries of `shared` (score arguments and
    flags common to several kernels) that this kernel names, and cfg's launch options."""
    names = _parameter_names(kernel)
    unknown = set(arguments) - names
    assert not unknown, f"{kernel.__name__} has no parameter(s) {sorted(unknown)}"
    arguments = {**{name: value for name, value in shared.items() if name in names}, **arguments}
    for pointer, flag in _kernels.OPTIONAL_POINTERS.items():
        if pointer in names and flag in names:  # an absent pointer is None, and only then is its flag off
            assert (arguments[pointer] is None) == (not arguments.get(flag, False)), (kernel.__name__, pointer, flag)
    options = {} if cfg is None else {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
    kernel[_grid(programs)](**arguments, **options)


@functools.lru_cache(maxsize=None)
def _parameter_names(kernel: JITFunction) -> frozenset[str]:
    fn = getattr(kernel, "fn", kernel)  # the interpreter's wrapper keeps the Python function as .fn
    return frozenset(inspect.signature(fn).parameters)


def _problem(q: torch.Tensor, k: torch.Tensor, params: AttentionParams) -> tuple[int, int, int]:
    """(sequences, longest query length, longest key length): what the grid is sized by."""
    if params.is_varlen:
        return params.cu_seqlens_q.shape[0] - 1, params.max_seqlen_q, params.max_seqlen_k
    return q.shape[0], q.shape[2], k.shape[2]


def _lse_strides(q: torch.Tensor, params: AttentionParams) -> dict[str, int]:
    """lse is (B, Hq, Sq) for padded input and (Hq, total_q) for packed input, as in FlashAttention-2."""
    heads_q, seq_q = q.shape[1], q.shape[2]
    return {"stride_lse_b": 0 if params.is_varlen else heads_q * seq_q, "stride_lse_h": seq_q}


def _block_key(dims: dict[str, object]) -> tuple[object, ...]:
    """What of the head dims changes the resources a tile needs: the blocks and their masks."""
    return tuple(dims.get(name) for name in ("BLOCK_D", "BLOCK_DV", "EVEN_D", "EVEN_DV"))


def _head_dims(q: torch.Tensor, v: torch.Tensor | None = None) -> dict[str, object]:
    """head_dim(_v), their power-of-two blocks and whether the blocks are exact, by name."""
    block_d = _configs.head_dim_bucket(q.shape[3])  # tl.dot's and tl.arange's power of two, >= 16
    dims: dict[str, object] = {"head_dim": q.shape[3], "BLOCK_D": block_d, "EVEN_D": block_d == q.shape[3]}
    if v is not None:
        block_dv = _configs.head_dim_bucket(v.shape[3])
        dims.update(head_dim_v=v.shape[3], BLOCK_DV=block_dv, EVEN_DV=block_dv == v.shape[3])
    return dims


@_serialized_when_interpreting
def attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, params: AttentionParams
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """o (B, Hq, Sq, Dv) in q's dtype and lse (B, Hq, Sq) float32, natural log.

    Packed input arrives as (1, H, total, D) views of (total, H, D) tensors; lse is then (Hq, total_q)."""
    _, heads_q, seq_q, _ = q.shape
    heads_kv, head_dim_v_out = k.shape[1], v.shape[3]
    batch, max_q, max_k = _problem(q, k, params)
    lse_shape = (heads_q, seq_q) if params.is_varlen else (q.shape[0], heads_q, seq_q)
    lse = torch.empty(lse_shape, dtype=torch.float32, device=q.device)
    sinks = params.kernel_sinks
    if batch * heads_q * max_q == 0 or max_k == 0:
        o = _empty_like_layout(q, (q.shape[0], heads_q, seq_q, head_dim_v_out), q.dtype)
        lse.fill_(-math.inf)  # no key at all: every row attends to nothing (or only to its sink)
        if sinks is not None:
            lse.copy_(sinks.view(-1, 1) if params.is_varlen else sinks.view(1, -1, 1).expand_as(lse))
        return o.zero_(), lse
    q, k, v = _aligned(q), _aligned(k), _aligned(v)
    o = _empty_like_layout(q, (q.shape[0], heads_q, seq_q, v.shape[3]), q.dtype)
    scores = _score_arguments(params, max_q, max_k)
    dims = _head_dims(q, v)
    key = _variant_key(scores)
    tma = use_tma(q, "forward", max(q.shape[3], v.shape[3]), key)
    if tma and q.is_cuda:
        _ensure_tma_allocator()

    def launch(cfg: KernelConfig) -> None:
        _run_kernel(_kernels._attn_fwd, triton.cdiv(max_q, cfg.block_m) * batch * heads_q, scores, cfg,
                Q=q, K=k, V=v, O=o, LSE=lse, SINKS=sinks,
                **_bhs_strides(q, "q", "m"), **_bhs_strides(k, "k", "n"), **_bhs_strides(v, "v", "n"),
                **_bhs_strides(o, "o", "m"), **_lse_strides(q, params),
                num_heads_q=heads_q, group_size=heads_q // heads_kv, seq_q=max_q, seq_k=max_k,
                qk_scale_log2=params.scale * math.log2(math.e), **dims, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
                SCALE_POSITIVE=params.scale > 0, USE_TMA=tma, HAS_SINKS=sinks is not None, **_kernel_flags(q))

    # The sinks change only the forward's epilogue: the backward reads the merged lse.
    specialization = (*_block_key(dims), tma, sinks is not None, _score_flags(scores))
    _launch_tiled("forward", _kernel_candidates("forward", q, q.shape[3], v.shape[3], key, max_q, max_k, launch),
                  q, launch, specialization)
    return o[..., :head_dim_v_out], lse


@_serialized_when_interpreting
def attention_backward(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       o: torch.Tensor, lse: torch.Tensor, params: AttentionParams, bias_grad: bool = False,
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
    batch, max_q, max_k = _problem(q, k, params)
    sinks = params.kernel_sinks
    dbias = torch.zeros((batch, heads_q, seq_q, seq_k), dtype=torch.float32, device=q.device) if bias_grad else None
    if batch * heads_q * max_q == 0 or max_k == 0:
        # No key: a sink-only row has lse = sink and o = 0, so only dlse reaches the sink.
        dsinks = None if sinks is None else _sink_grad(sinks, lse, -dlse if dlse is not None else None,
                                                       params.is_varlen)
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v), dbias, dsinks
    if do.stride(-1) != 1:
        do = do.contiguous()
    q, k, v, o, do = _aligned(q), _aligned(k), _aligned(v), _aligned(o), _aligned(do)
    dq = _empty_like_layout(q, tuple(q.shape), q.dtype)
    dk = _empty_like_layout(k, tuple(k.shape), k.dtype)
    dv = _empty_like_layout(v, tuple(v.shape), v.dtype)
    dims = _head_dims(q, v)

    # delta and lse_log2 have lse's layout: (B, Hq, Sq), or (Hq, total_q) for packed input (then q.shape[0] is 1).
    lse = lse.contiguous()
    delta, lse_log2 = torch.empty_like(lse), torch.empty_like(lse)
    if dlse is not None:
        dlse = dlse.to(torch.float32).contiguous()
    pre_block = preprocess_block_m(dims["BLOCK_DV"], q.element_size())
    _run_kernel(_kernels._attn_bwd_preprocess, triton.cdiv(seq_q, pre_block) * q.shape[0] * heads_q, {},
            O=o, DO=do, LSE=lse, DLSE=dlse, DELTA=delta, LSE_LOG2=lse_log2,
            **_bhs_strides(o, "o", "m"), **_bhs_strides(do, "do", "m"), num_heads_q=heads_q, seq_q=seq_q,
            head_dim_v=v.shape[3], BLOCK_M=pre_block, BLOCK_DV=dims["BLOCK_DV"], HAS_DLSE=dlse is not None)
    dsinks = None if sinks is None else _sink_grad(sinks, lse, delta, params.is_varlen)

    scores = _score_arguments(params, max_q, max_k)
    key = _variant_key(scores)
    tma_dkdv, tma_dq = (use_tma(q, kernel, max(q.shape[3], v.shape[3]), key)
                        for kernel in ("backward_dkdv", "backward_dq"))
    if (tma_dkdv or tma_dq) and q.is_cuda:
        _ensure_tma_allocator()
    common = dict(Q=q, K=k, V=v, DO=do, LSE_LOG2=lse_log2, DELTA=delta, **_bhs_strides(q, "q", "m"),
                  **_bhs_strides(k, "k", "n"), **_bhs_strides(v, "v", "n"), **_bhs_strides(do, "do", "m"),
                  **_lse_strides(q, params), num_heads_q=heads_q, group_size=heads_q // heads_kv, seq_q=max_q,
                  seq_k=max_k, qk_scale_log2=params.scale * math.log2(math.e), scale=params.scale, **dims,
                  **_kernel_flags(q))

    def launch_dkdv(cfg: KernelConfig) -> None:
        _run_kernel(_kernels._attn_bwd_dkdv, triton.cdiv(max_k, cfg.block_n) * batch * heads_kv, {**scores, **common},
                cfg, DK=dk, DV=dv, **_bhs_strides(dk, "dk", "n"), **_bhs_strides(dv, "dv", "n"),
                DBIAS=dbias, STORE_DBIAS=dbias is not None, num_heads_kv=heads_kv,
                BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, USE_TMA=tma_dkdv)

    def launch_dq(cfg: KernelConfig) -> None:
        _run_kernel(_kernels._attn_bwd_dq, triton.cdiv(max_q, cfg.block_m) * batch * heads_q, {**scores, **common}, cfg,
                DQ=dq, **_bhs_strides(dq, "dq", "m"), BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, USE_TMA=tma_dq)

    specialization = (*_block_key(dims), dbias is not None, _score_flags(scores))
    for kernel, launch, tma in (("backward_dkdv", launch_dkdv, tma_dkdv), ("backward_dq", launch_dq, tma_dq)):
        candidates = _kernel_candidates(kernel, q, q.shape[3], v.shape[3], key, max_q, max_k, launch)
        _launch_tiled(kernel, candidates, q, launch, (*specialization, tma))
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
    _run_kernel(_kernels._dropout_mask, programs, {}, MASK=mask, num_heads=heads, seq_q=seq_q, seq_k=seq_k,
            dropout_p=dropout_p, dropout_seed=seed, BLOCK_M=block_m, BLOCK_N=block_n)
    return mask.bool()


def _inspection_scores(params: AttentionParams, q: torch.Tensor, seq_q: int, seq_k: int) -> dict[str, object]:
    """The score arguments of the inspection kernels, which take no dropout and no packed input."""
    if params.dropout_p > 0 or params.is_varlen:
        raise ValueError("the inspection kernels take neither dropout nor packed input")
    return _score_arguments(params, seq_q, seq_k)


@_serialized_when_interpreting
def attention_probs(q: torch.Tensor, k: torch.Tensor, lse: torch.Tensor, rows: torch.Tensor, heads: torch.Tensor,
                    params: AttentionParams) -> torch.Tensor:
    """float32 (B, len(heads), len(rows), Sk): exp(score - lse) of the chosen query rows and heads.
    rows, heads: int32 index tensors on q's device."""
    batch, heads_q, seq_q, _ = q.shape
    heads_kv, seq_k = k.shape[1], k.shape[2]
    probs = torch.empty((batch, heads.shape[0], rows.shape[0], seq_k), dtype=torch.float32, device=q.device)
    if probs.numel() == 0:
        return probs
    q, k = _aligned(q), _aligned(k)
    block_m, block_n = 32, 64
    programs = triton.cdiv(rows.shape[0], block_m) * triton.cdiv(seq_k, block_n) * batch * heads.shape[0]
    _run_kernel(_kernels._attn_probs, programs, _inspection_scores(params, q, seq_q, seq_k),
            Q=q, K=k, LSE=lse, P=probs, ROWS=rows, HEADS=heads, **_bhs_strides(q, "q", "m"),
            **_bhs_strides(k, "k", "n"), stride_lse_b=heads_q * seq_q, stride_lse_h=seq_q,
            **_strides(probs, ("stride_pb", "stride_ph", "stride_pm")), num_heads_sel=heads.shape[0],
            num_rows=rows.shape[0], group_size=heads_q // heads_kv, seq_q=seq_q, seq_k=seq_k,
            qk_scale_log2=params.scale * math.log2(math.e), **_head_dims(q), BLOCK_M=block_m, BLOCK_N=block_n,
            **_kernel_flags(q))
    return probs


@_serialized_when_interpreting
def attention_stats(q: torch.Tensor, k: torch.Tensor, params: AttentionParams
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
    scores = _inspection_scores(params, q, seq_q, seq_k)
    dims = _head_dims(q)
    common = dict(Q=q, K=k, LSE=lse, **_bhs_strides(q, "q", "m"), **_bhs_strides(k, "k", "n"), num_heads_q=heads_q,
                  group_size=heads_q // heads_kv, seq_q=seq_q, seq_k=seq_k,
                  qk_scale_log2=params.scale * math.log2(math.e), **dims, **_kernel_flags(q))

    # The forward's and dQ's tiles: the same score tile shapes, without v and its accumulator.
    def launch_rows(cfg: KernelConfig) -> None:
        _run_kernel(_kernels._attn_row_stats, triton.cdiv(seq_q, cfg.block_m) * batch * heads_q, {**scores, **common},
                cfg, ENTROPY=entropy, MAX_PROB=max_prob, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n)

    def launch_cols(cfg: KernelConfig) -> None:
        _run_kernel(_kernels._attn_col_sums, triton.cdiv(seq_k, cfg.block_n) * batch * heads_q, {**scores, **common},
                cfg, RECEIVED=received, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n)

    # Table tiles only (no tuning: these kernels are not what the tuner times).
    key = _variant_key(scores)
    specialization = (*_block_key(dims), _score_flags(scores))
    for name, kernel, launch in (("row_stats", "forward", launch_rows), ("col_sums", "backward_dq", launch_cols)):
        _launch_tiled(name, _kernel_candidates(kernel, q, q.shape[3], q.shape[3], key, seq_q, seq_k), q, launch,
                      specialization)
    return lse, entropy, max_prob, received


@dataclass(frozen=True)
class KVCache:
    """A KV cache as the decode kernel reads it (validated by fused_attn.kvcache).

    Dense: k (rows, Hkv, capacity, D), v (rows, Hkv, capacity, Dv), and batch_idx, int32 (B,),
    the row of each sequence (None: row b). Paged: k (pages, page_size, Hkv, D), v likewise with Dv,
    and block_table, int32 (B, pages per sequence). Sequence b has seqlens[b] (int32 (B,), or one
    int for all) + num_new keys: num_new were just written in after the seqlens[b] already there."""

    k: torch.Tensor
    v: torch.Tensor
    seqlens: torch.Tensor | int
    num_new: int = 0
    block_table: torch.Tensor | None = None
    batch_idx: torch.Tensor | None = None

    @property
    def paged(self) -> bool:
        return self.block_table is not None

    @property
    def capacity(self) -> int:
        """The most keys one sequence can hold."""
        if self.block_table is not None:
            return self.block_table.shape[1] * self.k.shape[1]
        return self.k.shape[2]

    def kernel_arguments(self) -> dict[str, object]:
        """The kernel's cache arguments by name: rows (or pages), heads and positions (or slots)."""
        head_axis, position_axis = (2, 1) if self.paged else (1, 2)
        arguments: dict[str, object] = {"K_CACHE": self.k, "V_CACHE": self.v, "CACHE_SEQLENS": self.seqlens if isinstance(self.seqlens, torch.Tensor) else None,
                                        "PER_SEQUENCE_LENGTHS": isinstance(self.seqlens, torch.Tensor),
                                        "cache_len": 0 if isinstance(self.seqlens, torch.Tensor) else self.seqlens,
                                        "num_new": self.num_new,
                                        "BLOCK_TABLE": self.block_table, "CACHE_BATCH_IDX": self.batch_idx,
                                        "IS_PAGED": self.paged, "HAS_BATCH_IDX": self.batch_idx is not None,
                                        "PAGE_SIZE": self.k.shape[1] if self.paged else 1,
                                        "stride_block_table_b": self.block_table.stride(0) if self.paged else 0}
        for name, t in (("k", self.k), ("v", self.v)):
            arguments.update({f"stride_{name}_row": t.stride(0), f"stride_{name}h": t.stride(head_axis),
                              f"stride_{name}n": t.stride(position_axis)})
        return arguments


MAX_DECODE_SPLITS = 128


def decode_splits(batch: int, heads_kv: int, query_rows: int, cache: KVCache, q: torch.Tensor) -> int:
    """How many parts the KV-cache kernel cuts each sequence's keys into when the caller leaves it
    open: enough programs for two waves on q's GPU, with parts of at least 4 key tiles of the
    cache's capacity (the lengths themselves stay on the device). 1 under the interpreter.
    Depends on the batch: pass num_splits for results that do not."""
    if not q.is_cuda:
        return 1
    cfg = _configs.decode_config(query_rows, _configs.head_dim_bucket(max(q.shape[3], cache.v.shape[-1])))
    programs = batch * heads_kv * triton.cdiv(query_rows, cfg.block_m)
    sms = torch.cuda.get_device_properties(q.device).multi_processor_count
    by_occupancy = triton.cdiv(2 * sms, max(programs, 1))
    by_length = triton.cdiv(cache.capacity, 4 * cfg.block_n)
    return max(1, min(by_occupancy, by_length, MAX_DECODE_SPLITS))


@_serialized_when_interpreting
def attention_decode(q: torch.Tensor, cache: KVCache, params: AttentionParams, num_splits: int
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """o (B, Hq, Sq, Dv) in q's dtype and lse (B, Hq, Sq) float32 of q over each sequence's keys
    in `cache`, the score options in `params` (mask by key position, window, ALiBi, softcap, sinks;
    no dropout or packing). With num_splits > 1 the keys of each sequence are cut into that many parts whose
    partial results a second kernel merges in a fixed order."""
    batch, heads_q, seq_q, _ = q.shape
    heads_kv = cache.k.shape[2] if cache.paged else cache.k.shape[1]
    head_dim_v = cache.v.shape[3]
    o = _empty_like_layout(q, (batch, heads_q, seq_q, head_dim_v), q.dtype)
    lse = torch.empty((batch, heads_q, seq_q), dtype=torch.float32, device=q.device)
    if o.numel() == 0 and lse.numel() == 0:
        return o, lse
    group_size = heads_q // heads_kv
    dims = _head_dims(q, cache.v)
    cfg = _configs.decode_config(group_size * seq_q, max(dims["BLOCK_D"], dims["BLOCK_DV"]), interpreting())
    split = num_splits > 1
    o_part = lse_part = None
    if split:
        o_part = torch.empty((batch, heads_q, seq_q, num_splits, head_dim_v), dtype=torch.float32, device=q.device)
        lse_part = torch.empty((batch, heads_q, seq_q, num_splits), dtype=torch.float32, device=q.device)
    sinks = params.kernel_sinks
    flags = _kernel_flags(q)
    programs = batch * heads_kv * triton.cdiv(group_size * seq_q, cfg.block_m) * num_splits
    _run_kernel(_kernels._attn_decode, programs, _score_arguments(params, seq_q, cache.capacity), cfg,
                Q=q, O=o, LSE=lse, O_PART=o_part, LSE_PART=lse_part, SINKS=None if split else sinks,
                **cache.kernel_arguments(), **_bhs_strides(q, "q", "m"), **_bhs_strides(o, "o", "m"),
                num_heads_q=heads_q, num_heads_kv=heads_kv, group_size=group_size, seq_q=seq_q,
                num_splits=num_splits, qk_scale_log2=params.scale * math.log2(math.e),
                **{name: dims[name] for name in ("head_dim", "head_dim_v", "BLOCK_D", "BLOCK_DV")},
                BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, HAS_SINKS=sinks is not None and not split, SPLIT=split,
                **flags)
    if split:
        _run_kernel(_kernels._attn_decode_combine, batch * heads_q * seq_q, {}, None,
                    O_PART=o_part, LSE_PART=lse_part, O=o, LSE=lse, SINKS=sinks, **_bhs_strides(o, "o", "m"),
                    num_heads_q=heads_q, seq_q=seq_q, num_splits=num_splits, head_dim_v=head_dim_v,
                    BLOCK_SPLITS=triton.next_power_of_2(num_splits), BLOCK_DV=dims["BLOCK_DV"],
                    EMULATE_BF16=flags["EMULATE_BF16"], HAS_SINKS=sinks is not None)
    return o, lse
