"""What the benchmark measures, each written once: FLOPs, time, peak memory, saved bytes.

Every function here works on CPU tensors too (at tiny sizes, through the Triton interpreter),
so the tests exercise the same code the GPU run uses; only the clock and the memory counter
change with the device.
"""
from __future__ import annotations

import contextlib
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.multiprocessing.reductions import StorageWeakRef

MODES = ("fwd", "bwd", "fwd+bwd")
BACKWARD_FLOP_FACTOR = 2.5  # backward = 2.5x forward: 5 matmuls against 2, as FlashAttention counts


def visible_pairs(seq_q: int, seq_k: int, causal: bool) -> int:
    """(query, key) pairs that attend. Causal is bottom-right aligned (query i sees key j when
    j <= i + Sk - Sq), which equals torch's top-left mask when Sq == Sk."""
    if not causal:
        return seq_q * seq_k
    offset = seq_k - seq_q
    # Row i sees clamp(i + 1 + offset, 0, Sk) keys: zero rows, then a ramp, then full rows.
    first_ramp = max(0, -offset)                   # first row that sees a key
    first_full = min(seq_q, max(0, seq_k - offset - 1))  # first row that sees all Sk keys
    ramp = 0
    if first_full > first_ramp:
        lo, hi = first_ramp + 1 + offset, first_full + offset  # keys seen by the ramp's ends
        ramp = (lo + hi) * (first_full - first_ramp) // 2
    return ramp + (seq_q - max(first_full, first_ramp)) * seq_k


def attention_flops(batch: int, heads: int, seq_q: int, seq_k: int, head_dim: int, causal: bool,
                    mode: str) -> float:
    """4 * B * H * (visible pairs) * D for the forward (two matmuls of 2 FLOPs per multiply-add);
    backward 2.5x that; causal counted by the exact number of unmasked pairs."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    forward = 4.0 * batch * heads * visible_pairs(seq_q, seq_k, causal) * head_dim
    return {"fwd": forward, "bwd": BACKWARD_FLOP_FACTOR * forward,
            "fwd+bwd": (1 + BACKWARD_FLOP_FACTOR) * forward}[mode]


# ----------------------------------------------------------------------------------------------
# Time


@dataclass(frozen=True)
class Timing:
    """Milliseconds per call: the 20th, 50th and 80th percentiles."""
    p20: float
    p50: float
    p80: float


def time_cuda(fn: Callable[[], object], grad_to_none: Sequence[torch.Tensor], warmup_ms: float,
              rep_ms: float) -> Timing:
    """CUDA events via triton.testing.do_bench, which also flushes L2 before every call."""
    import triton.testing

    p20, p50, p80 = triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, grad_to_none=list(grad_to_none),
                                            quantiles=[0.2, 0.5, 0.8])
    return Timing(p20, p50, p80)


def time_host(fn: Callable[[], object], grad_to_none: Sequence[torch.Tensor], warmup_ms: float,
              rep_ms: float) -> Timing:
    """Wall clock, for CPU tensors (the tests run the timing path this way at tiny sizes)."""
    def once() -> float:
        for t in grad_to_none:
            t.grad = None
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3

    first = once()
    for _ in range(max(0, int(warmup_ms / max(first, 1e-3)) - 1)):
        once()
    samples = [once() for _ in range(max(3, min(1000, int(rep_ms / max(first, 1e-3)))))]
    q = statistics.quantiles(samples, n=10, method="inclusive")
    return Timing(q[1], statistics.median(samples), q[7])


# ----------------------------------------------------------------------------------------------
# Memory


class _HostPeakTracker(TorchDispatchMode):
    """Peak bytes of tensor storages created inside the block and alive at the same time.

    The CPU has no allocator statistics, so every ATen op's outputs are tracked and dropped
    once their storage dies. Storages attached with ``set_`` are skipped: those are the Triton
    interpreter's host views of kernel arguments, which a GPU launch does not make.
    """

    def __init__(self) -> None:
        super().__init__()
        self._live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket is not torch.ops.aten.set_:
            # A view (detach, transpose, ...) or an in-place op returns an argument's storage.
            known = {StorageWeakRef(t.untyped_storage()).cdata for t in tree_leaves((args, kwargs))
                     if isinstance(t, torch.Tensor)}
            for t in tree_leaves(out):
                if isinstance(t, torch.Tensor) and not t.is_meta:
                    ref = StorageWeakRef(t.untyped_storage())
                    if ref.cdata not in known:
                        self._live.setdefault(ref.cdata, (ref, t.untyped_storage().nbytes()))
        self._live = {key: entry for key, entry in self._live.items() if not entry[0].expired()}
        self.peak = max(self.peak, sum(nbytes for _, nbytes in self._live.values()))
        return out


@dataclass
class MemoryReading:
    """Peak bytes allocated inside the block above what was allocated when it began, and the
    bytes autograd saved for backward inside it (distinct storages, the block's inputs excluded)."""
    peak_bytes: int = 0
    saved_bytes: int = 0
    _saved: dict[int, int] = field(default_factory=dict, repr=False)


@contextlib.contextmanager
def measure_memory(device: torch.device, inputs: Sequence[torch.Tensor]) -> Iterator[MemoryReading]:
    """Measure one call's peak allocation and saved-for-backward bytes.

    On CUDA the peak comes from the caching allocator's counters; on the CPU from tracking the
    storages that ATen ops create. Saved bytes come from saved-tensor hooks on any device.
    """
    reading = MemoryReading()
    input_storages = {t.untyped_storage().data_ptr() for t in inputs}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in input_storages:
            reading._saved[storage.data_ptr()] = storage.nbytes()
        return t

    hooks = torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        with hooks:
            yield reading
        torch.cuda.synchronize(device)
        reading.peak_bytes = torch.cuda.max_memory_allocated(device) - base
    else:
        tracker = _HostPeakTracker()
        with hooks, tracker:
            yield reading
        reading.peak_bytes = tracker.peak
    reading.saved_bytes = sum(reading._saved.values())
