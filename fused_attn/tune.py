"""Tuning the kernels' tiles on the user's GPU.

By default nothing is timed: each launch uses the config table's vetted tiles (kernels/configs.py)
in the table's order. Timings taken on the user's card reorder them:

* a per-device results file, ``$FUSED_ATTN_TUNE_DIR`` or ``~/.cache/fused_attn/tune/``, named after
  the device and the Triton version (``NVIDIA_H200-triton3.6.0.json``), is read once per process
  and device, lazily at the first launch; an entry matching a launch's `TuneKey` puts its config
  first, the table's other tiles after it (the out-of-resources retry still has them);
* ``FUSED_ATTN_TUNE=1`` times every candidate of each new key at its first launch and appends the
  fastest to that file; ``python -m fused_attn.tune`` does the same for shapes named on the command
  line, and prints the timings;
* ``FUSED_ATTN_TUNE=0`` ignores the file: the table's order only.
  The variable is read once, at the first launch (`reset` reads it again).

Nothing is timed when the launcher passes no `run` (calls that must not be tuned), under the Triton
interpreter, inside CUDA graph capture (timing synchronizes, which capture forbids) or while
torch.compile traces (a trace must not depend on timings): those launches use the table's order,
or a result already in memory.

Why do_bench in a loop and not ``triton.autotune(..., cache_results=True)``: the launcher picks
the tile before launching (override_configs, the interpreter's pinned tile, the table's default
with no timing at all, the out-of-resources fallback) and computes each grid from the tile in a
closure; an Autotuner would own that choice, time every new key whether the user opted in or not
(inside graph capture and compile tracing too), key on exact argument values rather than our
buckets (sequence-length bucket, head-dim bucket) unless the kernels took extra dummy arguments,
and keep its results in Triton's cache under a hash of the kernel source: opaque, unreadable by
another process until that same launch, and not writable by the GPU tile sweep. This module times
with the Autotuner's own primitive instead (``triton.testing.do_bench``, median: its signature,
``return_mode="median"`` included, is the same in Triton 3.5 and 3.9, so in 3.6 too) and keeps
the results in one readable JSON per device, the same schema the tile sweep writes.

File schema (format 1)::

    {"format": 1, "device": "NVIDIA H200", "capability": 90, "triton": "3.6.0", "torch": "2.9.0",
     "entries": [{"kernel": "forward", "head_dim": 128, "dtype": "bf16", "variant": "plain",
                  "even_d": true, "seq_bucket": 4096,
                  "config": {"block_m": 128, "block_n": 64, "num_warps": 8, "num_stages": 3},
                  "ms": 1.234, "timings_ms": {"128x64w8s3": 1.234, "64x64w4s3": 1.5}}]}

A file whose "device" or "triton" differs from the running process's is never loaded; a malformed
one warns once and is ignored (tuning results must never stop a training run).
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import json
import math
import os
import re
import statistics
import sys
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, NamedTuple, Sequence

import torch
import triton

from fused_attn._warnings import warn_once
from fused_attn.kernels.configs import VARIANTS, KernelConfig

FORMAT = 1
ENV_TUNE = "FUSED_ATTN_TUNE"
ENV_DIR = "FUSED_ATTN_TUNE_DIR"
WARMUP_MS = 25  # do_bench's (and triton.autotune's) defaults
REP_MS = 100
DTYPES = ("fp16", "bf16", "fp32")


@dataclass(frozen=True)
class TuneKey:
    """What a tuned tile is stored under: launches that share a key share a tile."""

    kernel: str  # "forward" | "backward_dkdv" | "backward_dq"
    head_dim: int  # head-dim bucket of max(D, Dv)
    dtype: str  # "fp16" | "bf16" | "fp32"
    variant: str  # one of configs.VARIANTS
    even_d: bool  # both head dims equal their buckets
    seq_bucket: int  # next power of two of max(seq_q, seq_k), clamped to [64, 65536]


class DeviceInfo(NamedTuple):
    name: str  # torch.cuda.get_device_name
    capability: int  # major * 10 + minor


def dtype_name(dtype: torch.dtype) -> str:
    """The key's name of a kernel dtype: "fp16", "bf16" or "fp32"."""
    return {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}[dtype]


def seq_bucket(length: int) -> int:
    """Smallest power of two >= `length`, clamped to [64, 65536]: tiles are tuned per octave."""
    bucket = 64
    while bucket < length and bucket < 65536:
        bucket *= 2
    return bucket


def config_label(cfg: KernelConfig) -> str:
    """"128x64w8s3": block_m x block_n, warps, stages (the keys of "timings_ms")."""
    return f"{cfg.block_m}x{cfg.block_n}w{cfg.num_warps}s{cfg.num_stages}"


def _sanitize(text: str) -> str:
    # '-' separates device from version in the file name, so it is replaced like spaces are.
    return re.sub(r"[^A-Za-z0-9.]+", "_", text).strip("_") or "unknown"


def results_dir() -> Path:
    """Where results files live: $FUSED_ATTN_TUNE_DIR, else ~/.cache/fused_attn/tune."""
    configured = os.environ.get(ENV_DIR)
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "fused_attn" / "tune"


def results_path(device_name: str, triton_version: str | None = None) -> Path:
    """The results file of a device under a Triton version (default: the running one)."""
    version = triton.__version__ if triton_version is None else triton_version
    return results_dir() / f"{_sanitize(device_name)}-triton{_sanitize(version)}.json"


# ---------------------------------------------------------------------------------------------
# Process state. `choose` reads it without the lock (dict reads are atomic under the GIL); loads,
# timings and file writes take it.

_LOCK = threading.RLock()
_RESULTS: dict[torch.device, dict[TuneKey, KernelConfig | None]] = {}  # None: tried, use the table
_MODE: str | None = None  # "off" | "load" | "tune", from FUSED_ATTN_TUNE at the first load
_FORCED = False  # the CLI's run: time every new key whatever the environment says
_REPORT: list[dict[str, Any]] | None = None  # the CLI's run: what was timed
_WARNED: set[object] = set()
_DEVICE_INFO: dict[int, DeviceInfo] = {}


def reset() -> None:
    """Forget loaded results, the FUSED_ATTN_TUNE setting and past warnings: the next launch
    reads the environment and the results file again."""
    global _MODE
    with _LOCK:
        _RESULTS.clear()
        _MODE = None
        _WARNED.clear()
        _DEVICE_INFO.clear()


def _mode() -> str:
    global _MODE
    if _MODE is None:
        value = os.environ.get(ENV_TUNE, "").strip().lower()
        if value in ("", "auto"):
            _MODE = "load"
        elif value in ("0", "false", "no", "off"):
            _MODE = "off"
        elif value in ("1", "true", "yes", "on"):
            _MODE = "tune"
        else:
            warn_once(_WARNED, ("env", value), f"fused_attn: {ENV_TUNE}={value!r} is not one of 1/0 (on/off): "
                      "results files are loaded, nothing is timed",
                      category=RuntimeWarning, stacklevel=2)
            _MODE = "load"
    return _MODE


def _cuda_device_info(index: int) -> DeviceInfo:
    info = _DEVICE_INFO.get(index)
    if info is None:
        major, minor = torch.cuda.get_device_capability(index)
        info = _DEVICE_INFO[index] = DeviceInfo(torch.cuda.get_device_name(index), major * 10 + minor)
    return info


def _device_info(device: torch.device) -> DeviceInfo | None:
    """Name and capability of a CUDA device; None for anything else (nothing is tuned there)."""
    if device.type != "cuda":
        return None
    try:
        return _cuda_device_info(device.index if device.index is not None else torch.cuda.current_device())
    except Exception as exc:  # e.g. a CPU-only torch: no results rather than a failed launch
        warn_once(_WARNED, ("device", str(device)), f"fused_attn: cannot name {device} ({exc}); tuning results unused",
                  category=RuntimeWarning, stacklevel=2)
        return None


# ---------------------------------------------------------------------------------------------
# The results file.

class MalformedResults(ValueError):
    """A results file that is not valid JSON of this schema."""


def _int_field(entry: dict[str, Any], name: str) -> int:
    value = entry.get(name)
    if isinstance(value, bool) or not isinstance(value, int):
        raise MalformedResults(f"'{name}' must be an int, got {value!r}")
    return value


def _str_field(entry: dict[str, Any], name: str) -> str:
    value = entry.get(name)
    if not isinstance(value, str):
        raise MalformedResults(f"'{name}' must be a string, got {value!r}")
    return value


def _parse_entry(entry: object) -> tuple[TuneKey, KernelConfig]:
    if not isinstance(entry, dict):
        raise MalformedResults(f"an entry must be an object, got {entry!r}")
    even_d = entry.get("even_d")
    if not isinstance(even_d, bool):
        raise MalformedResults(f"'even_d' must be true or false, got {even_d!r}")
    key = TuneKey(kernel=_str_field(entry, "kernel"), head_dim=_int_field(entry, "head_dim"),
                  dtype=_str_field(entry, "dtype"), variant=_str_field(entry, "variant"), even_d=even_d,
                  seq_bucket=_int_field(entry, "seq_bucket"))
    config = entry.get("config")
    if not isinstance(config, dict):
        raise MalformedResults(f"'config' must be an object, got {config!r}")
    cfg = KernelConfig(*(_int_field(config, name) for name in ("block_m", "block_n", "num_warps", "num_stages")))
    from fused_attn import _launch  # late: the launcher imports this module lazily too

    try:  # the same checks override_configs applies: a bad tile fails here, not in a launch
        _launch._check_kernel_config(key.kernel, cfg)
    except (TypeError, ValueError) as exc:
        raise MalformedResults(str(exc)) from None
    return key, cfg


def read_results(path: Path) -> dict[str, Any] | None:
    """The parsed, validated file at `path`, or None when there is none.
    Raises MalformedResults when it is not this schema."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise MalformedResults(f"cannot read it: {exc}") from None
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise MalformedResults(f"not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise MalformedResults("the top level must be an object")
    if data.get("format") != FORMAT:
        raise MalformedResults(f"'format' must be {FORMAT}, got {data.get('format')!r}")
    _str_field(data, "device")
    _str_field(data, "triton")
    if not isinstance(data.get("entries"), list):
        raise MalformedResults("'entries' must be a list")
    for entry in data["entries"]:
        _parse_entry(entry)
    return data


def _load_file(info: DeviceInfo) -> dict[TuneKey, KernelConfig | None]:
    """The entries of `info`'s results file as a key -> tile map; empty (with one warning) when
    the file is malformed or was written for another device or Triton version."""
    path = results_path(info.name)
    try:
        data = read_results(path)
    except MalformedResults as exc:
        warn_once(_WARNED, ("malformed", str(path)), f"fused_attn: ignoring the tuning results in {path}: {exc} "
                  "(delete it, or run `python -m fused_attn.tune --clear`)",
                  category=RuntimeWarning, stacklevel=2)
        return {}
    if data is None:
        return {}
    if data["device"] != info.name or data["triton"] != triton.__version__:
        warn_once(_WARNED, ("foreign", str(path)),
                  f"fused_attn: ignoring the tuning results in {path}: they were timed on {data['device']!r} "
                  f"with Triton {data['triton']}, this process runs {info.name!r} with Triton {triton.__version__}",
                  category=RuntimeWarning, stacklevel=2)
        return {}
    results: dict[TuneKey, KernelConfig | None] = {}
    for entry in data["entries"]:  # a later entry for a key replaces an earlier one
        key, cfg = _parse_entry(entry)
        results[key] = cfg
    return results


def _load(device: torch.device) -> dict[TuneKey, KernelConfig | None]:
    with _LOCK:
        results = _RESULTS.get(device)
        if results is None:
            info = _device_info(device) if _mode() != "off" else None
            results = _load_file(info) if info is not None else {}
            _RESULTS[device] = results
        return results


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """Serialize read-modify-write of a results file between processes (e.g. the ranks of a
    distributed job tuning at once); a no-op where fcntl is missing (Windows)."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    with open(path.with_name(path.name + ".lock"), "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _write_entry(info: DeviceInfo, entry: dict[str, Any]) -> Path | None:
    """Add `entry` to `info`'s results file (replacing one with the same key) atomically; None,
    with a warning, when it cannot (the result then lives in this process only)."""
    path = results_path(info.name)
    key, _ = _parse_entry(entry)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with _file_lock(path):
            try:
                data = read_results(path)
            except MalformedResults as exc:  # never overwrite what we cannot read: it may be the user's
                raise OSError(f"the file there is malformed ({exc}); delete it to record results") from None
            if data is not None and (data["device"] != info.name or data["triton"] != triton.__version__):
                raise OSError(f"the file there was written for {data['device']!r}, Triton {data['triton']}")
            if data is None:
                data = {"format": FORMAT, "device": info.name, "capability": info.capability,
                        "triton": triton.__version__, "torch": torch.__version__, "entries": []}
            data["torch"] = torch.__version__
            data["entries"] = [e for e in data["entries"] if _parse_entry(e)[0] != key] + [entry]
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
            try:
                with os.fdopen(fd, "w") as f:
                    json.dump(data, f, indent=1)
                    f.write("\n")
                os.replace(tmp, path)  # readers see the old file or the new one, never half of one
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
    except OSError as exc:
        warn_once(_WARNED, ("write", str(path)), f"fused_attn: cannot record tuning results in {path}: {exc}",
                  category=RuntimeWarning, stacklevel=2)
        return None
    return path


# ---------------------------------------------------------------------------------------------
# Timing.

def _bench_ms(fn: Callable[[], None]) -> float:
    """Median milliseconds of `fn` (CUDA). Tests replace this module attribute with a fake."""
    from triton.testing import do_bench

    ms = do_bench(fn, warmup=WARMUP_MS, rep=REP_MS, return_mode="median")
    return float(statistics.median(ms)) if isinstance(ms, (list, tuple)) else float(ms)


def _may_time(device: torch.device) -> bool:
    """Whether a launch on `device` may be timed now."""
    if device.type != "cuda":
        return False
    from fused_attn import _launch

    if _launch.interpreting() or torch.compiler.is_compiling():
        return False
    try:
        return not torch.cuda.is_current_stream_capturing()
    except Exception:  # cannot tell: do not risk timing inside a capture
        return False


def _tune(key: TuneKey, device: torch.device, candidates: tuple[KernelConfig, ...],
          run: Callable[[KernelConfig], None]) -> KernelConfig | None:
    """Time every candidate of `key` with `run`, remember the fastest (in memory and in the
    results file) and return it; None when there is nothing to choose or nothing ran."""
    with _LOCK:
        results = _RESULTS.setdefault(device, {})
        if key in results:  # another thread timed it while this one waited
            return results[key]
        if len(candidates) < 2 and not _FORCED:  # nothing to choose between: no latency
            results[key] = None
            return None
        timings: dict[KernelConfig, float] = {}
        errors: list[str] = []
        for cfg in candidates:
            try:
                timings[cfg] = _bench_ms(functools.partial(run, cfg))
            except Exception as exc:  # e.g. OutOfResources: the launcher's retry skips it too
                errors.append(f"{config_label(cfg)}: {type(exc).__name__}: {exc}")
        finite = {cfg: ms for cfg, ms in timings.items() if math.isfinite(ms)}
        best = min(finite, key=finite.__getitem__) if finite else None  # ties: the table's order
        results[key] = best
        if errors and best is not None:
            warn_once(_WARNED, ("tune errors", device, key), f"fused_attn: while tuning {key}, some tiles failed and "
                      f"were skipped: {'; '.join(errors)}",
                      category=RuntimeWarning, stacklevel=2)
        path = None
        if best is not None:
            entry = {"kernel": key.kernel, "head_dim": key.head_dim, "dtype": key.dtype, "variant": key.variant,
                     "even_d": key.even_d, "seq_bucket": key.seq_bucket,
                     "config": {"block_m": best.block_m, "block_n": best.block_n,
                                "num_warps": best.num_warps, "num_stages": best.num_stages},
                     "ms": finite[best], "timings_ms": {config_label(c): ms for c, ms in finite.items()}}
            info = _device_info(device)
            if info is not None:
                path = _write_entry(info, entry)
        if _REPORT is not None:
            _REPORT.append({"key": key, "candidates": candidates, "timings": timings, "errors": errors,
                            "best": best, "path": path})
        return best


def choose(key: TuneKey, device: torch.device, candidates: tuple[KernelConfig, ...],
           run: Callable[[KernelConfig], None] | None) -> tuple[KernelConfig, ...]:
    """The tiles to launch `key` with on `device`, in order: `candidates` (the table's vetted
    list, best first) with the user's tuned tile moved or put first when there is one.

    `run(cfg)` launches the call's kernel with tile `cfg` (its outputs are overwritten by every
    launch); with FUSED_ATTN_TUNE=1 a key's first launch times each candidate with it. None: never
    time this call. Runs on every launch: without results or tuning it is two dict reads."""
    results = _RESULTS.get(device)
    if results is None:
        results = _load(device)
    best = results.get(key, _NOT_SEEN) if results else _NOT_SEEN
    if best is _NOT_SEEN:
        if run is None or not (_FORCED or _MODE == "tune") or not _may_time(device):
            return candidates
        best = _tune(key, device, candidates, run)
    if best is None:
        return candidates
    return _first(best, candidates)  # type: ignore[arg-type]


_NOT_SEEN: Any = object()


def _first(best: KernelConfig, candidates: tuple[KernelConfig, ...]) -> tuple[KernelConfig, ...]:
    """`best`, then the other candidates in the table's order (the out-of-resources retry list).
    A tile the table does not list (a results file from an older table) is not launched: only
    vetted tiles run."""
    if best not in candidates or candidates[0] == best:
        return candidates
    return (best, *(cfg for cfg in candidates if cfg != best))


@contextlib.contextmanager
def _forced_tuning(device: torch.device) -> Iterator[list[dict[str, Any]]]:
    """Time every key launched on `device` inside the block once, whatever FUSED_ATTN_TUNE and
    the results file say (the CLI's run), and yield the list the timings are reported into."""
    global _FORCED, _REPORT
    with _LOCK:
        _RESULTS[device] = {}  # re-time keys the file already has: the user asked for it
        _FORCED, _REPORT = True, []
        report = _REPORT
    try:
        yield report
    finally:
        with _LOCK:
            _FORCED, _REPORT = False, None
            _RESULTS.pop(device, None)  # the next launch reloads the file with the new entries


# ---------------------------------------------------------------------------------------------
# python -m fused_attn.tune

def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m fused_attn.tune",
        description="Time fused_attn's vetted tiles on this GPU for the given shapes (forward and "
                    "backward) and record the fastest in a per-device results file that later "
                    f"processes load. Directory: ${ENV_DIR}, else ~/.cache/fused_attn/tune.")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--heads", type=int, default=16, help="query heads")
    parser.add_argument("--kv-heads", type=int, default=None, help="key/value heads (default: --heads)")
    parser.add_argument("--seq", type=int, nargs="+", default=[4096], help="query lengths (one run each)")
    parser.add_argument("--seq-k", type=int, default=None, help="key length (default: each --seq)")
    parser.add_argument("--head-dim", type=int, nargs="+", default=[128])
    parser.add_argument("--head-dim-v", type=int, default=None, help="value head dim (default: --head-dim)")
    parser.add_argument("--dtype", nargs="+", choices=DTYPES, default=["bf16"])
    parser.add_argument("--variant", nargs="+", choices=VARIANTS, default=["plain"],
                        help="mask: a boolean attn_mask; dropout: dropout_p=0.1; all: both")
    parser.add_argument("--causal", action="store_true")
    parser.add_argument("--forward-only", action="store_true", help="skip the backward kernels")
    parser.add_argument("--device", default="cuda", help="e.g. cuda:1 (default: the current CUDA device)")
    parser.add_argument("--show", action="store_true", help="print this device's results file and exit")
    parser.add_argument("--clear", action="store_true", help="delete this device's results file and exit")
    return parser


def _fail(message: str) -> int:
    print(f"python -m fused_attn.tune: {message}", file=sys.stderr)
    return 2


def _format_entries(data: dict[str, Any]) -> list[str]:
    lines = [f"{'kernel':<14}{'head_dim':>9}{'dtype':>6}{'variant':>8}{'even_d':>7}{'seq':>7}  "
             f"{'config':<12}{'ms':>9}  timings_ms"]
    for entry in data["entries"]:
        timings = ", ".join(f"{label} {ms:.4g}" for label, ms in (entry.get("timings_ms") or {}).items()
                            if isinstance(ms, (int, float)))
        ms = entry.get("ms")
        lines.append(f"{entry['kernel']:<14}{entry['head_dim']:>9}{entry['dtype']:>6}{entry['variant']:>8}"
                     f"{'yes' if entry['even_d'] else 'no':>7}{entry['seq_bucket']:>7}  "
                     f"{config_label(_parse_entry(entry)[1]):<12}"
                     f"{(f'{ms:.4f}' if isinstance(ms, (int, float)) else '-'):>9}  {timings}")
    return lines


def _format_report(records: list[dict[str, Any]]) -> list[str]:
    lines = [f"{'kernel':<14}{'head_dim':>9}{'dtype':>6}{'variant':>8}{'even_d':>7}{'seq':>7}  "
             f"{'config':<12}{'ms':>10}"]
    for record in records:
        key: TuneKey = record["key"]
        head = (f"{key.kernel:<14}{key.head_dim:>9}{key.dtype:>6}{key.variant:>8}"
                f"{'yes' if key.even_d else 'no':>7}{key.seq_bucket:>7}  ")
        default = record["candidates"][0] if record["candidates"] else None
        for i, cfg in enumerate(record["candidates"]):
            ms = record["timings"].get(cfg)
            notes = [note for note, flag in (("table default", cfg == default), ("chosen", cfg == record["best"]))
                     if flag]
            if cfg == record["best"] and default in record["timings"] and ms:
                notes.append(f"{record['timings'][default] / ms:.2f}x the default")
            lines.append(f"{head if i == 0 else ' ' * len(head)}{config_label(cfg):<12}"
                         f"{(f'{ms:.4f}' if ms is not None else 'failed'):>10}  {', '.join(notes)}".rstrip())
        for error in record["errors"]:
            lines.append(f"{' ' * len(head)}{error}")
    return lines


def _tune_shape(device: torch.device, args: argparse.Namespace, seq: int, head_dim: int, dtype: str,
                variant: str) -> torch.Tensor:
    """One attention call (and its backward) at this shape through the public API; its output."""
    from fused_attn import attention

    torch_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
    seq_k = args.seq_k or seq
    kv_heads = args.kv_heads or args.heads
    head_dim_v = args.head_dim_v or head_dim
    grad = not args.forward_only
    q = torch.randn(args.batch, args.heads, seq, head_dim, device=device, dtype=torch_dtype, requires_grad=grad)
    k = torch.randn(args.batch, kv_heads, seq_k, head_dim, device=device, dtype=torch_dtype, requires_grad=grad)
    v = torch.randn(args.batch, kv_heads, seq_k, head_dim_v, device=device, dtype=torch_dtype, requires_grad=grad)
    mask = None
    if variant in ("mask", "all"):  # a key-padding mask: the last eighth of the keys hidden
        mask = torch.ones(args.batch, 1, 1, seq_k, device=device, dtype=torch.bool)
        mask[..., seq_k - seq_k // 8:] = False
    o = attention(q, k, v, causal=args.causal, attn_mask=mask, dropout_p=0.1 if variant in ("dropout", "all") else 0.0)
    if grad:
        o.backward(torch.randn_like(o))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return o


def main(argv: Sequence[str] | None = None) -> int:
    """The CLI: 0 when every shape was tuned, 1 when some failed, 2 when it cannot run here."""
    args = _parser().parse_args(argv)
    if not torch.cuda.is_available():
        return _fail("no CUDA device here: tuning times the kernels on the GPU that will run them "
                     "(nothing was timed or written)")
    from fused_attn import _launch

    if _launch.interpreting():
        return _fail("TRITON_INTERPRET=1 is set: the interpreter's timings mean nothing for a GPU; "
                     "unset it and run again")
    try:
        device = torch.device(args.device)
        if device.type != "cuda":
            raise ValueError
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        info = _cuda_device_info(device.index)
    except (RuntimeError, ValueError, AssertionError):
        return _fail(f"--device {args.device!r} is not a CUDA device of this machine")
    path = results_path(info.name)
    if args.clear:
        for target in (path, path.with_name(path.name + ".lock")):
            with contextlib.suppress(FileNotFoundError):
                target.unlink()
        print(f"removed {path}")
        reset()
        return 0
    if args.show:
        try:
            data = read_results(path)
        except MalformedResults as exc:
            print(f"{path}: malformed ({exc})")
            return 1
        if data is None:
            print(f"no results for {info.name} with Triton {triton.__version__} ({path} does not exist)")
            return 0
        print(f"{path}: {data['device']}, Triton {data['triton']}, torch {data.get('torch')}, "
              f"{len(data['entries'])} entries")
        print("\n".join(_format_entries(data)))
        return 0

    print(f"tuning on {info.name} (capability {info.capability // 10}.{info.capability % 10}), "
          f"Triton {triton.__version__}: results go to {path}")
    failed = 0
    torch.cuda.set_device(device)
    with _forced_tuning(device) as report:
        for seq in args.seq:
            for head_dim in args.head_dim:
                for dtype in args.dtype:
                    for variant in args.variant:
                        try:
                            _tune_shape(device, args, seq, head_dim, dtype, variant)
                        except Exception as exc:  # e.g. bf16 on sm_75, out of memory: go on with the rest
                            failed += 1
                            print(f"seq {seq}, head dim {head_dim}, {dtype}, {variant}: {type(exc).__name__}: "
                                  f"{exc}", file=sys.stderr)
    print("\n".join(_format_report(report)))
    if not any(record["path"] for record in report):
        print("nothing was recorded", file=sys.stderr)
        return 1
    return 1 if failed else 0


if __name__ == "__main__":
    # Run the package's module, not this __main__ copy: the launcher consults fused_attn.tune's state.
    from fused_attn import tune as _tune_module

    sys.exit(_tune_module.main())
