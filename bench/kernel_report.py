"""Compile every shipped attention tile for real GPU targets and judge what the GPU would run.

No GPU is needed: `triton.compile` builds cubins for every target in `configs.TARGETS` (capability
75, 80, 86, 90, 100, 120) on any machine, and the `cuobjdump` that ships with Triton reads them
back. For every tile the config table lists (first choices and the vetted alternatives), with the
head dim masked and exact (EVEN_D False and True), this module compiles the kernel and finds its
hot loop: the unmasked inner loop, read from the SASS. It records registers, spills, shared
memory, the hot loop's MMA instructions and wgmma shapes, and a static issue figure, and checks
(see docs/kernel-report.md):

    executed / useful MMA FLOPs in the hot loop = 1 (no warp recomputes another warp's tile)
    wgmma N >= 32 in the hot loop on capability 90, fp16/bf16 (N < 64 is noted)
    no LDL/STL inside the hot loop (spills elsewhere are recorded, not failed)
    shared memory within the target's limit, and the kernel compiles

Rows listed in `configs.ACCEPTED_FAILURES` (no candidate passes) are marked accepted instead of
failing. `--pick` chooses the table with the same checks. The kernels must be real
`triton.JITFunction`s: run with TRITON_INTERPRET unset or 0. The launcher copies any q/k/v/do whose
head dim or strides are not multiples of 16 elements into an aligned buffer, so the kernels are
compiled with 16-byte aligned pointers and strides (`--variant unaligned` is a diagnostic).

    python -m bench.kernel_report                 # markdown table; exit 1 if a check fails
    python -m bench.kernel_report --json out.json # also write every row as JSON
    python -m bench.kernel_report --dump DIR      # and each cubin, SASS and PTX, with DIR/index.json
    python -m bench.kernel_report --pick kernels/config_table.py --row-cache rows.jsonl

Exit status: 0 all checks pass, 1 some check failed, 3 the environment cannot compile
(interpreter on, or Triton's NVIDIA backend tools missing). Every figure is static: nothing is timed.
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

from fused_attn.kernels.attention import OPTIONAL_POINTERS
from fused_attn.kernels.configs import (ACCEPTED_FAILURES, UNVETTED_ROWS, CAPABILITIES, HEAD_DIM_BUCKETS,
                                        KERNELS as TABLE_KERNELS, TARGETS, TMA_KERNELS, TMA_MIN_HEAD_DIM, VARIANTS as TABLE_VARIANTS,
                                        AttentionConfigs, KernelConfig, all_candidates, all_configs,
                                        has_variant_rows, lookup, max_head_dim, preprocess_block_m, uses_tma,
                                        variant_key)

SHARED_MEMORY_LIMITS: dict[int, int] = {cap: target.shared_memory for cap, target in TARGETS.items()}
"""Largest shared memory one block may use, in bytes, per compile target (configs.TARGETS)."""

KERNELS: tuple[str, ...] = ("fwd", "preprocess", "dkdv", "dq")
_TABLE_KERNEL = {"fwd": "forward", "dkdv": "backward_dkdv", "dq": "backward_dq"}
_KERNEL_FUNCTIONS = {"fwd": "_attn_fwd", "preprocess": "_attn_bwd_preprocess",
                     "dkdv": "_attn_bwd_dkdv", "dq": "_attn_bwd_dq",
                     # The inspection kernels (attention_probs / attention_stats): compiled by the
                     # compile test, not part of the config table's report.
                     "probs": "_attn_probs", "row_stats": "_attn_row_stats", "col_sums": "_attn_col_sums",
                     # The KV-cache kernels (attention_with_kvcache): compiled by the compile test.
                     "decode": "_attn_decode", "decode_combine": "_attn_decode_combine"}
DTYPES_BY_ELEMENT_SIZE: dict[int, tuple[str, ...]] = {2: ("fp16", "bf16"), 4: ("fp32",)}
_ELEMENT_SIZES = {dtype: size for size, dtypes in DTYPES_BY_ELEMENT_SIZE.items() for dtype in dtypes}
_POINTER_ARGS_FP32 = ("LSE", "SINKS", "DLSE", "LSE_LOG2", "DELTA", "DBIAS", "ALIBI", "P", "ENTROPY", "MAX_PROB", "RECEIVED",
                      "O_PART", "LSE_PART")  # always float32, whatever q's dtype
_POINTER_ARGS_INT32 = ("CU_SEQLENS_Q", "CU_SEQLENS_K", "ROWS", "HEADS", "CACHE_SEQLENS", "BLOCK_TABLE", "CACHE_BATCH_IDX")
_FLOAT_ARGS = ("qk_scale_log2", "scale", "softcap_in", "softcap_out_log2", "dropout_p")
_INT64_ARGS = ("dropout_seed",)
# Strides the launcher derives from lengths or small tensors: not multiples of 16 in general.
_UNALIGNED_STRIDES = ("stride_lse_b", "stride_lse_h", "stride_alibi_b", "stride_block_table_b")
_PREPROCESS_NUM_WARPS = 4  # fused_attn/_launch.py passes none: Triton's default

# Variant keys of the table (configs.VARIANTS) -> the constexprs compiled for them: the most
# demanding call of that key (a float mask whose gradient is stored, dropout, both).
TABLE_VARIANT_FEATURES: dict[str, tuple[str, ...]] = {
    "plain": (), "mask": ("BIAS_KIND", "STORE_DBIAS"), "dropout": ("HAS_DROPOUT",),
    "all": ("BIAS_KIND", "STORE_DBIAS", "HAS_DROPOUT")}

# Dense 16-bit tensor-core FLOP per clock per SM of each target (None: Triton has no MMA there),
# from the vendors' peak figures: the denominator of the issue-pressure figure. Assumptions, not
# measurements; tf32 counts half, exact fp32 counts the FMA pipes (2 FLOP per lane).
MMA_FLOP_PER_CLOCK: dict[int, int | None] = {75: None, 80: 2048, 86: 1024, 90: 4096, 100: 8192, 120: 1024}
FMA_FLOP_PER_CLOCK: dict[int, int] = {75: 128, 80: 128, 86: 256, 90: 256, 100: 256, 120: 256}

# Bump when the analysis of a compiled kernel changes (what find_hot_loop, _mma_flops, _signature
# or _constexprs compute): cached rows and the committed report's fingerprint carry it.
REPORT_VERSION = 4
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
            "compiled for a GPU target. Run `env -u TRITON_INTERPRET python -m bench.kernel_report` "
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
    even_d: bool = False  # EVEN_D / EVEN_DV: the head dim equals its block (64, 128) or is masked (80, 96)
    table_variant: str | None = None  # the table's variant key this job vets (None: a diagnostic row)

    @property
    def uses_mma(self) -> bool:
        """Tensor-core dots: not on targets where Triton lowers tl.dot to FMA, not for exact fp32."""
        return (TARGETS[self.capability].tensor_cores and self.kernel != "preprocess"
                and (self.dtype != "fp32" or self.input_precision == "tf32"))

    @property
    def needs_wgmma_n(self) -> bool:
        """On capability 90 the 16-bit hot loops must use warpgroup MMA with N >= 32 (or the head
        dim, where it is smaller)."""
        return self.capability == 90 and self.dtype in ("fp16", "bf16") and self.kernel != "preprocess"

    @property
    def useful_flops(self) -> int | None:
        """FLOPs one iteration of the hot loop must do (head dims at their blocks)."""
        d = self.head_dim
        if self.block_n is None:
            return None
        pairs = self.block_m * self.block_n
        return {"fwd": 4 * pairs * d, "dkdv": 8 * pairs * d, "dq": 6 * pairs * d, "decode": 4 * pairs * d}.get(self.kernel)

    @property
    def name(self) -> str:
        tile = f"{self.block_m}x{self.block_n}" if self.block_n is not None else f"{self.block_m}"
        feats = ("-" + "+".join(self.features)) if self.features else ""
        return (f"sm{self.capability}-d{self.head_dim}-{self.dtype}-{self.input_precision}-{self.kernel}-{tile}"
                f"-w{self.num_warps}-s{self.num_stages}-{'even' if self.even_d else 'masked'}{feats}")


@dataclass
class HotLoop:
    """The unmasked inner loop of a compiled kernel, read from its SASS (static figures)."""

    instructions: int  # per warp, one iteration
    mma_instructions: int  # HGMMA / HMMA / UTC*MMA per warp (per CTA for UTC*MMA)
    executed_flops: int | None  # per CTA and iteration (None: tcgen05, whose shapes the SASS does not show)
    wgmma_n: list[int]  # the N of every HGMMA in the loop
    local_memory: int  # LDL + STL in the loop
    selects: int  # FSEL + FSETP + SEL: how the unmasked loop is told from the masked ones
    mufu: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class KernelReport:
    """What one compiled kernel uses, and which checks it fails (empty `failures`: all pass)."""

    job: CompileJob
    compiled: bool = False
    error: str | None = None
    registers: int | None = None
    stack_bytes: int | None = None
    local_bytes: int | None = None
    spill_instructions: int | None = None  # LDL + STL in the whole SASS
    shared: int | None = None  # compiled.metadata.shared: dynamic shared memory
    static_shared: int | None = None  # SHARED in cuobjdump's resource usage
    shared_limit: int = 0
    hgmma: int | None = None
    hmma: int | None = None
    tcgen05: int | None = None  # UTC*MMA (sm_100)
    mufu_ex2: int | None = None
    hot_loop: HotLoop | None = None
    mma_ratio: float | None = None  # executed / useful MMA FLOPs in the hot loop
    issue_per_mma: float | None = None  # hot-loop issue slots per useful MMA cycle (static model)
    compile_seconds: float = 0.0
    failures: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # recorded, not failed
    accepted: str | None = None  # configs.ACCEPTED_FAILURES' reason when its failures are accepted

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
        row.update({k: v for k, v in asdict(self).items() if k not in ("job", "hot_loop")})
        row.update(hot_loop=self.hot_loop.as_dict() if self.hot_loop else None, spills=self.spills,
                   total_shared=self.total_shared, ok=self.ok, name=self.job.name)
        return row

    @classmethod
    def from_dict(cls, row: Mapping[str, Any]) -> "KernelReport":
        job_fields = {f for f in CompileJob.__dataclass_fields__}
        job = CompileJob(**{k: (tuple(v) if k == "features" else v) for k, v in row.items() if k in job_fields})
        report_fields = set(cls.__dataclass_fields__) - {"job", "hot_loop"}
        report = cls(job=job, **{k: row[k] for k in report_fields if k in row})
        report.hot_loop = HotLoop(**row["hot_loop"]) if row.get("hot_loop") else None
        return report


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
                "fingerprint": fingerprint(), "variant": self.rows[0].job.variant if self.rows else None,
                "shared_memory_limits": SHARED_MEMORY_LIMITS, "rows": [row.as_dict() for row in self.rows]}


def fingerprint(kernel_module: str = DEFAULT_KERNEL_MODULE) -> str:
    """Hash of what the compiled kernels depend on: the kernel source (every module of the
    kernel's package but configs.py, whose logic the tests check against the report row by row,
    and __init__.py, which only holds an import shim),
    the config table (read as files, so it works under the interpreter too) and where TMA is used."""
    import hashlib
    import importlib.util

    digest = hashlib.sha256(f"report{REPORT_VERSION}-{_tma_stamp()}".encode())
    spec = importlib.util.find_spec(kernel_module)
    assert spec is not None and spec.origin is not None, kernel_module
    for path in sorted(Path(spec.origin).parent.glob("*.py")):
        if path.name not in ("configs.py", "__init__.py"):
            digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def _precisions(capability: int, dtype: str, fp32_tf32: bool = True) -> tuple[str, ...]:
    # fp32 runs with 'ieee' (the default) and 'tf32' (torch's allow_tf32); Turing has no tf32.
    if dtype != "fp32":
        return ("tf32",)  # ignored by tl.dot for 16-bit operands
    return ("ieee", "tf32") if fp32_tf32 and capability >= 80 else ("ieee",)


def _dtypes(capability: int, element_size: int, dtypes: Sequence[str] | None = None) -> tuple[str, ...]:
    """The dtypes compiled for a row of `element_size`: by default bf16 stands for the 16-bit
    dtypes (fp16 runs the same tiles and compiles to the same MMA shapes, .F16 for .BF16; the
    compile test recompiles fp16 samples), fp16 where there is no bf16 (the launcher refuses bf16
    before capability 80)."""
    if dtypes is None and element_size == 2:
        dtypes = ("bf16",)
    chosen = [d for d in DTYPES_BY_ELEMENT_SIZE[element_size] if dtypes is None or d in dtypes]
    if not TARGETS[capability].bf16:
        chosen = [d for d in chosen if d != "bf16"] or (["fp16"] if element_size == 2 else chosen)
    return tuple(chosen)


def jobs_for_tile(capability: int, head_dim: int, element_size: int, kernel: str, cfg: KernelConfig,
                  table_variant: str = "plain", *, dtypes: Sequence[str] | None = None,
                  fp32_tf32: bool = True, variant: str = DEFAULT_VARIANT) -> list[CompileJob]:
    """What vetting one tile of one kernel compiles: each dtype and precision the row runs, with
    the head dim exact and masked."""
    features = tuple(f for f in TABLE_VARIANT_FEATURES[table_variant] if kernel == "dkdv" or f != "STORE_DBIAS")
    return [CompileJob(capability, head_dim, dtype, kernel, cfg.block_m, cfg.block_n, cfg.num_warps,
                       cfg.num_stages, precision, variant, features, even_d, table_variant)
            for dtype in _dtypes(capability, element_size, dtypes)
            for precision in _precisions(capability, dtype, fp32_tf32)
            for even_d in (False, True)]


def build_jobs(table: Mapping[tuple[int, int, int, str], AttentionConfigs] | None = None, *,
               fp32_tf32: bool = True, variant: str = DEFAULT_VARIANT, dtypes: Sequence[str] | None = None,
               capabilities: Sequence[int] | None = None) -> list[CompileJob]:
    """Every kernel to compile for `table` (default: the shipped first choices of every row,
    capability, head-dim bucket, element size and variant key), with the head dim exact and
    masked; the preprocess kernel once per (capability, head dim, dtype)."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    table = {k: v for k, v in all_configs().items() if k not in UNVETTED_ROWS} if table is None else table
    jobs: list[CompileJob] = []
    preprocess_done: set[tuple[int, int, str]] = set()
    for (capability, head_dim, element_size, table_variant), configs in sorted(table.items()):
        if capabilities is not None and capability not in capabilities:
            continue
        for kernel, cfg in (("fwd", configs.forward), ("dkdv", configs.backward_dkdv), ("dq", configs.backward_dq)):
            jobs += jobs_for_tile(capability, head_dim, element_size, kernel, cfg, table_variant,
                                  dtypes=dtypes, fp32_tf32=fp32_tf32, variant=variant)
        for dtype in _dtypes(capability, element_size, dtypes):
            if (capability, head_dim, dtype) not in preprocess_done:
                preprocess_done.add((capability, head_dim, dtype))
                jobs.append(CompileJob(capability, head_dim, dtype, "preprocess",
                                       preprocess_block_m(head_dim, element_size), None, _PREPROCESS_NUM_WARPS,
                                       None, "ieee" if dtype == "fp32" else "tf32", variant))
    return jobs


# Variant constexprs the kernels are launched with besides the table's keys: recorded by
# `--variants` (window, ALiBi, softcap and packed input run the plain tiles).
VARIANT_FEATURES: dict[str, tuple[str, ...]] = {
    "window": ("LIMIT_LEFT",),
    "alibi": ("HAS_ALIBI",),
    "softcap": ("HAS_SOFTCAP",),
    "dropout": ("HAS_DROPOUT",),
    "varlen": ("IS_VARLEN",),
    "float mask + grad": ("BIAS_KIND", "STORE_DBIAS"),
    "sinks": ("HAS_SINKS",),
    "all at once": ("LIMIT_LEFT", "HAS_ALIBI", "HAS_SOFTCAP", "HAS_DROPOUT", "IS_VARLEN", "BIAS_KIND", "STORE_DBIAS",
                    "HAS_SINKS"),
}
# Flags only some kernels take: STORE_DBIAS is dK/dV's, HAS_SINKS the forward's (the backward reads
# the merged lse).
_KERNEL_ONLY_FLAGS = {"STORE_DBIAS": "dkdv", "HAS_SINKS": "fwd"}


def build_variant_jobs(capabilities: Sequence[int] = (80, 90), head_dims: Sequence[int] = (64, 128),
                       features: Mapping[str, tuple[str, ...]] = VARIANT_FEATURES,
                       dtype: str = "bf16") -> list[CompileJob]:
    """The forward, dK/dV and dQ kernels with each variant switched on, on the tiles the launcher
    takes for it (head dim masked). Diagnostic rows: what the checks find is recorded, not failed."""
    jobs = []
    for capability in capabilities:
        for head_dim in head_dims:
            for flags in features.values():
                # The tiles the launcher takes for these flags: the table's mask/dropout rows.
                configs = lookup(capability, head_dim, _ELEMENT_SIZES[dtype],
                                 variant_key("BIAS_KIND" in flags, "HAS_DROPOUT" in flags))
                for kernel, cfg in (("fwd", configs.forward), ("dkdv", configs.backward_dkdv),
                                    ("dq", configs.backward_dq)):
                    kernel_flags = tuple(f for f in flags if _KERNEL_ONLY_FLAGS.get(f, kernel) == kernel)
                    if flags and not kernel_flags:  # the kernel does not take this variant: the plain row
                        continue
                    jobs.append(CompileJob(capability, head_dim, dtype, kernel, cfg.block_m, cfg.block_n,
                                           cfg.num_warps, cfg.num_stages, "tf32", features=kernel_flags))
    return jobs


def _signature(fn: Any, dtype: str, constexprs: Mapping[str, Any], variant: str = DEFAULT_VARIANT
               ) -> tuple[dict[str, str], dict[tuple[int, ...], list[list[Any]]]]:
    """Types of every argument, as the launcher passes them, and the divisibility hints that
    `JITFunction._pack_args` derives at launch: 16-byte aligned pointers (torch allocations) and,
    in the aligned variant, strides and head dims that are multiples of 16. An optional pointer
    whose flag is off in `constexprs` is None at launch, which Triton specializes as a constexpr
    (`_absent_pointers` gives their values)."""
    signature: dict[str, str] = {}
    attrs: dict[tuple[int, ...], list[list[Any]]] = {}
    absent = _absent_pointers(fn, constexprs)
    for index, param in enumerate(fn.params):
        name = param.name
        if param.is_constexpr or name in absent:
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


def _absent_pointers(fn: Any, constexprs: Mapping[str, Any]) -> dict[str, None]:
    """{pointer: None} for the optional pointers of `fn` whose flag is off: the launcher passes None."""
    return {param.name: None for param in fn.params
            if param.name in OPTIONAL_POINTERS and OPTIONAL_POINTERS[param.name] in constexprs
            and not constexprs[OPTIONAL_POINTERS[param.name]]}


# Constexprs the launcher sets only under the Triton interpreter (bf16 emulation): off on the GPU.
_INTERPRETER_ONLY_FLAGS = frozenset({"EMULATE_BF16"})


def _constexprs(fn: Any, job: CompileJob) -> dict[str, Any]:
    """Values of every constexpr parameter of `fn`, for the most demanding variant the launcher
    produces: causal (diagonal and unmasked loops) and head dims that need masks."""
    if job.kernel == "preprocess":
        known: dict[str, Any] = {"BLOCK_M": job.block_m, "BLOCK_DV": job.head_dim, "EVEN_DV": job.even_d}
    else:
        known = {"BLOCK_M": job.block_m, "BLOCK_N": job.block_n, "BLOCK_D": job.head_dim,
                 "BLOCK_DV": job.head_dim, "LIMIT_RIGHT": True, "EVEN_D": job.even_d, "EVEN_DV": job.even_d,
                 "INPUT_PRECISION": job.input_precision,
                 # The plain rows cover calls without attn_mask or variants; `features` turns them on.
                 "BIAS_KIND": 0, "STORE_DBIAS": False,
                 # what the launcher does on the target's GPUs (fused_attn._launch.use_tma)
                 "USE_TMA": _uses_tma(job),
                 "BLOCK_SPLITS": 16,  # the decode combine kernel's parts
                 "PAGE_SIZE": 16}  # the decode kernel's (a common page size; only read when paged)
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
            raise KeyError(f"{fn.__name__} has a constexpr {param.name} that bench.kernel_report does "
                           "not know how to set: add it to kernel_report._constexprs")
    return values


_RESOURCE_RE = re.compile(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)")


def _count(pattern: str, sass: str) -> int:
    return len(re.findall(pattern, sass))


_SASS_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")


def _opcode(text: str) -> str:
    if text.startswith("@"):  # predicated: @P0 BRA ...
        text = text.split(None, 1)[1] if " " in text else ""
    return text.split()[0] if text else ""


def _is_mma(opcode: str) -> bool:
    return opcode.startswith(("HGMMA", "HMMA")) or (opcode.startswith("UTC") and "MMA" in opcode)


def _mma_flops(opcode: str, num_warps: int) -> int | None:
    """Executed FLOPs of one MMA instruction for the whole CTA; None when the SASS hides the shape."""
    match = re.match(r"HGMMA\.(\d+)x(\d+)x(\d+)", opcode)
    if match:  # one per warpgroup
        m, n, k = map(int, match.groups())
        return 2 * m * n * k * max(1, num_warps // 4)
    match = re.match(r"HMMA\.16(8)(\d+)", opcode)
    if match:  # m16 n8 kK, one per warp
        return 2 * 16 * 8 * int(match.group(2)) * num_warps
    return None


def find_hot_loop(sass: str, num_warps: int, uses_mma: bool) -> HotLoop | None:
    """The unmasked inner loop: of the innermost loops (backward branches) that hold MMA
    instructions (FFMA for FMA dots), the one with the fewest selects (the masked loops compare
    and select per element). Loops without MMA (barrier waits, retries) do not count as inner
    loops of an MMA loop; loops sharing a branch target are one loop."""
    instructions = [(int(m.group(1), 16), m.group(2).strip()) for m in _SASS_LINE.finditer(sass)]
    ends: dict[int, int] = {}
    for address, text in instructions:
        if _opcode(text).startswith("BRA"):
            target = re.search(r"0x([0-9a-f]+)", text)
            if target and int(target.group(1), 16) <= address:
                start = int(target.group(1), 16)
                ends[start] = max(ends.get(start, start), address)

    def body(lo: int, hi: int) -> list[str]:
        return [_opcode(text) for address, text in instructions if lo <= address <= hi]

    def weight(ops: list[str]) -> int:
        return sum(1 for op in ops if _is_mma(op)) if uses_mma else sum(1 for op in ops if op.startswith("FFMA"))

    loops = [(lo, hi) for lo, hi in ends.items() if weight(body(lo, hi))]
    innermost = [(lo, hi) for lo, hi in loops
                 if not any((lo, hi) != (l2, h2) and lo <= l2 and h2 <= hi for l2, h2 in loops)]
    bodies = [(weight(body(lo, hi)), body(lo, hi)) for lo, hi in innermost]
    if not bodies:
        return None
    if not uses_mma:  # FMA dots: the loops with most of the FMAs, then the fewest selects
        top = max(w for w, _ in bodies)
        bodies = [(w, ops) for w, ops in bodies if w * 2 >= top]
    selects = lambda ops: sum(1 for op in ops if op.split(".")[0] in ("FSEL", "FSETP", "SEL"))  # noqa: E731
    _, ops = min(bodies, key=lambda item: (selects(item[1]), -len(item[1])))
    mma = [op for op in ops if _is_mma(op)]
    flops = [_mma_flops(op, num_warps) for op in mma]
    return HotLoop(
        instructions=len(ops), mma_instructions=len(mma),
        executed_flops=None if any(f is None for f in flops) else sum(flops),  # type: ignore[arg-type]
        wgmma_n=sorted(int(m.group(1)) for m in (re.match(r"HGMMA\.\d+x(\d+)x", op) for op in mma) if m),
        local_memory=sum(1 for op in ops if op.split(".")[0] in ("LDL", "STL")),
        selects=selects(ops), mufu=sum(1 for op in ops if op.startswith("MUFU")))


def _peak_flop_per_clock(job: CompileJob) -> int:
    if job.uses_mma:
        peak = MMA_FLOP_PER_CLOCK[job.capability] or FMA_FLOP_PER_CLOCK[job.capability]
        return peak // 2 if job.dtype == "fp32" else peak
    return FMA_FLOP_PER_CLOCK[job.capability]


def compile_one(job: CompileJob, kernel_module: str = DEFAULT_KERNEL_MODULE,
                dump_dir: str | None = None) -> KernelReport:
    """Compile one kernel for its target, read registers, spills, shared memory and its hot loop,
    and check it. With `dump_dir`, the cubin, SASS and PTX are written there as `<job.name>.*`."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    report = KernelReport(job=job, shared_limit=SHARED_MEMORY_LIMITS[job.capability])
    fn = getattr(_kernel_module(kernel_module), _KERNEL_FUNCTIONS[job.kernel])
    constexprs = _constexprs(fn, job)
    signature, attrs = _signature(fn, job.dtype, constexprs, job.variant)
    options: dict[str, Any] = {"num_warps": job.num_warps}
    if job.num_stages is not None:
        options["num_stages"] = job.num_stages
    start = time.perf_counter()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*TRITON_DEFAULT_FP_FUSION.*")
            source = ASTSource(fn=fn, signature=signature, constexprs={**constexprs, **_absent_pointers(fn, constexprs)},
                               attrs=attrs)
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
    if dump_dir is not None:
        out = Path(dump_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{job.name}.cubin").write_bytes(compiled.asm["cubin"])
        (out / f"{job.name}.sass").write_text(sass)
        (out / f"{job.name}.ptx").write_text(compiled.asm.get("ptx", ""))
    match = _RESOURCE_RE.search(usage)
    if match is None:
        report.failures.append(f"cannot parse cuobjdump resource usage: {usage.strip()[:200]}")
    else:
        report.registers, report.stack_bytes, report.static_shared, report.local_bytes = map(int, match.groups())
    report.spill_instructions = _count(r"\bLDL\b", sass) + _count(r"\bSTL\b", sass)
    report.hgmma = _count(r"\bHGMMA\b", sass)
    report.hmma = _count(r"\bHMMA\b", sass)
    report.tcgen05 = _count(r"\bUTC\w*MMA\b", sass)
    report.mufu_ex2 = _count(r"\bMUFU\.EX2\b", sass)
    if job.kernel != "preprocess":
        report.hot_loop = find_hot_loop(sass, job.num_warps, job.uses_mma)
    _check(report)
    return report


def _check(report: KernelReport) -> None:
    """The speed checks: no wasted MMA work, wide wgmma on sm_90, no local memory in the hot
    loop, shared memory within the card's limit. Spills outside the hot loop are recorded."""
    job, loop = report.job, report.hot_loop
    if report.total_shared > report.shared_limit:
        report.failures.append(f"needs {report.total_shared} B shared memory, over the {report.shared_limit} B "
                               f"of capability {job.capability}")
    if report.spills or report.spill_instructions:
        report.notes.append(f"spills {report.spills} B ({report.spill_instructions} LDL/STL) outside the hot loop")
    if job.kernel == "preprocess":
        return
    if loop is None:
        report.failures.append("no inner loop with " + ("MMA" if job.uses_mma else "FMA") + " instructions found")
        return
    if loop.local_memory:
        report.failures.append(f"{loop.local_memory} LDL/STL inside the unmasked inner loop")
    useful = job.useful_flops
    if job.uses_mma and loop.executed_flops is not None and useful:
        report.mma_ratio = loop.executed_flops / useful
        if abs(report.mma_ratio - 1.0) > 1e-6:
            report.failures.append(f"executed/useful MMA FLOPs {report.mma_ratio:.2f} in the hot loop "
                                   "(warps recompute each other's tiles: M side < 64 x warpgroups)")
    elif job.uses_mma and loop.executed_flops is None:
        report.notes.append("tcgen05 MMA: issued once per CTA, no warp replication by construction")
    if job.needs_wgmma_n:
        if not loop.wgmma_n:
            report.failures.append(f"no HGMMA in the hot loop on capability 90 ({report.hmma} HMMA): the slow path")
        elif min(loop.wgmma_n) < min(32, job.head_dim):  # at head dim 16, P @ V has N = 16 by construction
            report.failures.append(f"wgmma N={min(loop.wgmma_n)} in the hot loop (shared-memory bound below 32)")
        elif min(loop.wgmma_n) < min(64, job.head_dim):
            report.notes.append(f"wgmma N={min(loop.wgmma_n)} < 64 in the hot loop")
    if useful:
        report.issue_per_mma = (loop.instructions * job.num_warps / 4) / (useful / _peak_flop_per_clock(job))


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


def _job_key(job: CompileJob) -> str:
    return json.dumps({**asdict(job), "use_tma": _uses_tma(job)}, sort_keys=True)


def _uses_tma(job: CompileJob) -> bool:
    """What the launcher does for this job's calls on the target's GPUs (configs.uses_tma)."""
    if job.kernel not in _TABLE_KERNEL:
        return False
    variant = job.table_variant or variant_key("BIAS_KIND" in job.features, "HAS_DROPOUT" in job.features)
    return uses_tma(job.capability, _TABLE_KERNEL[job.kernel], job.head_dim, _ELEMENT_SIZES[job.dtype], variant)


class RowCache:
    """Rows already compiled (a JSON-lines file), each stamped with its kernel's Triton cache key
    (the kernel's source and every @triton.jit function it calls) and the Triton version, so
    `--pick` and the report that follows it compile each kernel once, and a change to one kernel
    recompiles only that kernel's rows."""

    def __init__(self, path: str | None, kernel_module: str = DEFAULT_KERNEL_MODULE) -> None:
        self.path = Path(path) if path else None
        self.stamps = kernel_stamps(kernel_module)
        self.rows: dict[str, dict[str, Any]] = {}
        if self.path is not None and self.path.exists():
            for line in self.path.read_text().splitlines():
                if not line.strip():
                    continue
                entry = json.loads(line)
                if entry.get("stamp") == self.stamps.get(entry["row"]["kernel"]):
                    self.rows[entry["job"]] = entry["row"]

    def get(self, job: CompileJob) -> KernelReport | None:
        row = self.rows.get(_job_key(job))
        return None if row is None else _rechecked(row)

    def add(self, report: KernelReport) -> None:
        key = _job_key(report.job)
        if key in self.rows or self.path is None or not report.compiled:
            return
        self.rows[key] = report.as_dict()
        with self.path.open("a") as f:
            f.write(json.dumps({"stamp": self.stamps[report.job.kernel], "job": key, "row": self.rows[key]}) + "\n")


def accept_listed_failures(report: KernelReport) -> None:
    """Turn the speed-check failures of a row listed in configs.ACCEPTED_FAILURES into notes (never
    a compile or shared-memory failure)."""
    job = report.job
    key = (job.capability, job.head_dim, _ELEMENT_SIZES[job.dtype], job.table_variant or "",
           _TABLE_KERNEL.get(job.kernel, ""))
    reason = ACCEPTED_FAILURES.get(key)
    if reason is None or job.table_variant is None or not report.failures:
        return
    if any(f.startswith(("does not compile", "needs ")) for f in report.failures):
        return
    report.notes += [f"accepted (configs.ACCEPTED_FAILURES): {failure}" for failure in report.failures]
    report.failures, report.accepted = [], reason


def _rechecked(row: Mapping[str, Any]) -> KernelReport:
    """A cached row with the checks of this version applied to its raw figures."""
    report = KernelReport.from_dict(row)
    report.failures, report.notes, report.mma_ratio, report.issue_per_mma = [], [], None, None
    report.accepted = None
    report.shared_limit = SHARED_MEMORY_LIMITS[report.job.capability]
    if report.compiled:
        _check(report)
    return report


def kernel_stamps(kernel_module: str = DEFAULT_KERNEL_MODULE) -> dict[str, str]:
    """Per kernel name: Triton's cache key of the kernel (its source and its callees) and Triton's version."""
    import triton

    module = _kernel_module(kernel_module)
    return {kernel: f"{getattr(module, name).cache_key}-triton{triton.__version__}-report{REPORT_VERSION}"
            for kernel, name in _KERNEL_FUNCTIONS.items() if hasattr(getattr(module, name, None), "cache_key")}


def _tma_stamp() -> str:
    """Where the kernels compile with USE_TMA (configs.uses_tma): part of what the report depends
    on besides the kernel source and the table."""
    import hashlib

    text = inspect.getsource(uses_tma) + repr(sorted((cap, sorted(kernels)) for cap, kernels in TMA_KERNELS.items()))
    text += f"min head dim {TMA_MIN_HEAD_DIM}"
    return "tma" + hashlib.sha256(text.encode()).hexdigest()[:8]


def run_report(table: Mapping[tuple[int, int, int, str], AttentionConfigs] | None = None, *, workers: int = 2,
               fp32_tf32: bool = True, variant: str = DEFAULT_VARIANT, cache_dir: str | None = None,
               kernel_module: str = DEFAULT_KERNEL_MODULE, jobs: Sequence[CompileJob] | None = None,
               dump_dir: str | None = None, row_cache: str | None = None) -> Report:
    """Compile every kernel of `table` (default: every vetted tile of the shipped table), or the
    given `jobs`, and check each one.

    `workers` processes compile in parallel (1: in this process). `variant` picks what the
    compiler may assume about head dims and strides (see the module docstring). `cache_dir` is the
    TRITON_CACHE_DIR of the compiles; by default a fresh temporary one, so nothing stale is reused.
    `kernel_module` names a module with the four kernels, to check a patched copy. `dump_dir`
    receives every cubin, SASS and PTX; `row_cache` (a JSON-lines file) reuses earlier compiles of
    the same kernel source and Triton version.
    Raises ReportEnvironmentError when the kernels cannot be compiled here."""
    import triton

    check_environment(kernel_module)
    start = time.perf_counter()
    if jobs is None:
        jobs = _all_table_jobs(table, fp32_tf32=fp32_tf32, variant=variant)
    jobs = list(dict.fromkeys(jobs))  # one compile per distinct job
    cache = RowCache(None if dump_dir else row_cache, kernel_module)  # a dump needs the files: compile
    cached = {i: cache.get(job) for i, job in enumerate(jobs)}
    todo = [i for i, row in cached.items() if row is None]
    with tempfile.TemporaryDirectory(prefix="fused_attn_kernel_report_") as fresh:
        # A fresh cache by default: Triton's cache key ignores some settings that change the result
        # (for example TRITON_ALLOW_NON_CONSTEXPR_GLOBALS), so a shared cache could report stale kernels.
        compiled = _compile_all([jobs[i] for i in todo], workers, cache_dir or fresh, kernel_module, dump_dir)
    for i, row in zip(todo, compiled):
        cached[i] = row
        cache.add(row)
    rows = [cached[i] for i in range(len(jobs))]
    for row in rows:
        accept_listed_failures(row)
    if dump_dir is not None:
        index = [dict(row.as_dict(), files={ext: f"{row.job.name}.{ext}" for ext in ("cubin", "sass", "ptx")})
                 for row in rows if row.compiled]
        Path(dump_dir, "index.json").write_text(json.dumps(index, indent=1) + "\n")
    return Report(rows=rows, seconds=time.perf_counter() - start, triton_version=triton.__version__)


def _all_table_jobs(table: Mapping[tuple[int, int, int, str], AttentionConfigs] | None, *, fp32_tf32: bool,
                    variant: str) -> list[CompileJob]:
    """The jobs of `table`, or of every tile the shipped table lists (first choices and the
    vetted alternatives the tuner and the out-of-resources retry may launch)."""
    if table is not None:
        return build_jobs(table, fp32_tf32=fp32_tf32, variant=variant)
    jobs = build_jobs(fp32_tf32=fp32_tf32, variant=variant)
    for (capability, head_dim, size, table_variant), by_kernel in sorted(all_candidates().items()):
        if (capability, head_dim, size, table_variant) in UNVETTED_ROWS:
            continue
        for kernel, table_kernel in _TABLE_KERNEL.items():
            for cfg in by_kernel[table_kernel][1:]:
                jobs += jobs_for_tile(capability, head_dim, size, kernel, cfg, table_variant,
                                      fp32_tf32=fp32_tf32, variant=variant)
    return jobs


def _compile_all(jobs: Sequence[CompileJob], workers: int, cache_dir: str,
                 kernel_module: str, dump_dir: str | None = None) -> list[KernelReport]:
    order = sorted(range(len(jobs)), key=lambda i: _cost(jobs[i]))
    results: dict[int, KernelReport] = {}
    if workers <= 1 or len(jobs) <= 1:
        saved_cache_dir = os.environ.get("TRITON_CACHE_DIR")
        try:
            _worker_init(cache_dir)
            for i in order:
                results[i] = compile_one(jobs[i], kernel_module, dump_dir)
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
            futures = {pool.submit(compile_one, jobs[i], kernel_module, dump_dir): i for i in order}
            for future in concurrent.futures.as_completed(futures):
                results[futures[future]] = future.result()
    return [results[i] for i in range(len(jobs))]


# ---------------------------------------------------------------------------------------------
# Picking the table: the largest tiles that pass every check, per row, kernel and variant.

def _tiles(*specs: str) -> tuple[KernelConfig, ...]:
    out = []
    for spec in specs:
        tile, rest = spec.split("w")
        warps, stages = rest.split("s")
        m, n = tile.split("x")
        out.append(KernelConfig(int(m), int(n), int(warps), int(stages)))
    return tuple(out)


# Preference order (largest tile first, then more pipelining): FlashAttention-2's and the Triton
# tutorial's shapes on top. The M side of every dot (block_m for forward/dQ, block_n for dK/dV)
# is >= 64 per warpgroup in the large tiles; the small ones are for small shared memories.
CANDIDATE_TILES: dict[tuple[str, str], tuple[KernelConfig, ...]] = {
    ("fwd", "mma"): _tiles("128x128w8s3", "128x128w8s2", "128x64w8s3", "128x64w8s2", "128x64w4s2", "64x64w4s3",
                           "64x64w4s2", "64x32w4s2", "64x32w4s1", "32x32w4s1", "16x16w4s1"),
    ("dkdv", "mma"): _tiles("64x128w8s3", "64x128w8s2", "32x128w8s3", "32x128w8s2", "64x64w4s3", "64x64w4s2",
                            "32x64w4s3", "32x64w4s2", "32x64w4s1", "16x64w4s1", "32x32w4s1", "16x32w4s1", "16x16w4s1"),
    ("dq", "mma"): _tiles("128x128w8s2", "128x64w8s3", "128x64w8s2", "128x32w8s2", "64x64w4s3", "64x64w4s2",
                          "64x32w4s2", "64x32w4s1", "32x32w4s1", "16x16w4s1"),
    # Exact fp32 (FMA dots, operands whole in registers) and every dtype on targets without MMA.
    ("fwd", "fma"): _tiles("128x64w8s2", "64x64w4s2", "64x32w4s2", "64x32w4s1", "32x32w4s1", "16x32w4s1",
                           "16x16w4s1"),
    ("dkdv", "fma"): _tiles("64x64w4s2", "32x64w4s2", "32x64w4s1", "16x64w4s1", "32x32w4s1", "16x32w4s1",
                            "16x16w4s1"),
    ("dq", "fma"): _tiles("128x32w8s2", "64x64w4s2", "64x32w4s2", "64x32w4s1", "32x32w4s1", "16x16w4s1"),
}


@dataclass
class PickResult:
    """One (row, kernel) of the table: the vetted tiles, best first, and every row compiled for it."""

    key: tuple[int, int, int, str]
    kernel: str
    chosen: list[KernelConfig]
    rows: list[KernelReport]
    passed: bool  # False: no candidate passed; `chosen` holds the one that failed least


def _candidate_kind(capability: int, element_size: int) -> str:
    return "mma" if TARGETS[capability].tensor_cores and element_size == 2 else "fma"


# Head dim 512: a 64-row tile's Q (or K and V) and float32 accumulators spill whatever the warp
# count, so only small tiles are compiled for that bucket. Probed (bf16, Triton 3.9): sm_90 forward
# 64x32 w4 has 700+ LDL/STL in the hot loop; with 8 warps Triton splits the 512-wide accumulator
# across the two warpgroups but has both compute the whole S = QK^T (executed/useful 1.50 at
# 64x16, 64x32, 64x64, 64x128) and still spills (24-79 LDL/STL). sm_80 dK/dV and dQ at
# 16/32/64-row tiles with 8 warps: replicated S (1.5-2.5) or over 163 KB of shared memory. Sharing
# one S between warpgroups needs layouts Triton's tl.dot does not let a kernel choose.
CANDIDATE_TILES_512: dict[str, tuple[KernelConfig, ...]] = {
    "fwd": _tiles("32x32w4s1", "32x16w4s1", "16x32w4s1", "16x16w4s1"),
    "dkdv": _tiles("32x32w4s1", "16x32w4s1", "32x16w4s1", "16x16w4s1"),
    "dq": _tiles("32x32w4s1", "16x32w4s1", "32x16w4s1", "16x16w4s1"),
}


def _candidates_for(kernel: str, capability: int, element_size: int, head_dim: int = 128
                    ) -> tuple[KernelConfig, ...]:
    if head_dim >= 512:
        return CANDIDATE_TILES_512[kernel]
    tiles = CANDIDATE_TILES[(kernel, _candidate_kind(capability, element_size))]
    if not TARGETS[capability].tensor_cores:
        # FMA dots hold whole operand tiles in registers and Turing has 64 KB of shared memory:
        # start at 64-row tiles (each sm_75 compile takes ~10 s).
        tiles = tuple(t for t in tiles if t.block_m * t.block_n <= 64 * 64 and t.num_warps == 4)
    return tiles


def pick_slot(key: tuple[int, int, int, str], kernel: str, candidates: Sequence[KernelConfig], keep: int,
              kernel_module: str = DEFAULT_KERNEL_MODULE, cached: Mapping[str, Mapping[str, Any]] | None = None
              ) -> PickResult:
    """Compile `candidates` in order until `keep` pass every check with the head dim masked and
    exact (bf16 stands for 16-bit; fp32 both ways); stops at a tile's first failure."""
    capability, head_dim, size, table_variant = key
    dtypes = ("bf16",) if size == 2 and TARGETS[capability].bf16 else None
    chosen: list[KernelConfig] = []
    rows: list[KernelReport] = []
    worst: list[tuple[tuple[int, int], int, KernelConfig]] = []
    for index, cfg in enumerate(candidates):
        failed = 0
        for job in jobs_for_tile(capability, head_dim, size, kernel, cfg, table_variant, dtypes=dtypes):
            hit = (cached or {}).get(_job_key(job))
            row = _rechecked(hit) if hit is not None else compile_one(job, kernel_module)
            rows.append(row)
            if not row.ok:
                failed += 1
                break
        if failed:
            worst.append((_penalty(rows[-1]), index, cfg))
            continue
        chosen.append(cfg)
        if len(chosen) >= keep:
            break
    if chosen:
        return PickResult(key, kernel, chosen, rows, True)
    # Nothing passes: the tile whose failures cost least (never one that cannot run).
    runnable = [entry for entry in worst if entry[0][0] < _CANNOT_RUN]
    return PickResult(key, kernel, [min(runnable or worst)[2]], rows, False)


_CANNOT_RUN = 1000


def _penalty(row: KernelReport) -> tuple[int, int]:
    """How bad a failed row is, for choosing among tiles that all fail: one that cannot run (no
    compile, too much shared memory) is out; local memory in the hot loop and replicated MMA work
    cost the most; a narrow wgmma or the pre-Hopper MMA on sm_90 less; then the fewer LDL/STL in
    the hot loop."""
    penalty = 0
    for failure in row.failures:
        if failure.startswith(("does not compile", "needs ")):
            penalty += _CANNOT_RUN
        elif "LDL/STL" in failure or failure.startswith("executed/useful"):
            penalty += 2
        else:
            penalty += 1
    return penalty, row.hot_loop.local_memory if row.hot_loop else 0


def _pick_worker(args: tuple[Any, ...]) -> PickResult:
    return pick_slot(*args)


def pick_table(capabilities: Sequence[int] = CAPABILITIES, head_dims: Sequence[int] = HEAD_DIM_BUCKETS,
               element_sizes: Sequence[int] = (2, 4), variants: Sequence[str] = TABLE_VARIANTS, *,
               workers: int = 2, kernel_module: str = DEFAULT_KERNEL_MODULE, row_cache: str | None = None,
               log: Any = None, keep_plain: int = 3) -> dict[tuple[int, int, int, str], dict[str, PickResult]]:
    """Pick every (capability, head dim, element size, variant) row of the table. The plain rows
    search the whole candidate list; the variant rows start from the plain row's choice (a mask
    or dropout never makes a larger tile fit)."""
    check_environment(kernel_module)
    cache = RowCache(row_cache, kernel_module)
    results: dict[tuple[int, int, int, str], dict[str, PickResult]] = {}
    context = multiprocessing.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="fused_attn_pick_") as tmp, \
            concurrent.futures.ProcessPoolExecutor(max_workers=workers, mp_context=context,
                                                   initializer=_worker_init, initargs=(tmp,)) as pool:
        for phase in ([v for v in variants if v == "plain"], [v for v in variants if v != "plain"]):
            futures = {}
            for capability in capabilities:
                for head_dim in head_dims:
                    for size in element_sizes:
                        for table_variant in phase:
                            if table_variant != "plain" and not has_variant_rows(capability, head_dim, size):
                                continue
                            if head_dim > max_head_dim(capability, size):  # refused on such cards
                                continue
                            key = (capability, head_dim, size, table_variant)
                            for kernel in ("dkdv", "dq", "fwd"):
                                candidates = _candidates_for(kernel, capability, size, head_dim)
                                # Plain rows keep alternatives for the tuner and the out-of-resources
                                # retry; variant rows keep their first passing tile.
                                # The plain 16-bit rows keep three tiles (the tuner's candidates and the
                                # out-of-resources retry); the others their first passing tile.
                                keep = keep_plain if table_variant == "plain" and _candidate_kind(capability, size) == "mma" else 1
                                if table_variant != "plain":
                                    plain_key = (capability, head_dim, size, "plain")
                                    plain = (results[plain_key][kernel].chosen[0] if plain_key in results else
                                             all_candidates()[plain_key][_TABLE_KERNEL[kernel]][0])
                                    candidates = candidates[candidates.index(plain):] if plain in candidates else candidates
                                dtypes = ("bf16",) if size == 2 and TARGETS[capability].bf16 else None
                                hits = {k: cache.rows[k] for cfg in candidates
                                        for job in jobs_for_tile(capability, head_dim, size, kernel, cfg,
                                                                 table_variant, dtypes=dtypes)
                                        if (k := _job_key(job)) in cache.rows}
                                futures[pool.submit(_pick_worker, (key, kernel, candidates, keep, kernel_module,
                                                                   hits))] = key
            for future in concurrent.futures.as_completed(futures):
                result = future.result()
                results.setdefault(result.key, {})[result.kernel] = result
                for row in result.rows:
                    cache.add(row)
                if log is not None:
                    print(f"picked {result.key} {result.kernel}: "
                          f"{[f'{c.block_m}x{c.block_n}w{c.num_warps}s{c.num_stages}' for c in result.chosen]}"
                          f"{'' if result.passed else ' (NOTHING PASSED)'} after {len(result.rows)} compiles",
                          file=log, flush=True)
    return results


def write_table(results: Mapping[tuple[int, int, int, str], Mapping[str, PickResult]], path: str) -> None:
    """Write kernels/config_table.py from `pick_table`'s results."""
    import triton

    lines = ['"""The config table, generated by `python -m bench.kernel_report --pick` (do not edit by hand).',
             "",
             "(capability, head-dim bucket, element size, variant) -> for the forward, dK/dV and dQ kernels, the",
             "vetted tiles (block_m, block_n, num_warps, num_stages), best first. Static checks only (see",
             f"bench/kernel_report.py), Triton {triton.__version__}; no GPU has timed them.",
             '"""', "",
             "PICKED: dict[tuple[int, int, int, str], tuple[tuple[tuple[int, int, int, int], ...], ...]] = {"]
    failed = []
    shipped = {key: value for key, value in all_candidates().items()  # rows not picked this time keep theirs
               if key[3] == "plain" or has_variant_rows(key[0], key[1], key[2])}
    for key in sorted(set(results) | set(shipped), key=lambda k: (k[0], k[1], k[2], TABLE_VARIANTS.index(k[3]))):
        per_kernel = []
        for kernel in ("fwd", "dkdv", "dq"):
            result = results.get(key, {}).get(kernel)
            if result is not None and not result.passed:
                failed.append(f"{key} {kernel}")
            chosen = result.chosen if result is not None else shipped[key][_TABLE_KERNEL[kernel]]
            per_kernel.append("(" + ", ".join(f"({c.block_m}, {c.block_n}, {c.num_warps}, {c.num_stages})"
                                              for c in chosen) + ",)")
        lines.append(f"    {key!r}: ({', '.join(per_kernel)}),")
    lines.append("}")
    if failed:
        lines.append("")
        lines.append(f"# No candidate passed every check (the least failing is listed): {', '.join(failed)}")
    Path(path).write_text("\n".join(lines) + "\n")


def _cell(value: int | None) -> str:
    return "-" if value is None else str(value)


def _feature_name(flags: tuple[str, ...]) -> str:
    for name, feature_flags in VARIANT_FEATURES.items():
        if set(flags) == set(feature_flags) or set(flags) == set(feature_flags) - {"STORE_DBIAS"}:
            return name
    return "+".join(flags) or "plain"


def format_markdown(rows: Iterable[KernelReport]) -> str:
    """One markdown row per compiled kernel; the hot-loop columns are static figures."""
    rows = list(rows)
    with_features = any(row.job.features for row in rows)
    header = ("| cap | D | dtype | prec | kernel |" + (" variant |" if with_features else "")
              + " BM x BN | warps | stages | D exact | regs | spills | shared (B) | hot-loop MMA | exec/useful "
                "| wgmma N | hot LDL/STL | issue/MMA | status |")
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for row in rows:
        job, loop = row.job, row.hot_loop
        tile = f"{job.block_m} x {job.block_n}" if job.block_n is not None else f"{job.block_m}"
        spills = "-" if not row.compiled else (
            "0" if not (row.spills or row.spill_instructions) else f"{row.spills} B, {row.spill_instructions} LDL/STL")
        shared = "-" if not row.compiled else f"{row.total_shared} / {row.shared_limit}"
        mma = "-" if loop is None else (
            f"{loop.mma_instructions} {'HGMMA' if row.hgmma else 'UTCMMA' if row.tcgen05 else 'HMMA' if row.hmma else 'FFMA'}"
            if loop.mma_instructions else "FMA")
        ratio = "-" if row.mma_ratio is None else f"{row.mma_ratio:.2f}"
        wgmma_n = "-" if loop is None or not loop.wgmma_n else "/".join(str(n) for n in sorted(set(loop.wgmma_n)))
        issue = "-" if row.issue_per_mma is None else f"{row.issue_per_mma:.2f}"
        status = ("accepted: " + "; ".join(n.split(": ", 1)[1] for n in row.notes if n.startswith("accepted"))
                  if row.accepted else "ok") if row.ok else "FAIL: " + "; ".join(row.failures).replace("|", "/")
        variant_cell = f" {_feature_name(job.features)} |" if with_features else ""
        lines.append(
            f"| {job.capability} | {job.head_dim} | {job.dtype} | {job.input_precision} | {job.kernel} |{variant_cell} "
            f"{tile} | {job.num_warps} | {_cell(job.num_stages)} | {'yes' if job.even_d else 'no'} "
            f"| {_cell(row.registers)} | {spills} | {shared} | {mma} | {ratio} | {wgmma_n} "
            f"| {'-' if loop is None else loop.local_memory} | {issue} | {status} |")
    return "\n".join(lines)


def format_summary(rows: Sequence[KernelReport]) -> str:
    """Per (capability, dtype, kernel): the worst issue pressure and how many rows fail."""
    groups: dict[tuple[int, str, str], list[KernelReport]] = {}
    for row in rows:
        if row.job.kernel != "preprocess":
            groups.setdefault((row.job.capability, row.job.dtype, row.job.kernel), []).append(row)
    lines = ["| cap | dtype | kernel | rows | failed | exec/useful (max) | issue/MMA (median, max) |",
             "|---|---|---|---|---|---|---|"]
    for (capability, dtype, kernel), group in sorted(groups.items()):
        issues = sorted(r.issue_per_mma for r in group if r.issue_per_mma is not None)
        ratios = [r.mma_ratio for r in group if r.mma_ratio is not None]
        lines.append(f"| {capability} | {dtype} | {kernel} | {len(group)} | {sum(not r.ok for r in group)} "
                     f"| {max(ratios):.2f} | " if ratios else
                     f"| {capability} | {dtype} | {kernel} | {len(group)} | {sum(not r.ok for r in group)} | - | ")
        lines[-1] += (f"{issues[len(issues) // 2]:.2f}, {issues[-1]:.2f} |" if issues else "- |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.kernel_report", description=__doc__.split("\n\n")[0])
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
                             "of the bf16 D=64/128 plain tiles instead; diagnostic rows")
    parser.add_argument("--dump", metavar="DIR", help="write every cubin, SASS and PTX to DIR with an index.json")
    parser.add_argument("--row-cache", metavar="PATH",
                        help="JSON-lines file of compiled rows to reuse and extend (same kernel source and Triton)")
    parser.add_argument("--capabilities", type=lambda text: [int(c) for c in text.split(",")],
                        help=f"comma-separated targets (default: all of {list(CAPABILITIES)})")
    parser.add_argument("--pick", metavar="TABLE_PY",
                        help="pick the table instead: compile the candidates of every row and write the vetted "
                             "tiles to TABLE_PY (kernels/config_table.py)")
    ints = lambda text: [int(c) for c in text.split(",")]  # noqa: E731
    parser.add_argument("--head-dims", type=ints, help="with --pick: the head-dim buckets to pick (default: all)")
    parser.add_argument("--element-sizes", type=ints, help="with --pick: 2 and/or 4 (default: both)")
    parser.add_argument("--table-variants", type=lambda text: text.split(","),
                        help=f"with --pick: variant keys (default: all of {list(TABLE_VARIANTS)})")
    args = parser.parse_args(argv)
    try:
        if args.pick:
            results = pick_table(capabilities=args.capabilities or CAPABILITIES, workers=args.workers,
                                 head_dims=args.head_dims or HEAD_DIM_BUCKETS,
                                 element_sizes=args.element_sizes or (2, 4),
                                 variants=args.table_variants or TABLE_VARIANTS,
                                 kernel_module=args.kernel_module, row_cache=args.row_cache, log=sys.stdout)
            write_table(results, args.pick)
            failed = [f"{key} {kernel}" for key, by_kernel in results.items() for kernel, r in by_kernel.items()
                      if not r.passed]
            print(f"wrote {args.pick}: {len(results)} rows; nothing passed for: {failed or 'none'}")
            return 1 if failed else 0
        jobs = build_variant_jobs() if args.variants else None
        if jobs is None and args.capabilities:
            jobs = [job for job in _all_table_jobs(None, fp32_tf32=args.fp32_tf32, variant=args.variant)
                    if job.capability in args.capabilities]
        report = run_report(workers=args.workers, fp32_tf32=args.fp32_tf32, variant=args.variant,
                            cache_dir=args.cache_dir, kernel_module=args.kernel_module, jobs=jobs,
                            dump_dir=args.dump, row_cache=args.row_cache)
    except ReportEnvironmentError as exc:
        print(f"kernel_report: {exc}", file=sys.stderr)
        return ENV_ERROR_EXIT
    if args.variants:
        # Diagnostic rows: the plain tiles with other flags on; their findings are recorded.
        for row in report.rows:
            row.notes += [f"(recorded) {failure}" for failure in row.failures]
            row.failures = []
    print(format_markdown(report.rows))
    print()
    print(format_summary(report.rows))
    failed = [row for row in report.rows if not row.ok]
    print(f"\n{len(report.rows)} kernels ({args.variant} head dims) compiled for capabilities "
          f"{sorted({row.job.capability for row in report.rows})} with Triton {report.triton_version} "
          f"in {report.seconds:.1f} s; {len(failed)} failed checks")
    if args.json:
        Path(args.json).write_text(json.dumps(report.as_dict(), indent=1) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    # Re-import so worker processes pickle functions of bench.kernel_report, not __main__.
    from bench.kernel_report import main as _main

    sys.exit(_main())
