"""Benchmark: fused_attn side by side with torch SDPA (every backend), FlexAttention, the
flash-attn package and the naive reference, in one run.

With a CUDA GPU: forward, backward and forward+backward; causal and not; D 64 and 128; bf16
and fp16; S = 512 to 32k at B*S = 16k tokens and H*D = 2048 (the FlashAttention-3 paper's
setting), plus 64k and 128k for memory. Median time of `triton.testing.do_bench` over rotated
inputs, TFLOP/s, peak memory above the inputs, bytes saved for backward, and every provider's
speed relative to fused_attn in the same run.

Without one: the kernels run through the Triton interpreter; they are checked against the float64
reference at small sizes, and the memory that does not depend on the device (peak allocation and
bytes saved for backward) is measured for fused_attn, the naive reference and SDPA's math backend
across sequence lengths. Throughput needs a GPU and is not reported.

Either way the rows are appended to a CSV under bench/results/ (with card, date and versions),
PNG plots are made from it, and markdown tables go to stdout (a progress bar to stderr).

    python -m bench.run                    # whatever this machine has
    python -m bench.run --quick            # fewer sizes
    python -m bench.run --out /tmp/b       # CSV and plots somewhere else
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

if not torch.cuda.is_available():  # before triton is imported, so fused_attn's kernels interpret
    os.environ.setdefault("TRITON_INTERPRET", "1")

import fused_attn  # noqa: E402
from bench import report  # noqa: E402
from bench.measure import MODES  # noqa: E402
from bench.providers import Case, providers_named  # noqa: E402
from bench.runner import MEMORY_ONLY_SEQS, TIMED_SEQS, fa3_cases, run_cases  # noqa: E402
from fused_attn import reference  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
CPU_PROVIDERS = ["fused_attn", "naive", "sdpa_math", "sdpa_flash"]
# Under the interpreter every tile iteration costs Python time, so the CPU run uses big tiles;
# what is allocated does not depend on the tile size.
_CPU_TILE = fused_attn.KernelConfig(512, 512, 4, 1)
CPU_MEMORY_CONFIGS = fused_attn.AttentionConfigs(_CPU_TILE, _CPU_TILE, _CPU_TILE)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer sizes (GPU: S 1k/4k/16k, no 128k; CPU: S <= 2048)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for the CSV and plots (default bench/results)")
    parser.add_argument("--no-save", action="store_true", help="print tables only; write no CSV or plots")
    parser.add_argument("--providers", nargs="+", help="subset of providers (default: all)")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=["bf16", "fp16"])
    parser.add_argument("--head-dims", nargs="+", type=int, default=[128, 64])
    parser.add_argument("--seqs", nargs="+", type=int, help="timed sequence lengths (default 512 to 32768)")
    parser.add_argument("--memory-seqs", nargs="*", type=int, help="memory-only lengths (default 65536 131072)")
    parser.add_argument("--warmup-ms", type=float, default=25.0)
    parser.add_argument("--rep-ms", type=float, default=100.0)
    parser.add_argument("--budget-s", type=float, help="stop measuring after this many seconds; "
                        "the remaining cases are listed as skipped")
    args = parser.parse_args(argv)
    return args


def run_gpu(args: argparse.Namespace) -> list[dict[str, object]]:
    seqs = args.seqs or ([1024, 4096, 16384] if args.quick else list(TIMED_SEQS))
    memory_seqs = args.memory_seqs if args.memory_seqs is not None else (
        [65536] if args.quick else list(MEMORY_ONLY_SEQS))
    cases = fa3_cases(modes=args.modes, dtypes=[DTYPES[d] for d in args.dtypes], head_dims=args.head_dims,
                      seqs=seqs, memory_only_seqs=memory_seqs)
    providers = providers_named(args.providers)
    meta = report.run_metadata("cuda")
    print(f"# fused_attn benchmark: {meta['device']}, {meta['date']}\n")
    print(f"torch {meta['torch']}, triton {meta['triton']}, CUDA {meta['cuda']}. {len(cases)} cases x "
          f"{len(providers)} providers; B*S = 16k tokens, H*D = 2048; median of do_bench over rotated inputs.\n",
          flush=True)
    return _measure(args, meta, cases, providers, "gpu", warmup_ms=args.warmup_ms, rep_ms=args.rep_ms,
                    budget_s=args.budget_s)


def check_correctness() -> str:
    """Small cases through the interpreter, every output and gradient against float64, with the
    FlashAttention rule: the error at most 2x (o) or 3x (gradients) PyTorch's own in that dtype."""
    gen = torch.Generator().manual_seed(0)
    lines = ["| shape (B, Hq, Hkv, Sq, Sk, D) | causal | dtype | worst error / PyTorch's (o, dq, dk, dv) | limit | result |",
             "|---|---|---|---|---|---|"]
    for (b, hq, hkv, sq, sk, d), causal, dtype in [
        ((1, 4, 2, 97, 97, 64), True, torch.float16),
        ((1, 2, 2, 200, 77, 80), True, torch.bfloat16),
        ((2, 2, 1, 33, 120, 40), False, torch.float32),
    ]:
        q = torch.randn(b, hq, sq, d, generator=gen).to(dtype)
        k = torch.randn(b, hkv, sk, d, generator=gen).to(dtype)
        v = torch.randn(b, hkv, sk, d, generator=gen).to(dtype)
        do = torch.randn(b, hq, sq, d, generator=gen).to(dtype)
        results = {}
        for name, fn, cast in (("golden", reference.attention, torch.float64), ("fused", fused_attn.attention, dtype),
                               ("torch", reference.attention, dtype)):
            leaves = [t.to(cast, copy=True).requires_grad_() for t in (q, k, v)]
            o = fn(*leaves, causal=causal)
            o.backward(do.to(cast))
            results[name] = [o.detach()] + [t.grad for t in leaves]
        ratios = []
        for fused, plain, golden in zip(results["fused"], results["torch"], results["golden"]):
            fused_err = (fused.double() - golden).abs().max().item()
            plain_err = (plain.double() - golden).abs().max().item()
            ratios.append(fused_err / max(plain_err, 1e-6))
        passed = ratios[0] <= 2 and max(ratios[1:]) <= 3
        lines.append(f"| {(b, hq, hkv, sq, sk, d)} | {causal} | {str(dtype)[6:]} | "
                     f"{', '.join(f'{r:.2f}' for r in ratios)} | 2, 3, 3, 3 | {'pass' if passed else 'FAIL'} |")
    return "\n".join(lines)


def run_cpu(args: argparse.Namespace) -> list[dict[str, object]]:
    meta = report.run_metadata("cpu")
    print("# fused_attn on a machine without a GPU\n")
    print(f"{meta['device']}; torch {meta['torch']}, triton {meta['triton']}, {meta['date']}.\n")
    print("There is no CUDA device, so the Triton kernels run through the interpreter (NumPy). This run "
          "checks correctness and measures memory, which does not depend on the device. **Throughput "
          "(TFLOP/s) needs a GPU and is not reported here**; run the same command on a machine with one.\n")
    print("## Correctness against the float64 reference (small sizes, interpreter)\n")
    print(check_correctness() + "\n", flush=True)

    seqs = args.seqs or ([256, 512, 1024, 2048] if args.quick else [512, 1024, 2048, 4096, 8192])
    cases = [Case("fwd+bwd", True, torch.float32, 1, 2, seq, 64, timed=False) for seq in seqs]
    providers = providers_named(args.providers or CPU_PROVIDERS)
    with fused_attn.override_configs(CPU_MEMORY_CONFIGS):
        return _measure(args, meta, cases, providers, "cpu")


def _measure(args: argparse.Namespace, meta: dict[str, str], cases: list[Case], providers, prefix: str,
             **options) -> list[dict[str, object]]:
    """Run the cases, appending each case's rows to the CSV as soon as they exist (a killed run keeps
    what it measured); then read this run back, so tables and plots come from what was saved."""
    device = "cuda" if prefix == "gpu" else "cpu"
    if args.no_save:
        import dataclasses

        rows = run_cases(cases, providers, device, **options)
        return [{**meta, **dataclasses.asdict(r)} for r in rows]
    csv_path = args.out / f"{prefix}.csv"
    run_cases(cases, providers, device, on_case_done=lambda rows: report.append_csv(csv_path, meta, rows), **options)
    return [r for r in report.read_csv(csv_path) if r["run_id"] == meta["run_id"]]


def print_gpu_report(args: argparse.Namespace, records: list[dict[str, object]]) -> None:
    print("## Throughput: TFLOP/s (speed relative to fused_attn in this run)\n")
    print(report.throughput_table(records) + "\n")
    print("## Peak memory above the inputs, forward+backward\n")
    print(report.memory_table(records, "peak_bytes") + "\n")
    print("## Saved for backward (beyond q, k, v)\n")
    print(report.memory_table(records, "saved_bytes") + "\n")
    if not args.no_save:
        _plots(records, args.out, "gpu")
        print(f"Rows appended to {args.out / 'gpu.csv'}\n")
    print("## Summary\n")
    print(report.summary_table(records))


def print_cpu_report(args: argparse.Namespace, records: list[dict[str, object]]) -> None:
    first = records[0]
    print(f"## Memory, forward+backward, causal, float32, B={first['batch']}, H={first['heads']}, "
          f"D={first['head_dim']}\n")
    print("Peak allocation above the inputs (MiB):\n")
    print(report.memory_table(records, "peak_bytes") + "\n")
    print("Saved for backward, beyond q, k, v (MiB):\n")
    print(report.memory_table(records, "saved_bytes") + "\n")
    by = {(r["provider"], r["seq"]): r for r in records if r["status"] == "ok"}
    seqs = sorted({r["seq"] for r in records})
    for name in ("fused_attn", "naive", "sdpa_math"):
        first_row, last_row = by.get((name, seqs[0])), by.get((name, seqs[-1]))
        if first_row and last_row and first_row["peak_bytes"]:
            growth = last_row["peak_bytes"] / first_row["peak_bytes"]
            print(f"- {name}: peak grows {growth:,.1f}x from S={seqs[0]} to S={seqs[-1]} "
                  f"({seqs[-1] // seqs[0]}x longer)")
    print("\nfused_attn keeps o and the float32 lse, O(S); the naive path and SDPA's math backend keep "
          "S x S scores and probabilities, O(S^2).")
    if not args.no_save:
        print()
        _plots(records, args.out, "cpu")
        print(f"Rows appended to {args.out / 'cpu.csv'}")


def _plots(records: list[dict[str, object]], out: Path, prefix: str) -> None:
    try:
        for path in report.make_plots(records, out, prefix):
            print(f"Plot: {path}")
    except ImportError:
        print("No plots: matplotlib is not installed (pip install -e '.[bench]').")


def print_decode_section(args: argparse.Namespace) -> None:
    """One decoding case of `python -m bench.decode` (B=8, a 32k cache, dense and pages of 16): on a
    GPU timed against SDPA's backends, without one its bytes model."""
    from bench import decode

    print("\n## Decoding over a KV cache (full run: python -m bench.decode)\n")
    if torch.cuda.is_available():
        rows = decode.run_gpu((8,), (32768,), ("dense", "paged16"), args.warmup_ms, args.rep_ms)
        print(decode.gpu_table(rows))
    else:
        print("Time needs a GPU. What one step must read, and its lower bound at each card's peak bandwidth:\n")
        print(decode.bytes_model((8,), (32768,)))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    start = time.perf_counter()
    if torch.cuda.is_available():
        print_gpu_report(args, run_gpu(args))
    else:
        print_cpu_report(args, run_cpu(args))
    print_decode_section(args)
    print(f"\nDone in {time.perf_counter() - start:.0f} s.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
