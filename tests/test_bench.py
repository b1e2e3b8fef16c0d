"""The benchmark's own code at tiny sizes: FLOP counts, the memory counters, the runner's rows
(skips, OOM, errors, budget), the CSV, tables and plots, the CPU main job and the GPU suite.

These run on the CPU; the runner's timing path is the same code the GPU run uses with the host
clock in place of CUDA events. Nothing here asserts a speed.
"""
from __future__ import annotations

import contextlib
import io
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fused_attn
from bench import report
from bench.measure import attention_flops, measure_memory, visible_pairs
from bench.providers import Case, Provider, Unsupported, all_providers, providers_named
from bench.runner import Progress, Row, _input_sets, fa3_cases, rotation_count, run_cases
from fused_attn import reference

REPO = Path(__file__).resolve().parent.parent
# The no-GPU path runs fused_attn on CPU tensors through the interpreter, which is off on a GPU
# machine; there test_run_cases_on_cuda is the twin.
cpu_only = pytest.mark.cpu_only(reason="the no-GPU path; a GPU machine runs its GPU twin")
TINY_CONFIG = fused_attn.KernelConfig(64, 64, 4, 1)
TINY = fused_attn.AttentionConfigs(TINY_CONFIG, TINY_CONFIG, TINY_CONFIG)


# ---------------------------------------------------------------------------------------------
# FLOPs


@pytest.mark.parametrize("seq_q,seq_k", [(1, 1), (1, 17), (17, 1), (97, 97), (200, 77), (77, 200), (5, 3), (3, 5)])
def test_visible_pairs_counts_the_causal_mask(seq_q: int, seq_k: int) -> None:
    assert visible_pairs(seq_q, seq_k, True) == int(reference.causal_mask(seq_q, seq_k).sum())
    assert visible_pairs(seq_q, seq_k, False) == seq_q * seq_k


def test_attention_flops_formula() -> None:
    forward = attention_flops(2, 16, 1024, 1024, 128, False, "fwd")
    assert forward == 4 * 2 * 16 * 1024 * 1024 * 128
    assert attention_flops(2, 16, 1024, 1024, 128, False, "bwd") == 2.5 * forward
    assert attention_flops(2, 16, 1024, 1024, 128, False, "fwd+bwd") == 3.5 * forward
    causal = attention_flops(2, 16, 1024, 1024, 128, True, "fwd")
    assert causal == 4 * 2 * 16 * (1024 * 1025 // 2) * 128  # exact pairs, a bit over half
    with pytest.raises(ValueError, match="mode"):
        attention_flops(1, 1, 8, 8, 8, False, "backward")


# ---------------------------------------------------------------------------------------------
# Memory counters (CPU: ATen storages; saved tensors: hooks)


def test_host_peak_counts_live_storages_only() -> None:
    x = torch.randn(1000)
    with measure_memory(torch.device("cpu"), [x]) as reading:
        a = torch.empty(1000)          # 4000 bytes
        view = a[:10].t()              # a view: no new storage
        x.detach().mul_(1.0)           # an input's storage: not counted
        del a, view
        b = torch.empty(500)           # 2000 bytes, after a was freed
        c = torch.empty(250)           # 1000 bytes, alongside b
        del b, c
    assert reading.peak_bytes == 4000
    assert reading.saved_bytes == 0


def test_saved_bytes_of_fused_attention_are_o_and_lse(device: str) -> None:
    q, k, v = (torch.randn(1, 2, 40, 16, device=device, requires_grad=True) for _ in range(3))
    with measure_memory(torch.device(device), [q, k, v]) as reading:
        fused_attn.attention(q, k, v, causal=True)
    assert reading.saved_bytes == 1 * 2 * 40 * 16 * 4 + 1 * 2 * 40 * 4  # o float32 + lse float32


def test_memory_grows_linearly_for_fused_and_quadratically_for_naive(device: str) -> None:
    def peak(fn, seq: int) -> int:
        q, k, v, do = (torch.randn(1, 1, seq, 64, device=device, requires_grad=i < 3) for i in range(4))
        with measure_memory(torch.device(device), [q, k, v, do]) as reading:
            fn(q, k, v, causal=True).backward(do)
        return reading.peak_bytes

    short = 64 if device == "cpu" else 2048  # the CUDA allocator rounds small blocks up
    with fused_attn.override_configs(TINY) if device == "cpu" else contextlib.nullcontext():
        fused_growth = peak(fused_attn.attention, 4 * short) / peak(fused_attn.attention, short)
    naive_growth = peak(reference.attention, 4 * short) / peak(reference.attention, short)
    assert 3.5 < fused_growth < 4.5   # 4x longer, 4x the memory
    assert naive_growth > 8           # S x S matrices take over (16x in the limit)


# ---------------------------------------------------------------------------------------------
# The runner


def _raising(error: BaseException) -> Provider:
    def build(case: Case, device: torch.device):
        def fn(q, k, v):
            raise error
        return fn
    return Provider(f"raises_{type(error).__name__}", build)


TINY_CASES = fa3_cases(dtypes=[torch.float32], head_dims=[16], seqs=[32], memory_only_seqs=[64], tokens=64, width=32)


def test_fa3_cases_keep_tokens_and_width() -> None:
    cases = fa3_cases()
    timed = [c for c in cases if c.timed]
    assert len(timed) == 3 * 2 * 2 * 2 * 7 and len(cases) == len(timed) + 2 * 2
    assert {(c.dtype, c.head_dim) for c in cases[:42]} == {(torch.bfloat16, 128)} and not cases[42].timed
    assert all(c.batch * c.seq == 16384 or (c.batch == 1 and c.seq > 16384) for c in timed)
    assert all(c.heads * c.head_dim == 2048 for c in cases)
    assert {c.seq for c in cases if not c.timed} == {65536, 131072}


@cpu_only
def test_run_cases_rows_for_every_provider_and_outcome() -> None:
    providers = providers_named(["fused_attn", "naive", "sdpa_math", "sdpa_efficient", "flex_compiled",
                                 "flash_attn_pkg"]) + [_raising(torch.OutOfMemoryError("CUDA out of memory")),
                                                       _raising(KeyError("boom"))]
    with fused_attn.override_configs(TINY):
        rows = run_cases(TINY_CASES, providers, "cpu", warmup_ms=1, rep_ms=3, progress=None)
    assert len(rows) == len(TINY_CASES) * len(providers)
    by = {(r.mode, r.causal, r.seq, r.provider): r for r in rows}
    for case in TINY_CASES:
        get = lambda name: by[(case.mode, case.causal, case.seq, name)]  # noqa: E731
        for name in ("fused_attn", "naive", "sdpa_math"):
            row = get(name)
            assert row.status == "ok", row
            assert row.peak_bytes > 0
            assert (row.saved_bytes is None) == (case.mode == "fwd")
            if case.timed:
                assert 0 < row.ms_p20 <= row.ms_p50 <= row.ms_p80
                flops = attention_flops(case.batch, case.heads, case.seq, case.seq, case.head_dim, case.causal, case.mode)
                assert row.tflops == pytest.approx(flops / row.ms_p50 / 1e9)
                assert row.speed_vs_fused == pytest.approx(get("fused_attn").ms_p50 / row.ms_p50)
            else:
                assert row.ms_p50 is None and row.tflops is None
        assert get("fused_attn").speed_vs_fused in (None, 1.0)
        assert get("sdpa_efficient").status == "skipped" and "CUDA" in get("sdpa_efficient").reason
        assert get("flex_compiled").status == "skipped" and "CUDA" in get("flex_compiled").reason
        assert get("flash_attn_pkg").status == "skipped" and "flash-attn" in get("flash_attn_pkg").reason
        assert get("raises_OutOfMemoryError").status == "OOM"
        assert get("raises_KeyError").status == "error" and "KeyError" in get("raises_KeyError").reason


@pytest.mark.gpu
def test_run_cases_on_cuda() -> None:
    """The GPU twin of the CPU runner test: every provider torch offers here runs or says why not."""
    cases = fa3_cases(dtypes=[torch.bfloat16], head_dims=[64], seqs=[256], memory_only_seqs=[1024],
                      tokens=512, width=128)
    rows = run_cases(cases, all_providers(), "cuda", warmup_ms=2, rep_ms=10, progress=None)
    assert len(rows) == len(cases) * len(all_providers())
    for row in rows:
        assert row.status in ("ok", "skipped"), row  # nothing OOMs or errors at these sizes
        if row.provider in ("fused_attn", "naive", "sdpa_math", "sdpa_efficient", "sdpa_flash"):
            assert row.status == "ok", row
        if row.status == "ok":
            assert row.peak_bytes > 0 and (row.tflops is not None) == row.timed
        else:
            assert row.reason
    fused_fwd = next(r for r in rows if r.provider == "fused_attn" and r.mode == "fwd+bwd" and r.timed)
    naive_fwd = next(r for r in rows if r.provider == "naive" and r.mode == "fwd+bwd" and r.timed)
    assert fused_fwd.saved_bytes < naive_fwd.saved_bytes


def test_run_cases_time_budget_skips_the_rest() -> None:
    done: list[list[Row]] = []
    rows = run_cases(TINY_CASES[:2], providers_named(["naive"]), "cpu", budget_s=0.0, progress=None,
                     on_case_done=done.append)
    assert [r.status for r in rows] == ["skipped", "skipped"]
    assert done == [[rows[0]], [rows[1]]]  # handed over case by case, for the CSV
    assert all("time budget" in r.reason for r in rows)


def test_input_sets_are_random_independent_and_in_the_provider_layout() -> None:
    case = Case("bwd", True, torch.float16, 2, 3, 40, 16)
    sets = _input_sets(case, "bshd", torch.device("cpu"), 2, seed=0)
    assert len(sets) == 2 and sets[0][0].shape == (2, 40, 3, 16)
    assert all(t.requires_grad for t in sets[0][:3]) and not sets[0][3].requires_grad
    assert all((t != 0).float().mean() > 0.99 and t.std() > 0.5 for s in sets for t in s)  # never zeros
    assert not torch.equal(sets[0][0], sets[1][0]) and not torch.equal(sets[0][0], sets[0][1])
    assert rotation_count(case, torch.device("cpu")) == 1


def test_unknown_provider_is_named() -> None:
    with pytest.raises(ValueError, match="sdpa_fast"):
        providers_named(["fused_attn", "sdpa_fast"])
    assert [p.name for p in all_providers()][0] == "fused_attn"


def test_progress_bar_writes_one_line_per_step_to_a_log() -> None:
    stream = io.StringIO()
    bar = Progress(4, stream)
    for i in range(4):
        bar.step(f"step {i}")
    lines = stream.getvalue().splitlines()
    assert len(lines) == 4 and lines[-1].startswith("[" + "#" * 30 + "] 4/4") and "step 3" in lines[-1]


# ---------------------------------------------------------------------------------------------
# CSV, tables, plots


def _rows() -> list[Row]:
    rows = []
    for seq, fused_ms, naive_ms in ((1024, 1.0, 4.0), (2048, 3.0, 15.0)):
        for name, ms in (("fused_attn", fused_ms), ("naive", naive_ms)):
            flops = attention_flops(8, 16, seq, seq, 128, True, "fwd+bwd")
            rows.append(Row(name, "fwd+bwd", True, "bfloat16", 8, 16, seq, 128, True, "ok", "", ms * 0.9, ms, ms * 1.1,
                            flops / ms / 1e9, fused_ms / ms, seq * 1000 * (1 if name == "fused_attn" else seq),
                            seq * 100))
        rows.append(Row("sdpa_flash", "fwd+bwd", True, "bfloat16", 8, 16, seq, 128, True, "skipped",
                        "needs sm80"))
    rows.append(Row("naive", "fwd+bwd", True, "bfloat16", 1, 16, 131072, 128, False, "OOM", "out of memory"))
    return rows


def _gpu_meta(run_id: str) -> dict[str, str]:
    return {"run_id": run_id, "date": "2026-11-25", "device": "NVIDIA H100 (sm_90, 80 GiB)", "torch": "2.11",
            "triton": "3.6", "cuda": "13.0", "python": "3.12"}


def test_csv_appends_and_reads_back(tmp_path: Path) -> None:
    path = tmp_path / "gpu.csv"
    report.append_csv(path, _gpu_meta("20261125T000000Z"), _rows())
    report.append_csv(path, _gpu_meta("20261126T000000Z"), _rows()[:2])
    assert path.read_text().count("run_id") == 1
    records = report.read_csv(path)
    assert len(records) == len(_rows()) + 2
    first = records[0]
    assert first["seq"] == 1024 and first["ms_p50"] == 1.0 and first["causal"] is True and first["timed"] is True
    assert records[2]["ms_p50"] is None and records[2]["reason"] == "needs sm80"
    newest = report.latest_run(records)
    assert len(newest) == 2 and {r["run_id"] for r in newest} == {"20261126T000000Z"}
    assert report.latest_run(records, gpu=False) == []


def test_csv_with_other_columns_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "old.csv"
    path.write_text("provider,ms\nfused_attn,1.0\n")
    with pytest.raises(ValueError, match="columns"):
        report.append_csv(path, _gpu_meta("x"), _rows())


def test_tables_show_ratios_skips_and_oom(tmp_path: Path) -> None:
    path = tmp_path / "gpu.csv"
    report.append_csv(path, _gpu_meta("1"), _rows())
    records = report.read_csv(path)
    table = report.throughput_table(records)
    assert "| fused_attn | naive | sdpa_flash |" in table
    naive_tflops = attention_flops(8, 16, 1024, 1024, 128, True, "fwd+bwd") / 4.0 / 1e9
    assert f"{naive_tflops:.1f} (0.25x)" in table
    assert "skipped[1]" in table and "[1] sdpa_flash: needs sm80" in table
    assert "131072" not in table  # memory-only lengths are not in the throughput table
    memory = report.memory_table(records)
    assert "OOM" in memory and f"{1024 * 1000 / 2**20:,.2f}" in memory
    summary = report.summary_table(records)
    assert f"{math.sqrt(0.25 * 0.2):.2f}x" in summary  # geometric mean of naive's ratios


def test_plots_are_png_files(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib", reason="plots need the bench extra (CI installs it with the test extra)")
    path = tmp_path / "gpu.csv"
    report.append_csv(path, _gpu_meta("1"), _rows())
    assert report.main([str(path)]) == 0
    for name in ("gpu_throughput_bfloat16.png", "gpu_memory.png"):
        data = (tmp_path / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


# ---------------------------------------------------------------------------------------------
# The main job without a GPU, and the GPU suite (which must degrade the same way)


@cpu_only
def test_cpu_main_job(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from bench import run

    assert run.main(["--seqs", "64", "128", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "Throughput (TFLOP/s) needs a GPU" in out
    assert out.count("| pass |") == 3 and "FAIL" not in out
    records = report.read_csv(tmp_path / "cpu.csv")
    assert {(r["provider"], r["seq"]) for r in records} == {(p, s) for p in run.CPU_PROVIDERS for s in (64, 128)}
    assert all(r["status"] == "ok" and r["peak_bytes"] > 0 and r["tflops"] is None for r in records)
    assert (tmp_path / "cpu_memory.png").read_bytes()[:4] == b"\x89PNG"


def test_cpu_correctness_check_fails_a_wrong_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    from bench import run

    def off_by_a_little(q, k, v, *, causal=False):
        return reference.attention(q, k, v, causal=causal) * 1.01

    monkeypatch.setattr(fused_attn, "attention", off_by_a_little)
    assert run.check_correctness().count("| FAIL |") == 3


@cpu_only
def test_gpu_suite_without_a_gpu(tmp_path: Path) -> None:
    """The suite's plumbing end to end: install check, a pytest run, the benchmark, the summary."""
    result = subprocess.run(
        [sys.executable, "-m", "bench.gpu_suite", str(tmp_path), "--workers", "0",
         "--pytest-args", "tests/test_bench.py -k visible_pairs", "--bench-args",
         "--seqs 64 --providers fused_attn naive"],
        cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    summary = (tmp_path / "summary.md").read_text()
    assert "tests.log (" in summary and "deselected in" in summary  # the GPU-marked step selects none here
    assert "8 passed" in summary and "rows: 2 ok" in summary and "No GPU here" in summary
    assert result.stdout.strip().endswith("the CPU tables are in bench.md.")
    assert "Throughput (TFLOP/s) needs a GPU" in (tmp_path / "bench.md").read_text()
    assert (tmp_path / "cpu.csv").exists() and (tmp_path / "tests.log").exists()
    assert "variant benchmark (" in summary and ", exit 0)" in summary.split("variant benchmark")[1]
    from bench import variants

    assert (tmp_path / "bench-variants.md").read_text().count("| pass |") == len(variants.VARIANTS)


@pytest.mark.parametrize("tail,expected", [
    ("....\n8 passed, 1 deselected in 0.51s\n", "8 passed, 1 deselected in 0.51s"),
    ("==== 3 failed, 10 passed in 80.00s (0:01:20) ====\n", "3 failed, 10 passed in 80.00s (0:01:20)"),
    ("collecting\n[gpu_suite] stopped after 100 s (deadline)\n", "stopped at the deadline before pytest finished"),
])
def test_gpu_suite_reads_the_pytest_outcome(tmp_path: Path, tail: str, expected: str) -> None:
    from bench.gpu_suite import pytest_outcome

    log = tmp_path / "tests.log"
    log.write_text("$ python -m pytest\n" + tail)
    assert pytest_outcome(log) == expected


def test_decode_bytes_model_and_bandwidth_table() -> None:
    from bench import decode

    # 2 (K and V) x B x Hkv x L x D x 2 bytes; without GQA packing each is read Hq / Hkv times.
    assert decode.kv_bytes(8, 4096) == 2 * 8 * 8 * 4096 * 128 * 2 == 128 * 2**20
    assert decode.kv_bytes(1, 10, times_read=4) == 4 * decode.kv_bytes(1, 10)
    assert decode.peak_bandwidth_gbs("NVIDIA H100 80GB HBM3") == 3350
    assert decode.peak_bandwidth_gbs("NVIDIA H200") == 4800
    assert decode.peak_bandwidth_gbs("NVIDIA GH200 480GB") == 4000  # the longest name that matches wins
    assert decode.peak_bandwidth_gbs("some new card") is None


@pytest.mark.cpu_only(reason="the no-GPU report of bench.decode")
def test_decode_benchmark_without_a_gpu_checks_the_kernels_and_says_time_needs_one(capsys) -> None:
    from bench import decode

    assert decode.main(["--quick", "--no-save"]) == 0
    out = capsys.readouterr().out
    assert "Time per step needs a GPU" in out
    assert out.count("| pass |") == 4 and "FAIL" not in out
    assert "| 8 | 32768 | 1,024.0 MiB | 4,096.0 MiB | 223.7 |" in out  # 1 GiB at 4.8 TB/s


def test_decode_benchmark_pages_hold_the_dense_cache() -> None:
    from bench import decode

    step = decode.make_step(2, 37, "cpu", dtype=torch.float32, layouts=("dense", "paged16"), heads_q=4,
                            heads_kv=2, head_dim=8)
    k_pages, v_pages, table = step.paged["paged16"]
    for b in range(2):
        for j in range(37):
            page, slot = table[b, j // 16], j % 16
            assert torch.equal(k_pages[page, slot], step.k[b, :, j])
            assert torch.equal(v_pages[page, slot], step.v[b, :, j])
