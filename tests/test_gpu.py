"""The same checks as test_attention.py at real sizes, on a CUDA GPU (skipped without one).

Their CPU twins are test_attention.py's grid (same rule, same helper, small sizes), and
test_tile_boundaries for the tile splits these long sequences cross many times.
"""
from __future__ import annotations

import pytest
import torch

import fused_attn
from fused_attn import reference
from tests.helpers import GPU, AttentionCase, assert_close_to_reference, check_against_reference

pytestmark = pytest.mark.gpu

LONG = [
    AttentionCase(1, 2, 1, 16384, 16384, 128, 128, True, torch.bfloat16),
    AttentionCase(1, 2, 2, 16384, 16384, 64, 64, False, torch.float16),
    AttentionCase(1, 4, 1, 4097, 8191, 96, 96, True, torch.bfloat16),
    AttentionCase(1, 4, 2, 8191, 1000, 80, 80, True, torch.float16),
    AttentionCase(2, 2, 2, 4096, 4096, 256, 256, True, torch.bfloat16),
    AttentionCase(1, 2, 2, 1000, 4097, 200, 40, False, torch.float16),
    AttentionCase(1, 8, 8, 2048, 2048, 128, 128, False, torch.float16, "bshd"),
    AttentionCase(1, 2, 2, 4096, 4096, 64, 64, True, torch.float32),
]


@pytest.mark.parametrize("case", LONG, ids=lambda c: c.id)
def test_long_sequences_match_reference(case: AttentionCase) -> None:
    check_against_reference(case, GPU)


@pytest.mark.parametrize("allow_tf32", [False, True], ids=["ieee", "tf32"])
def test_float32_follows_allow_tf32(allow_tf32: bool, monkeypatch) -> None:
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", allow_tf32)
    # The same-dtype PyTorch baseline runs under the same flag, so the rule compares like with like.
    check_against_reference(AttentionCase(1, 2, 2, 1024, 1024, 128, 128, True, torch.float32), GPU)


def test_more_than_2_31_elements_and_65535_batch_heads() -> None:
    """B * H * S * D > 2**31 (64-bit offsets) with B * H = 2**17 programs' worth of heads."""
    batch, heads, seq, dim = 1024, 128, 136, 128  # 2.28e9 elements per tensor, B * H = 131072
    gen = torch.Generator(device=GPU).manual_seed(0)
    q, k, v = (torch.randn(batch, heads, seq, dim, device=GPU, dtype=torch.float16, generator=gen)
               for _ in range(3))
    q.requires_grad_()
    k.requires_grad_()
    v.requires_grad_()
    o = fused_attn.attention(q, k, v, causal=True)
    do = torch.randn_like(o)
    dq, dk, dv = torch.autograd.grad(o, (q, k, v), do)
    # Batches are independent: check the last one, whose offsets are past 2**31.
    tail = [t[-1:].detach() for t in (q, k, v)]
    golden_leaves = [t.double().requires_grad_() for t in tail]
    plain_leaves = [t.clone().requires_grad_() for t in tail]
    golden = reference.attention(*golden_leaves, causal=True)
    plain = reference.attention(*plain_leaves, causal=True)
    assert_close_to_reference("o", o[-1:], golden, plain, 2.0, torch.float16)
    golden_grads = torch.autograd.grad(golden, golden_leaves, do[-1:].double())
    plain_grads = torch.autograd.grad(plain, plain_leaves, do[-1:])
    for name, got, g, p in zip(("dq", "dk", "dv"), (dq[-1:], dk[-1:], dv[-1:]), golden_grads, plain_grads):
        assert_close_to_reference(name, got, g, p, 3.0, torch.float16)


def test_backward_deterministic_at_scale() -> None:
    gen = torch.Generator(device=GPU).manual_seed(1)
    q = torch.randn(2, 16, 4096, 128, device=GPU, dtype=torch.bfloat16, generator=gen, requires_grad=True)
    k = torch.randn(2, 4, 4096, 128, device=GPU, dtype=torch.bfloat16, generator=gen, requires_grad=True)
    v = torch.randn(2, 4, 4096, 128, device=GPU, dtype=torch.bfloat16, generator=gen, requires_grad=True)
    do = torch.randn(2, 16, 4096, 128, device=GPU, dtype=torch.bfloat16, generator=gen)
    first = torch.autograd.grad(fused_attn.attention(q, k, v, causal=True), (q, k, v), do)
    second = torch.autograd.grad(fused_attn.attention(q, k, v, causal=True), (q, k, v), do)
    for a, b in zip(first, second):
        assert torch.equal(a, b)
