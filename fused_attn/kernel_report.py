"""Compile every shipped attention config for real GPU targets and check what the GPU would see.

No GPU is needed: `triton.compile` builds cubins for capability 80 (A100) and 90 (H100/H200) on
any machine, and the `cuobjdump` that ships with Triton reads them back. For every entry of
`fused_attn.kernels.configs.all_configs()`, every dtype of that element size and each of the four
kernels, this module compiles the most demanding variant the launcher can produce (causal, head
dims that need masks) and records

    registers   REG per thread (cuobjdump --dump-resource-usage)
    spills      STACK + LOCAL bytes, and LDL/STL instructions in the SASS
    shared      dynamic shared memory in bytes (compiled.metadata.shared) + static shared
    HGMMA/HMMA  warpgroup (sm_90) and warp-level tensor-core MMA instructions in the SASS
    MUFU.EX2    hardware exponentials in the SASS

and checks: the kernel compiles, spills nothing, fits the card's shared memory, and on
capability 90 the fp16/bf16 forward, dK/dV and dQ kernels use HGMMA (the preprocess kernel has
no dot). The kernels must be real `triton.JITFunction`s: run with TRITON_INTERPRET unset or 0.

    python -m fused_attn.kernel_report                 # markdown table; exit 1 if a check fails
    python -m fused_attn.kernel_report --json out.json # also write every row as JSON

Exit status: 0 all checks pass, 1 some check failed, 3 the environment cannot compile
(interpreter on, or Triton's NVIDIA backend tools missing).
"""
from __future__ import annotations

import argparse
import concurrent.futures
import inspect
import json
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from fused_attn.kernels.configs import AttentionConfigs, KernelConfig, all_configs

SHARED_MEMORY_LIMITS: dict[int, int] = {80: 166_912, 90: 232_448}
"""Largest shared memory one block may use, in bytes (A100: 163 KiB, H100/H200: 227 KiB)."""

KERNELS: tuple[str, ...] = ("fwd", "preprocess", "dkdv", "dq")
_KERNEL_FUNCTIONS = {"fwd": "_attn_fwd", "preprocess": "_attn_bwd_preprocess",
                     "dkdv": "_attn_bwd_dkdv", "dq": "_attn_bwd_dq"}
DTYPES_BY_ELEMENT_SIZE: dict[int, tuple[str, ...]] = {2: ("fp16", "bf16"), 4: ("fp32",)}
_POINTER_ARGS_FP32 = ("LSE", "DELTA")  # always float32, whatever q's dtype
_FLOAT_ARGS = ("qk_scale_log2", "scale")
_PREPROCESS_NUM_WARPS = 4  # fused_attn/_launch.py passes none: Triton's default

ENV_ERROR_EXIT = 3


class ReportEnvironmentError(RuntimeError):
    """The kernels cannot be compiled for a GPU target in this process."""


def preprocess_block_m(block_dv: int) -> int:
    """BLOCK_M of `_attn_bwd_preprocess`, as chosen in fused_attn/_launch.py."""
    return 64 if block_dv <= 128 else 32


def nvidia_tool(name: str) -> Path | None:
    """Path of a tool (cuobjdump, ptxas, ...) shipped in triton/backends/nvidia/bin, or None.

    Looks the package up without importing triton, so it is safe under the interpreter too."""
    import importlib.util

    spec = importlib.util.find_spec("triton")
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        path = Path(location) / "backends" / "nvidia" / "bin" / name
        if path.is_file() and os.access(path, os.X_OK):
            return path
    return None


def _interpreter_requested() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


def check_environment() -> None:
    """Raise ReportEnvironmentError with the fix when the report cannot run here."""
    if _interpreter_requested():
        raise ReportEnvironmentError(
            "TRITON_INTERPRET is set: the kernels are built for the Triton interpreter and cannot be "
            "compiled for a GPU target. Run `env -u TRITON_INTERPRET python -m fused_attn.kernel_report` "
            "(or TRITON_INTERPRET=0) in a fresh process.")
    from triton.runtime.jit import JITFunction

    from fused_attn.kernels import attention

    for name in _KERNEL_FUNCTIONS.values():
        if not isinstance(getattr(attention, name), JITFunction):
            raise ReportEnvironmentError(
                f"fused_attn.kernels.attention.{name} is not a triton JITFunction: the module was "
                "imported with TRITON_INTERPRET=1 in this process. Run the report in a fresh process "
                "without TRITON_INTERPRET.")
    for tool in ("ptxas", "cuobjdump"):
        if nvidia_tool(tool) is None:
            raise ReportEnvironmentError(
                f"{tool} not found under triton/backends/nvidia/bin: this Triton install has no "
                "NVIDIA backend tools, so kernels cannot be compiled for CUDA targets")


@dataclass(frozen=True)
class CompileJob:
    """One kernel to compile: which shipped entry, dtype and launch parameters."""

    capability: int
    head_dim: int  # the bucket: BLOCK_D = BLOCK_DV = head_dim
    dtype: str  # 'fp16', 'bf16' or 'fp32'
    kernel: str  # one of KERNELS
    block_m: int
    block_n: int | None  # None for the preprocess kernel
    num_warps: int
    num_stages: int | None  # None: Triton's default (the preprocess launch passes none)
    input_precision: str

    @property
    def needs_hgmma(self) -> bool:
        """On capability 90 the 16-bit kernels with dots must use warpgroup MMA."""
        return self.capability >= 90 and self.dtype in ("fp16", "bf16") and self.kernel != "preprocess"


@dataclass
class KernelReport:
    """What one compiled kernel uses, and which checks it fails (empty `failures`: all pass)."""

    job: CompileJob
    compiled: bool = False
    error: str | None = None
    registers: int | None = None
    stack_bytes: int | None = None
    local_bytes: int | None = None
    spill_instructions: int | None = None  # LDL + STL in the SASS
    shared: int | None = None  # compiled.metadata.shared: dynamic shared memory
    static_shared: int | None = None  # SHARED in cuobjdump's resource usage
    shared_limit: int = 0
    hgmma: int | None = None
    hmma: int | None = None
    mufu_ex2: int | None = None
    compile_seconds: float = 0.0
    failures: list[str] = field(default_factory=list)

    @property
    def spills(self) -> int:
        """Non-zero when registers spill: STACK/LOCAL bytes plus LDL/STL instructions."""
        return (self.stack_bytes or 0) + (self.local_bytes or 0) + (self.spill_instructions or 0)

    @property
    def total_shared(self) -> int:
        return (self.shared or 0) + (self.static_shared or 0)

    @property
    def ok(self) -> bool:
        return not self.failures

    def as_dict(self) -> dict[str, Any]:
        row = asdict(self.job)
        row.update({k: v for k, v in asdict(self).items() if k != "job"})
        row.update(spills=self.spills, total_shared=self.total_shared, needs_hgmma=self.job.needs_hgmma,
                   ok=self.ok)
        return row


@dataclass
class Report:
    rows: list[KernelReport]
    seconds: float
    triton_version: str

    @property
    def ok(self) -> bool:
        return all(row.ok for row in self.rows)

    def as_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "seconds": round(self.seconds, 2), "triton_version": self.triton_version,
                "shared_memory_limits": SHARED_MEMORY_LIMITS, "rows": [row.as_dict() for row in self.rows]}


def _kernel_jobs(capability: int, head_dim: int, dtype: str, configs: AttentionConfigs,
                 input_precision: str) -> list[CompileJob]:
    def job(kernel: str, cfg: KernelConfig) -> CompileJob:
        return CompileJob(capability, head_dim, dtype, kernel, cfg.block_m, cfg.block_n, cfg.num_warps,
                          cfg.num_stages, input_precision)

    preprocess = CompileJob(capability, head_dim, dtype, "preprocess", preprocess_block_m(head_dim), None,
                            _PREPROCESS_NUM_WARPS, None, input_precision)
    return [job("fwd", configs.forward), preprocess, job("dkdv", configs.backward_dkdv),
            job("dq", configs.backward_dq)]


def build_jobs(table: Mapping[tuple[int, int, int], AttentionConfigs] | None = None, *,
               fp32_tf32: bool = True) -> list[CompileJob]:
    """Every kernel to compile for `table` (default: the shipped configs).

    16-bit dtypes compile with input_precision 'tf32' (ignored for 16-bit dots); fp32 compiles with
    'ieee' (the launcher's default) and, with `fp32_tf32`, also 'tf32' (torch's allow_tf32 on)."""
    table = all_configs() if table is None else table
    jobs: list[CompileJob] = []
    for (capability, head_dim, element_size), configs in sorted(table.items()):
        for dtype in DTYPES_BY_ELEMENT_SIZE[element_size]:
            precisions = ("ieee", "tf32") if dtype == "fp32" and fp32_tf32 else (
                ("ieee",) if dtype == "fp32" else ("tf32",))
            for precision in precisions:
                jobs.extend(_kernel_jobs(capability, head_dim, dtype, configs, precision))
    return jobs


def _signature(fn: Any, dtype: str) -> tuple[dict[str, str], dict[tuple[int, ...], list[list[Any]]]]:
    """Types of every argument, as the launcher passes them, and 16-byte alignment of pointers
    (what `JITFunction._pack_args` derives from torch tensors; ints get no divisibility hint)."""
    signature: dict[str, str] = {}
    attrs: dict[tuple[int, ...], list[list[Any]]] = {}
    for index, param in enumerate(fn.params):
        name = param.name
        if param.is_constexpr:
            signature[name] = "constexpr"
        elif name in _FLOAT_ARGS:
            signature[name] = "fp32"
        elif name.isupper():  # tensors: Q, K, V, O, LSE, DELTA, DO, DK, DV, DQ
            signature[name] = "*fp32" if name in _POINTER_ARGS_FP32 else f"*{dtype}"
            attrs[(index,)] = [["tt.divisibility", 16]]
        else:  # strides, head counts, lengths, head dims
            signature[name] = "i32"
    return signature, attrs


# Constexprs the launcher sets only under the Triton interpreter (bf16 emulation): off on the GPU.
_INTERPRETER_ONLY_FLAGS = frozenset({"DOT_UPCAST", "EMULATE_BF16"})


def _constexprs(fn: Any, job: CompileJob) -> dict[str, Any]:
    """Values of every constexpr parameter of `fn`, for the most demanding variant the launcher
    produces: causal (diagonal and unmasked loops) and head dims that need masks."""
    if job.kernel == "preprocess":
        known: dict[str, Any] = {"BLOCK_M": job.block_m, "BLOCK_DV": job.head_dim}
    else:
        known = {"BLOCK_M": job.block_m, "BLOCK_N": job.block_n, "BLOCK_D": job.head_dim,
                 "BLOCK_DV": job.head_dim, "CAUSAL": True, "EVEN_D": False, "EVEN_DV": False,
                 "INPUT_PRECISION": job.input_precision}
    values: dict[str, Any] = {}
    for param in fn.params:
        if not param.is_constexpr:
            continue
        if param.name in known:
            values[param.name] = known[param.name]
        elif param.name in _INTERPRETER_ONLY_FLAGS:
            values[param.name] = False
        elif param.default is not inspect.Parameter.empty:
            values[param.name] = param.default
        else:
            raise KeyError(f"{fn.__name__} has a constexpr {param.name} that fused_attn.kernel_report does "
                           "not know how to set: add it to kernel_report._constexprs")
    return values


_RESOURCE_RE = re.compile(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)")


def _count(pattern: str, sass: str) -> int:
    return len(re.findall(pattern, sass))


def compile_one(job: CompileJob) -> KernelReport:
    """Compile one kernel for its target and read registers, spills, shared memory and MMA use."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from fused_attn.kernels import attention

    report = KernelReport(job=job, shared_limit=SHARED_MEMORY_LIMITS[job.capability])
    fn = getattr(attention, _KERNEL_FUNCTIONS[job.kernel])
    signature, attrs = _signature(fn, job.dtype)
    options: dict[str, Any] = {"num_warps": job.num_warps}
    if job.num_stages is not None:
        options["num_stages"] = job.num_stages
    start = time.perf_counter()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*TRITON_DEFAULT_FP_FUSION.*")
            compiled = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=_constexprs(fn, job), attrs=attrs),
                                      target=GPUTarget("cuda", job.capability, 32), options=options)
    except Exception as exc:  # noqa: BLE001 - any compile failure is a failed row, not a crash
        report.compile_seconds = time.perf_counter() - start
        report.error = _summarize_error(exc)
        report.failures.append(f"does not compile: {report.error}")
        return report
    report.compile_seconds = time.perf_counter() - start
    report.compiled = True
    report.shared = int(compiled.metadata.shared)

    cuobjdump = nvidia_tool("cuobjdump")
    assert cuobjdump is not None, "check_environment() verifies cuobjdump"
    with tempfile.TemporaryDirectory(prefix="fused_attn_report_") as tmp:
        cubin = Path(tmp) / f"{fn.__name__}.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        usage = subprocess.run([str(cuobjdump), "--dump-resource-usage", str(cubin)],
                               capture_output=True, text=True, check=True).stdout
        sass = subprocess.run([str(cuobjdump), "--dump-sass", str(cubin)],
                              capture_output=True, text=True, check=True).stdout
    match = _RESOURCE_RE.search(usage)
    if match is None:
        report.failures.append(f"cannot parse cuobjdump resource usage: {usage.strip()[:200]}")
    else:
        report.registers, report.stack_bytes, report.static_shared, report.local_bytes = map(int, match.groups())
    report.spill_instructions = _count(r"\bLDL\b", sass) + _count(r"\bSTL\b", sass)
    report.hgmma = _count(r"\bHGMMA\b", sass)
    report.hmma = _count(r"\bHMMA\b", sass)
    report.mufu_ex2 = _count(r"\bMUFU\.EX2\b", sass)

    if report.spills:
        report.failures.append(f"spills registers (STACK {report.stack_bytes}, LOCAL {report.local_bytes}, "
                               f"{report.spill_instructions} LDL/STL)")
    if report.total_shared > report.shared_limit:
        report.failures.append(f"needs {report.total_shared} B shared memory, over the {report.shared_limit} B "
                               f"of capability {job.capability}")
    if job.needs_hgmma and not report.hgmma:
        report.failures.append(f"no HGMMA on capability {job.capability} ({report.hmma} HMMA): the slow path")
    return report


def _summarize_error(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    where = next((line for line in lines if line.startswith("at ")), "")
    message = lines[-1] if lines else ""
    text = f"{type(exc).__name__} {where}: {message}" if where else f"{type(exc).__name__}: {message}"
    return text[:500]


def _worker_init(cache_dir: str | None) -> None:
    if cache_dir is not None:
        os.environ["TRITON_CACHE_DIR"] = cache_dir
    warnings.filterwarnings("ignore", message=".*TRITON_DEFAULT_FP_FUSION.*")


def _cost(job: CompileJob) -> int:
    # Biggest kernels first so two workers finish together.
    return -(job.head_dim * (job.block_m + (job.block_n or 0)) * (2 if job.kernel in ("dkdv", "dq") else 1))


def run_report(table: Mapping[tuple[int, int, int], AttentionConfigs] | None = None, *, workers: int = 2,
               fp32_tf32: bool = True, cache_dir: str | None = None) -> Report:
    """Compile every kernel of `table` (default: the shipped configs) and check each one.

    `workers` processes compile in parallel (1: in this process). `cache_dir` overrides
    TRITON_CACHE_DIR for the compiles (default: Triton's cache, so a rerun is fast).
    Raises ReportEnvironmentError when the kernels cannot be compiled here."""
    import triton

    check_environment()
    start = time.perf_counter()
    jobs = build_jobs(table, fp32_tf32=fp32_tf32)
    order = sorted(range(len(jobs)), key=lambda i: _cost(jobs[i]))
    results: dict[int, KernelReport] = {}
    if workers <= 1:
        saved_cache_dir = os.environ.get("TRITON_CACHE_DIR")
        try:
            _worker_init(cache_dir)
            for i in order:
                results[i] = compile_one(jobs[i])
        finally:
            if saved_cache_dir is None:
                os.environ.pop("TRITON_CACHE_DIR", None)
            else:
                os.environ["TRITON_CACHE_DIR"] = saved_cache_dir
    else:
        # spawn: a fresh interpreter per worker, no state forked from the caller (torch, threads).
        context = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(max_workers=workers, mp_context=context,
                                                    initializer=_worker_init, initargs=(cache_dir,)) as pool:
            futures = {pool.submit(compile_one, jobs[i]): i for i in order}
            for future in concurrent.futures.as_completed(futures):
                results[futures[future]] = future.result()
    return Report(rows=[results[i] for i in range(len(jobs))], seconds=time.perf_counter() - start,
                  triton_version=triton.__version__)


def _cell(value: int | None) -> str:
    return "-" if value is None else str(value)


def format_markdown(rows: Iterable[KernelReport]) -> str:
    """One markdown row per (capability, head dim, dtype, precision, kernel)."""
    header = ("| cap | D | dtype | prec | kernel | BM x BN | warps | stages | regs | spills | shared (B) "
              "| limit (B) | HGMMA | HMMA | EX2 | s | status |")
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for row in rows:
        job = row.job
        tile = f"{job.block_m} x {job.block_n}" if job.block_n is not None else f"{job.block_m}"
        spills = "-" if not row.compiled else (
            "0" if not row.spills else f"{row.stack_bytes}/{row.local_bytes}/{row.spill_instructions}")
        shared = "-" if not row.compiled else (
            str(row.shared) if not row.static_shared else f"{row.shared}+{row.static_shared}")
        status = "ok" if row.ok else "FAIL: " + "; ".join(row.failures).replace("|", "/")
        lines.append(
            f"| {job.capability} | {job.head_dim} | {job.dtype} | {job.input_precision} | {job.kernel} | {tile} "
            f"| {job.num_warps} | {_cell(job.num_stages)} | {_cell(row.registers)} | {spills} | {shared} "
            f"| {row.shared_limit} | {_cell(row.hgmma)} | {_cell(row.hmma)} | {_cell(row.mufu_ex2)} "
            f"| {row.compile_seconds:.1f} | {status} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fused_attn.kernel_report", description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", metavar="PATH", help="write every row, with the checks, as JSON")
    parser.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1),
                        help="compile processes (default: 2, or 1 on a single core)")
    parser.add_argument("--no-fp32-tf32", dest="fp32_tf32", action="store_false",
                        help="skip the fp32 variant with input_precision='tf32' (torch allow_tf32 on)")
    parser.add_argument("--cache-dir", help="TRITON_CACHE_DIR for the compiles (default: Triton's own)")
    args = parser.parse_args(argv)
    try:
        report = run_report(workers=args.workers, fp32_tf32=args.fp32_tf32, cache_dir=args.cache_dir)
    except ReportEnvironmentError as exc:
        print(f"kernel_report: {exc}", file=sys.stderr)
        return ENV_ERROR_EXIT
    print(format_markdown(report.rows))
    failed = [row for row in report.rows if not row.ok]
    print(f"\n{len(report.rows)} kernels compiled for capabilities "
          f"{sorted({row.job.capability for row in report.rows})} with Triton {report.triton_version} "
          f"in {report.seconds:.1f} s; {len(failed)} failed checks")
    if args.json:
        Path(args.json).write_text(json.dumps(report.as_dict(), indent=1) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    # Re-import so worker processes pickle functions of fused_attn.kernel_report, not __main__.
    from fused_attn.kernel_report import main as _main

    sys.exit(_main())
