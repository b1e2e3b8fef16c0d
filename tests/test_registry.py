"""fused_attn.activate() / deactivate(): fused_attn behind torch SDPA's flash backend on CUDA.

On the CPU: registration, the dispatcher entry and its removal, and the two aten kernels called
directly (through the interpreter) against the reference, with and without dropout. On a GPU:
F.scaled_dot_product_attention with the flash backend runs fused_attn's kernels and matches the
reference, dropout included."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fused_attn
from fused_attn import reference, registry
from tests.helpers import GPU, AttentionCase, assert_close_to_reference, make_inputs

needs_registry = pytest.mark.skipif(not hasattr(torch.nn.attention, "register_flash_attention_impl"),
                                    reason=f"torch {torch.__version__} has no flash-attention registry")
OP = "aten::_scaled_dot_product_flash_attention"


def _our_cuda_kernel_is_registered() -> bool:
    return "fused_attn/registry.py" in torch._C._dispatch_dump(OP).replace("\\", "/")


@needs_registry
def test_activate_registers_and_deactivate_restores() -> None:
    attention = torch.nn.attention
    assert not fused_attn.registry.is_active() and not _our_cuda_kernel_is_registered()
    try:
        fused_attn.activate()
        assert attention.current_flash_attention_impl() == "fused_attn"
        assert "fused_attn" in attention.list_flash_attention_impls()
        assert _our_cuda_kernel_is_registered()
        fused_attn.activate()  # again: still one registration, still active
        assert registry.is_active() and _our_cuda_kernel_is_registered()
    finally:
        fused_attn.deactivate()
    assert attention.current_flash_attention_impl() is None
    assert not _our_cuda_kernel_is_registered()
    fused_attn.deactivate()  # a second deactivate is a no-op


def _reference_grads(q, k, v, do, causal: bool, dropout_p: float = 0.0, keep: torch.Tensor | None = None) -> dict:
    """o, lse, dq, dk, dv of the reference in float64 ("golden") and in the inputs' dtype ("plain")."""
    expected = {}
    for name, dtype in (("golden", torch.float64), ("plain", q.dtype)):
        leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
        o, lse = reference.attention(*leaves, causal=causal, return_lse=True, dropout_p=dropout_p, dropout_mask=keep)
        o.backward(do.to(dtype))
        expected[name] = [o.detach(), lse.detach()] + [t.grad for t in leaves]
    return expected


@pytest.mark.parametrize("case", [
    AttentionCase(2, 4, 4, 33, 33, 64, 64, True, torch.float16),
    AttentionCase(1, 4, 2, 20, 47, 40, 40, False, torch.bfloat16),   # GQA, Sq != Sk, padded head dim
    AttentionCase(1, 2, 2, 16, 16, 32, 32, False, torch.float32, "bshd"),
], ids=lambda c: c.id)
def test_aten_kernels_match_the_reference(case: AttentionCase, device: str) -> None:
    """The two functions the dispatcher calls, called directly: outputs in the inputs' layouts,
    o and lse, and dq, dk, dv from the backward, all under FlashAttention's rule."""
    q, k, v, do = make_inputs(case, device)
    out, lse, _, _, max_q, max_k, *_ = registry.sdpa_flash_forward(q, k, v, 0.0, case.causal)
    assert (max_q, max_k) == (case.seq_q, case.seq_k) and out.stride() == torch.empty_like(q).stride()
    dq, dk, dv = registry.sdpa_flash_backward(do, q, k, v, out, lse, None, None, max_q, max_k, 0.0, case.causal,
                                              torch.zeros(2), torch.zeros(()))
    assert dq.stride() == torch.empty_like(q).stride() and dk.stride() == torch.empty_like(k).stride()
    expected = _reference_grads(q, k, v, do, case.causal)
    for i, (name, got) in enumerate(zip(("o", "lse", "dq", "dk", "dv"), (out, lse, dq, dk, dv))):
        assert_close_to_reference(name, got, expected["golden"][i], expected["plain"][i],
                                  2 if name in ("o", "lse") else 3, case.dtype)


@pytest.mark.parametrize("case", [
    AttentionCase(2, 4, 2, 24, 24, 32, 32, True, torch.float16),     # GQA, causal
    AttentionCase(1, 2, 2, 17, 30, 40, 40, False, torch.bfloat16),   # Sq != Sk, padded head dim
], ids=lambda c: c.id)
def test_aten_kernels_with_dropout_match_the_reference_with_the_kernels_mask(case: AttentionCase, device: str) -> None:
    """Dropout: the forward draws its seed with fused_attn.dropout_seed() (torch's default
    generator) and returns it in rng_state[0]; the backward regenerates the mask from the seed
    it is handed as philox_seed. Both match the reference given the kernels' mask."""
    q, k, v, do = make_inputs(case, device)
    dropout_p = 0.25
    torch.manual_seed(11)
    out, lse, _, _, max_q, max_k, rng_state, philox_offset, _ = registry.sdpa_flash_forward(
        q, k, v, dropout_p, case.causal)
    torch.manual_seed(11)
    seed = fused_attn.dropout_seed()
    assert rng_state.dtype == torch.uint64 and rng_state.shape == (2,) and rng_state.device == q.device
    assert rng_state[0].item() == seed.item()
    dq, dk, dv = registry.sdpa_flash_backward(do, q, k, v, out, lse, None, None, max_q, max_k, dropout_p, case.causal,
                                              rng_state, philox_offset)
    keep = fused_attn.dropout_mask(seed, case.batch, case.heads_q, case.seq_q, case.seq_k, dropout_p, device)
    expected = _reference_grads(q, k, v, do, case.causal, dropout_p, keep)
    for i, (name, got) in enumerate(zip(("o", "lse", "dq", "dk", "dv"), (out, lse, dq, dk, dv))):
        assert_close_to_reference(name, got, expected["golden"][i], expected["plain"][i],
                                  2 if name in ("o", "lse") else 3, case.dtype)
    # The backward's mask comes from philox_seed: another seed gives other gradients.
    other = torch.tensor([seed.item() + 1, 0], dtype=torch.uint64, device=q.device)
    dv_other = registry.sdpa_flash_backward(do, q, k, v, out, lse, None, None, max_q, max_k, dropout_p, case.causal,
                                            other, philox_offset)[2]
    assert not torch.equal(dv_other, dv)


@pytest.mark.parametrize("kwargs,reason", [
    ({"return_debug_mask": True}, "return_debug_mask"),
    ({"is_causal": True, "seq_k": 9}, "Sq != Sk"),
])
def test_unsupported_calls_raise_instead_of_computing_something_else(kwargs, reason) -> None:
    q = torch.randn(1, 2, 8, 16)
    k = v = torch.randn(1, 2, kwargs.pop("seq_k", 8), 16)
    with pytest.raises(RuntimeError, match=reason):
        registry.sdpa_flash_forward(q, k, v, 0.0, **kwargs)


@pytest.mark.gpu
@needs_registry
def test_sdpa_flash_backend_runs_fused_attn_on_cuda(monkeypatch) -> None:
    calls = []
    original = registry.forward
    monkeypatch.setattr(registry, "forward", lambda *a, **kw: calls.append(1) or original(*a, **kw))
    q, k, v, do = make_inputs(AttentionCase(2, 8, 8, 1000, 1000, 128, 128, True, torch.bfloat16), GPU)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    try:
        fused_attn.activate()
        with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.FLASH_ATTENTION):
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            o.backward(do)
    finally:
        fused_attn.deactivate()
    assert calls == [1]
    golden = [t.detach().double().requires_grad_() for t in (q, k, v)]
    plain = [t.detach().requires_grad_() for t in (q, k, v)]
    expected = {}
    for name, leaves in (("golden", golden), ("plain", plain)):
        out = reference.attention(*leaves, causal=True)
        out.backward(do.to(out.dtype))
        expected[name] = [out.detach()] + [t.grad for t in leaves]
    for i, (name, got) in enumerate(zip(("o", "dq", "dk", "dv"), (o.detach(), q.grad, k.grad, v.grad))):
        assert_close_to_reference(name, got, expected["golden"][i], expected["plain"][i],
                                  2 if name == "o" else 3, torch.bfloat16)


@pytest.mark.gpu
@needs_registry
def test_sdpa_flash_backend_dropout_on_cuda() -> None:
    """Dropout through torch's SDPA flash backend: the seed the forward returns in rng_state comes
    back to the backward through torch's autograd; o and the gradients match the reference given
    the kernels' mask (re-derived by re-seeding torch's default generator)."""
    q, k, v, do = make_inputs(AttentionCase(2, 4, 4, 300, 300, 64, 64, True, torch.bfloat16), GPU)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    try:
        fused_attn.activate()
        with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.FLASH_ATTENTION):
            torch.manual_seed(3)
            o = F.scaled_dot_product_attention(*leaves, dropout_p=0.2, is_causal=True)
            o.backward(do)
    finally:
        fused_attn.deactivate()
    torch.manual_seed(3)
    keep = fused_attn.dropout_mask(fused_attn.dropout_seed(), 2, 4, 300, 300, 0.2, GPU)
    expected = _reference_grads(q, k, v, do, True, 0.2, keep)
    for i, (name, got) in enumerate(zip(("o", "dq", "dk", "dv"), [o.detach()] + [t.grad for t in leaves])):
        j = 0 if i == 0 else i + 1  # _reference_grads also holds lse
        assert_close_to_reference(name, got, expected["golden"][j], expected["plain"][j],
                                  2 if name == "o" else 3, torch.bfloat16)
