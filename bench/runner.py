"""Run cases against providers and collect one row per (case, provider).

The same loop serves the GPU run and the CPU run; the device picks the clock
(`measure.time_cuda` or `measure.time_host`) and the memory counter. Nothing here raises for
a provider that fails: a refusal is a "skipped" row with the reason, out-of-memory is an "OOM"
row, any other exception an "error" row, and cases past the time budget are "skipped" rows too.
"""
from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence, TextIO

import torch

from bench.measure import MODES, Timing, attention_flops, measure_memory, time_cuda, time_host
from bench.providers import AttentionFn, Case, Provider, Unsupported

# The FlashAttention-3 paper's setting: a fixed number of tokens B*S and a fixed width H*D, so
# that every sequence length does the same work per token and numbers compare with its tables.
TOKENS = 16384
WIDTH = 2048
TIMED_SEQS = (512, 1024, 2048, 4096, 8192, 16384, 32768)
MEMORY_ONLY_SEQS = (65536, 131072)


def fa3_cases(modes: Sequence[str] = MODES, causal: Sequence[bool] = (False, True),
              dtypes: Sequence[torch.dtype] = (torch.bfloat16, torch.float16), head_dims: Sequence[int] = (128, 64),
              seqs: Sequence[int] = TIMED_SEQS, memory_only_seqs: Sequence[int] = MEMORY_ONLY_SEQS,
              tokens: int = TOKENS, width: int = WIDTH) -> list[Case]:
    """Timed cases at B*S = tokens (B at least 1) and H*D = width, and memory-only cases at the
    longest lengths (forward+backward, B = 1, causal and not, first dtype and head dim).

    Ordered by priority, since a time budget cuts the tail: the first (dtype, head dim) group,
    which matches the published FlashAttention tables, then the memory-only cases, then the rest.
    """
    groups = []
    for dtype in dtypes:
        for head_dim in head_dims:
            groups.append([Case(mode, is_causal, dtype, max(1, tokens // seq), width // head_dim, seq, head_dim)
                           for is_causal in causal for mode in modes for seq in seqs])
    memory_only = [Case("fwd+bwd", is_causal, dtypes[0], 1, width // head_dims[0], seq, head_dims[0], timed=False)
                   for is_causal in causal for seq in memory_only_seqs]
    return groups[0] + memory_only + [case for group in groups[1:] for case in group]


@dataclass
class Row:
    """One CSV row. Times in ms; `speed_vs_fused` = fused_attn's time / this provider's time in the
    same run (below 1: slower than fused_attn); `peak_bytes` is the peak allocation during one call
    above what existed before it (the inputs; for "bwd" also the saved forward state, so there it
    is the gradients and the backward's temporaries); `saved_bytes` what the forward saved for
    backward beyond q, k, v (empty for "fwd", which runs without autograd)."""
    provider: str
    mode: str
    causal: bool
    dtype: str
    batch: int
    heads: int
    seq: int
    head_dim: int
    timed: bool                     # False for memory-only cases
    status: str                     # ok, skipped, OOM, error
    reason: str = ""
    ms_p20: float | None = None
    ms_p50: float | None = None
    ms_p80: float | None = None
    tflops: float | None = None
    speed_vs_fused: float | None = None
    peak_bytes: int | None = None
    saved_bytes: int | None = None

    @classmethod
    def for_case(cls, case: Case, provider: str, status: str, reason: str = "") -> "Row":
        return cls(provider, case.mode, case.causal, case.dtype_name, case.batch, case.heads, case.seq,
                   case.head_dim, case.timed, status, reason)


def _input_sets(case: Case, layout: str, device: torch.device, count: int, seed: int
                ) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """`count` independent (q, k, v, do) sets of standard-normal values (never zeros)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    shape = ((case.batch, case.heads, case.seq, case.head_dim) if layout == "bhsd"
             else (case.batch, case.seq, case.heads, case.head_dim))
    needs_grad = case.mode != "fwd"
    sets = []
    for _ in range(count):
        q, k, v, do = (torch.randn(shape, generator=gen, device=device, dtype=case.dtype) for _ in range(4))
        sets.append((q.requires_grad_(needs_grad), k.requires_grad_(needs_grad), v.requires_grad_(needs_grad), do))
    return sets


def rotation_count(case: Case, device: torch.device, max_sets: int = 4) -> int:
    """Input sets to cycle through so that the inputs of one call are not still in L2 from the
    last: enough sets to cover twice the L2 cache, at most `max_sets`; one set on the CPU."""
    if device.type != "cuda":
        return 1
    l2_bytes = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 * 2**20)
    set_bytes = 4 * case.batch * case.heads * case.seq * case.head_dim * torch.tensor([], dtype=case.dtype).element_size()
    return max(1, min(max_sets, math.ceil(2 * l2_bytes / set_bytes)))


class Progress:
    """A one-line progress bar on a terminal; one line per step when the stream is a log file."""

    def __init__(self, total: int, stream: TextIO | None = sys.stderr, width: int = 30) -> None:
        self.total, self.done, self.stream, self.width = total, 0, stream, width
        self.start = time.perf_counter()

    def step(self, label: str) -> None:
        self.done += 1
        if self.stream is None:
            return
        filled = round(self.width * self.done / max(1, self.total))
        line = (f"[{'#' * filled}{'.' * (self.width - filled)}] {self.done}/{self.total} "
                f"{time.perf_counter() - self.start:5.0f}s {label}")
        if self.stream.isatty():
            self.stream.write("\r" + line[:150].ljust(150) + ("\n" if self.done == self.total else ""))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()


def _steps(fn: AttentionFn, case: Case, sets: list) -> tuple[Callable[[], object], Callable[[], object]]:
    """(prepare, step): the timed call cycles through the input sets; for "bwd", prepare runs the
    forwards whose graphs the timed backward replays (retain_graph keeps them for the next turn)."""
    turn = [0]
    outputs: list[torch.Tensor] = []

    def prepare() -> None:
        if case.mode == "bwd":
            outputs[:] = [fn(q, k, v) for q, k, v, _ in sets]

    def step() -> object:
        i = turn[0] = (turn[0] + 1) % len(sets)
        q, k, v, do = sets[i]
        if case.mode == "fwd":
            return fn(q, k, v)
        if case.mode == "bwd":
            return outputs[i].backward(do, retain_graph=True)
        return fn(q, k, v).backward(do)

    return prepare, step


def measure_case(case: Case, provider: Provider, device: torch.device, sets: list,
                 timer: Callable[..., Timing], warmup_ms: float, rep_ms: float) -> Row:
    """One provider on one case: a first call (compiles, or is refused), one call under the memory
    counters, then the timer if the case is timed."""
    row = Row.for_case(case, provider.name, "ok")
    try:
        fn = provider.build(case, device)
        with provider.context():
            prepare, step = _steps(fn, case, sets)
            leaves = [t for s in sets for t in s[:3]] if case.mode != "fwd" else []
            if case.mode == "bwd":
                with measure_memory(device, sets[0][:3]) as forward_memory:
                    fn(*sets[0][:3])
                row.saved_bytes = forward_memory.saved_bytes
            prepare()
            if case.timed or device.type == "cuda":  # a first call compiles; keep that out of the peak
                step()
            for t in leaves:
                t.grad = None
            with measure_memory(device, [t for s in sets for t in s]) as memory:
                step()
            row.peak_bytes = memory.peak_bytes
            if case.mode == "fwd+bwd":
                row.saved_bytes = memory.saved_bytes
            if case.timed:
                timing = timer(step, leaves, warmup_ms, rep_ms)
                row.ms_p20, row.ms_p50, row.ms_p80 = timing.p20, timing.p50, timing.p80
                row.tflops = attention_flops(case.batch, case.heads, case.seq, case.seq, case.head_dim,
                                             case.causal, case.mode) / timing.p50 / 1e9
    except Unsupported as refusal:
        return Row.for_case(case, provider.name, "skipped", str(refusal))
    except torch.OutOfMemoryError as error:
        return Row.for_case(case, provider.name, "OOM", str(error).split("\n")[0][:200])
    except Exception as error:  # a failing provider is a row, never the end of the run
        return Row.for_case(case, provider.name, "error", f"{type(error).__name__}: {str(error).splitlines()[0][:200] if str(error) else ''}")
    finally:
        for t in (t for s in sets for t in s[:3]):
            t.grad = None
    return row


def run_cases(cases: Iterable[Case], providers: Sequence[Provider], device: torch.device | str,
              warmup_ms: float = 25.0, rep_ms: float = 100.0, budget_s: float | None = None,
              progress: TextIO | None = sys.stderr, seed: int = 0,
              timer: Callable[..., Timing] | None = None,
              on_case_done: Callable[[list[Row]], None] | None = None) -> list[Row]:
    """Measure every provider on every case; rows in case order, providers in the given order.
    `on_case_done` gets each case's rows as soon as they exist (the CLI appends them to the CSV,
    so a run that is killed keeps what it measured)."""
    device = torch.device(device)
    cases = list(cases)
    timer = timer or (time_cuda if device.type == "cuda" else time_host)
    bar = Progress(len(cases) * len(providers), progress)
    start = time.perf_counter()
    rows: list[Row] = []
    for case_index, case in enumerate(cases):
        case_rows: list[Row] = []
        sets_by_layout: dict[str, list] = {}
        for provider in providers:
            if budget_s is not None and time.perf_counter() - start > budget_s:
                case_rows.append(Row.for_case(case, provider.name, "skipped", f"time budget of {budget_s:.0f} s spent"))
            else:
                try:
                    if provider.layout not in sets_by_layout:
                        sets_by_layout[provider.layout] = _input_sets(
                            case, provider.layout, device, rotation_count(case, device), seed + case_index)
                    case_rows.append(measure_case(case, provider, device, sets_by_layout[provider.layout],
                                                  timer, warmup_ms, rep_ms))
                except torch.OutOfMemoryError as error:  # the inputs themselves did not fit
                    case_rows.append(Row.for_case(case, provider.name, "OOM", "inputs: " + str(error).split("\n")[0][:180]))
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            bar.step(f"{case.label} {provider.name}: {case_rows[-1].status}")
        _fill_ratios(case_rows)
        rows.extend(case_rows)
        if on_case_done is not None:
            on_case_done(case_rows)
        sets_by_layout.clear()
    return rows


def _fill_ratios(case_rows: list[Row]) -> None:
    fused = next((r for r in case_rows if r.provider == "fused_attn" and r.ms_p50), None)
    for row in case_rows:
        if fused is not None and row.ms_p50:
            row.speed_vs_fused = fused.ms_p50 / row.ms_p50
