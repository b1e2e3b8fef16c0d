"""One rank of the context-parallel tests (tests/test_distributed.py starts several, gloo on CPU).

    python -m tests.distributed_worker --world 2 --rank 0 --port 29500 --suite grid

Each rank builds the same full inputs from one seed, runs every case of its suite on its shard,
and compares o, lse and dq, dk, dv (and the sinks' gradient, summed over ranks) with the float64
reference on the whole sequence under FlashAttention's rule. It prints one line per case and exits
non-zero on the first failure."""
from __future__ import annotations

import argparse
import datetime
import os
import sys
import traceback

os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import fused_attn.distributed as fad  # noqa: E402
from fused_attn import reference  # noqa: E402

FLOOR = {torch.float32: 1e-6, torch.bfloat16: 1e-3, torch.float16: 1e-4}


def grid_cases(world: int) -> list[dict]:
    """Every method x layout x causal, windows, and sinks with softcap in bf16 on 2 ranks; on 4
    ranks (slower under the interpreter) one case per method."""
    heads = {2: (4, 2), 4: (8, 4)}[world]
    if world == 4:
        return [dict(method="ring", layout="zigzag", causal=True, heads=heads),
                dict(method="allgather", layout="contiguous", causal=True, window=(5, 0), heads=heads, packed=True),
                dict(method="ulysses", layout="zigzag", causal=True, sinks=True, heads=heads, dtype=torch.bfloat16)]
    cases = []
    for method in fad.METHODS:
        for layout in fad.LAYOUTS:
            for causal in (False, True):
                cases.append(dict(method=method, layout=layout, causal=causal, heads=heads))
    for method in fad.METHODS:
        cases.append(dict(method=method, layout="zigzag", causal=True, window=(5, 0), heads=heads))
        cases.append(dict(method=method, layout="contiguous", causal=False, window=(3, 4), heads=heads))
    for method in fad.METHODS:
        cases.append(dict(method=method, layout="zigzag", causal=True, sinks=True, softcap=20.0, heads=heads,
                          dtype=torch.bfloat16))
    # Packed sequences whose boundaries fall inside and across the ranks' pieces (all-gather only).
    cases.append(dict(method="allgather", layout="contiguous", causal=True, heads=heads, packed=True))
    cases.append(dict(method="allgather", layout="zigzag", causal=False, window=(2, 3), heads=heads, packed=True,
                      sinks=True))
    return cases


def packed_bounds(seq: int) -> list[int]:
    """Three sequences of uneven lengths that cross the pieces' edges (and a one-token one)."""
    return [0, seq // 3 - 1, seq // 3, seq - 4, seq]


def check(name: str, got: torch.Tensor, golden: torch.Tensor, plain: torch.Tensor, factor: float,
          dtype: torch.dtype) -> None:
    finite = torch.isfinite(golden)
    assert torch.equal(torch.isfinite(got), finite), f"{name}: infinities differ"
    err = (got.double() - golden)[finite].abs().max().item()
    plain_err = (plain.double() - golden)[finite].abs().max().item()
    bound = factor * plain_err + FLOOR[dtype] * max(1.0, golden[finite].abs().max().item())
    assert err <= bound, f"{name}: error {err:.3e} > {factor} x PyTorch's {plain_err:.3e} + floor"


def run_case(case: dict, group: dist.ProcessGroup | None = None) -> None:
    """One case on `group` (default: the world): the inputs are sharded over its ranks."""
    world = dist.get_world_size(group)
    dtype = case.get("dtype", torch.float32)
    heads_q, heads_kv = case["heads"]
    seq_local = 7 if case["layout"] == "contiguous" else 6
    seq = seq_local * world
    gen = torch.Generator().manual_seed(0)
    full = [torch.randn(2, h, seq, 16, generator=gen) for h in (heads_q, heads_kv, heads_kv)]
    do_full = torch.randn(2, heads_q, seq, 16, generator=gen)
    sinks = torch.randn(heads_q, generator=gen) + 1 if case.get("sinks") else None
    options = dict(causal=case["causal"], window=case.get("window"), softcap=case.get("softcap", 0.0))
    shard = lambda t: fad.shard_sequence(t, group=group, layout=case["layout"])  # noqa: E731

    cu_seqlens = None
    if case.get("packed"):  # one row of packed sequences
        full = [t[:1] for t in full]
        do_full = do_full[:1]
        cu_seqlens = torch.tensor(packed_bounds(seq), dtype=torch.int32)
    leaves = [shard(t).to(dtype).requires_grad_() for t in full]
    sink_leaf = None if sinks is None else sinks.clone().requires_grad_()
    o, lse = fad.context_parallel_attention(*leaves, group=group, method=case["method"], layout=case["layout"],
                                            sinks=sink_leaf, cu_seqlens=cu_seqlens, return_lse=True, **options)
    if case.get("dtype") == torch.bfloat16:  # the same call again gives the same bits
        again = fad.context_parallel_attention(*leaves, group=group, method=case["method"], layout=case["layout"],
                                               sinks=sink_leaf, cu_seqlens=cu_seqlens, return_lse=True, **options)
        assert torch.equal(o, again[0]) and torch.equal(lse, again[1]), "not deterministic"
    (o.float() * shard(do_full)).sum().backward()
    mine = [o, lse] + [t.grad for t in leaves]
    dsinks = None
    if sink_leaf is not None:  # each rank holds its queries' share: the whole is the sum
        dsinks = sink_leaf.grad.clone()
        dist.all_reduce(dsinks, group=group)

    results = {}
    for kind, cast in (("golden", torch.float64), ("plain", dtype)):
        ref_leaves = [t.to(cast).requires_grad_() for t in full]
        ref_sinks = None if sinks is None else sinks.to(cast).requires_grad_()
        if cu_seqlens is None:
            ro, rlse = reference.attention(*ref_leaves, sinks=ref_sinks, return_lse=True, **options)
        else:  # the packed reference on (total, H, D), back to (1, H, total, D)
            ro, rlse = reference.attention_varlen(*(t[0].transpose(0, 1) for t in ref_leaves), cu_seqlens, cu_seqlens,
                                                  sinks=ref_sinks, return_lse=True, **options)
            ro, rlse = ro.transpose(0, 1)[None], rlse[None]
        (ro * do_full.to(cast)).sum().backward()
        results[kind] = [shard(ro.detach()), shard(rlse.detach())] + [shard(t.grad) for t in ref_leaves]
        if ref_sinks is not None:
            results[kind].append(ref_sinks.grad)
    if dsinks is not None:
        mine.append(dsinks)
    for i, name in enumerate(("o", "lse", "dq", "dk", "dv", "dsinks")[:len(mine)]):
        check(name, mine[i].detach(), results["golden"][i], results["plain"][i], 2.0 if i < 2 else 3.0, dtype)


def bad_calls(world: int, rank: int) -> None:
    """Each must raise the same ValueError on every rank (and never hang)."""
    q = torch.randn(1, 3, 4, 16)
    k = v = torch.randn(1, 3, 4, 16)
    expect = [
        (lambda: fad.context_parallel_attention(q, k, v, method="ulysses"), "divide by"),
        (lambda: fad.context_parallel_attention(q, k, v, method="ring", window=(2, 1), causal=True), "window"),
        (lambda: fad.shard_sequence(torch.randn(1, 1, 2 * world + 1, 4), layout="contiguous"), "equal parts"),
        (lambda: fad.context_parallel_attention(q, k, v, method="sideways"), "method"),
        (lambda: fad.context_parallel_attention(q, k, v, method="ring",
                                                cu_seqlens=torch.tensor([0, 8], dtype=torch.int32)), "allgather"),
        (lambda: fad.context_parallel_attention(q, k, v, method="allgather",
                                                cu_seqlens=torch.tensor([0, 3, 5], dtype=torch.int32)), "rise from 0"),
        # rank 0 holds a longer piece than the others: caught before any attention collective
        (lambda: fad.context_parallel_attention(*(torch.randn(1, 2, 4 + (rank == 0), 16) for _ in range(3))),
         "disagree"),
    ]
    for call, words in expect:
        try:
            call()
        except ValueError as error:
            assert words in str(error), str(error)
        else:
            raise AssertionError(f"no ValueError for a call expected to mention {words!r}")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--world", type=int, required=True)
    parser.add_argument("--rank", type=int, required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--suite", choices=("grid", "quick", "errors"), required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{args.port}", rank=args.rank,
                            world_size=args.world, timeout=datetime.timedelta(seconds=120))
    try:
        if args.suite == "errors":
            bad_calls(args.world, args.rank)
            print(f"rank {args.rank}: errors ok", flush=True)
        else:
            cases = grid_cases(args.world)
            if args.suite == "quick":  # one causal zigzag case per method (bench.context_parallel)
                cases = [case for case in cases if case["layout"] == "zigzag" and case["causal"]
                         and "window" not in case and not case.get("sinks")]
            for case in cases:
                run_case(case)
                print(f"rank {args.rank}: ok {case}", flush=True)
            if args.suite == "grid" and args.world == 4:
                # Two groups of two ranks each run their own ring: group ranks are not global ranks.
                halves = [dist.new_group([0, 1]), dist.new_group([2, 3])]
                case = dict(method="ring", layout="zigzag", causal=True, heads=(4, 2), sinks=True)
                run_case(case, group=halves[args.rank // 2])
                print(f"rank {args.rank}: ok {case} on a subgroup of 2", flush=True)
    except Exception:  # noqa: BLE001 - report and fail this rank
        traceback.print_exc()
        return 1
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
