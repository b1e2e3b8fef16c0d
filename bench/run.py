"""Microbenchmark: fused_attn side by side with torch SDPA and the naive reference.

With a CUDA GPU: forward and forward+backward TFLOP/s and peak memory at B * S = 16k tokens,
H * D = 2048 (the FlashAttention papers' setting), each provider's ratio to fused_attn in the
same run. Without one: the kernels run through the Triton interpreter at small sizes, are
checked against the float64 reference, and the memory saved for backward is measured for
each provider across sequence lengths (this does not depend on the device). Throughput
needs a GPU and is not reported on CPU.

    python -m bench.run            # whatever this machine has
    python -m bench.run --quick    # fewer sizes
"""
from __future__ import annotations

import argparse
import math
import os
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch.nn.functional as F  # noqa: E402

import fused_attn  # noqa: E402
from fused_attn import reference  # noqa: E402


def attention_flops(batch: int, heads: int, seq_q: int, seq_k: int, head_dim: int, causal: bool,
                    mode: str) -> float:
    """4 * B * H * (visible pairs) * D for the forward; backward is 2.5x that."""
    if causal:  # exact count of visible pairs under bottom-right alignment
        pairs = sum(max(0, min(seq_k, i + 1 + seq_k - seq_q)) for i in range(seq_q))
    else:
        pairs = seq_q * seq_k
    forward = 4.0 * batch * heads * pairs * head_dim
    return {"fwd": forward, "bwd": 2.5 * forward, "fwd+bwd": 3.5 * forward}[mode]


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> torch.Tensor:
    # torch's is_causal is top-left aligned; with Sq == Sk (as here) it equals fused_attn's.
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal)


def naive(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> torch.Tensor:
    return reference.attention(q, k, v, causal=causal)


def fused(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> torch.Tensor:
    return fused_attn.attention(q, k, v, causal=causal)


PROVIDERS = {"fused_attn": fused, "torch_sdpa": sdpa, "naive": naive}


def saved_bytes(fn, q, k, v, causal: bool) -> int:
    """Bytes of the tensors autograd keeps for backward (distinct storages counted once)."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(*leaves, causal)
    inputs = {t.untyped_storage().data_ptr() for t in leaves}
    return sum(n for ptr, n in storages.items() if ptr not in inputs)


def run_gpu(quick: bool) -> None:
    import triton.testing

    props = torch.cuda.get_device_properties(0)
    print(f"# fused_attn benchmark on {props.name}, torch {torch.__version__}, "
          f"triton {__import__('triton').__version__}\n")
    print("| mode | causal | D | seq | provider | ms | TFLOP/s | speed vs fused_attn | peak MiB |")
    print("|---|---|---|---|---|---|---|---|---|")
    seqs = [1024, 4096, 16384] if quick else [512, 1024, 2048, 4096, 8192, 16384]
    for head_dim in (64, 128):
        heads = 2048 // head_dim
        for causal in (False, True):
            for mode in ("fwd", "fwd+bwd"):
                for seq in seqs:
                    batch = max(1, 16384 // seq)
                    shape = (batch, heads, seq, head_dim)
                    q, k, v = (torch.randn(shape, device="cuda", dtype=torch.bfloat16) for _ in range(3))
                    do = torch.randn_like(q)
                    flops = attention_flops(batch, heads, seq, seq, head_dim, causal, mode)
                    times: dict[str, float] = {}
                    for name, fn in PROVIDERS.items():
                        if name == "naive" and seq > 4096:
                            print(f"| {mode} | {causal} | {head_dim} | {seq} | {name} | skipped: S x S scores "
                                  "would not fit | | | |")
                            continue
                        leaves = [t.requires_grad_(mode != "fwd") for t in (q, k, v)]

                        def step() -> None:
                            o = fn(*leaves, causal)
                            if mode != "fwd":
                                o.backward(do)

                        try:
                            torch.cuda.reset_peak_memory_stats()
                            base = torch.cuda.memory_allocated()
                            ms = triton.testing.do_bench(step, warmup=25, rep=100)
                            peak = (torch.cuda.max_memory_allocated() - base) / 2**20
                        except torch.OutOfMemoryError:
                            print(f"| {mode} | {causal} | {head_dim} | {seq} | {name} | OOM | | | |")
                            torch.cuda.empty_cache()
                            continue
                        times[name] = ms
                        ratio = times["fused_attn"] / ms if "fused_attn" in times else float("nan")
                        print(f"| {mode} | {causal} | {head_dim} | {seq} | {name} | {ms:.3f} | "
                              f"{flops / ms / 1e9:.1f} | {ratio:.2f}x | {peak:.0f} |", flush=True)
                        for t in leaves:
                            t.grad = None


def run_cpu(quick: bool) -> None:
    print("# fused_attn on a machine without a GPU\n")
    print("No CUDA device: the Triton kernels run through the interpreter (NumPy), so this run "
          "checks correctness and measures memory. Throughput (TFLOP/s) needs a GPU and is not "
          "reported here.\n")
    print("## Correctness against the float64 reference (small sizes, interpreter)\n")
    print("| shape (B, Hq, Hkv, Sq, Sk, D) | causal | dtype | max err fused | max err torch same dtype |")
    print("|---|---|---|---|---|")
    gen = torch.Generator().manual_seed(0)
    for (b, hq, hkv, sq, sk, d), causal, dtype in [
        ((1, 4, 2, 97, 97, 64), True, torch.float16),
        ((1, 2, 2, 200, 77, 80), True, torch.bfloat16),
        ((2, 2, 1, 33, 120, 40), False, torch.float32),
    ]:
        q = torch.randn(b, hq, sq, d, generator=gen).to(dtype)
        k = torch.randn(b, hkv, sk, d, generator=gen).to(dtype)
        v = torch.randn(b, hkv, sk, d, generator=gen).to(dtype)
        golden = reference.attention(q.double(), k.double(), v.double(), causal=causal)
        err = (fused_attn.attention(q, k, v, causal=causal).double() - golden).abs().max().item()
        plain = (reference.attention(q, k, v, causal=causal).double() - golden).abs().max().item()
        print(f"| {(b, hq, hkv, sq, sk, d)} | {causal} | {str(dtype)[6:]} | {err:.2e} | {plain:.2e} |")

    print("\n## Memory saved for backward (bytes beyond q, k, v; B=1, H=8, D=64, fp16, causal)\n")
    seqs = [256, 512, 1024] if quick else [256, 512, 1024, 2048, 4096]
    print("| seq | fused_attn | naive reference | torch SDPA (CPU default backend) | naive / fused |")
    print("|---|---|---|---|---|")
    for seq in seqs:
        q, k, v = (torch.randn(1, 8, seq, 64, dtype=torch.float16) for _ in range(3))
        # Saving happens in the forward; fused_attn's forward runs its kernel, so keep it small.
        fused_bytes = saved_bytes(fused, q, k, v, True) if seq <= 1024 else _fused_saved_formula(q, v)
        naive_bytes = saved_bytes(naive, q, k, v, True)
        sdpa_bytes = saved_bytes(sdpa, q, k, v, True)
        print(f"| {seq} | {fused_bytes:,} | {naive_bytes:,} | {sdpa_bytes:,} | {naive_bytes / fused_bytes:.1f}x |",
              flush=True)
    print("\nfused_attn keeps o and the float32 lse: O(S). The naive path keeps S x S scores and "
          "probabilities: O(S^2).")


def _fused_saved_formula(q: torch.Tensor, v: torch.Tensor) -> int:
    """o (B, H, S, Dv) in the input dtype plus lse (B, H, S) float32: what the forward saves
    (measured at the shorter lengths above; computed here to skip minutes of interpreter time)."""
    b, h, s, _ = q.shape
    return b * h * s * v.shape[-1] * v.element_size() + b * h * s * 4


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer sizes")
    args = parser.parse_args(argv)
    if torch.cuda.is_available():
        run_gpu(args.quick)
    else:
        run_cpu(args.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
