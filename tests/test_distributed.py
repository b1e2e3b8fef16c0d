"""fused_attn.distributed: context-parallel attention over torch.distributed.

The multi-process tests start 2 and 4 ranks (gloo on CPU, the kernels through the interpreter;
each rank is `python -m tests.distributed_worker`) with a timeout, so a hang fails the test
instead of stalling the run. Each rank compares its o, lse and dq, dk, dv (and the sinks'
gradient) with the float64 reference on the whole sequence under FlashAttention's rule. The
single-process tests check the layouts and the band arithmetic exhaustively against brute force."""
from __future__ import annotations

import itertools
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fused_attn.distributed as fad
from fused_attn import reference

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT_S = 900


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_ranks(world: int, suite: str) -> list[str]:
    """Start `world` ranks of the worker; return their outputs. Fails (after killing every rank)
    when one exits non-zero or the whole takes longer than TIMEOUT_S."""
    port = _free_port()
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    ranks = [subprocess.Popen([sys.executable, "-m", "tests.distributed_worker", "--world", str(world), "--rank",
                               str(rank), "--port", str(port), "--suite", suite], cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for rank in range(world)]
    outputs = []
    try:
        for process in ranks:
            out, _ = process.communicate(timeout=TIMEOUT_S)
            outputs.append(out)
    except subprocess.TimeoutExpired:
        for process in ranks:
            process.kill()
        pytest.fail(f"the {world} ranks did not finish within {TIMEOUT_S} s (a hang?)")
    for rank, (process, out) in enumerate(zip(ranks, outputs)):
        assert process.returncode == 0, f"rank {rank} failed:\n{out[-4000:]}"
    return outputs


@pytest.mark.cpu_only(reason="gloo on CPU through the interpreter; the GPU path is NCCL")
@pytest.mark.parametrize("world", [2, 4])
def test_every_method_matches_the_whole_sequence_reference(world: int) -> None:
    outputs = _run_ranks(world, "grid")
    from tests.distributed_worker import grid_cases

    for out in outputs:  # on 4 ranks one more case: a ring on each of two subgroups
        assert out.count(": ok ") == len(grid_cases(world)) + (world == 4), out[-2000:]


@pytest.mark.cpu_only(reason="gloo on CPU through the interpreter")
def test_bad_input_raises_on_every_rank_without_a_hang() -> None:
    outputs = _run_ranks(2, "errors")
    assert all("errors ok" in out for out in outputs)


@pytest.mark.parametrize("layout", fad.LAYOUTS)
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_layouts_cover_the_sequence_once(layout: str, world: int) -> None:
    seq_local = 6
    seen = sorted(position for rank in range(world) for start, length in fad.chunk_ranges(seq_local, world, rank, layout)
                  for position in range(start, start + length))
    assert seen == list(range(seq_local * world))
    x = torch.arange(seq_local * world).view(1, 1, -1, 1)
    pieces = [torch.cat([x[:, :, s:s + n] for s, n in fad.chunk_ranges(seq_local, world, r, layout)], 2)
              for r in range(world)]
    assert torch.equal(fad._in_sequence_order(pieces, layout, 2), x)


def test_the_local_bands_equal_the_global_band() -> None:
    """_visible_block: for every chunk pair and window, the local call's band (bottom-right
    aligned, on the trimmed rows and keys) marks exactly the pairs the global band does."""
    for q_start, q_len, k_start, k_len in itertools.product((0, 3, 9), (1, 4), (0, 2, 8), (1, 5)):
        for left, right in itertools.product((-1, 0, 2, 7), (-1, 0, 1, 6)):
            rows = torch.arange(q_start, q_start + q_len)[:, None]
            cols = torch.arange(k_start, k_start + k_len)[None, :]
            expected = torch.ones(q_len, k_len, dtype=torch.bool)
            if left >= 0:
                expected &= cols >= rows - left
            if right >= 0:
                expected &= cols <= rows + right
            block = fad._visible_block(q_start, q_len, k_start, k_len, left, right)
            got = torch.zeros(q_len, k_len, dtype=torch.bool)
            if block is not None:
                assert block.window[0] >= -1 and block.window[1] >= -1
                local = reference.window_mask(block.row_hi - block.row_lo, block.key_hi - block.key_lo, block.window)
                got[block.row_lo:block.row_hi, block.key_lo:block.key_hi] = local
            assert torch.equal(got, expected), (q_start, q_len, k_start, k_len, left, right, block)


def test_uninitialized_torch_distributed_is_a_clear_error() -> None:
    q = torch.randn(1, 2, 4, 16)
    with pytest.raises(ValueError, match="init_process_group"):
        fad.context_parallel_attention(q, q, q)


@pytest.mark.cpu_only(reason="gloo on CPU through the interpreter")
def test_the_training_example_matches_one_process() -> None:
    """examples/context_parallel_train.py under torchrun (2 ranks, Ulysses): the sharded loss and
    every parameter gradient equal the single-process run's."""
    port = _free_port()
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(port),
               "examples/context_parallel_train.py", "--method", "ulysses", "--steps", "2", "--seq", "24"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT_S,
                            env={**os.environ, "TRITON_INTERPRET": "1"})
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    assert "loss and gradients match" in result.stdout
    assert "MISMATCH" not in result.stdout


def test_communication_volume_model() -> None:
    from bench import context_parallel as cp

    kv = 2 * cp.HEADS_KV * 4096 * cp.HEAD_DIM * cp.ELEMENT  # K and V of a 4096-token sequence
    q = cp.HEADS_Q * 4096 * cp.HEAD_DIM * cp.ELEMENT
    assert cp.volume_bytes("ring", 4096, 4) == (3 * kv / 4, 4 * 3 * kv / 4)  # float32 dK/dV travel with K/V
    assert cp.volume_bytes("allgather", 4096, 4) == (3 / 4 * kv, 3 / 4 * kv)
    assert cp.volume_bytes("ulysses", 4096, 4) == (3 / 16 * (kv + 2 * q),) * 2
