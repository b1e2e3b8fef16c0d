"""The compile report: every tile the config table ships (first choices and the vetted
alternatives the tuner and the out-of-resources retry may launch), on every target it ships for,
with the head dim masked and exact, passes the speed checks: executed/useful MMA FLOPs = 1 in the
hot (unmasked) loop, wgmma N >= 32 on capability 90, no local memory inside that loop, shared
memory within the card's limit (see bench/kernel_report.py).

Compiling everything takes about 15 minutes on two cores, so the report is committed
(`bench/results/kernel_report.json`, regenerated with `python -m bench.kernel_report --json
...` whenever the kernels or the table change) and these tests

- fail when the committed report is stale (its fingerprint of the kernel source and the table
  differs from the code's) or does not cover a shipped tile, or when any of its rows fails a check
  (re-checked here from the raw figures, not from the report's verdict);
- recompile a sample of rows here, with this Triton, and require the same verdict and figures, so
  the committed file is what the compiler says;
- show the checks catch what issue 12 found (the old H100 dK/dV and dQ tiles fail).

The checks run in a fresh process: this one runs with TRITON_INTERPRET=1 (tests/conftest.py),
under which the kernels are not JITFunctions and cannot be compiled for a GPU target.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
REPORT = ROOT / "bench" / "results" / "kernel_report.json"
EXPECTED_SHARED_LIMITS = {75: 65_536, 80: 166_912, 86: 101_376, 90: 232_448, 100: 232_448, 120: 101_376}
REPORT_TIMEOUT_S = 900


def _missing_nvidia_tools() -> list[str]:
    spec = importlib.util.find_spec("triton")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    missing = []
    for tool in ("ptxas", "cuobjdump"):
        if not any((Path(loc) / "backends" / "nvidia" / "bin" / tool).is_file() for loc in locations):
            missing.append(tool)
    return missing


def _skip_without_tools() -> None:
    missing = _missing_nvidia_tools()
    if missing:
        pytest.skip(f"Triton's NVIDIA backend tools ({', '.join(missing)}) are not installed under "
                    "triton/backends/nvidia/bin: cannot compile for CUDA targets")


def _row_id(row: dict) -> str:
    return row.get("name") or (f"cap{row['capability']}-d{row['head_dim']}-{row['dtype']}-{row['input_precision']}"
                               f"-{row['kernel']}-{row['block_m']}x{row['block_n']}-w{row['num_warps']}-s{row['num_stages']}")


def _run_python(script: str) -> str:
    """Run `script` in a fresh process without the interpreter; return its last stdout line."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", script], env=env, cwd=ROOT, capture_output=True, text=True,
                            timeout=REPORT_TIMEOUT_S)
    assert result.returncode == 0, result.stderr[-4000:]
    return result.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def committed() -> dict:
    assert REPORT.exists(), f"{REPORT} is missing: run python -m bench.kernel_report --json {REPORT}"
    return json.loads(REPORT.read_text())


def _problems(row: dict) -> list[str]:
    """The speed checks, from the row's raw figures."""
    name, loop = _row_id(row), row["hot_loop"]
    if not row["compiled"]:
        return [f"{name}: does not compile: {row['error']}"]
    problems = []
    if row["shared"] + row["static_shared"] > EXPECTED_SHARED_LIMITS[row["capability"]]:
        problems.append(f"{name}: {row['shared']} + {row['static_shared']} B shared memory > "
                        f"{EXPECTED_SHARED_LIMITS[row['capability']]} B")
    if row["kernel"] == "preprocess" or row.get("accepted"):  # accepted: configs.ACCEPTED_FAILURES
        return problems
    if loop is None:
        return problems + [f"{name}: no hot loop found"]
    if loop["local_memory"]:
        problems.append(f"{name}: {loop['local_memory']} LDL/STL in the hot loop")
    tensor_cores = row["capability"] != 75 and (row["dtype"] != "fp32" or row["input_precision"] == "tf32")
    if tensor_cores and loop["executed_flops"] is not None:
        useful = {"fwd": 4, "dkdv": 8, "dq": 6}[row["kernel"]] * row["block_m"] * row["block_n"] * row["head_dim"]
        if loop["executed_flops"] != useful:
            problems.append(f"{name}: executed/useful MMA FLOPs {loop['executed_flops'] / useful:.2f}")
    if tensor_cores and loop["executed_flops"] is None and row["capability"] != 100:
        problems.append(f"{name}: MMA shapes unknown outside sm_100")
    if row["capability"] == 90 and row["dtype"] in ("fp16", "bf16"):
        if not loop["wgmma_n"] or min(loop["wgmma_n"]) < min(32, row["head_dim"]):
            problems.append(f"{name}: wgmma N {loop['wgmma_n']} in the hot loop (need >= 32)")
    return problems


def test_committed_report_is_current(committed: dict) -> None:
    from bench import kernel_report

    assert committed["fingerprint"] == kernel_report.fingerprint(), (
        "bench/results/kernel_report.json was made for other kernels or another config table: regenerate it "
        "(python -m bench.kernel_report --json bench/results/kernel_report.json) and commit it")


def test_committed_report_covers_every_shipped_tile_on_every_target(committed: dict) -> None:
    from dataclasses import asdict

    from bench import kernel_report

    fields = set(kernel_report.CompileJob.__dataclass_fields__)
    have = {json.dumps({k: (list(v) if k == "features" else v) for k, v in row.items() if k in fields},
                       sort_keys=True) for row in committed["rows"]}
    expected = kernel_report._all_table_jobs(None, fp32_tf32=True, variant="aligned")
    missing = [job.name for job in expected
               if json.dumps({k: (list(v) if k == "features" else v) for k, v in asdict(job).items()},
                             sort_keys=True) not in have]
    assert not missing, f"{len(missing)} shipped kernels are not in the committed report, e.g. {missing[:5]}"
    from fused_attn.kernels.configs import UNVETTED_ROWS, all_candidates

    vetted = {key[0] for key in all_candidates() if key not in UNVETTED_ROWS}
    assert {row["capability"] for row in committed["rows"]} == vetted
    assert set(UNVETTED_ROWS) <= set(all_candidates()), "UNVETTED_ROWS names rows the table does not have"
    assert {row["even_d"] for row in committed["rows"]} == {False, True}


def test_every_committed_row_passes_the_speed_checks(committed: dict) -> None:
    problems = [p for row in committed["rows"] for p in _problems(row)]
    assert not problems, f"{len(problems)} of {len(committed['rows'])} kernels fail:\n" + "\n".join(problems[:40])
    assert committed["ok"], "the report's own verdict disagrees with the checks"


def test_accepted_failures_are_current(committed: dict) -> None:
    """Every configs.ACCEPTED_FAILURES entry names shipped rows that fail the speed checks (an
    entry whose rows pass is stale), and only those rows are accepted."""
    from fused_attn.kernels.configs import ACCEPTED_FAILURES

    kernels = {"fwd": "forward", "dkdv": "backward_dkdv", "dq": "backward_dq"}
    accepted: dict[tuple, list[dict]] = {}
    for row in committed["rows"]:
        if row.get("accepted"):
            key = (row["capability"], row["head_dim"], 4 if row["dtype"] == "fp32" else 2, row["table_variant"],
                   kernels[row["kernel"]])
            assert key in ACCEPTED_FAILURES and row["accepted"] == ACCEPTED_FAILURES[key], _row_id(row)
            assert any(note.startswith("accepted") for note in row["notes"]), _row_id(row)
            accepted.setdefault(key, []).append(row)
    for key, reason in ACCEPTED_FAILURES.items():
        assert reason.strip(), key
        assert accepted.get(key), f"ACCEPTED_FAILURES{key} is stale: its rows pass; remove the entry"


_SAMPLE_SCRIPT = """
import json
from bench import kernel_report as kr
from fused_attn.kernels.configs import candidates
kr.check_environment(kr.DEFAULT_KERNEL_MODULE)
jobs = []
for cap, d, size, variant, kernel, dtypes in [
        (90, 128, 2, "plain", "fwd", ("bf16",)), (90, 128, 2, "plain", "dkdv", ("bf16",)),
        (90, 64, 2, "plain", "dq", ("fp16",)), (80, 128, 2, "mask", "dkdv", ("bf16",)),
        (120, 256, 2, "plain", "dq", ("bf16",)), (86, 64, 4, "plain", "fwd", ("fp32",)),
        (100, 128, 2, "dropout", "dkdv", ("bf16",)), (75, 64, 2, "plain", "fwd", ("fp16",))]:
    table_kernel = {"fwd": "forward", "dkdv": "backward_dkdv", "dq": "backward_dq"}[kernel]
    cfg = candidates(cap, d, size, variant)[table_kernel][0]
    jobs += kr.jobs_for_tile(cap, d, size, kernel, cfg, variant, dtypes=dtypes)
print(json.dumps([r.as_dict() for r in kr.run_report(jobs=jobs, workers=2).rows]))
"""


@pytest.mark.compile
def test_a_sample_recompiles_to_the_committed_figures(committed: dict) -> None:
    """Every target, both head-dim cases, 16-bit and fp32, table variants: compiled here, the
    checks pass and, under the Triton version the report was made with, registers, shared memory
    and the hot loop match the committed rows."""
    import triton

    _skip_without_tools()
    rows = json.loads(_run_python(_SAMPLE_SCRIPT))
    assert {row["capability"] for row in rows} == set(EXPECTED_SHARED_LIMITS)
    committed_by_name = {row["name"]: row for row in committed["rows"]}
    for row in rows:
        assert not _problems(row), _problems(row)
        assert row["ok"], (row["name"], row["failures"])
        if committed["triton_version"] == triton.__version__:
            want = committed_by_name.get(row["name"])
            if row["dtype"] == "fp16" and row["capability"] != 75 and want is None:
                continue  # the report compiles bf16 for the 16-bit rows (the same tiles and MMA shapes)
            assert want is not None, f"{row['name']} is not in the committed report"
            for key in ("registers", "shared", "hot_loop"):
                assert row[key] == want[key], (row["name"], key, row[key], want[key])


_OLD_TILES_SCRIPT = """
import json
from bench import kernel_report as kr
from fused_attn.kernels.configs import KernelConfig
jobs = [kr.CompileJob(90, 128, "bf16", "dkdv", 16, 64, 8, 3, "tf32"),
        kr.CompileJob(90, 128, "bf16", "dq", 64, 32, 8, 2, "tf32"),
        kr.CompileJob(80, 128, "bf16", "dkdv", 16, 32, 8, 2, "tf32")]
print(json.dumps([r.as_dict() for r in kr.run_report(jobs=jobs, workers=1, dump_dir=%r).rows]))
"""


@pytest.mark.compile
def test_the_checks_catch_the_tiles_issue_12_found(tmp_path: Path) -> None:
    """The tiles shipped before issue 12 waste tensor-core work: H100 dK/dV 16x64 and dQ 64x32 at
    8 warps execute 1.5x and 1.67x the useful MMA FLOPs with n8 / n16 wgmma, A100 dK/dV 16x32 2.5x.
    `--dump` writes each cubin with an index."""
    _skip_without_tools()
    rows = json.loads(_run_python(_OLD_TILES_SCRIPT % str(tmp_path)))
    ratios = [round(row["mma_ratio"], 2) for row in rows]
    assert ratios == [1.5, 1.67, 2.5]
    assert min(rows[0]["hot_loop"]["wgmma_n"]) == 8 and min(rows[1]["hot_loop"]["wgmma_n"]) == 16
    assert all(not row["ok"] for row in rows)
    assert any("wgmma N=8" in failure for failure in rows[0]["failures"])
    index = json.loads((tmp_path / "index.json").read_text())
    assert [entry["name"] for entry in index] == [row["name"] for row in rows]
    for entry in index:
        cubin = tmp_path / entry["files"]["cubin"]
        assert cubin.stat().st_size > 1000 and "HGMMA" in (tmp_path / entry["files"]["sass"]).read_text() or \
            entry["capability"] == 80


_TMA_SCRIPT = """
import json, tempfile
from pathlib import Path
from bench import kernel_report as kr
kr.check_environment()
found = {}
for capability, kernel in ((80, "dq"), (90, "dq"), (120, "fwd"), (120, "dq")):
    job = kr.CompileJob(capability, 64, "bf16", kernel, 64, 64, 4, 2, "tf32", even_d=True)
    fn = getattr(kr._kernel_module(kr.DEFAULT_KERNEL_MODULE), kr._KERNEL_FUNCTIONS[kernel])
    with tempfile.TemporaryDirectory() as tmp:
        report = kr.compile_one(job, dump_dir=tmp)
        sass = (Path(tmp) / f"{job.name}.sass").read_text()
    found[f"{capability}-{kernel}"] = [kr._constexprs(fn, job)["USE_TMA"], "UTMALDG" in sass, report.ok]
print(json.dumps(found))
"""


@pytest.mark.compile
def test_tma_loads_are_compiled_where_the_launcher_uses_them() -> None:
    """The report compiles what the launcher runs (configs.TMA_KERNELS): on sm_90 the streamed
    tiles are TMA copies (UTMALDG); sm_80 has no TMA; sm_120 uses it in the forward only."""
    _skip_without_tools()
    found = json.loads(_run_python(_TMA_SCRIPT))
    assert found == {"80-dq": [False, False, True], "90-dq": [True, True, True], "120-fwd": [True, True, True],
                     "120-dq": [False, False, True]}


def test_hot_loop_is_the_loop_without_selects() -> None:
    """On a hand-written SASS: two MMA loops (a masked one with selects, an unmasked one with an
    LDL and a barrier-wait retry loop inside it), an outer loop, and a loop without MMA: the
    unmasked MMA loop is the hot loop (the wait loop inside it does not make it an outer loop)."""
    from bench.kernel_report import find_hot_loop

    sass = "\n".join([
        "/*0000*/ MOV R1, c[0x0][0x28] ;",
        "/*0010*/ HGMMA.64x64x16.F32.BF16 R24, gdesc[UR4], R24 ;",  # outer loop body
        "/*0020*/ FSEL R2, R3, -INF, P0 ;",
        "/*0030*/ HGMMA.64x128x16.F32.BF16 R24, gdesc[UR4], R24 ;",  # masked loop 0x20-0x50
        "/*0040*/ FSETP.GT.AND P0, PT, R2, R3, PT ;",
        "/*0050*/ @P0 BRA 0x20 ;",
        "/*0060*/ HGMMA.64x32x16.F32.BF16 R24, gdesc[UR4], R24 ;",  # unmasked loop 0x60-0xb0
        "/*0070*/ SYNCS.PHASECHK.TRANS64.TRYWAIT P3, [UR8], R9 ;",  # a wait loop 0x70-0x80
        "/*0080*/ @!P3 BRA 0x70 ;",
        "/*0090*/ HGMMA.64x32x16.F32.BF16 R24, gdesc[UR4], R24 ;",
        "/*00a0*/ LDL R5, [R1] ;",
        "/*00b0*/ @P1 BRA 0x60 ;",
        "/*00c0*/ FADD R6, R6, R7 ;",  # a loop without MMA
        "/*00d0*/ @P2 BRA 0xc0 ;",
        "/*00e0*/ BRA 0x10 ;",  # the outer loop: not innermost
    ])
    loop = find_hot_loop(sass, num_warps=8, uses_mma=True)
    assert loop is not None
    assert (loop.instructions, loop.mma_instructions, loop.wgmma_n, loop.local_memory, loop.selects) == (6, 2, [32, 32], 1, 0)
    assert loop.executed_flops == 2 * (2 * 64 * 32 * 16) * 2  # two warpgroups issue each HGMMA
    assert find_hot_loop(sass, num_warps=8, uses_mma=False) is None  # no FFMA loop in it


_VARIANT_SCRIPT = """
import json, sys
from bench import kernel_report as kr
kr.check_environment(kr.DEFAULT_KERNEL_MODULE)
jobs = kr.build_variant_jobs(capabilities=(80, 90), head_dims=(128,),
                             features={"all at once": kr.VARIANT_FEATURES["all at once"]})
# The inspection kernels (attention_probs, attention_stats) with every score option on.
score_flags = ("LIMIT_LEFT", "HAS_ALIBI", "HAS_SOFTCAP", "BIAS_KIND")
jobs += [kr.CompileJob(cap, 128, "bf16", kernel, 64, 64, 4, 2, "tf32", features=score_flags)
         for cap in (80, 90) for kernel in ("probs", "row_stats", "col_sums")]
print(json.dumps([kr.compile_one(job).as_dict() for job in jobs]))
"""


@pytest.mark.compile
def test_every_variant_at_once_compiles_for_gpus() -> None:
    """The interpreter accepts code a GPU compile may not (an early return in the packed-input
    path, Philox, the tanh, index gathers): the kernels with every variant flag on, and the
    inspection kernels of attention_probs / attention_stats, compile for capability 80 and 90,
    fit shared memory and keep HGMMA. Spills of these rows are recorded by
    `kernel_report --variants`, not checked here."""
    from fused_attn.kernels.configs import ACCEPTED_FAILURES

    missing = _missing_nvidia_tools()
    if missing:
        pytest.skip(f"Triton's NVIDIA backend tools ({', '.join(missing)}) are not installed")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", _VARIANT_SCRIPT], env=env, cwd=ROOT, capture_output=True,
                            text=True, timeout=REPORT_TIMEOUT_S)
    assert result.returncode == 0, result.stderr[-4000:]
    rows = json.loads(result.stdout.strip().splitlines()[-1])
    kernels = ("fwd", "dkdv", "dq", "probs", "row_stats", "col_sums")
    assert {(row["capability"], row["kernel"]) for row in rows} == {(c, k) for c in (80, 90) for k in kernels}
    for row in rows:
        assert row["compiled"], f"{_row_id(row)}: {row['error']}"
        # Diagnostic rows: their speed figures are recorded by `kernel_report --variants`; they must
        # compile and fit the card.
        assert row["total_shared"] <= EXPECTED_SHARED_LIMITS[row["capability"]], _row_id(row)
        assert set(row["features"]) >= {"LIMIT_LEFT", "HAS_ALIBI", "HAS_SOFTCAP", "BIAS_KIND"}
        if row["kernel"] in ("fwd", "dkdv", "dq"):
            assert set(row["features"]) >= {"HAS_DROPOUT", "IS_VARLEN"}
        table_kernel = {"fwd": "forward", "dkdv": "backward_dkdv", "dq": "backward_dq"}.get(row["kernel"])
        if row["capability"] == 90 and (90, 128, 2, "all", table_kernel) not in ACCEPTED_FAILURES:
            assert row["hgmma"] > 0, _row_id(row)  # an accepted row may run HMMA (configs.ACCEPTED_FAILURES)


_DECODE_SCRIPT = """
import json
from bench import kernel_report as kr
kr.check_environment(kr.DEFAULT_KERNEL_MODULE)
options = ("LIMIT_LEFT", "LIMIT_RIGHT", "HAS_ALIBI", "HAS_SOFTCAP", "HAS_SINKS")
jobs = [kr.CompileJob(cap, head_dim, "bf16", "decode", 16, 64 if head_dim <= 128 else 16, 4, 2, "tf32",
                      features=features)
        for cap in (80, 90) for head_dim in (128, 512)
        for features in ((), ("IS_PAGED", "SPLIT", *options), ("HAS_BATCH_IDX", "SPLIT"))]
jobs += [kr.CompileJob(cap, 128, "bf16", "decode_combine", 1, None, 4, None, "tf32", features=("HAS_SINKS",))
         for cap in (80, 90)]
print(json.dumps([kr.compile_one(job).as_dict() for job in jobs]))
"""


@pytest.mark.compile
def test_the_kvcache_kernels_compile_for_gpus() -> None:
    """attention_with_kvcache's kernels (paged gathers, split-KV, every score option, the combine)
    compile for capability 80 and 90, fit shared memory, keep their stores of absent pointers out
    (None pointers compile as constexprs) and use tensor cores for the dots. Their speed has not
    been timed on a GPU."""
    _skip_without_tools()
    rows = json.loads(_run_python(_DECODE_SCRIPT))
    assert len(rows) == 14
    for row in rows:
        assert row["compiled"], f"{_row_id(row)}: {row['error']}"
        assert row["total_shared"] <= EXPECTED_SHARED_LIMITS[row["capability"]], _row_id(row)
        if row["kernel"] == "decode":
            assert row["hgmma"] + row["hmma"] > 0, _row_id(row)


_POINTER_SCRIPT = """
import json
from bench import kernel_report as kr
from fused_attn.kernels import attention
plain = kr.CompileJob(90, 64, "bf16", "fwd", 64, 64, 4, 2, "tf32")
masked = kr.CompileJob(90, 64, "bf16", "fwd", 64, 64, 4, 2, "tf32", features=("BIAS_KIND", "HAS_SINKS"))
out = {}
for job in (plain, masked):
    fn = attention._attn_fwd
    signature, _ = kr._signature(fn, job.dtype, kr._constexprs(fn, job))
    out[job.name] = {name: signature[name] for name in ("BIAS", "ALIBI", "SINKS", "CU_SEQLENS_Q")}
print(json.dumps(out))
"""


def test_absent_optional_pointers_compile_as_constexpr_none() -> None:
    """The compile report types an optional pointer as the launcher passes it: None (a constexpr)
    when its flag is off, a pointer when on (kernels.attention.OPTIONAL_POINTERS pairs them)."""
    by_job = json.loads(_run_python(_POINTER_SCRIPT))
    plain, masked = by_job.values()
    assert plain == {"BIAS": "constexpr", "ALIBI": "constexpr", "SINKS": "constexpr", "CU_SEQLENS_Q": "constexpr"}
    assert masked == {"BIAS": "*bf16", "ALIBI": "constexpr", "SINKS": "*fp32", "CU_SEQLENS_Q": "constexpr"}
