"""Decoding benchmark: one generation step (one query per sequence) over a KV cache.

A decoding step is bound by memory bandwidth: its measure is how fast it reads the KV cache,
as a fraction of the card's peak bandwidth. Cases: B in {1, 8, 64}, cache lengths 1k to 128k,
Hq=32, Hkv=8, D=128, bf16; the cache dense, or paged with pages of 16 and 256 keys.

With a CUDA GPU, side by side in one run: fused_attn's `attention_with_kvcache` (default split
count), torch SDPA's backends on the dense cache (`enable_gqa`), FlexAttention (compiled) on the
dense cache, and flash-attn's `flash_attn_with_kvcache` when installed (dense, and paged where its
page size allows). Median time per step (`triton.testing.do_bench`), KV bytes read per second, the
fraction of the card's peak bandwidth (a table of vendor figures; unknown cards show none), and each
provider's speed relative to fused_attn. Rows go to bench/results/decode.csv, a plot to decode.png.

Without one: time needs a GPU. The run checks the kernels through the interpreter against the
float64 reference (dense and paged, split and not) and prints the bytes model: what one step must
read, what a kernel that reads k/v once per query head (no GQA packing) reads, and the time the
read takes at the peak bandwidth of common cards (a lower bound, not a measurement).

    python -m bench.decode             # whatever this machine has
    python -m bench.decode --quick     # B=8 and lengths 4k, 32k only
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch

if not torch.cuda.is_available():  # before triton is imported, so fused_attn's kernels interpret
    os.environ.setdefault("TRITON_INTERPRET", "1")

import fused_attn  # noqa: E402
from bench import report  # noqa: E402
from fused_attn import reference  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
BATCHES = (1, 8, 64)
CACHE_LENGTHS = (1024, 4096, 16384, 32768, 131072)
HEADS_Q, HEADS_KV, HEAD_DIM = 32, 8, 128
LAYOUTS = ("dense", "paged16", "paged256")
# Peak DRAM bandwidth in GB/s (vendor figures) by a substring of torch's device name.
PEAK_BANDWIDTH_GBS = {"H200": 4800, "H100 SXM": 3350, "H100 80GB HBM3": 3350, "H100 PCIe": 2000, "H100 NVL": 3900,
                      "GH200": 4000, "B200": 8000, "A100-SXM4-80GB": 2039, "A100 80GB PCIe": 1935,
                      "A100-SXM4-40GB": 1555, "A100-PCIE-40GB": 1555, "L40S": 864, "L40": 864, "L4": 300,
                      "A10G": 600, "A10": 600, "RTX 4090": 1008, "RTX 3090": 936, "RTX 5090": 1792, "T4": 320}
CSV_FIELDS = ("run_id", "date", "device", "torch", "triton", "provider", "layout", "batch", "cache_len", "status",
              "ms", "kv_bytes", "gbs", "bandwidth_fraction", "speed_vs_fused")


@dataclass
class DecodeRow:
    provider: str
    layout: str
    batch: int
    cache_len: int
    status: str  # "ok", or why not
    ms: float | None = None
    kv_bytes: int = 0
    gbs: float | None = None
    bandwidth_fraction: float | None = None
    speed_vs_fused: float | None = None


def kv_bytes(batch: int, cache_len: int, heads_kv: int = HEADS_KV, head_dim: int = HEAD_DIM, element_size: int = 2,
             times_read: int = 1) -> int:
    """Bytes of K and V one step must read: every cached key and value once (times_read: how often
    a kernel without GQA packing reads each, Hq / Hkv)."""
    return 2 * batch * heads_kv * cache_len * head_dim * element_size * times_read


def peak_bandwidth_gbs(device_name: str) -> float | None:
    for key, value in sorted(PEAK_BANDWIDTH_GBS.items(), key=lambda item: -len(item[0])):
        if key in device_name:
            return float(value)
    return None


@dataclass
class Step:
    """One decoding step's inputs: q (B, Hq, 1, D), the dense cache (B, Hkv, L, D) and its paged copy."""
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    seqlens: torch.Tensor
    paged: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]  # layout -> (k_pages, v_pages, block_table)


def make_step(batch: int, cache_len: int, device: str, dtype: torch.dtype = torch.bfloat16, layouts=LAYOUTS,
              heads_q: int = HEADS_Q, heads_kv: int = HEADS_KV, head_dim: int = HEAD_DIM, seed: int = 0) -> Step:
    gen = torch.Generator(device=device).manual_seed(seed)
    q = torch.randn(batch, heads_q, 1, head_dim, device=device, dtype=dtype, generator=gen)
    k = torch.randn(batch, heads_kv, cache_len, head_dim, device=device, dtype=dtype, generator=gen)
    v = torch.randn(batch, heads_kv, cache_len, head_dim, device=device, dtype=dtype, generator=gen)
    seqlens = torch.full((batch,), cache_len, dtype=torch.int32, device=device)
    paged = {}
    for layout in layouts:
        if layout == "dense":
            continue
        page = int(layout.removeprefix("paged"))
        pages_per_seq = -(-cache_len // page)
        table = torch.randperm(batch * pages_per_seq, device=device, generator=gen).view(batch, pages_per_seq)
        k_pages = torch.empty(batch * pages_per_seq, page, heads_kv, head_dim, device=device, dtype=dtype)
        v_pages = torch.empty_like(k_pages)
        padded = pages_per_seq * page
        for src, dst in ((k, k_pages), (v, v_pages)):
            full = torch.nn.functional.pad(src, (0, 0, 0, padded - cache_len))  # (B, Hkv, padded, D)
            dst[table.flatten()] = full.view(batch, heads_kv, pages_per_seq, page, head_dim).permute(
                0, 2, 3, 1, 4).reshape(-1, page, heads_kv, head_dim)
        paged[layout] = (k_pages, v_pages, table.to(torch.int32))
    return Step(q, k, v, seqlens, paged)


def providers(step: Step, layout: str) -> dict[str, Callable[[], object] | str]:
    """name -> a call computing the step, or why it cannot run here."""
    calls: dict[str, Callable[[], object] | str] = {}
    if layout == "dense":
        calls["fused_attn"] = lambda: fused_attn.attention_with_kvcache(step.q, step.k, step.v,
                                                                        cache_seqlens=step.seqlens)
    else:
        k_pages, v_pages, table = step.paged[layout]
        calls["fused_attn"] = lambda: fused_attn.attention_with_kvcache(step.q, k_pages, v_pages,
                                                                        cache_seqlens=step.seqlens, block_table=table)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    for name, backend in (("sdpa_flash", SDPBackend.FLASH_ATTENTION), ("sdpa_efficient", SDPBackend.EFFICIENT_ATTENTION),
                          ("sdpa_cudnn", SDPBackend.CUDNN_ATTENTION), ("sdpa_math", SDPBackend.MATH)):
        def sdpa(backend=backend):
            with sdpa_kernel(backend):
                return torch.nn.functional.scaled_dot_product_attention(step.q, step.k, step.v, enable_gqa=True)
        calls[f"{name} (dense)"] = sdpa
    try:
        from torch.nn.attention.flex_attention import flex_attention

        flex = torch.compile(flex_attention, dynamic=False)
        calls["flex (dense)"] = lambda: flex(step.q, step.k, step.v, enable_gqa=True)
    except Exception as exc:  # noqa: BLE001 - report why, keep going
        calls["flex (dense)"] = f"unavailable: {type(exc).__name__}"
    try:
        from flash_attn import flash_attn_with_kvcache  # type: ignore[import-not-found]
    except ImportError:
        calls["flash_attn"] = "flash-attn not installed"
    else:
        q = step.q.transpose(1, 2)  # (B, 1, Hq, D)
        if layout == "dense":
            kc, vc = step.k.transpose(1, 2), step.v.transpose(1, 2)
            calls["flash_attn"] = lambda: flash_attn_with_kvcache(q, kc, vc, cache_seqlens=step.seqlens)
        elif int(layout.removeprefix("paged")) % 256 == 0:
            k_pages, v_pages, table = step.paged[layout]
            calls["flash_attn"] = lambda: flash_attn_with_kvcache(q, k_pages, v_pages, cache_seqlens=step.seqlens,
                                                                  block_table=table)
        else:
            calls["flash_attn"] = "flash-attn pages must be multiples of 256 keys"
    return calls


def run_gpu(batches, lengths, layouts, warmup_ms: float, rep_ms: float) -> list[DecodeRow]:
    import triton.testing

    name = torch.cuda.get_device_name()
    peak = peak_bandwidth_gbs(name)
    rows: list[DecodeRow] = []
    for batch in batches:
        for cache_len in lengths:
            try:
                step = make_step(batch, cache_len, "cuda", layouts=layouts)
            except torch.OutOfMemoryError:
                rows += [DecodeRow("fused_attn", layout, batch, cache_len, "out of memory") for layout in layouts]
                continue
            expected = reference.attention(step.q.float(), step.k.float(), step.v.float())
            for layout in layouts:
                case_rows = []
                for provider, call in providers(step, layout).items():
                    row = DecodeRow(provider, layout, batch, cache_len, "ok", kv_bytes=kv_bytes(batch, cache_len))
                    if isinstance(call, str):
                        row.status = call
                    else:
                        try:
                            out = call()
                            if (out.float() - expected).abs().max().item() > 2e-2:
                                row.status = "wrong result"
                            else:
                                row.ms = triton.testing.do_bench(call, warmup=warmup_ms, rep=rep_ms,
                                                                 return_mode="median")
                        except Exception as exc:  # noqa: BLE001 - a provider that cannot run is a row
                            row.status = f"error: {type(exc).__name__}: {str(exc)[:80]}"
                    if row.ms:
                        row.gbs = row.kv_bytes / row.ms / 1e6
                        row.bandwidth_fraction = row.gbs / peak if peak else None
                    case_rows.append(row)
                fused = next((r for r in case_rows if r.provider == "fused_attn" and r.ms), None)
                for row in case_rows:
                    if fused and row.ms:
                        row.speed_vs_fused = fused.ms / row.ms
                rows += case_rows
                print(f"  B={batch} L={cache_len} {layout}: done", file=sys.stderr, flush=True)
            del step
            torch.cuda.empty_cache()
    return rows


def gpu_table(rows: list[DecodeRow]) -> str:
    lines = ["| layout | B | cache | provider | ms / step | GB/s | of peak | speed vs fused_attn |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r.status != "ok":
            lines.append(f"| {r.layout} | {r.batch} | {r.cache_len} | {r.provider} | {r.status} | | | |")
            continue
        fraction = f"{r.bandwidth_fraction:.0%}" if r.bandwidth_fraction is not None else "card unknown"
        lines.append(f"| {r.layout} | {r.batch} | {r.cache_len} | {r.provider} | {r.ms:.4f} | {r.gbs:,.0f} | "
                     f"{fraction} | {r.speed_vs_fused:.2f}x |")
    return "\n".join(lines)


def check_correctness() -> str:
    """Small decoding steps through the interpreter against float64, under FlashAttention's rule."""
    lines = ["| layout | B, Hq, Hkv, cache, D | splits | error / PyTorch's (o) | limit | result |",
             "|---|---|---|---|---|---|"]
    for layout, splits in (("dense", 1), ("dense", 3), ("paged16", 1), ("paged16", 4)):
        step = make_step(2, 97, "cpu", layouts=(layout,), heads_q=8, heads_kv=2, head_dim=64)
        if layout == "dense":
            o = fused_attn.attention_with_kvcache(step.q, step.k, step.v, cache_seqlens=step.seqlens,
                                                  num_splits=splits)
        else:
            k_pages, v_pages, table = step.paged[layout]
            o = fused_attn.attention_with_kvcache(step.q, k_pages, v_pages, cache_seqlens=step.seqlens,
                                                  block_table=table, num_splits=splits)
        golden = reference.attention(step.q.double(), step.k.double(), step.v.double())
        plain = reference.attention(step.q, step.k, step.v)
        ratio = (o.double() - golden).abs().max().item() / max((plain.double() - golden).abs().max().item(), 1e-3)
        lines.append(f"| {layout} | 2, 8, 2, 97, 64 | {splits} | {ratio:.2f} | 2 | {'pass' if ratio <= 2 else 'FAIL'} |")
    return "\n".join(lines)


def bytes_model(batches, lengths) -> str:
    cards = {"H200": 4800, "H100 SXM": 3350, "A100 80GB": 2039, "RTX 4090": 1008}
    lines = ["| B | cache | KV bytes read / step | without GQA packing (x Hq/Hkv) | "
             + " | ".join(f"lower bound on {c} (us)" for c in cards) + " |",
             "|---|---|---|---|" + "---|" * len(cards)]
    for batch in batches:
        for cache_len in lengths:
            once = kv_bytes(batch, cache_len)
            bounds = " | ".join(f"{once / (gbs * 1e3):,.1f}" for gbs in cards.values())
            lines.append(f"| {batch} | {cache_len} | {once / 2**20:,.1f} MiB | "
                         f"{kv_bytes(batch, cache_len, times_read=HEADS_Q // HEADS_KV) / 2**20:,.1f} MiB | {bounds} |")
    return "\n".join(lines)


def plot(rows: list[DecodeRow], path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, axes = plt.subplots(1, len(BATCHES), figsize=(5 * len(BATCHES), 4), squeeze=False)
    for ax, batch in zip(axes[0], BATCHES):
        for provider in sorted({r.provider for r in rows}):
            for layout in LAYOUTS:
                points = [(r.cache_len, r.gbs) for r in rows if r.provider == provider and r.layout == layout
                          and r.batch == batch and r.gbs]
                if points:
                    ax.plot(*zip(*points), marker="o", label=f"{provider} {layout}" if layout != "dense" or
                            "(dense)" not in provider else provider)
        ax.set_xscale("log", base=2)
        ax.set_title(f"B={batch}: KV cache read, GB/s")
        ax.set_xlabel("cache length")
    axes[0][0].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.decode", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="B=8, cache lengths 4k and 32k")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--no-save", action="store_true")
    parser.add_argument("--warmup-ms", type=float, default=25.0)
    parser.add_argument("--rep-ms", type=float, default=100.0)
    args = parser.parse_args(argv)
    batches, lengths = ((8,), (4096, 32768)) if args.quick else (BATCHES, CACHE_LENGTHS)
    start = time.perf_counter()
    if torch.cuda.is_available():
        meta = report.run_metadata("cuda")
        peak = peak_bandwidth_gbs(torch.cuda.get_device_name())
        print(f"# Decoding over a KV cache: {meta['device']}, {meta['date']}\n")
        print(f"torch {meta['torch']}, triton {meta['triton']}; Hq={HEADS_Q}, Hkv={HEADS_KV}, D={HEAD_DIM}, bf16, one "
              f"query per sequence; peak bandwidth {peak or 'unknown'} GB/s (vendor figure).\n", flush=True)
        rows = run_gpu(batches, lengths, LAYOUTS, args.warmup_ms, args.rep_ms)
        print(gpu_table(rows) + "\n")
        if not args.no_save:
            report.append_records(args.out / "decode.csv", CSV_FIELDS, ({**meta, **asdict(row)} for row in rows))
            path = plot(rows, args.out / "decode.png")
            print(f"Rows appended to {args.out / 'decode.csv'}" + (f"; plot {path}" if path else ""))
    else:
        meta = report.run_metadata("cpu")
        print("# Decoding over a KV cache, on a machine without a GPU\n")
        print(f"{meta['device']}; torch {meta['torch']}, triton {meta['triton']}, {meta['date']}.\n")
        print("**Time per step needs a GPU and is not reported here.** The kernels run through the Triton "
              "interpreter: this run checks them and prints what a step must read.\n")
        print("## Correctness against the float64 reference (interpreter)\n")
        print(check_correctness() + "\n")
        print(f"## Bytes model: Hq={HEADS_Q}, Hkv={HEADS_KV}, D={HEAD_DIM}, bf16\n")
        print("fused_attn packs the query heads of a group into one tile, so it reads each cached key and value "
              "once per step. A step cannot take less than its bytes over the card's peak bandwidth.\n")
        print(bytes_model(batches, lengths))
    print(f"\nDone in {time.perf_counter() - start:.0f} s.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
