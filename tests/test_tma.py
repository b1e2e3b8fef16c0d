"""TMA loads (capability 9.0+): the descriptor path gives the very numbers of the pointer path.

On the GPU the launcher loads the streamed tiles through TMA descriptors on Hopper and newer
(fused_attn._launch.use_tma). Here the interpreter runs the same kernels with USE_TMA=True
(FUSED_ATTN_TMA=1) and every result must equal the pointer path's bit for bit, and pass the
FlashAttention rule against the float64 reference. tests/test_compile.py checks that the sm_90
SASS issues TMA copies.
"""
from __future__ import annotations

import contextvars
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch
import triton

import fused_attn
from fused_attn import _launch, reference
from fused_attn.kernels import configs
from tests.helpers import (AttentionCase, assert_close_to_reference, check_against_reference, fused_with_grads,
                           make_inputs)

pytestmark = pytest.mark.skipif(not _launch._TRITON_HAS_TMA, reason="this Triton has no tl.make_tensor_descriptor")


def _run(case: AttentionCase, device: str, tma: bool, monkeypatch: pytest.MonkeyPatch) -> list[torch.Tensor]:
    """o, lse, dq, dk, dv of one call with the case's options (dropout from one fixed generator
    state), with the TMA path on or off."""
    monkeypatch.setenv(_launch.ENV_TMA, "1" if tma else "0")
    return fused_with_grads(make_inputs(case, device))


CASES = [
    AttentionCase(2, 4, 2, 17, 97, 40, 40, True, torch.float16),  # GQA, Sq != Sk, head dim needing a mask
    AttentionCase(1, 2, 2, 1, 200, 80, 80, True, torch.bfloat16),  # one query, causal bottom-right
    AttentionCase(1, 3, 1, 97, 17, 96, 64, False, torch.float32),  # MQA, Dv != D, more queries than keys
    AttentionCase(1, 2, 2, 64, 64, 64, 64, True, torch.float16, "bshd"),  # exact head dim, (B, S, H, D) layout
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_descriptor_path_equals_pointer_path(case: AttentionCase, device: str, monkeypatch: pytest.MonkeyPatch,
                                             one_cpu_thread: None) -> None:
    with_tma = _run(case, device, True, monkeypatch)
    without = _run(case, device, False, monkeypatch)
    for name, a, b in zip(("o", "lse", "dq", "dk", "dv"), with_tma, without):
        assert torch.equal(a, b), f"{name} differs between the TMA and the pointer loads"


@pytest.mark.parametrize("case", CASES[:2], ids=lambda c: c.id)
def test_descriptor_path_against_float64(case: AttentionCase, device: str, monkeypatch: pytest.MonkeyPatch,
                                         one_cpu_thread: None) -> None:
    monkeypatch.setenv(_launch.ENV_TMA, "1")
    check_against_reference(case, device)


VARIANT_BASE = AttentionCase(1, 4, 2, 33, 47, 48, 48, True, torch.float16)
VARIANT_CASES = [
    replace(VARIANT_BASE, window=(5, 0), name="window"),
    replace(VARIANT_BASE, softcap=2.0, alibi="batch", name="softcap-alibi"),
    replace(VARIANT_BASE, mask="float", mask_shape=(1, 4, 33, 47), name="float-mask"),
    replace(VARIANT_BASE, mask="bool", dropout_p=0.25, name="bool-mask-dropout"),
]


@pytest.mark.parametrize("case", VARIANT_CASES, ids=lambda c: c.name)
def test_descriptor_path_with_variants(case: AttentionCase, device: str, monkeypatch: pytest.MonkeyPatch,
                                       one_cpu_thread: None) -> None:
    with_tma = _run(case, device, True, monkeypatch)
    without = _run(case, device, False, monkeypatch)
    for name, a, b in zip(("o", "lse", "dq", "dk", "dv"), with_tma, without):
        assert torch.equal(a, b), f"{name} differs between the TMA and the pointer loads"


def test_descriptor_path_packed_sequences(device: str, monkeypatch: pytest.MonkeyPatch, one_cpu_thread: None) -> None:
    """Each sequence's descriptor ends at its own length: the next sequence is never read (it is
    filled with NaN here, so a read would show)."""
    case = AttentionCase(heads_q=4, heads_kv=2, head_dim=40, causal=True, dtype=torch.float16,
                         lengths_q=(5, 1, 23), lengths_k=(9, 30, 2))
    inputs = make_inputs(case, device, seed=11)
    q, k, v, do = inputs
    cu_q, cu_k = inputs.cu_seqlens_q, inputs.cu_seqlens_k
    results = {}
    for tma in (True, False):
        monkeypatch.setenv(_launch.ENV_TMA, "1" if tma else "0")
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        o = fused_attn.attention_varlen(*leaves, cu_q, cu_k, inputs.max_seqlen_q, inputs.max_seqlen_k, causal=True)
        results[tma] = (o, *torch.autograd.grad(o, leaves, do))
    for name, a, b in zip(("o", "dq", "dk", "dv"), results[True], results[False]):
        assert torch.equal(a, b), f"{name} differs between the TMA and the pointer loads"
    # The same sequences one at a time against the float64 reference.
    o = results[True][0]
    for i in range(case.num_seqs):
        rows = slice(int(cu_q[i]), int(cu_q[i + 1]))
        keys = slice(int(cu_k[i]), int(cu_k[i + 1]))
        one = [t[s].transpose(0, 1).unsqueeze(0) for t, s in ((q, rows), (k, keys), (v, keys))]
        golden = reference.attention(*[t.double() for t in one], causal=True)
        plain = reference.attention(*one, causal=True)
        assert_close_to_reference("o", o[rows].transpose(0, 1).unsqueeze(0), golden, plain, 2.0, torch.float16)


def test_keys_past_the_sequence_are_never_read(device: str, monkeypatch: pytest.MonkeyPatch,
                                               one_cpu_thread: None) -> None:
    """k and v are views of a buffer whose rows past seq_k hold NaN: the box past the descriptor's
    end reads zeros, so nothing of it reaches o or the gradients."""
    monkeypatch.setenv(_launch.ENV_TMA, "1")
    seq_q, seq_k, dim = 19, 37, 64
    gen = torch.Generator().manual_seed(5)
    buffers = [torch.full((1, 2, seq_k + 27, dim), float("nan")) for _ in range(2)]
    for buffer in buffers:
        buffer[:, :, :seq_k] = torch.randn(1, 2, seq_k, dim, generator=gen)
    k, v = (b.to(device, torch.float16)[:, :, :seq_k] for b in buffers)
    q = torch.randn(1, 2, seq_q, dim, generator=gen).to(device, torch.float16)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    o = fused_attn.attention(*leaves, causal=True)
    grads = torch.autograd.grad(o, leaves, torch.ones_like(o))
    assert torch.isfinite(o).all() and all(torch.isfinite(g).all() for g in grads)
    golden = reference.attention(q.double(), k.contiguous().double(), v.contiguous().double(), causal=True)
    plain = reference.attention(q, k.contiguous(), v.contiguous(), causal=True)
    assert_close_to_reference("o", o, golden, plain, 2.0, torch.float16)


def test_use_tma_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    """On by default where configs.uses_tma says (capability 9.0+, 16-bit, no mask or dropout,
    head dims from 64), off with FUSED_ATTN_TMA=0 or a Triton without descriptors."""
    half = SimpleNamespace(device=torch.device("cuda", 0), element_size=lambda: 2)  # what the decision reads
    single = SimpleNamespace(device=torch.device("cuda", 0), element_size=lambda: 4)
    monkeypatch.setattr(_launch, "interpreting", lambda: False)
    expected = {75: set(), 80: set(), 86: set(), 90: {"forward", "backward_dkdv", "backward_dq"},
                100: {"forward", "backward_dq"}, 120: {"forward"}}
    assert {row: set(kernels) for row, kernels in configs.TMA_KERNELS.items()} == {
        row: kernels for row, kernels in expected.items() if kernels}
    for row, kernels in expected.items():
        monkeypatch.setattr(_launch, "_row", lambda _, r=row: r)
        for kernel in configs.KERNELS:
            monkeypatch.delenv(_launch.ENV_TMA, raising=False)
            assert _launch.use_tma(half, kernel, 128, "plain") is (kernel in kernels), (row, kernel)
            assert _launch.use_tma(half, kernel, 80, "plain") is (kernel in kernels), (row, kernel)  # bucket 128
            assert _launch.use_tma(half, kernel, 32, "plain") is False  # small head dims: pointer loads
            assert _launch.use_tma(single, kernel, 128, "plain") is False  # exact fp32: FMA dots
            for variant in ("mask", "dropout", "all"):
                assert _launch.use_tma(half, kernel, 128, variant) is False
            monkeypatch.setenv(_launch.ENV_TMA, "1")  # cannot add TMA where the report found none
            assert _launch.use_tma(half, kernel, 128, "plain") is (kernel in kernels), (row, kernel)
            monkeypatch.setenv(_launch.ENV_TMA, "0")
            assert _launch.use_tma(half, kernel, 128, "plain") is False
    monkeypatch.delenv(_launch.ENV_TMA, raising=False)
    monkeypatch.setattr(_launch, "_TRITON_HAS_TMA", False)  # an older Triton: pointer loads everywhere
    assert _launch.use_tma(half, "forward", 128, "plain") is False
    monkeypatch.setattr(_launch, "_TRITON_HAS_TMA", True)
    assert _launch.use_tma(torch.zeros(1), "forward", 128, "plain") is False  # a CPU tensor, no interpreter


def test_use_tma_under_the_interpreter_and_bad_values(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_launch, "interpreting", lambda: True)
    q = torch.zeros(1, 1, 1, 16)
    monkeypatch.delenv(_launch.ENV_TMA, raising=False)
    assert _launch.use_tma(q, "forward", 16, "plain") is False  # the tests' default: the pointer path
    monkeypatch.setenv(_launch.ENV_TMA, "1")  # every call, so the tests reach every variant and dtype
    assert all(_launch.use_tma(q, kernel, 16, variant) for kernel in configs.KERNELS for variant in configs.VARIANTS)
    monkeypatch.setenv(_launch.ENV_TMA, "yes")
    with pytest.raises(ValueError, match="FUSED_ATTN_TMA"):
        _launch.use_tma(q, "forward", 16, "plain")
    with pytest.raises(ValueError, match="FUSED_ATTN_TMA"):
        fused_attn.attention(q, q, q)  # before any launch


def test_allocator_installed_only_when_none_is_set() -> None:
    from triton.runtime import _allocation

    def current() -> object:
        allocator = _allocation._allocator
        return allocator.get() if hasattr(allocator, "get") else allocator

    def in_fresh_context(user_allocator: object | None) -> object:
        if user_allocator is not None:
            triton.set_allocator(user_allocator)
        _launch._ensure_tma_allocator()
        return current()

    if not hasattr(_allocation._allocator, "get"):
        pytest.skip("this Triton keeps one global allocator")
    saved = current()
    try:
        triton.set_allocator(_allocation.NullAllocator())
        assert contextvars.copy_context().run(in_fresh_context, None) is _launch._tma_scratch
        mine = lambda size, alignment, stream: torch.empty(size, dtype=torch.int8)  # noqa: E731
        assert contextvars.copy_context().run(in_fresh_context, mine) is mine  # the user's stays
    finally:
        triton.set_allocator(saved)
