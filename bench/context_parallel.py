"""Context-parallel attention: one rank's kernel work per ring step, measured, and a projection of
step time and efficiency for P = 2 to 64 ranks and sequences up to 1M tokens.

With a CUDA GPU: the kernels' forward and backward on one (query block, key block) pair of S / P
tokens each (B=1, Hq=32, Hkv=8, D=128, bf16), the work of one ring step, timed with
`triton.testing.do_bench`. The projection then takes a ring step as the larger of that time and
the time to send one K/V block (forward) or K/V with their float32 gradients (backward) over the
link, since the two overlap. NVLink is assumed within 8 ranks and InfiniBand beyond (stated
bandwidths below). Efficiency is the kernel time over the step time. **This is a projection from
measured kernel time and stated bandwidths, not a multi-GPU measurement.**

Without one: the communication-volume model per method (bytes each rank sends per attention
layer, forward and backward), and a correctness check of all three methods on 2 gloo ranks
through the interpreter. It says that time needs a GPU.

    python -m bench.context_parallel
"""
from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from fused_attn import _launch  # noqa: E402
from fused_attn._launch import AttentionParams  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
HEADS_Q, HEADS_KV, HEAD_DIM, ELEMENT = 32, 8, 128, 2  # bf16
RANKS = (2, 4, 8, 16, 32, 64)
SEQS = (131072, 262144, 524288, 1048576)
# Per-GPU, per-direction link bandwidths in GB/s (vendor figures): NVLink 4 through NVSwitch on
# H100 / H200 nodes of 8, and one 400 Gb/s InfiniBand NDR port per GPU between nodes.
NVLINK_GBS, INFINIBAND_GBS, GPUS_PER_NODE = 450.0, 50.0, 8
MEASURED_BLOCKS = (2048, 4096, 8192, 16384, 32768)


def volume_bytes(method: str, seq: int, ranks: int, batch: int = 1) -> tuple[float, float]:
    """(forward, backward) bytes one rank sends per attention layer. K/V of the whole sequence are
    `kv` bytes; a rank's share of q, k, v, o is `kv / ranks` scaled by its heads."""
    kv = 2 * batch * HEADS_KV * seq * HEAD_DIM * ELEMENT
    q_or_o = batch * HEADS_Q * seq * HEAD_DIM * ELEMENT
    if method == "ring":  # P-1 K/V blocks forward; P moves of K/V with float32 dK/dV backward
        block = kv / ranks
        return (ranks - 1) * block, ranks * (block + 2 * block)
    if method == "allgather":  # all-gather K/V forward; reduce-scatter of dK/dV (their dtype) backward
        share = (ranks - 1) / ranks
        return share * kv, share * kv
    # ulysses: all-to-all of q, k, v and o forward; of do, dq, dk and dv backward (the lse is small)
    share = (ranks - 1) / ranks / ranks
    return share * (kv + 2 * q_or_o), share * (kv + 2 * q_or_o)


def volume_table() -> str:
    lines = ["| method | S | P | forward MiB / rank / layer | backward MiB / rank / layer |", "|---|---|---|---|---|"]
    for method in ("ring", "allgather", "ulysses"):
        for seq in (131072, 1048576):
            for ranks in (8, 64):
                fwd, bwd = volume_bytes(method, seq, ranks)
                lines.append(f"| {method} | {seq} | {ranks} | {fwd / 2**20:,.0f} | {bwd / 2**20:,.0f} |")
    return "\n".join(lines)


def time_block(n: int, warmup_ms: float, rep_ms: float) -> tuple[float, float]:
    """(forward ms, backward ms) of the kernels on one full (n-query, n-key) block."""
    import triton.testing

    q = torch.randn(1, HEADS_Q, n, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, HEADS_KV, n, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    params = AttentionParams(scale=HEAD_DIM ** -0.5)
    o, lse = _launch.attention_forward(q, k, v, params)
    do = torch.randn_like(o)
    forward = triton.testing.do_bench(lambda: _launch.attention_forward(q, k, v, params), warmup=warmup_ms,
                                      rep=rep_ms, return_mode="median")
    backward = triton.testing.do_bench(lambda: _launch.attention_backward(do, q, k, v, o, lse, params),
                                       warmup=warmup_ms, rep=rep_ms, return_mode="median")
    return forward, backward


def block_time(measured: dict[int, tuple[float, float]], n: int) -> tuple[float, float]:
    """Kernel time of an n x n block: measured, or scaled from the largest measured block by n^2."""
    if n in measured:
        return measured[n]
    largest = max(measured)
    factor = (n / largest) ** 2
    return measured[largest][0] * factor, measured[largest][1] * factor


def projection(measured: dict[int, tuple[float, float]], causal: bool) -> str:
    lines = ["| S | P | block | link | kernel ms / step fwd, bwd | send ms / step fwd, bwd | projected layer ms fwd+bwd "
             "| efficiency |", "|---|---|---|---|---|---|---|---|"]
    for seq in SEQS:
        for ranks in RANKS:
            n = seq // ranks
            forward, backward = block_time(measured, n)
            if causal:  # zigzag: every rank computes half of each step's pairs
                forward, backward = forward / 2, backward / 2
            link = NVLINK_GBS if ranks <= GPUS_PER_NODE else INFINIBAND_GBS
            kv_block = 2 * HEADS_KV * n * HEAD_DIM * ELEMENT
            send_fwd = kv_block / (link * 1e6)
            send_bwd = 3 * kv_block / (link * 1e6)  # K/V and their float32 gradients
            step_fwd, step_bwd = max(forward, send_fwd), max(backward, send_bwd)
            total = ranks * (step_fwd + step_bwd)
            efficiency = (forward + backward) / (step_fwd + step_bwd)
            lines.append(f"| {seq} | {ranks} | {n} | {'NVLink' if ranks <= GPUS_PER_NODE else 'IB'} | "
                         f"{forward:.2f}, {backward:.2f} | {send_fwd:.2f}, {send_bwd:.2f} | {total:,.1f} | "
                         f"{efficiency:.0%} |")
    return "\n".join(lines)


def check_on_two_ranks() -> str:
    """One case per method on 2 gloo ranks (tests/distributed_worker.py, --suite quick)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    ranks = [subprocess.Popen([sys.executable, "-m", "tests.distributed_worker", "--world", "2", "--rank", str(r),
                               "--port", str(port), "--suite", "quick"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for r in range(2)]
    outputs = []
    for process in ranks:
        try:
            outputs.append(process.communicate(timeout=600)[0])
        except subprocess.TimeoutExpired:
            for p in ranks:
                p.kill()
            return "timed out (a hang?)"
    if any(p.returncode for p in ranks):
        return "FAILED:\n" + outputs[0][-2000:]
    return "\n".join(line for line in outputs[0].splitlines() if ": ok " in line)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.context_parallel", description=__doc__.split("\n\n")[0])
    parser.add_argument("--warmup-ms", type=float, default=25.0)
    parser.add_argument("--rep-ms", type=float, default=100.0)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    print("# Context-parallel attention\n")
    print(f"Hq={HEADS_Q}, Hkv={HEADS_KV}, D={HEAD_DIM}, bf16, B=1.\n")
    print("## Communication volume per rank and attention layer (model)\n")
    print(volume_table() + "\n")
    if torch.cuda.is_available():
        print(f"## One ring step's kernel work on {torch.cuda.get_device_name()} (measured)\n")
        measured = {}
        lines = ["| block (queries = keys) | forward ms | backward ms |", "|---|---|---|"]
        for n in MEASURED_BLOCKS:
            try:
                measured[n] = time_block(n, args.warmup_ms, args.rep_ms)
            except torch.OutOfMemoryError:
                break
            lines.append(f"| {n} | {measured[n][0]:.3f} | {measured[n][1]:.3f} |")
        print("\n".join(lines) + "\n")
        print(f"## Projection, causal zigzag ring (NVLink {NVLINK_GBS:.0f} GB/s up to {GPUS_PER_NODE} ranks, "
              f"InfiniBand {INFINIBAND_GBS:.0f} GB/s beyond; blocks past {max(measured)} scaled by n^2)\n")
        print("**A projection from measured kernel time and stated link bandwidths, not a multi-GPU "
              "measurement.**\n")
        print(projection(measured, causal=True))
    else:
        print("**Time needs a GPU and is not reported here**: the kernel time per ring step and the "
              "projection are measured and computed on one.\n")
        print("## Correctness on 2 gloo ranks (interpreter), against the float64 reference\n")
        print(check_on_two_ranks())
    print(f"\nDone in {time.perf_counter() - start:.0f} s.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
