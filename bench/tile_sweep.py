"""The tile sweep: time each attention kernel alone for every vetted tile, on the GPU at hand.

    python -m bench.tile_sweep OUT_DIR [--quick] [--deadline-s 480]

For bf16, D = 128 and 64, S = 4096 and 8192 (--quick: 4096 only), causal and not, B = 4, H = 16:

* each kernel alone (forward `_attn_fwd`, dK/dV `_attn_bwd_dkdv`, dQ `_attn_bwd_dq`) with every
  candidate tile of that kernel from `kernels/configs.py` (`configs.candidates` for this card; the
  first is the shipped tile), the other two kernels at their shipped tile. The launches of one
  call are captured and the one kernel's launch is replayed under `triton.testing.do_bench`
  (median, L2 flushed before every call), so only that kernel's device time is counted;
* fused_attn's whole forward and forward+backward (launchers, shipped tiles, and the best passing
  tiles of this shape), next to torch SDPA's FLASH_ATTENTION and CUDNN_ATTENTION backends
  (`torch.nn.attention.sdpa_kernel`), forward and forward+backward, in the same run (a backend this
  torch or card lacks is a "skipped" row that says why);
* every candidate's o, dq, dk, dv against the shipped tile's, and the shipped tile's against torch
  SDPA, by ||out - ref|| / ||ref|| <= --tolerance (NaN never passes). Outputs are poisoned with NaN
  and the captured launches replayed before the check, so a tile that leaves elements unwritten
  fails even where the allocator hands back memory that an earlier tile filled correctly.
  Only tiles whose check passed can win.

FLOPs: forward 4 * B * H * Sq * Sk * D, halved for causal; backward 2.5x and forward+backward 3.5x
that (FlashAttention's count). The per-kernel backward rows count what each kernel executes:
dK/dV 2.0x (4 matmuls: QK^T and dO V^T recomputed, P^T dO, dS^T Q), dQ 1.5x (QK^T, dO V^T, dS K).

Writes, as it goes (a run stopped at its deadline keeps what it measured):
  OUT_DIR/tile_sweep.csv                      every row (timings, TFLOP/s, check errors, skips)
  OUT_DIR/tuned-<device>-triton<ver>.json     the winners, in fused_attn.tune's results schema:
      copy it to ~/.cache/fused_attn/tune/<device>-triton<ver>.json (or $FUSED_ATTN_TUNE_DIR) to
      use them, or carry the winners into kernels/configs.py's table
  OUT_DIR/tile_sweep.md                       the tables, which are also printed last
One JSON entry per (kernel, head dim, sequence bucket): causal and not share a key (the tuner's
variant "plain" covers both), so the winner is the passing tile with the least time summed over the
causal settings measured, among tiles measured in all of them; "ms" and "timings_ms" are the mean
over those settings.

Time: dominated by Triton compiling each candidate once per (head dim, causal) (a few seconds
each); the timings themselves take about 0.2 s per row. Every step checks the deadline first and
the rest become "skipped" rows. Without CUDA it says so and exits 0 (CI has no GPU). The sweep core
(`sweep`) takes the shapes, the device description and the timing function as parameters, so the
tests run its plumbing on the CPU through the Triton interpreter with a fake clock.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import csv
import json
import math
import os
import re
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch

KERNELS = ("forward", "backward_dkdv", "backward_dq")
KERNEL_FUNCTIONS = {"forward": "_attn_fwd", "backward_dkdv": "_attn_bwd_dkdv", "backward_dq": "_attn_bwd_dq"}
# Every kernel one forward+backward launches, in launch order (the check replays them all).
LAUNCHED = ("_attn_fwd", "_attn_bwd_preprocess", "_attn_bwd_dkdv", "_attn_bwd_dq")
FLOP_FACTOR = {"forward": 1.0, "backward_dkdv": 2.0, "backward_dq": 1.5, "fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5}
DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
SDPA_PROVIDERS = ("sdpa_flash", "sdpa_cudnn")
TOLERANCE = 2e-2  # bf16 outputs of the same math land near 1e-3 to 5e-3 of each other
DEFAULT_DEADLINE_S = 480.0
FATAL_CUDA = ("illegal memory access", "unspecified launch failure", "misaligned address",
              "an illegal instruction", "device-side assert", "CUDA error: launch failure")
COLUMNS = ("device", "capability", "triton", "torch", "provider", "kernel", "dtype", "batch", "heads", "seq",
           "head_dim", "causal", "config", "shipped", "status", "ms", "tflops", "flop_factor", "vs_shipped",
           "err_o", "err_dq", "err_dk", "err_dv", "reason")


# ---------------------------------------------------------------------------------------------
# What is swept, where, and how it is timed


@dataclass(frozen=True)
class Shape:
    """One attention problem: (B, H, S, D) for q, k, v (Sq == Sk), causal or not."""
    batch: int
    heads: int
    seq: int
    head_dim: int
    causal: bool
    dtype: torch.dtype = torch.bfloat16

    @property
    def label(self) -> str:
        return (f"{DTYPE_NAMES.get(self.dtype, str(self.dtype))} D={self.head_dim} S={self.seq} "
                f"{'causal' if self.causal else 'full'} B={self.batch} H={self.heads}")


@dataclass(frozen=True)
class DeviceInfo:
    """The card the sweep runs on: the JSON's header and the key to the candidate table."""
    name: str                   # torch.cuda.get_device_name
    capability: int             # major * 10 + minor
    shared_memory: int | None   # bytes one block may opt into (None: the table row's own limit)
    device: str = "cuda"        # torch device string the tensors go to ("cpu" under the interpreter)
    triton: str = ""
    torch: str = ""


@dataclass(frozen=True)
class Timed:
    """What a timing function is asked to time: fused_attn's kernel `kernel` with tile `config`
    ("forward", "backward_dkdv", "backward_dq"), or a provider's whole "fwd" / "fwd+bwd"."""
    provider: str                 # "fused_attn", "fused_attn_best", "sdpa_flash", "sdpa_cudnn"
    kernel: str
    config: object | None         # KernelConfig for the per-kernel rows
    shape: Shape


TimeFn = Callable[[Callable[[], object], Timed], float]
"""time_fn(fn, what) -> milliseconds per call of fn (the median)."""


def config_label(cfg: object) -> str:
    """"128x64w8s3": block_m x block_n, warps, stages (fused_attn.tune's label)."""
    return f"{cfg.block_m}x{cfg.block_n}w{cfg.num_warps}s{cfg.num_stages}"  # type: ignore[attr-defined]


def seq_bucket(length: int) -> int:
    """Smallest power of two >= `length`, clamped to [64, 65536] (fused_attn.tune's key)."""
    bucket = 64
    while bucket < length and bucket < 65536:
        bucket *= 2
    return bucket


def even_head_dim(head_dim: int) -> bool:
    """The kernels' EVEN_D: the head dim is its own bucket (a power of two >= 16)."""
    return head_dim >= 16 and head_dim & (head_dim - 1) == 0


def forward_flops(shape: Shape) -> float:
    """4 * B * H * Sq * Sk * D, halved for causal."""
    flops = 4.0 * shape.batch * shape.heads * shape.seq * shape.seq * shape.head_dim
    return flops / 2 if shape.causal else flops


def default_shapes(quick: bool = False, batch: int = 4, heads: int = 16, head_dims: Sequence[int] = (128, 64),
                   seqs: Sequence[int] | None = None, dtype: torch.dtype = torch.bfloat16) -> list[Shape]:
    """The swept shapes in priority order (a deadline cuts the tail): every head dim and causal
    setting at the shortest length first, since those compile the candidates, then the longer ones."""
    seqs = list(seqs) if seqs else ([4096] if quick else [4096, 8192])
    return [Shape(batch, heads, seq, head_dim, causal, dtype)
            for seq in seqs for head_dim in head_dims for causal in (False, True)]


def query_device(index: int | None = None) -> DeviceInfo:
    """The current (or given) CUDA device, described as the launcher sees it."""
    import triton

    index = torch.cuda.current_device() if index is None else index
    major, minor = torch.cuda.get_device_capability(index)
    shared: int | None = None
    try:
        from fused_attn import _launch

        _, shared, _ = _launch.device_row(index)
    except Exception:  # noqa: BLE001 - the launcher's helper moved: ask torch
        shared = getattr(torch.cuda.get_device_properties(index), "shared_memory_per_block_optin", None) or None
    return DeviceInfo(torch.cuda.get_device_name(index), major * 10 + minor, shared, f"cuda:{index}",
                      triton.__version__, torch.__version__)


def cuda_time_fn(warmup_ms: float = 25.0, rep_ms: float = 100.0) -> TimeFn:
    """Median of `triton.testing.do_bench` (CUDA events, L2 flushed before each call). The same
    signature and return_mode in Triton 3.5 to 3.9."""
    from triton.testing import do_bench

    def time_fn(fn: Callable[[], object], what: Timed) -> float:
        ms = do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median")
        return float(ms[0] if isinstance(ms, (list, tuple)) else ms)

    return time_fn


# ---------------------------------------------------------------------------------------------
# Capturing the kernels' launches, to replay one kernel alone


@dataclass
class Launch:
    """One kernel launch as the launcher made it; calling it launches the same kernel again."""
    name: str
    kernel: object
    grid: object
    args: tuple
    kwargs: dict

    def __call__(self) -> None:
        self.kernel[self.grid](*self.args, **self.kwargs)  # type: ignore[index]


def _recording(kernel: object, name: str, launches: list[Launch]) -> object:
    """A stand-in for `kernel` that launches it and records the launch. A shallow copy of the same
    class (subclassed), so isinstance checks on the kernel objects (fused_attn's `interpreting()`)
    answer as before."""
    class Recording(type(kernel)):  # type: ignore[misc]
        def __getitem__(self, grid: object) -> Callable[..., None]:
            def launch(*args: object, **kwargs: object) -> None:
                kernel[grid](*args, **kwargs)  # type: ignore[index]
                launches.append(Launch(name, kernel, grid, args, kwargs))
            return launch

    stand_in = copy.copy(kernel)
    stand_in.__class__ = Recording
    return stand_in


@contextlib.contextmanager
def capture_launches(names: Sequence[str] = LAUNCHED) -> Iterator[list[Launch]]:
    """Record the launches of the named kernels of `fused_attn.kernels.attention` made inside."""
    from fused_attn.kernels import attention as kernels

    launches: list[Launch] = []
    originals = {name: getattr(kernels, name) for name in names}
    try:
        for name, kernel in originals.items():
            setattr(kernels, name, _recording(kernel, name, launches))
        yield launches
    finally:
        for name, kernel in originals.items():
            setattr(kernels, name, kernel)


# ---------------------------------------------------------------------------------------------
# Runs and checks


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float32; inf when out has a NaN or inf (never passes)."""
    out32, ref32 = out.float(), ref.float()
    if not bool(torch.isfinite(out32).all()):
        return math.inf
    return float((out32 - ref32).norm() / ref32.norm().clamp_min(1e-30))


OUTPUT_NAMES = ("o", "dq", "dk", "dv")


@dataclass
class Run:
    """One forward+backward with a set of tiles: its outputs and the launches that made them."""
    outputs: dict[str, torch.Tensor]
    launches: list[Launch]

    def launch_of(self, kernel: str) -> Launch:
        found = [launch for launch in self.launches if launch.name == KERNEL_FUNCTIONS[kernel]]
        if len(found) != 1:
            raise RuntimeError(f"expected one launch of {KERNEL_FUNCTIONS[kernel]}, saw {len(found)}")
        return found[0]


def _params(shape: Shape):
    from fused_attn._launch import AttentionParams

    return AttentionParams(scale=1.0 / math.sqrt(shape.head_dim), window_left=-1, window_right=0 if shape.causal else -1)


def forward_backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, do: torch.Tensor, shape: Shape
                     ) -> dict[str, torch.Tensor]:
    """fused_attn's forward then backward through its launchers, in this thread (an
    override_configs block around it applies to all three kernels)."""
    from fused_attn._launch import attention_backward, attention_forward

    params = _params(shape)
    o, lse = attention_forward(q, k, v, params)
    dq, dk, dv, _, _ = attention_backward(do, q, k, v, o, lse, params)
    return {"o": o, "dq": dq, "dk": dk, "dv": dv}


def checked_run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, do: torch.Tensor, shape: Shape,
                tiles: object) -> Run:
    """Forward+backward with `tiles` (AttentionConfigs) with every launch captured; then the
    outputs are poisoned with NaN and the launches replayed, so what is checked was written by
    this run's kernels."""
    import fused_attn

    with fused_attn.override_configs(tiles), capture_launches() as launches:  # type: ignore[arg-type]
        outputs = forward_backward(q, k, v, do, shape)
    storages = {t.untyped_storage().data_ptr() for launch in launches
                for t in (*launch.args, *launch.kwargs.values()) if isinstance(t, torch.Tensor)}
    for out in outputs.values():
        if out.untyped_storage().data_ptr() in storages:
            out.fill_(float("nan"))
    for launch in launches:
        launch()
    return Run(outputs, list(launches))


def sdpa_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, do: torch.Tensor, causal: bool
                   ) -> dict[str, torch.Tensor]:
    """torch SDPA (its own choice of backend) on the same inputs: o, dq, dk, dv."""
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    o = torch.nn.functional.scaled_dot_product_attention(*leaves, is_causal=causal)
    o.backward(do)
    return {"o": o.detach(), "dq": leaves[0].grad, "dk": leaves[1].grad, "dv": leaves[2].grad}


def compare(outputs: dict[str, torch.Tensor], reference: dict[str, torch.Tensor], tolerance: float
            ) -> tuple[bool, dict[str, float]]:
    """(all within tolerance, relative error of each of o, dq, dk, dv)."""
    errors = {name: rel_error(outputs[name], reference[name]) for name in OUTPUT_NAMES}
    return all(err <= tolerance for err in errors.values()), errors


# ---------------------------------------------------------------------------------------------
# The sweep


class _Deadline(Exception):
    pass


class _FatalDevice(Exception):
    """The CUDA context is broken (e.g. an illegal memory access): nothing more can run."""


def _is_fatal(error: BaseException) -> bool:
    return any(text in str(error) for text in FATAL_CUDA)


def _describe(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0][:200] if text else ''}"


@dataclass
class SweepResult:
    rows: list[dict[str, object]] = field(default_factory=list)
    entries: list[dict[str, object]] = field(default_factory=list)
    stopped: str = ""            # why the sweep stopped early ("" when it finished)
    shipped_failures: int = 0    # shapes whose shipped tiles failed the check against SDPA
    errors: int = 0              # shapes that could not be set up at all


class _CsvLog:
    """tile_sweep.csv, rewritten at the start and appended row by row."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            with path.open("w", newline="") as f:
                csv.DictWriter(f, fieldnames=COLUMNS).writeheader()

    def add(self, row: dict[str, object]) -> None:
        if self.path is not None:
            with self.path.open("a", newline="") as f:
                csv.DictWriter(f, fieldnames=COLUMNS).writerow({k: _csv_value(row.get(k)) for k in COLUMNS})


def _csv_value(value: object) -> object:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}" if math.isfinite(value) else str(value)
    return value


def sweep(shapes: Sequence[Shape], device: DeviceInfo, time_fn: TimeFn, *, out_dir: Path | None = None,
          deadline: float | None = None, clock: Callable[[], float] = time.perf_counter,
          candidates_fn: Callable[..., dict[str, tuple]] | None = None, tolerance: float = TOLERANCE,
          sdpa: Sequence[str] = SDPA_PROVIDERS, seed: int = 0,
          log: Callable[[str], None] | None = None) -> SweepResult:
    """Sweep every shape; rows in order (see COLUMNS). `deadline` is a value of `clock` after
    which no new step starts (the rest become "skipped" rows); `candidates_fn(capability,
    head_dim, element_size, variant, shared_memory)` gives each kernel's tiles, shipped first
    (default: `configs.candidates`). With `out_dir`, tile_sweep.csv grows row by row and the
    JSON of winners is rewritten after every shape."""
    if candidates_fn is None:
        from fused_attn.kernels import configs

        candidates_fn = configs.candidates
    log = log or (lambda line: print(line, flush=True))
    result = SweepResult()
    csv_log = _CsvLog(out_dir / "tile_sweep.csv" if out_dir is not None else None)
    header = {"device": device.name, "capability": device.capability, "triton": device.triton, "torch": device.torch}

    def emit(row: dict[str, object]) -> None:
        row = {**header, **{k: v for k, v in row.items() if k != "_slot"}}
        result.rows.append(row)
        csv_log.add(row)
        if out_dir is not None and row["kernel"] in KERNELS and row["status"] != "skipped":
            write_json(out_dir, device, winners(result.rows))  # a run killed mid-shape keeps its winners
        timing = f"{row['ms']:.4f} ms, {_fmt(row['tflops'], 1)} TFLOP/s" if row.get("ms") is not None else ""
        log(f"[tile_sweep {clock() - start:5.0f}s] {row['provider']} {row['kernel']} "
            f"{row['config'] or ''} {_shape_of(row).label}: {row['status']} {timing} {row.get('reason') or ''}".rstrip())

    start = clock()
    for shape_index, shape in enumerate(shapes):
        candidates = candidates_fn(device.capability, shape.head_dim, shape.dtype.itemsize, "plain",
                                   device.shared_memory)
        plan = _plan(shape, candidates, sdpa, tma_kernels_on(device.device, shape))
        if result.stopped:
            for row in plan:
                emit({**row, "status": "skipped", "reason": result.stopped})
            continue
        try:
            _sweep_shape(shape, device, candidates, plan, time_fn, emit, tolerance, sdpa, seed + shape_index,
                         lambda: deadline is not None and clock() >= deadline, result)
        except _Deadline:
            result.stopped = "deadline reached"
        except _FatalDevice as error:
            result.stopped = f"stopped: the device failed ({error})"
        if out_dir is not None:
            (out_dir / "tile_sweep.md").write_text(format_tables(result.rows, result.stopped) + "\n")
        if device.device.startswith("cuda"):
            with contextlib.suppress(Exception):  # a broken context already stopped the sweep
                torch.cuda.empty_cache()
    result.entries = winners(result.rows)
    if out_dir is not None:
        write_json(out_dir, device, result.entries)
        (out_dir / "tile_sweep.md").write_text(format_tables(result.rows, result.stopped) + "\n")
    return result


def _shape_of(row: dict[str, object]) -> Shape:
    dtype = {name: dtype for dtype, name in DTYPE_NAMES.items()}.get(str(row["dtype"]), torch.bfloat16)
    return Shape(int(row["batch"]), int(row["heads"]), int(row["seq"]), int(row["head_dim"]),  # type: ignore[arg-type]
                 bool(row["causal"]), dtype)


def _base_row(shape: Shape, provider: str, kernel: str, config: object | None = None,
              shipped: bool = False) -> dict[str, object]:
    return {"provider": provider, "kernel": kernel, "dtype": DTYPE_NAMES.get(shape.dtype, str(shape.dtype)),
            "batch": shape.batch, "heads": shape.heads, "seq": shape.seq, "head_dim": shape.head_dim,
            "causal": shape.causal, "config": config_label(config) if config is not None else "",
            "shipped": shipped, "status": "", "ms": None, "tflops": None, "flop_factor": FLOP_FACTOR[kernel],
            "vs_shipped": None, "err_o": None, "err_dq": None, "err_dk": None, "err_dv": None, "reason": ""}


def _plan(shape: Shape, candidates: dict[str, tuple], sdpa: Sequence[str],
          tma_kernels: Sequence[str] = ()) -> list[dict[str, object]]:
    """Every row one shape produces, in the order the sweep measures them. `tma_kernels`: the
    kernels that load through TMA on this device, each timed again with pointer loads at the end."""
    rows = [_base_row(shape, "fused_attn", kernel, candidates[kernel][0], shipped=True) for kernel in KERNELS]
    rows += [_base_row(shape, "fused_attn", mode) for mode in ("fwd", "fwd+bwd")]
    rows += [_base_row(shape, provider, mode) for provider in sdpa for mode in ("fwd", "fwd+bwd")]
    rows += [_base_row(shape, "fused_attn", kernel, cfg) for kernel in KERNELS for cfg in candidates[kernel][1:]]
    rows.append(_base_row(shape, "fused_attn_best", "fwd+bwd"))
    rows += [_base_row(shape, POINTER_LOADS, kernel, candidates[kernel][0]) for kernel in tma_kernels]
    return [{**row, "_slot": slot} for slot, row in enumerate(rows)]


POINTER_LOADS = "fused_attn_pointer_loads"  # the shipped tile with FUSED_ATTN_TMA=0: does TMA pay?


def tma_kernels_on(device: str, shape: Shape) -> tuple[str, ...]:
    """The kernels that load through TMA for `shape` on `device` (fused_attn._launch.use_tma)."""
    from fused_attn import _launch

    probe = torch.empty(0, device=device, dtype=shape.dtype)
    return tuple(kernel for kernel in KERNELS if _launch.use_tma(probe, kernel, shape.head_dim, "plain"))


@contextlib.contextmanager
def _pointer_loads() -> Iterator[None]:
    from fused_attn import _launch

    saved = os.environ.get(_launch.ENV_TMA)
    os.environ[_launch.ENV_TMA] = "0"
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(_launch.ENV_TMA, None)
        else:
            os.environ[_launch.ENV_TMA] = saved


def _sweep_shape(shape: Shape, device: DeviceInfo, candidates: dict[str, tuple], plan: list[dict[str, object]],
                 time_fn: TimeFn, emit: Callable[[dict[str, object]], None], tolerance: float,
                 sdpa: Sequence[str], seed: int, past_deadline: Callable[[], bool], result: SweepResult) -> None:
    from fused_attn.kernels.configs import AttentionConfigs

    pending = list(plan)

    def finish(row: dict[str, object]) -> None:
        pending[:] = [r for r in pending if r["_slot"] != row["_slot"]]
        emit(row)

    def skip_rest(reason: str) -> None:
        for row in list(pending):
            finish({**row, "status": "skipped", "reason": reason})

    def guard() -> None:
        if past_deadline():
            skip_rest("deadline reached")
            raise _Deadline

    def failed(row: dict[str, object], error: BaseException) -> None:
        finish({**row, "status": "error", "reason": _describe(error)})
        if _is_fatal(error):
            skip_rest("the device failed earlier")
            raise _FatalDevice(_describe(error))

    shipped = AttentionConfigs(*(candidates[kernel][0] for kernel in KERNELS))
    fwd_flops = forward_flops(shape)
    guard()
    try:
        dev = torch.device(device.device)
        gen = torch.Generator(device=dev).manual_seed(seed)
        dims = (shape.batch, shape.heads, shape.seq, shape.head_dim)
        q, k, v, do = (torch.randn(dims, generator=gen, device=dev, dtype=shape.dtype) for _ in range(4))
        reference = sdpa_reference(q, k, v, do, shape.causal)
        base = checked_run(q, k, v, do, shape, shipped)
    except Exception as error:  # noqa: BLE001 - the whole shape is unusable; say why on each row
        result.errors += 1
        skip_rest(f"setup failed: {_describe(error)}")
        if _is_fatal(error):
            raise _FatalDevice(_describe(error)) from None
        return
    ok, errors = compare(base.outputs, reference, tolerance)
    if not ok:
        result.shipped_failures += 1
    check_against = base.outputs if ok else reference  # a broken shipped tile is no reference
    shipped_ms: dict[str, float] = {}

    def timed_row(row: dict[str, object], fn: Callable[[], object], what: Timed, flops: float,
                  passed: bool, errs: dict[str, float] | None, reason: str = "") -> float | None:
        try:
            ms = time_fn(fn, what)
        except Exception as error:  # noqa: BLE001 - e.g. out of memory: a row, not the end
            failed(row, error)
            return None
        kernel = str(row["kernel"])
        done = {**row, "status": "ok" if passed else "check failed", "ms": ms,
                "tflops": flops / ms / 1e9 if ms > 0 else None, "reason": reason}
        if errs is not None:
            done.update({f"err_{name}": err for name, err in errs.items()})
        if row["shipped"]:
            done["vs_shipped"] = 1.0
        elif kernel in shipped_ms and ms > 0 and row["provider"] in ("fused_attn", POINTER_LOADS):
            done["vs_shipped"] = shipped_ms[kernel] / ms
        finish(done)
        return ms

    # The shipped tiles: each kernel alone, then the whole forward and forward+backward.
    for index, kernel in enumerate(KERNELS):
        guard()
        ms = timed_row(plan[index], base.launch_of(kernel), Timed("fused_attn", kernel, candidates[kernel][0], shape),
                       FLOP_FACTOR[kernel] * fwd_flops, ok, errors,
                       f"errors against torch SDPA{'' if ok else f': over the tolerance {tolerance}'}")
        if ms is not None:
            shipped_ms[kernel] = ms
    import fused_attn

    def whole(tiles: object, with_backward: bool) -> Callable[[], object]:
        def call() -> object:
            with fused_attn.override_configs(tiles):  # type: ignore[arg-type]
                if with_backward:
                    return forward_backward(q, k, v, do, shape)
                from fused_attn._launch import attention_forward

                return attention_forward(q, k, v, _params(shape))
        return call

    for offset, mode in enumerate(("fwd", "fwd+bwd")):
        guard()
        timed_row(plan[3 + offset], whole(shipped, mode == "fwd+bwd"), Timed("fused_attn", mode, None, shape),
                  FLOP_FACTOR[mode] * fwd_flops, ok, None, "shipped tiles, launchers (kernels + allocations)")

    # torch SDPA's backends on the same inputs.
    for p_index, provider_name in enumerate(sdpa):
        for offset, mode in enumerate(("fwd", "fwd+bwd")):
            guard()
            row = plan[5 + 2 * p_index + offset]
            _time_sdpa(row, provider_name, mode, shape, q, k, v, do, time_fn, fwd_flops, finish, failed)

    # Every other candidate of each kernel, the other two kernels at the shipped tile.
    index = 5 + 2 * len(sdpa)
    best: dict[str, tuple[float, object]] = {kernel: (shipped_ms[kernel], candidates[kernel][0])
                                             for kernel in KERNELS if kernel in shipped_ms and ok}
    for kernel in KERNELS:
        for cfg in candidates[kernel][1:]:
            row = plan[index]
            index += 1
            guard()
            try:
                run = checked_run(q, k, v, do, shape, replace(shipped, **{kernel: cfg}))
                passed, errs = compare(run.outputs, check_against, tolerance)
                launch = run.launch_of(kernel)
            except Exception as error:  # noqa: BLE001 - out of resources, compile error, ...
                failed(row, error)
                continue
            reason = (f"errors against {'the shipped tile' if ok else 'torch SDPA (the shipped tile failed)'}"
                      f"{'' if passed else f': over the tolerance {tolerance}'}")
            ms = timed_row(row, launch, Timed("fused_attn", kernel, cfg, shape), FLOP_FACTOR[kernel] * fwd_flops,
                           passed, errs, reason)
            del run, launch
            if passed and ms is not None and (kernel not in best or ms < best[kernel][0]):
                best[kernel] = (ms, cfg)

    # The best passing tile of each kernel together, as a whole forward+backward.
    guard()
    row = plan[index]
    if len(best) < len(KERNELS):
        finish({**row, "status": "skipped", "reason": "no passing tile for some kernel"})
    else:
        tiles = AttentionConfigs(*(best[kernel][1] for kernel in KERNELS))
        row = {**row, "config": " ".join(config_label(getattr(tiles, kernel)) for kernel in KERNELS)}
        try:
            run = checked_run(q, k, v, do, shape, tiles)
            passed, errs = compare(run.outputs, check_against, tolerance)
            timed_row(row, whole(tiles, True), Timed("fused_attn_best", "fwd+bwd", None, shape),
                      FLOP_FACTOR["fwd+bwd"] * fwd_flops, passed, errs, "best passing tile of each kernel, launchers")
        except Exception as error:  # noqa: BLE001
            failed(row, error)

    # The shipped tiles again with pointer loads, for the kernels that use TMA here.
    pointer_rows = plan[index + 1:]
    if not pointer_rows:
        return
    guard()
    try:
        with _pointer_loads():
            run = checked_run(q, k, v, do, shape, shipped)
        passed, errs = compare(run.outputs, check_against, tolerance)
    except Exception as error:  # noqa: BLE001
        for row in pointer_rows:
            failed(row, error)
        return
    for row in pointer_rows:
        guard()
        launch = run.launch_of(str(row["kernel"]))
        if launch.kwargs.get("USE_TMA"):
            finish({**row, "status": "error", "reason": "FUSED_ATTN_TMA=0 did not turn TMA off"})
            continue
        timed_row(row, launch, Timed(POINTER_LOADS, str(row["kernel"]), getattr(shipped, str(row["kernel"])), shape),
                  FLOP_FACTOR[str(row["kernel"])] * fwd_flops, passed, errs,
                  "shipped tile with pointer loads (FUSED_ATTN_TMA=0); vs_shipped > 1: TMA is slower")


def _time_sdpa(row: dict[str, object], provider_name: str, mode: str, shape: Shape, q: torch.Tensor,
               k: torch.Tensor, v: torch.Tensor, do: torch.Tensor, time_fn: TimeFn, fwd_flops: float,
               finish: Callable[[dict[str, object]], None],
               failed: Callable[[dict[str, object], BaseException], None]) -> None:
    from bench.providers import Case, Unsupported, providers_named

    provider = providers_named([provider_name])[0]
    case = Case(mode, shape.causal, shape.dtype, shape.batch, shape.heads, shape.seq, shape.head_dim)
    leaves = [t.detach().clone().requires_grad_(mode != "fwd") for t in (q, k, v)]
    try:
        fn = provider.build(case, torch.device(q.device))
        with provider.context():
            if mode == "fwd":
                def step() -> object:
                    with torch.no_grad():
                        return fn(*leaves)
            else:
                def step() -> object:
                    for t in leaves:
                        t.grad = None
                    return fn(*leaves).backward(do)
            step()  # refused here, before any timing, when the backend cannot run this case
            ms = time_fn(step, Timed(provider_name, mode, None, shape))
    except Unsupported as refusal:
        finish({**row, "status": "skipped", "reason": f"unavailable: {refusal}"[:300]})
        return
    except Exception as error:  # noqa: BLE001
        failed(row, error)
        return
    finish({**row, "status": "ok", "ms": ms, "tflops": FLOP_FACTOR[mode] * fwd_flops / ms / 1e9 if ms > 0 else None,
            "reason": "torch SDPA, pinned with sdpa_kernel"})


# ---------------------------------------------------------------------------------------------
# Winners and the JSON


def winners(rows: Sequence[dict[str, object]]) -> list[dict[str, object]]:
    """One fused_attn.tune entry per (kernel, dtype, head dim, sequence bucket): among the tiles
    whose check passed and that were timed in every causal setting used for that key, the one
    with the least total time. The settings used are those measured completely (no tile skipped
    at the deadline) when there is one, else every setting measured at all.
    "ms" / "timings_ms": mean over those settings."""
    groups: dict[tuple, dict[bool, dict[str, float]]] = {}
    incomplete: set[tuple] = set()
    configs_by_label: dict[str, tuple[int, int, int, int]] = {}
    for row in rows:
        if row["provider"] != "fused_attn" or row["kernel"] not in KERNELS:
            continue
        key = (row["kernel"], row["dtype"], int(row["head_dim"]), seq_bucket(int(row["seq"])))  # type: ignore[arg-type]
        if row["status"] == "skipped":
            incomplete.add((key, bool(row["causal"])))
            continue
        per_causal = groups.setdefault(key, {}).setdefault(bool(row["causal"]), {})
        label = str(row["config"])
        configs_by_label[label] = _parse_label(label)
        # A tile that failed its check or errored is kept as infinitely slow: it never wins.
        ok = row["status"] == "ok" and row["ms"] is not None
        per_causal[label] = float(row["ms"]) if ok else math.inf  # type: ignore[arg-type]
    entries = []
    for (kernel, dtype, head_dim, bucket), per_causal in groups.items():
        key = (kernel, dtype, head_dim, bucket)
        complete = [t for causal, t in per_causal.items() if (key, causal) not in incomplete]
        settings = complete or list(per_causal.values())
        labels = [label for label in settings[0] if all(label in timings for timings in settings)]
        means = {label: sum(t[label] for t in settings) / len(settings) for label in labels}
        passing = {label: ms for label, ms in means.items() if math.isfinite(ms)}
        if not passing:
            continue
        label = min(passing, key=passing.__getitem__)  # ties: the first measured (shipped first)
        block_m, block_n, warps, stages = configs_by_label[label]
        entries.append({"kernel": kernel, "head_dim": head_dim, "dtype": dtype, "variant": "plain",
                        "even_d": even_head_dim(head_dim), "seq_bucket": bucket,
                        "config": {"block_m": block_m, "block_n": block_n, "num_warps": warps, "num_stages": stages},
                        "ms": round(passing[label], 6), "timings_ms": {lb: round(ms, 6) for lb, ms in passing.items()}})
    return entries


def _parse_label(label: str) -> tuple[int, int, int, int]:
    match = re.fullmatch(r"(\d+)x(\d+)w(\d+)s(\d+)", label)
    if not match:
        raise ValueError(f"not a tile label: {label!r}")
    return tuple(int(g) for g in match.groups())  # type: ignore[return-value]


def _sanitize(text: str) -> str:
    # fused_attn.tune's file naming: '-' separates device and version, so it is replaced too.
    return re.sub(r"[^A-Za-z0-9.]+", "_", text).strip("_") or "unknown"


def json_name(device: DeviceInfo) -> str:
    """tuned-<device>-triton<version>.json; without "tuned-" it is fused_attn.tune's file name."""
    return f"tuned-{_sanitize(device.name)}-triton{_sanitize(device.triton)}.json"


def tuned_json(device: DeviceInfo, entries: Sequence[dict[str, object]]) -> dict[str, object]:
    return {"format": 1, "device": device.name, "capability": device.capability, "triton": device.triton,
            "torch": device.torch, "entries": list(entries)}


def write_json(out_dir: Path, device: DeviceInfo, entries: Sequence[dict[str, object]]) -> Path:
    path = out_dir / json_name(device)
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(tuned_json(device, entries), indent=1) + "\n")
    tmp.replace(path)
    return path


# ---------------------------------------------------------------------------------------------
# Tables


def _fmt(value: object, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _kernel_line(shape: Shape, kernel: str, mine: list[dict[str, object]]) -> str:
    shipped = next((r for r in mine if r["shipped"]), {})
    passing = [r for r in mine if r["status"] == "ok" and r["ms"] is not None]
    top = min(passing, key=lambda r: r["ms"]) if passing else {}  # type: ignore[arg-type, return-value]
    counts = " / ".join(str(sum(r["status"] == s for r in mine)) for s in ("ok", "check failed", "error", "skipped"))
    speedup = shipped["ms"] / top["ms"] if shipped.get("ms") and top.get("ms") else None  # type: ignore[operator]
    shipped_cell = str(shipped.get("config", "-"))
    if shipped and shipped["status"] != "ok":
        shipped_cell += f" ({shipped['status']})"
    return (f"| {shape.head_dim} | {shape.seq} | {shape.causal} | {kernel} | {shipped_cell} | "
            f"{_fmt(shipped.get('ms'))} | {_fmt(shipped.get('tflops'), 1)} | {top.get('config', '-')} | "
            f"{_fmt(top.get('ms'))} | {_fmt(top.get('tflops'), 1)} | "
            f"{f'{speedup:.2f}x' if speedup else '-'} | {counts} |")


def format_tables(rows: Sequence[dict[str, object]], stopped: str = "") -> str:
    """Markdown: per kernel the shipped tile against the best passing one; the whole calls next to
    torch SDPA; the winners."""
    shapes = list(dict.fromkeys(_shape_of(r) for r in rows))
    lines = ["## Tile sweep: each kernel alone (TFLOP/s: fwd 4BHS^2D, halved causal; dK/dV 2.0x, dQ 1.5x)", "",
             "| D | S | causal | kernel | shipped | ms | TFLOP/s | best passing | ms | TFLOP/s | speed-up "
             "| tiles ok / check failed / error / skipped |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for shape in shapes:
        for kernel in KERNELS:
            mine = [r for r in rows if r["provider"] == "fused_attn" and r["kernel"] == kernel
                    and _shape_of(r) == shape]
            if mine:
                lines.append(_kernel_line(shape, kernel, mine))
    columns = [("fused_attn", "fwd", "shipped fwd"), ("fused_attn", "fwd+bwd", "shipped fwd+bwd"),
               ("fused_attn_best", "fwd+bwd", "best tiles fwd+bwd")]
    columns += [(provider, mode, f"{provider} {mode}") for provider in SDPA_PROVIDERS for mode in ("fwd", "fwd+bwd")]
    lines += ["", "## Whole calls, TFLOP/s (fused_attn through its launchers; fwd+bwd counted 3.5x fwd)", "",
              "| D | S | causal | " + " | ".join(name for _, _, name in columns) + " |",
              "|---|---|---|" + "---|" * len(columns)]
    for shape in shapes:
        cells = []
        for provider, mode, _ in columns:
            row = next((r for r in rows if r["provider"] == provider and r["kernel"] == mode
                        and _shape_of(r) == shape), None)
            cells.append("-" if row is None else _fmt(row["tflops"], 1) if row["status"] == "ok"
                         else str(row["status"]))
        lines.append(f"| {shape.head_dim} | {shape.seq} | {shape.causal} | " + " | ".join(cells) + " |")
    unavailable = sorted({f"{r['provider']}: {r['reason']}" for r in rows if str(r["provider"]).startswith("sdpa")
                          and r["status"] == "skipped" and str(r["reason"]).startswith("unavailable")})
    lines += [f"- {line}" for line in unavailable[:4]]

    pointer = [r for r in rows if r["provider"] == POINTER_LOADS]
    if pointer:
        lines += ["", "## TMA against pointer loads (the shipped tile; speed-up > 1: TMA is faster)", "",
                  "| D | S | causal | kernel | tile | pointer-load ms | TFLOP/s | TMA speed-up | status |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in pointer:
            shape = _shape_of(r)
            lines.append(f"| {shape.head_dim} | {shape.seq} | {shape.causal} | {r['kernel']} | {r['config']} | "
                         f"{_fmt(r['ms'], 4)} | {_fmt(r['tflops'], 1)} | {_fmt(r['vs_shipped'], 2)} | {r['status']} |")
    lines += ["", "## Winners (tuned JSON; causal and not share an entry)", ""]
    shipped_by_key = {(r["kernel"], r["dtype"], r["head_dim"], seq_bucket(int(r["seq"]))): r["config"]
                      for r in rows if r["provider"] == "fused_attn" and r["shipped"]}  # type: ignore[arg-type]
    entries = winners(rows)
    for e in entries:
        c = e["config"]
        label = f"{c['block_m']}x{c['block_n']}w{c['num_warps']}s{c['num_stages']}"  # type: ignore[index]
        shipped = shipped_by_key.get((e["kernel"], e["dtype"], e["head_dim"], e["seq_bucket"]))
        timings: dict[str, float] = e["timings_ms"]  # type: ignore[assignment]
        if label == shipped:
            note = "= shipped"
        elif shipped in timings:
            note = f"shipped {shipped}: {timings[shipped] / e['ms']:.2f}x slower"  # type: ignore[index, operator]
        else:
            note = f"shipped {shipped} did not pass or was not timed"
        lines.append(f"- {e['kernel']} D={e['head_dim']} S~{e['seq_bucket']}: {label} {e['ms']:.4f} ms ({note})")
    if not entries:
        lines.append("- none (nothing passed and was timed)")
    if stopped:
        lines += ["", f"Stopped early: {stopped}; the rest are 'skipped' rows."]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# CLI


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.tile_sweep", description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", type=Path, help="folder for tile_sweep.csv, tile_sweep.md and the tuned JSON")
    parser.add_argument("--quick", action="store_true", help="S = 4096 only")
    parser.add_argument("--deadline-s", type=float, default=DEFAULT_DEADLINE_S,
                        help=f"start no step after this many seconds (default {DEFAULT_DEADLINE_S:.0f})")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--head-dims", type=int, nargs="+", default=[128, 64])
    parser.add_argument("--seqs", type=int, nargs="+", help="sequence lengths (default 4096 8192; --quick 4096)")
    parser.add_argument("--warmup-ms", type=float, default=25.0)
    parser.add_argument("--rep-ms", type=float, default=100.0)
    parser.add_argument("--tolerance", type=float, default=TOLERANCE,
                        help=f"largest ||out - ref|| / ||ref|| that passes (default {TOLERANCE})")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """0: swept (or nothing to do without CUDA); 1: the shipped tiles failed their check against
    torch SDPA somewhere, a shape could not run at all, or the device failed; 2: cannot run here."""
    args = parse_args(argv)
    start = time.perf_counter()
    if not torch.cuda.is_available():
        print("tile_sweep: no CUDA device here, nothing to time (the sweep needs a GPU; exiting 0)")
        return 0
    from fused_attn import _launch

    device = query_device()
    if _launch.interpreting() and device.device.startswith("cuda"):
        print("tile_sweep: TRITON_INTERPRET=1 is set, so the kernels would run on the CPU; unset it", file=sys.stderr)
        return 2
    shapes = default_shapes(args.quick, args.batch, args.heads, args.head_dims, args.seqs)
    print(f"# tile sweep on {device.name} (capability {device.capability}), torch {device.torch}, "
          f"triton {device.triton}: {len(shapes)} shapes, deadline {args.deadline_s:.0f} s", flush=True)
    result = sweep(shapes, device, cuda_time_fn(args.warmup_ms, args.rep_ms), out_dir=args.out_dir,
                   deadline=start + args.deadline_s, tolerance=args.tolerance)
    print()
    print(f"Rows in {args.out_dir / 'tile_sweep.csv'}; winners in {args.out_dir / json_name(device)} "
          f"(fused_attn.tune reads it as ~/.cache/fused_attn/tune/{json_name(device)[len('tuned-'):]}). "
          f"{time.perf_counter() - start:.0f} s.\n")
    print(format_tables(result.rows, result.stopped))
    return 1 if result.shipped_failures or result.errors or result.stopped.startswith("stopped: the device") else 0


if __name__ == "__main__":
    sys.exit(main())
