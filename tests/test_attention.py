"""fused_attn.attention against the float64 reference, under FlashAttention's error rule.

On a machine without a GPU these run through the Triton interpreter at small sizes; the same
checks at real sizes are in test_gpu.py.
"""
from __future__ import annotations

import pytest
import torch

import fused_attn
from fused_attn import AttentionConfigs, KernelConfig
from tests.helpers import AttentionCase, check_against_reference, make_inputs

# (batch, heads_q, heads_kv, seq_q, seq_k, head_dim, head_dim_v): odd lengths, Sq != Sk both ways,
# GQA and MQA, head dims that are not powers of two, D != Dv, the 512 maximum (Gemma 4's global
# layers; MLA-like 192 / 512 and 320 / 40 splits) and a single key.
SHAPES = [
    (1, 1, 1, 1, 1, 16, 16),
    (2, 3, 3, 17, 17, 40, 40),
    (1, 2, 2, 97, 97, 64, 64),
    (1, 4, 2, 200, 200, 80, 80),
    (1, 4, 1, 33, 200, 96, 96),
    (1, 2, 1, 200, 97, 64, 64),
    (2, 2, 2, 64, 128, 128, 128),
    (1, 2, 2, 33, 65, 200, 200),
    (1, 2, 1, 40, 40, 256, 256),
    (1, 2, 1, 37, 53, 512, 512),
    (1, 2, 2, 17, 29, 192, 512),
    (1, 2, 1, 29, 17, 320, 40),
    (1, 3, 1, 50, 70, 40, 24),
    (1, 1, 1, 5, 9, 1, 3),
]
DTYPES = [torch.float16, torch.bfloat16, torch.float32]

GRID = [AttentionCase(*shape, causal=causal, dtype=dtype)
        for shape in SHAPES for causal in (False, True) for dtype in DTYPES]


@pytest.mark.parametrize("case", GRID, ids=lambda c: c.id)
def test_matches_reference(case: AttentionCase, device: str) -> None:
    check_against_reference(case, device)


LAYOUT_GRID = [
    AttentionCase(2, 4, 2, 37, 53, 64, 64, causal, torch.float16, layout)
    for layout in ("bshd", "sliced") for causal in (False, True)
] + [AttentionCase(1, 2, 2, 45, 45, 48, 48, True, torch.float32, "bshd")]


@pytest.mark.parametrize("case", LAYOUT_GRID, ids=lambda c: c.id)
def test_non_contiguous_inputs(case: AttentionCase, device: str) -> None:
    check_against_reference(case, device)


def test_transposed_bshd_runs_without_copy_and_keeps_layout(device: str) -> None:
    q, k, v, _ = make_inputs(AttentionCase(2, 4, 4, 33, 33, 32, 32, False, torch.float16, "bshd"), device)
    assert not q.is_contiguous()
    o = fused_attn.attention(q, k, v)
    # The output comes back in the (B, S, H, D) memory layout of q: transposing back is free.
    assert o.transpose(1, 2).is_contiguous()


# Tiles of 16 give many tiles even at these small lengths, so every split of the causal loops
# (unmasked, diagonal, ragged tail, rows with no key) is crossed several times.
SMALL_TILES = AttentionConfigs(KernelConfig(16, 16, 4, 1), KernelConfig(16, 16, 4, 1), KernelConfig(16, 16, 4, 1))
MIXED_TILES = AttentionConfigs(KernelConfig(64, 16, 4, 1), KernelConfig(16, 64, 4, 1), KernelConfig(32, 16, 4, 1))
TILE_GRID = [
    AttentionCase(1, 2, 1, sq, sk, 32, 32, causal, torch.float32)
    for sq, sk in ((47, 47), (31, 77), (77, 31), (64, 64), (16, 80), (80, 16)) for causal in (False, True)
]


@pytest.mark.parametrize("configs", [SMALL_TILES, MIXED_TILES], ids=["tiles16", "tiles-mixed"])
@pytest.mark.parametrize("case", TILE_GRID, ids=lambda c: c.id)
def test_tile_boundaries(case: AttentionCase, configs: AttentionConfigs, device: str) -> None:
    with fused_attn.override_configs(configs):
        check_against_reference(case, device)


def test_rows_without_keys_are_zero_with_minus_inf_lse(device: str) -> None:
    # Sq > Sk, causal: the first Sq - Sk rows see no key at all.
    q, k, v, do = make_inputs(AttentionCase(1, 2, 2, 50, 20, 32, 32, True, torch.float16), device)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    o, lse = fused_attn.attention(q, k, v, causal=True, return_lse=True)
    assert torch.all(o[:, :, :30] == 0) and torch.all(lse[:, :, :30] == float("-inf"))
    assert torch.isfinite(lse[:, :, 30:]).all()
    dq, dk, dv = torch.autograd.grad(o, (q, k, v), do)
    assert torch.all(dq[:, :, :30] == 0)
    assert not any(torch.isnan(g).any() for g in (dq, dk, dv))


def test_default_and_explicit_scale(device: str) -> None:
    case = AttentionCase(1, 2, 2, 29, 41, 24, 24, False, torch.float32)
    q, k, v, _ = make_inputs(case, device)
    for scale in (None, 0.3, 2.0):
        got = fused_attn.attention(q, k, v, scale=scale)
        want = fused_attn.reference.attention(q.double(), k.double(), v.double(), scale=scale)
        assert (got.double() - want).abs().max().item() < 1e-5
    assert not torch.allclose(fused_attn.attention(q, k, v, scale=0.3), fused_attn.attention(q, k, v))


@pytest.mark.parametrize("scale", [-4.0, -0.01, 0.0])
def test_zero_and_negative_scales(scale: float, device: str) -> None:
    """The forward's hot loop takes the row max before scaling (one FMA per score), which holds
    for positive scales only: zero and negative scales take the general path. Scores of +-100
    make a wrong row max overflow exp2."""
    case = AttentionCase(1, 2, 2, 29, 41, 24, 24, False, torch.float32)
    q, k, v, _ = make_inputs(case, device)
    q = (q * 3).requires_grad_()
    got = fused_attn.attention(q, k, v, scale=scale)
    want = fused_attn.reference.attention(q.double(), k.double(), v.double(), scale=scale)
    assert torch.isfinite(got).all()
    assert (got.double() - want).abs().max().item() < 1e-4  # scores of +-100 in float32
    got.sum().backward()
    dq = q.grad.clone()
    q.grad = None
    want.sum().backward()
    assert (dq.double() - q.grad.double()).abs().max().item() < 1e-4 * max(1.0, q.grad.abs().max().item())


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_backward_is_bitwise_deterministic(dtype: torch.dtype, device: str) -> None:
    q, k, v, do = make_inputs(AttentionCase(2, 4, 2, 70, 90, 40, 40, True, dtype), device)
    leaves = [t.requires_grad_() for t in (q, k, v)]
    first = torch.autograd.grad(fused_attn.attention(*leaves, causal=True), leaves, do)
    second = torch.autograd.grad(fused_attn.attention(*leaves, causal=True), leaves, do)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_inputs_are_not_modified(device: str) -> None:
    q, k, v, do = make_inputs(AttentionCase(1, 4, 2, 33, 47, 40, 40, True, torch.bfloat16, "bshd"), device)
    before = [t.clone() for t in (q, k, v, do)]
    leaves = [t.requires_grad_() for t in (q, k, v)]
    o = fused_attn.attention(*leaves, causal=True)
    torch.autograd.grad(o, leaves, do)
    for original, t in zip(before, (q, k, v, do)):
        assert torch.equal(original, t.detach())


def test_forward_saves_o_of_s_memory_for_backward(device: str) -> None:
    """Saved tensors are q, k, v, o and lse: nothing of size Sq x Sk."""
    q, k, v, _ = make_inputs(AttentionCase(1, 2, 2, 128, 96, 32, 32, True, torch.float16), device)
    saved: list[torch.Tensor] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t)
        return t

    leaves = [t.requires_grad_() for t in (q, k, v)]
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fused_attn.attention(*leaves, causal=True)
    total = sum(t.numel() for t in saved)
    assert len(saved) == 5
    assert total == q.numel() + k.numel() + v.numel() + q.numel() + 2 * 128
    assert max(t.numel() for t in saved) < 128 * 96 * 2


@pytest.mark.parametrize("shape", [(0, 2, 2, 8, 8), (1, 2, 2, 0, 8), (1, 2, 2, 8, 0), (1, 2, 2, 0, 0)],
                         ids=["batch0", "sq0", "sk0", "both0"])
def test_empty_inputs(shape: tuple[int, ...], device: str) -> None:
    batch, hq, hkv, sq, sk = shape
    q = torch.randn(batch, hq, sq, 16, device=device, dtype=torch.float16, requires_grad=True)
    k = torch.randn(batch, hkv, sk, 16, device=device, dtype=torch.float16, requires_grad=True)
    v = torch.randn(batch, hkv, sk, 8, device=device, dtype=torch.float16, requires_grad=True)
    o, lse = fused_attn.attention(q, k, v, return_lse=True)
    assert o.shape == (batch, hq, sq, 8) and lse.shape == (batch, hq, sq)
    assert torch.all(o == 0) and torch.all(lse == float("-inf"))  # vacuous when empty
    dq, dk, dv = torch.autograd.grad(o.float().sum(), (q, k, v))
    assert dq.shape == q.shape and dk.shape == k.shape and dv.shape == v.shape
    assert all(torch.all(g == 0) for g in (dq, dk, dv))


def _sparse_strided(shape: tuple[int, int, int, int], batch_stride: int, gen: torch.Generator,
                    device: str) -> torch.Tensor:
    """A (B, H, S, D) view whose batches lie batch_stride elements apart in one huge buffer.
    Only the pages that hold values are ever touched, so the buffer costs address space, not RAM."""
    b, h, s, d = shape
    storage = torch.empty(batch_stride * (b - 1) + h * s * d, dtype=torch.float16, device=device)
    view = storage.as_strided(shape, (batch_stride, s * d, d, 1))
    view.copy_(torch.randn(shape, generator=gen).to(torch.float16))
    return view


def test_offsets_past_2_31_elements(device: str) -> None:
    """CPU twin of the GPU test with > 2**31 elements: batch 2 starts 2**31 + 128 elements in,
    while each stride fits in 32 bits, so any 32-bit offset product would wrap."""
    gen = torch.Generator().manual_seed(3)
    batch_stride = 2**30 + 64
    q, k, v = (_sparse_strided((3, 2, 20, 16), batch_stride, gen, device) for _ in range(3))
    leaves = [t.requires_grad_() for t in (q, k, v)]
    do = torch.randn(3, 2, 20, 16, generator=gen).to(device=device, dtype=torch.float16)
    o = fused_attn.attention(*leaves, causal=True)
    grads = torch.autograd.grad(o, leaves, do)
    small = [t.detach().contiguous() for t in (q, k, v)]
    golden_leaves = [t.double().requires_grad_() for t in small]
    golden = fused_attn.reference.attention(*golden_leaves, causal=True)
    golden_grads = torch.autograd.grad(golden, golden_leaves, do.double())
    assert (o.double() - golden).abs().max().item() < 2e-3
    for got, want in zip(grads, golden_grads):
        assert (got.double() - want).abs().max().item() < 1e-2


def test_aligned_inputs_are_used_in_place_and_odd_ones_padded(device: str) -> None:
    from fused_attn._launch import _aligned

    q, _, _, _ = make_inputs(AttentionCase(2, 4, 4, 33, 33, 64, 64, False, torch.float16, "bshd"), device)
    assert _aligned(q) is q  # a (B, S, H, 64) view: vector loads work, no copy
    odd, _, _, _ = make_inputs(AttentionCase(2, 4, 4, 33, 33, 40, 40, False, torch.float16, "sliced"), device)
    padded = _aligned(odd)
    assert padded.shape == (2, 4, 33, 48) and padded.is_contiguous()
    assert torch.equal(padded[..., :40], odd) and torch.all(padded[..., 40:] == 0)
