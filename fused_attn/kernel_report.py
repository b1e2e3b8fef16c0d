"""Compile every shipped attention config for real GPU targets and check what the GPU would see.

No GPU is needed: `triton.compile` builds cubins for capability 80 (A100) and 90 (H100/H200) on
any machine, and the `cuobjdump` that ships with Triton reads them back. For every entry of
`fused_attn.kernels.configs.all_configs()`, every dtype of that element size and each of the four
kernels, this module compiles the most demanding variant the kernels are launched with (causal,
head dims that need masks) and records

    registers   REG per thread (cuobjdump --dump-resource-usage)
    spills      STACK + LOCAL bytes, and LDL/STL instructions in the SASS
    shared      dynamic shared memory in bytes (compiled.metadata.shared) + static shared
    HGMMA/HMMA  warpgroup (sm_90) and warp-level tensor-core MMA instructions in the SASS
    MUFU.EX2    hardware exponentials in the SASS

and checks: the kernel compiles, spills nothing, fits the card's shared memory, and on
capability 90 the fp16/bf16 forward, dK/dV and dQ kernels use HGMMA (the preprocess kernel has
no dot). Rows listed in `configs.KNOWN_SPILLS` (fp16/bf16 kernels that spill in every tile that
keeps HGMMA) are marked "known spill" instead of failing, but fail if they no longer spill (the
entry is stale) or break any other check. The kernels must be real `triton.JITFunction`s: run
with TRITON_INTERPRET unset or 0.

The default (and only shipped) variant is `aligned`: the launcher copies any q/k/v/do whose head
dim or non-last stride is not a multiple of 16 elements, or whose pointer is not 16-byte aligned,
into a zero-padded buffer, so the kernels only ever see 16-byte aligned pointers and head dims and
strides that are multiples of 16 (as Triton specializes them at launch); the head dim may still be
smaller than its block (EVEN_D False, e.g. 80 in a 128 block), which is what is compiled.
`--variant unaligned` compiles head dims like 59 with only the pointers' alignment known, a case
the launcher no longer produces; it is a diagnostic, not a check the configs must pass.

    python -m fused_attn.kernel_report                 # markdown table; exit 1 if a check fails
    python -m fused_attn.kernel_report --json out.json # also write every row as JSON
    python -m fused_attn.kernel_report --kernel-module my_patched_attention  # try a kernel change

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

from fused_attn.kernels.configs import (KNOWN_SPILLS, AttentionConfigs, KernelConfig, all_configs, lookup,
                                        preprocess_block_m)

SHARED_MEMORY_LIMITS: dict[int, int] = {80: 166_912, 90: 232_448}
"""Largest shared memory one block may use, in bytes (A100: 163 KiB, H100/H200: 227 KiB)."""

KERNELS: tuple[str, ...] = ("fwd", "preprocess", "dkdv", "dq")
_KERNEL_FUNCTIONS = {"fwd": "_attn_fwd", "preprocess": "_attn_bwd_preprocess",
                     "dkdv": "_attn_bwd_dkdv", "dq": "_attn_bwd_dq",
                     # The inspection kernels (attention_probs / attention_stats): compiled by the
                     # compile test, not part of the config table's report.
                     "probs": "_attn_probs", "row_stats": "_attn_row_stats", "col_sums": "_attn_col_sums"}
DTYPES_BY_ELEMENT_SIZE: dict[int, tuple[str, ...]] = {2: ("fp16", "bf16"), 4: ("fp32",)}
_ELEMENT_SIZES = {dtype: size for size, dtypes in DTYPES_BY_ELEMENT_SIZE.items() for dtype in dtypes}
_POINTER_ARGS_FP32 = ("LSE", "DLSE", "LSE_LOG2", "DELTA", "DBIAS", "ALIBI", "P", "ENTROPY", "MAX_PROB", "RECEIVED")  # always float32, whatever q's dtype
_POINTER_ARGS_INT32 = ("CU_SEQLENS_Q", "CU_SEQLENS_K", "ROWS", "HEADS")
_FLOAT_ARGS = ("qk_scale_log2", "scale", "softcap_in", "softcap_out_log2", "dropout_p")
_INT64_ARGS = ("dropout_seed",)
# Strides the launcher derives from lengths or small tensors: not multiples of 16 in general.
_UNALIGNED_STRIDES = ("stride_lse_b", "stride_lse_h", "stride_alibi_b")
_PREPROCESS_NUM_WARPS = 4  # fused_attn/_launch.py passes none: Triton's default

ENV_ERROR_EXIT = 3
DEFAULT_KERNEL_MODULE = "fused_attn.kernels.attention"
VARIANTS: tuple[str, ...] = ("aligned", "unaligned")
DEFAULT_VARIANT = "aligned"


class ReportEnvironmentError(RuntimeError):
    """The kernels cannot be compiled for a GPU target in this process."""


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


def _kernel_module(name: str) -> Any:
    import importlib

    return importlib.import_module(name)


def check_environment(kernel_module: str = DEFAULT_KERNEL_MODULE) -> None:
    """Raise ReportEnvironmentError with the fix when the report cannot run here."""
    if _interpreter_requested():
        raise ReportEnvironmentError(
            "TRITON_INTERPRET is set: the kernels are built for the Triton interpreter and cannot be "
            "compiled for a GPU target. Run `env -u TRITON_INTERPRET python -m fused_attn.kernel_report` "
            "(or TRITON_INTERPRET=0) in a fresh process.")
    from triton.runtime.jit import JITFunction

    module = _kernel_module(kernel_module)
    for name in _KERNEL_FUNCTIONS.values():
        if not isinstance(getattr(module, name, None), JITFunction):
            raise ReportEnvironmentError(
                f"{kernel_module}.{name} is not a triton JITFunction (missing, or the module was "
                "imported with TRITON_INTERPRET=1 in this process). Run the report in a fresh process "
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
    variant: str = DEFAULT_VARIANT  # one of VARIANTS
    features: tuple[str, ...] = ()  # variant constexprs switched on, e.g. ("HAS_DROPOUT", "IS_VARLEN")

    @property
    def in_known_spills(self) -> bool:
        """Listed in configs.KNOWN_SPILLS (16-bit dtypes only): its spills are reported, not failed."""
        return (self.dtype in ("fp16", "bf16")
                and (self.capability, self.head_dim, self.kernel) in KNOWN_SPILLS)

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
    known_spill: str | None = None  # KNOWN_SPILLS' reason when this row spills as listed there

    @property
    def spills(self) -> int:
        """Bytes of spilled registers per thread: cuobjdump's STACK + LOCAL."""
        return (self.stack_bytes or 0) + (self.local_bytes or 0)

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
                "variant": self.rows[0].job.variant if self.rows else None,
                "shared_memory_limits": SHARED_MEMORY_LIMITS, "rows": [row.as_dict() for row in self.rows]}


def _kernel_jobs(capability: int, head_dim: int, dtype: str, configs: AttentionConfigs,
                 input_precision: str, variant: str) -> list[CompileJob]:
    def job(kernel: str, cfg: KernelConfig) -> CompileJob:
        return CompileJob(capability, head_dim, dtype, kernel, cfg.block_m, cfg.block_n, cfg.num_warps,
                          cfg.num_stages, input_precision, variant)

    preprocess = CompileJob(capability, head_dim, dtype, "preprocess", preprocess_block_m(head_dim, _ELEMENT_SIZES[dtype]), None,
                            _PREPROCESS_NUM_WARPS, None, input_precision, variant)
    return [job("fwd", configs.forward), preprocess, job("dkdv", configs.backward_dkdv),
            job("dq", configs.backward_dq)]


# Variant constexprs the kernels are launched with besides the plain (causal, no mask) rows.
VARIANT_FEATURES: dict[str, tuple[str, ...]] = {
    "window": ("LIMIT_LEFT",),
    "alibi": ("HAS_ALIBI",),
    "softcap": ("HAS_SOFTCAP",),
    "dropout": ("HAS_DROPOUT",),
    "varlen": ("IS_VARLEN",),
    "float mask + grad": ("BIAS_KIND", "STORE_DBIAS"),
    "all at once": ("LIMIT_LEFT", "HAS_ALIBI", "HAS_SOFTCAP", "HAS_DROPOUT", "IS_VARLEN", "BIAS_KIND", "STORE_DBIAS"),
}


def build_variant_jobs(capabilities: Sequence[int] = (80, 90), head_dims: Sequence[int] = (64, 128),
                       features: Mapping[str, tuple[str, ...]] = VARIANT_FEATURES,
                       dtype: str = "bf16") -> list[CompileJob]:
    """The forward, dK/dV and dQ kernels of the shipped configs with each variant switched on.
    Their spills are recorded, not failed; compiling, shared memory and HGMMA are checked."""
    jobs = []
    for capability in capabilities:
        for head_dim in head_dims:
            configs = lookup(capability, head_dim, _ELEMENT_SIZES[dtype])
            for flags in features.values():
                for kernel, cfg in (("fwd", configs.forward), ("dkdv", configs.backward_dkdv),
                                    ("dq", configs.backward_dq)):
                    kernel_flags = tuple(f for f in flags if kernel == "dkdv" or f != "STORE_DBIAS")
                    jobs.append(CompileJob(capability, head_dim, dtype, kernel, cfg.block_m, cfg.block_n,
                                           cfg.num_warps, cfg.num_stages, "tf32", features=kernel_flags))
    return jobs


def build_jobs(table: Mapping[tuple[int, int, int], AttentionConfigs] | None = None, *,
               fp32_tf32: bool = True, variant: str = DEFAULT_VARIANT) -> list[CompileJob]:
    """Every kernel to compile for `table` (default: the shipped configs).

    16-bit dtypes compile with input_precision 'tf32' (ignored for 16-bit dots); fp32 compiles with
    'ieee' (the launcher's default) and, with `fp32_tf32`, also 'tf32' (torch's allow_tf32 on)."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    table = all_configs() if table is None else table
    jobs: list[CompileJob] = []
    for (capability, head_dim, element_size), configs in sorted(table.items()):
        for dtype in DTYPES_BY_ELEMENT_SIZE[element_size]:
            precisions = ("ieee", "tf32") if dtype == "fp32" and fp32_tf32 else (
                ("ieee",) if dtype == "fp32" else ("tf32",))
            for precision in precisions:
                jobs.extend(_kernel_jobs(capability, head_dim, dtype, configs, precision, variant))
    return jobs


def _signature(fn: Any, dtype: str, variant: str = DEFAULT_VARIANT
               ) -> tuple[dict[str, str], dict[tuple[int, ...], list[list[Any]]]]:
    """Types of every argument, as the launcher passes them, and the divisibility hints that
    `JITFunction._pack_args` derives at launch: 16-byte aligned pointers (torch allocations) and,
    in the aligned variant, strides and head dims that are multiples of 16."""
    signature: dict[str, str] = {}
    attrs: dict[tuple[int, ...], list[list[Any]]] = {}
    for index, param in enumerate(fn.params):
        name = param.name
        if param.is_constexpr:
            signature[name] = "constexpr"
        elif name in _FLOAT_ARGS:
            signature[name] = "fp32"
        elif name in _INT64_ARGS:
            signature[name] = "i64"
        elif name.isupper():  # tensors: Q, K, V, O, LSE, DELTA, DO, DK, DV, DQ, BIAS, ALIBI, CU_SEQLENS_*
            if name in _POINTER_ARGS_FP32:
                signature[name] = "*fp32"
            elif name in _POINTER_ARGS_INT32:
                signature[name] = "*i32"
            else:
                signature[name] = f"*{dtype}"
            attrs[(index,)] = [["tt.divisibility", 16]]
        else:  # strides, head counts, lengths, head dims
            signature[name] = "i32"
            if variant == "aligned" and name.startswith(("stride_", "head_dim")) and name not in _UNALIGNED_STRIDES:
                attrs[(index,)] = [["tt.divisibility", 16]]
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
                 "BLOCK_DV": job.head_dim, "LIMIT_RIGHT": True, "EVEN_D": False, "EVEN_DV": False,
                 "INPUT_PRECISION": job.input_precision,
                 # The plain rows cover calls without attn_mask or variants; `features` turns them on.
                 "BIAS_KIND": 0, "STORE_DBIAS": False}
        known.update({name: (1 if name == "BIAS_KIND" else True) for name in job.features})
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


def compile_one(job: CompileJob, kernel_module: str = DEFAULT_KERNEL_MODULE) -> KernelReport:
    """Compile one kernel for its target and read registers, spills, shared memory and MMA use."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    report = KernelReport(job=job, shared_limit=SHARED_MEMORY_LIMITS[job.capability])
    fn = getattr(_kernel_module(kernel_module), _KERNEL_FUNCTIONS[job.kernel])
    signature, attrs = _signature(fn, job.dtype, job.variant)
    options: dict[str, Any] = {"num_warps": job.num_warps}
    if job.num_stages is not None:
        options["num_stages"] = job.num_stages
    start = time.perf_counter()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*TRITON_DEFAULT_FP_FUSION.*")
            source = ASTSource(fn=fn, signature=signature, constexprs=_constexprs(fn, job), attrs=attrs)
            compiled = triton.compile(source, target=GPUTarget("cuda", job.capability, 32), options=options)
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
        try:
            usage = subprocess.run([str(cuobjdump), "--dump-resource-usage", str(cubin)],
                                   capture_output=True, text=True, check=True).stdout
            sass = subprocess.run([str(cuobjdump), "--dump-sass", str(cubin)],
                                  capture_output=True, text=True, check=True).stdout
        except subprocess.CalledProcessError as exc:
            report.failures.append(f"cuobjdump failed ({exc.returncode}): {exc.stderr.strip()[:200]}")
            return report
    match = _RESOURCE_RE.search(usage)
    if match is None:
        report.failures.append(f"cannot parse cuobjdump resource usage: {usage.strip()[:200]}")
    else:
        report.registers, report.stack_bytes, report.static_shared, report.local_bytes = map(int, match.groups())
    report.spill_instructions = _count(r"\bLDL\b", sass) + _count(r"\bSTL\b", sass)
    report.hgmma = _count(r"\bHGMMA\b", sass)
    report.hmma = _count(r"\bHMMA\b", sass)
    report.mufu_ex2 = _count(r"\bMUFU\.EX2\b", sass)

    if job.in_known_spills:
        if report.spills or report.spill_instructions:
            report.known_spill = KNOWN_SPILLS[(job.capability, job.head_dim, job.kernel)]
        else:
            report.failures.append("listed in configs.KNOWN_SPILLS but spills nothing: remove the entry")
    elif (report.spills or report.spill_instructions) and not job.features:
        # Variant rows (job.features) record spills without failing: their configs are the plain
        # kernels' (no GPU has timed alternatives yet), see VARIANT_FEATURES.
        report.failures.append(f"spills registers (STACK {report.stack_bytes}, LOCAL {report.local_bytes}, "
                               f"{report.spill_instructions} LDL/STL)")
    if report.total_shared > report.shared_limit:
        report.failures.append(f"needs {report.total_shared} B shared memory, over the {report.shared_limit} B "
                               f"of capability {job.capability}")
    if job.needs_hgmma and not report.hgmma:
        report.failures.append(f"no HGMMA on capability {job.capability} ({report.hmma} HMMA): the slow path")
    return report


def _summarize_error(exc: BaseException) -> str:
    """`Type at line:col: first sentence` of the innermost error of a compiler error chain."""
    chain: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in chain:
        chain.append(current)
        current = current.__cause__ or current.__context__
    where = ""
    for error in chain:  # the innermost location wins
        first_line = str(error).splitlines()[0] if str(error) else ""
        match = re.match(r"at (\d+:\d+)", first_line)
        if match:
            where = match.group(1)
    root = chain[-1]
    lines = [line.strip() for line in str(root).splitlines() if set(line.strip()) - set("^~ ")]
    message = re.split(r"(?<=\.)\s", lines[-1], maxsplit=1)[0] if lines else ""
    return f"{type(root).__name__}{' at ' + where if where else ''}: {message}"[:300]


def _worker_init(cache_dir: str) -> None:
    os.environ["TRITON_CACHE_DIR"] = cache_dir
    warnings.filterwarnings("ignore", message=".*TRITON_DEFAULT_FP_FUSION.*")


def _cost(job: CompileJob) -> int:
    # Biggest kernels first so two workers finish together.
    return -(job.head_dim * (job.block_m + (job.block_n or 0)) * (2 if job.kernel in ("dkdv", "dq") else 1))


def run_report(table: Mapping[tuple[int, int, int], AttentionConfigs] | None = None, *, workers: int = 2,
               fp32_tf32: bool = True, variant: str = DEFAULT_VARIANT, cache_dir: str | None = None,
               kernel_module: str = DEFAULT_KERNEL_MODULE, jobs: Sequence[CompileJob] | None = None) -> Report:
    """Compile every kernel of `table` (default: the shipped configs), or the given `jobs`, and check each one.

    `workers` processes compile in parallel (1: in this process). `variant` picks what the
    compiler may assume about head dims and strides (see the module docstring). `cache_dir` is the
    TRITON_CACHE_DIR of the compiles; by default a fresh temporary one, so nothing stale is reused.
    `kernel_module` names a module with the four kernels, to check a patched copy.
    Raises ReportEnvironmentError when the kernels cannot be compiled here."""
    import triton

    check_environment(kernel_module)
    start = time.perf_counter()
    jobs = build_jobs(table, fp32_tf32=fp32_tf32, variant=variant) if jobs is None else list(jobs)
    if cache_dir is None:
        # A fresh cache: Triton's cache key ignores some settings that change the result (for
        # example TRITON_ALLOW_NON_CONSTEXPR_GLOBALS), so a shared cache could report stale kernels.
        with tempfile.TemporaryDirectory(prefix="fused_attn_kernel_report_") as fresh:
            rows = _compile_all(jobs, workers, fresh, kernel_module)
    else:
        rows = _compile_all(jobs, workers, cache_dir, kernel_module)
    return Report(rows=rows, seconds=time.perf_counter() - start, triton_version=triton.__version__)


def _compile_all(jobs: Sequence[CompileJob], workers: int, cache_dir: str,
                 kernel_module: str) -> list[KernelReport]:
    order = sorted(range(len(jobs)), key=lambda i: _cost(jobs[i]))
    results: dict[int, KernelReport] = {}
    if workers <= 1:
        saved_cache_dir = os.environ.get("TRITON_CACHE_DIR")
        try:
            _worker_init(cache_dir)
            for i in order:
                results[i] = compile_one(jobs[i], kernel_module)
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
            futures = {pool.submit(compile_one, jobs[i], kernel_module): i for i in order}
            for future in concurrent.futures.as_completed(futures):
                results[futures[future]] = future.result()
    return [results[i] for i in range(len(jobs))]


def _cell(value: int | None) -> str:
    return "-" if value is None else str(value)


def _feature_name(flags: tuple[str, ...]) -> str:
    for name, feature_flags in VARIANT_FEATURES.items():
        if set(flags) == set(feature_flags) or set(flags) == set(feature_flags) - {"STORE_DBIAS"}:
            return name
    return "+".join(flags) or "plain"


def format_markdown(rows: Iterable[KernelReport]) -> str:
    """One markdown row per (capability, head dim, dtype, precision, kernel)."""
    rows = list(rows)
    with_features = any(row.job.features for row in rows)
    header = ("| cap | D | dtype | prec | kernel |" + (" variant |" if with_features else "")
              + " BM x BN | warps | stages | regs | spills | shared (B) | limit (B) | HGMMA | HMMA | EX2 | s | status |")
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for row in rows:
        job = row.job
        tile = f"{job.block_m} x {job.block_n}" if job.block_n is not None else f"{job.block_m}"
        spills = "-" if not row.compiled else (
            "0" if not (row.spills or row.spill_instructions) else f"{row.spills} B, {row.spill_instructions} LDL/STL")
        shared = "-" if not row.compiled else (
            str(row.shared) if not row.static_shared else f"{row.shared}+{row.static_shared}")
        status = ("known spill" if row.known_spill else "ok") if row.ok else "FAIL: " + "; ".join(row.failures).replace("|", "/")
        if row.ok and job.features and row.spills:
            status = "ok (spills recorded)"
        variant_cell = f" {_feature_name(job.features)} |" if with_features else ""
        lines.append(
            f"| {job.capability} | {job.head_dim} | {job.dtype} | {job.input_precision} | {job.kernel} |{variant_cell} {tile} "
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
    parser.add_argument("--variant", choices=VARIANTS, default=DEFAULT_VARIANT,
                        help="aligned (default): head dims and strides multiples of 16, all the launcher "
                             "passes to the kernels; unaligned: head dims like 59 (diagnostic only)")
    parser.add_argument("--cache-dir", help="TRITON_CACHE_DIR to compile into and reuse (default: a fresh "
                                            "temporary directory, removed afterwards)")
    parser.add_argument("--kernel-module", default=DEFAULT_KERNEL_MODULE,
                        help=f"importable module holding the four kernels (default: {DEFAULT_KERNEL_MODULE})")
    parser.add_argument("--variants", action="store_true",
                        help="compile the variant kernels (window, ALiBi, softcap, dropout, varlen, float mask) "
                             "of the bf16 D=64/128 configs instead; their spills are recorded, not failed")
    args = parser.parse_args(argv)
    try:
        report = run_report(workers=args.workers, fp32_tf32=args.fp32_tf32, variant=args.variant,
                            cache_dir=args.cache_dir, kernel_module=args.kernel_module,
                            jobs=build_variant_jobs() if args.variants else None)
    except ReportEnvironmentError as exc:
        print(f"kernel_report: {exc}", file=sys.stderr)
        return ENV_ERROR_EXIT
    print(format_markdown(report.rows))
    failed = [row for row in report.rows if not row.ok]
    print(f"\n{len(report.rows)} kernels ({args.variant} head dims) compiled for capabilities "
          f"{sorted({row.job.capability for row in report.rows})} with Triton {report.triton_version} "
          f"in {report.seconds:.1f} s; {len(failed)} failed checks, "
          f"{sum(1 for row in report.rows if row.ok and row.known_spill)} known spills (configs.KNOWN_SPILLS)")
    if args.json:
        Path(args.json).write_text(json.dumps(report.as_dict(), indent=1) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    # Re-import so worker processes pickle functions of fused_attn.kernel_report, not __main__.
    from fused_attn.kernel_report import main as _main

    sys.exit(_main())
