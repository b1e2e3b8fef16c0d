"""The GPU suite: for whoever has one CUDA GPU for a few minutes.

    python -m bench.gpu_suite OUT_DIR [--minutes 9]

Runs from the repository root on a machine that already has torch and triton and no network:
  1. makes `fused_attn` importable (an offline editable install, only if it is not already),
  2. the tests on the GPU: first the GPU-marked ones (tests/test_gpu.py at real sizes), one at a
     time, log in OUT_DIR/tests.log; then the rest of the grid on CUDA, across pytest-xdist
     workers if installed, log in OUT_DIR/tests-cpu-grid.log (compile-only tests are left to CI),
  3. the benchmark (`python -m bench.run`) with whatever time is left, its tables in
     OUT_DIR/bench.md, its progress in OUT_DIR/bench.log, rows in OUT_DIR/gpu.csv, PNG plots;
     then the variant benchmark (`python -m bench.variants --quick`, --variants-share of that
     time), tables in OUT_DIR/bench-variants.md, rows in OUT_DIR/gpu_variants.csv,
  4. the tile sweep (`python -m bench.tile_sweep`, --sweep-share of the time left after the tests,
     reserved before the benchmark starts; --quick, S = 4096 only, when that is under
     SWEEP_FULL_S): each kernel alone for every vetted tile next to torch SDPA's flash and cuDNN
     backends, rows in OUT_DIR/tile_sweep.csv, tables in OUT_DIR/tile_sweep.md, progress in
     OUT_DIR/tile_sweep.log, the winners in OUT_DIR/tuned-<device>-triton<ver>.json,
  5. a short summary table, printed last and written to OUT_DIR/summary.md (with the sweep's
     tables after it).
Every step has a deadline, so the whole suite ends within --minutes.

To keep the results: append OUT_DIR/gpu.csv's rows (without its header) to bench/results/gpu.csv
and run `python -m bench.report bench/results/gpu.csv` to remake the committed plots.
"""
from __future__ import annotations

import argparse
import importlib.util
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SWEEP_MIN_S = 60.0    # a tile sweep with less time than this compiles a few tiles and times nothing
SWEEP_FULL_S = 330.0  # the full sweep (S = 4096 and 8192) takes about this long on an H100; below, --quick
SWEEP_MARGIN_S = 20.0  # between the sweep's own deadline and the kill: its last step and its files


def _run(command: list[str], log: Path, timeout_s: float) -> tuple[int | None, float]:
    """Run with stdout+stderr to `log`; (exit code or None on timeout, seconds taken)."""
    start = time.perf_counter()
    with log.open("w") as out:
        out.write("$ " + " ".join(command) + "\n")
        out.flush()
        try:
            code = subprocess.run(command, cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
                                  timeout=max(1.0, timeout_s)).returncode
        except subprocess.TimeoutExpired:
            out.write(f"\n[gpu_suite] stopped after {timeout_s:.0f} s (deadline)\n")
            code = None
    return code, time.perf_counter() - start


def ensure_importable(out_dir: Path) -> str:
    """fused_attn.kernels is only importable once installed (a package-dir mapping); install it
    editable without touching the network if a plain import fails."""
    probe = [sys.executable, "-c", "import fused_attn.kernels"]
    if subprocess.run(probe, cwd=REPO, capture_output=True).returncode == 0:
        return "fused_attn already importable"
    code, _ = _run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index",
                    "-e", "."], out_dir / "install.log", 180)
    if code != 0 or subprocess.run(probe, cwd=REPO, capture_output=True).returncode != 0:
        raise SystemExit(f"could not make fused_attn importable; see {out_dir / 'install.log'}")
    return "installed fused_attn in editable mode (offline)"


def pytest_outcome(log: Path) -> str:
    """pytest's final counts line ("12 passed, 1 skipped in 80s"), or what went wrong."""
    text = log.read_text() if log.exists() else ""
    counts = [line.strip("= ") for line in text.splitlines()
              if re.search(r"\b(passed|failed|errors?|skipped|deselected|no tests ran)\b.* in [\d.]+s", line)]
    if counts:
        return counts[-1]
    if "[gpu_suite] stopped" in text:
        return "stopped at the deadline before pytest finished"
    return "no pytest summary in the log"


def _has_cuda() -> bool:
    probe = [sys.executable, "-c", "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"]
    return subprocess.run(probe, cwd=REPO, capture_output=True).returncode == 0


def sweep_step(seconds: float) -> tuple[bool, bool, float]:
    """(run the tile sweep, in --quick mode, its --deadline-s) with `seconds` left for it."""
    if seconds < SWEEP_MIN_S:
        return False, True, 0.0
    return True, seconds < SWEEP_FULL_S, seconds - SWEEP_MARGIN_S


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_suite", description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", type=Path, help="folder for logs, CSV, plots and the summary")
    parser.add_argument("--minutes", type=float, default=9.0, help="deadline for the whole suite (default 9)")
    parser.add_argument("--test-share", type=float, default=0.35, help="share of the time the tests may use")
    parser.add_argument("--workers", type=int, default=4, help="pytest-xdist workers for the tests")
    parser.add_argument("--pytest-args", default="tests",
                        help="paths or -k filters for pytest (default: tests; the compile-only tests are left to CI)")
    parser.add_argument("--bench-args", default="", help="extra arguments for bench.run, e.g. '--quick'")
    parser.add_argument("--variants-share", type=float, default=0.25,
                        help="share of the benchmark time for `bench.variants --quick` (0: skip it)")
    parser.add_argument("--sweep-share", type=float, default=0.4,
                        help="share of the time left after the tests for the tile sweep (0: skip it)")
    args = parser.parse_args(argv)

    start = time.perf_counter()
    deadline = start + args.minutes * 60
    out = args.out_dir.resolve()
    out.mkdir(parents=True, exist_ok=True)
    steps = [ensure_importable(out)]

    # The GPU tests first and one at a time (the largest needs ~36 GB); then everything else
    # (the CPU grid, on CUDA here) across workers if pytest-xdist is installed.
    workers = ["-n", str(args.workers)] if args.workers > 0 and importlib.util.find_spec("xdist") else []
    test_steps = [("tests.log", ["-m", "gpu", *shlex.split(args.pytest_args)], 0.6),
                  ("tests-cpu-grid.log", ["-m", "not gpu and not compile", *workers, *shlex.split(args.pytest_args)], 1.0)]
    codes = []
    test_deadline = time.perf_counter() + args.test_share * (deadline - time.perf_counter())
    for log_name, selection, share in test_steps:
        log = out / log_name
        code, took = _run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *selection], log,
                          share * (test_deadline - time.perf_counter()))
        codes.append(code)
        steps.append(f"{log_name} ({took:.0f} s, exit {code}): {pytest_outcome(log)}")
    # pytest exits 5 when a selection has no tests; that is not a failure.
    tests_ok = all(c in (0, 5) for c in codes)

    # The tile sweep's time is set aside now, before the benchmark takes the rest (without a GPU
    # the sweep has nothing to time: nothing is set aside).
    sweep_reserve = 0.0
    if args.sweep_share > 0 and _has_cuda():
        sweep_reserve = args.sweep_share * max(0.0, deadline - time.perf_counter())
    # Leave a minute for the benchmark's own tables and plots and for this summary; the variant
    # benchmark (windows, ALiBi, softcap, dropout, packed input) gets its share after the main one.
    budget = (deadline - time.perf_counter() - 60 - sweep_reserve) * (1 - args.variants_share)
    bench_cmd = [sys.executable, "-m", "bench.run", "--out", str(out), "--budget-s", f"{max(budget - 30, 10):.0f}",
                 "--warmup-ms", "10", "--rep-ms", "50", *shlex.split(args.bench_args)]
    with (out / "bench.md").open("w") as tables:
        bench_start = time.perf_counter()
        try:
            with (out / "bench.log").open("w") as log:
                bench_code = subprocess.run(bench_cmd, cwd=REPO, stdout=tables, stderr=log,
                                            timeout=max(10.0, budget + 45)).returncode
        except subprocess.TimeoutExpired:
            bench_code = None
    steps.append(f"benchmark ({time.perf_counter() - bench_start:.0f} s, exit {bench_code}): tables in "
                 f"{out / 'bench.md'}")
    variants_budget = deadline - time.perf_counter() - 45 - sweep_reserve
    if args.variants_share > 0 and variants_budget > 30:
        code, took = _run([sys.executable, "-m", "bench.variants", "--quick", "--csv", str(out / "gpu_variants.csv")],
                          out / "bench-variants.md", variants_budget)
        steps.append(f"variant benchmark ({took:.0f} s, exit {code}): tables in {out / 'bench-variants.md'}")

    # The tile sweep: whatever is left but a few seconds for this summary (the steps before it
    # may have ended early). It stops itself at its deadline; the kill after it is a backstop.
    sweep_code: int | None = 0
    run_sweep, quick, sweep_deadline = sweep_step(deadline - time.perf_counter() - 15)
    if args.sweep_share > 0 and run_sweep:
        sweep_code, took = _run([sys.executable, "-m", "bench.tile_sweep", str(out), "--deadline-s",
                                 f"{sweep_deadline:.0f}", *(["--quick"] if quick else [])],
                                out / "tile_sweep.log", sweep_deadline + SWEEP_MARGIN_S)
        tuned = sorted(p.name for p in out.glob("tuned-*.json"))
        steps.append(f"tile sweep ({took:.0f} s{', quick' if quick else ''}, exit {sweep_code}): log in "
                     f"{out / 'tile_sweep.log'}" + (f", winners in {out / tuned[0]}" if tuned else ""))
    elif args.sweep_share > 0:
        steps.append(f"tile sweep: not run, {max(0.0, deadline - time.perf_counter()):.0f} s left")

    sys.path.insert(0, str(REPO))
    from bench import report

    csv_paths = [p for p in (out / "gpu.csv", out / "cpu.csv") if p.exists()]  # cpu.csv: run without a GPU
    records = report.latest_run(report.read_csv(csv_paths[0])) if csv_paths else []
    lines = [f"# GPU suite, {time.perf_counter() - start:.0f} s", ""]
    lines += [f"- {s}" for s in steps]
    if records:
        statuses: dict[str, int] = {}
        for r in records:
            statuses[str(r["status"])] = statuses.get(str(r["status"]), 0) + 1
        lines += [f"- {records[0]['device']}; torch {records[0]['torch']}, triton {records[0]['triton']}, "
                  f"CUDA {records[0]['cuda']}",
                  "- rows: " + ", ".join(f"{n} {s}" for s, n in sorted(statuses.items())), "",
                  report.summary_table(records) if csv_paths[0].name == "gpu.csv"
                  else "No GPU here: no throughput; the CPU tables are in bench.md."]
    else:
        lines.append("- the benchmark wrote no rows")
    sweep_tables = out / "tile_sweep.md"
    if sweep_tables.exists():
        lines += ["", sweep_tables.read_text().rstrip()]
    summary = "\n".join(lines)
    (out / "summary.md").write_text(summary + "\n")
    print(summary)
    return 0 if tests_ok and bench_code == 0 and sweep_code == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
