"""Every shipped config compiles for A100 (capability 80) and H100 (90) without a GPU, spills no
registers (except the fp16/bf16 rows listed in configs.KNOWN_SPILLS, which must still spill, compile,
fit and use HGMMA), fits the card's shared memory and, on 90, uses warpgroup MMA (HGMMA) for
fp16/bf16. Compiled as the launcher runs them: head dims and strides multiples of 16 (aligned).

The checks run `python -m fused_attn.kernel_report` in a fresh process: this process runs with
TRITON_INTERPRET=1 (tests/conftest.py), under which the kernels are not JITFunctions and cannot
be compiled for a GPU target.
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
EXPECTED_SHARED_LIMITS = {80: 166_912, 90: 232_448}
REPORT_TIMEOUT_S = 900


def _missing_nvidia_tools() -> list[str]:
    spec = importlib.util.find_spec("triton")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    missing = []
    for tool in ("ptxas", "cuobjdump"):
        if not any((Path(loc) / "backends" / "nvidia" / "bin" / tool).is_file() for loc in locations):
            missing.append(tool)
    return missing


def _row_id(row: dict) -> str:
    return (f"cap{row['capability']}-d{row['head_dim']}-{row['dtype']}-{row['input_precision']}-{row['kernel']}"
            f"-{row['block_m']}x{row['block_n']}-w{row['num_warps']}-s{row['num_stages']}")


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> dict:
    missing = _missing_nvidia_tools()
    if missing:
        pytest.skip(f"Triton's NVIDIA backend tools ({', '.join(missing)}) are not installed under "
                    "triton/backends/nvidia/bin: cannot compile for CUDA targets")
    out = tmp_path_factory.mktemp("kernel_report") / "report.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-m", "fused_attn.kernel_report", "--json", str(out)],
                            env=env, cwd=ROOT, capture_output=True, text=True, timeout=REPORT_TIMEOUT_S)
    assert result.returncode in (0, 1), (
        f"kernel_report could not run (exit {result.returncode}):\n{result.stderr[-4000:]}")
    assert out.exists(), f"kernel_report wrote no JSON:\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}"
    data = json.loads(out.read_text())
    data["returncode"] = result.returncode
    data["stdout"] = result.stdout
    return data


def _known_spill_key(row: dict) -> tuple[int, int, str] | None:
    """The KNOWN_SPILLS key of `row`, or None: the entries cover fp16/bf16 rows only."""
    from fused_attn.kernels.configs import KNOWN_SPILLS

    key = (row["capability"], row["head_dim"], row["kernel"])
    return key if row["dtype"] in ("fp16", "bf16") and key in KNOWN_SPILLS else None


def _spills(row: dict) -> bool:
    return bool(row["spills"] or row["spill_instructions"])


@pytest.mark.compile
def test_every_kernel_of_every_config_compiles_without_spills(report: dict) -> None:
    from fused_attn.kernels.configs import all_configs

    rows = report["rows"]
    assert report["variant"] == "aligned"
    expected = {(cap, d) for cap, d, _size in all_configs()}
    assert {(row["capability"], row["head_dim"]) for row in rows} == expected
    assert {row["kernel"] for row in rows} == {"fwd", "preprocess", "dkdv", "dq"}
    assert {row["dtype"] for row in rows} == {"fp16", "bf16", "fp32"}

    problems = []
    for row in rows:
        limit = EXPECTED_SHARED_LIMITS[row["capability"]]
        name = _row_id(row)
        if not row["compiled"]:
            problems.append(f"{name}: does not compile: {row['error']}")
            continue
        if _spills(row) and _known_spill_key(row) is None:
            problems.append(f"{name}: spills (STACK {row['stack_bytes']}, LOCAL {row['local_bytes']}, "
                            f"{row['spill_instructions']} LDL/STL) at {row['registers']} registers "
                            "(not in configs.KNOWN_SPILLS: retune the entry)")
        if row["shared"] + row["static_shared"] > limit:
            problems.append(f"{name}: {row['shared']} + {row['static_shared']} B shared memory > {limit} B")
        needs_hgmma = (row["capability"] == 90 and row["dtype"] in ("fp16", "bf16")
                       and row["kernel"] in ("fwd", "dkdv", "dq"))
        if needs_hgmma and not row["hgmma"] > 0:
            problems.append(f"{name}: no HGMMA on capability 90 ({row['hmma']} HMMA)")
    assert not problems, f"{len(problems)} of {len(rows)} kernels fail:\n" + "\n".join(problems)
    # The report's own verdict agrees with the checks above.
    assert report["ok"] and report["returncode"] == 0, report["stdout"][-3000:]


@pytest.mark.compile
def test_known_spills_are_current_and_keep_hgmma(report: dict) -> None:
    """Every KNOWN_SPILLS entry names shipped fp16/bf16 rows that compile, fit shared memory, use
    HGMMA and really spill; an entry that no longer spills is stale and must be removed."""
    from fused_attn.kernels.configs import KNOWN_SPILLS, all_configs

    rows_by_key: dict[tuple[int, int, str], list[dict]] = {}
    for row in report["rows"]:
        key = _known_spill_key(row)
        if key is not None:
            rows_by_key.setdefault(key, []).append(row)
    problems = []
    for key, reason in KNOWN_SPILLS.items():
        capability, head_dim, kernel = key
        assert reason.strip(), f"KNOWN_SPILLS{key} has no reason"
        assert kernel in ("fwd", "dkdv", "dq"), f"KNOWN_SPILLS{key}: unknown kernel {kernel!r}"
        assert (capability, head_dim, 2) in all_configs(), f"KNOWN_SPILLS{key}: no such fp16/bf16 config"
        rows = rows_by_key.get(key, [])
        assert {row["dtype"] for row in rows} == {"fp16", "bf16"}, f"KNOWN_SPILLS{key}: rows missing"
        for row in rows:
            name = _row_id(row)
            if not row["compiled"]:
                problems.append(f"{name}: does not compile: {row['error']}")
                continue
            if not _spills(row):
                problems.append(f"{name}: KNOWN_SPILLS{key} is stale: the row no longer spills "
                                f"({row['registers']} registers); remove it from kernels/configs.py")
            limit = EXPECTED_SHARED_LIMITS[capability]
            if row["shared"] + row["static_shared"] > limit:
                problems.append(f"{name}: {row['shared']} + {row['static_shared']} B shared memory > {limit} B")
            if capability >= 90 and not row["hgmma"] > 0:
                problems.append(f"{name}: no HGMMA ({row['hmma']} HMMA): a spill-free non-HGMMA tile is "
                                "not what KNOWN_SPILLS allows")
            if not row["ok"] or row.get("known_spill") != reason:
                problems.append(f"{name}: the report does not mark it known spill: {row['failures']}")
    assert not problems, "\n".join(problems)


_VARIANT_SCRIPT = """
import json, sys
from fused_attn import kernel_report as kr
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
        assert row["ok"], f"{_row_id(row)}: {row['failures']}"
        assert set(row["features"]) >= {"LIMIT_LEFT", "HAS_ALIBI", "HAS_SOFTCAP", "BIAS_KIND"}
        if row["kernel"] in ("fwd", "dkdv", "dq"):
            assert set(row["features"]) >= {"HAS_DROPOUT", "IS_VARLEN"}
        if row["capability"] == 90:
            assert row["hgmma"] > 0
