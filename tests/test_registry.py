"""fused_attn.activate() / deactivate(): fused_attn behind torch SDPA's flash backend on CUDA.

On the CPU: registration, the dispatcher entry and its removal, and the two aten kernels called
directly (through the interpreter) against the reference. On a GPU: F.scaled_dot_product_attention
with the flash backend runs fused_attn's kernels and matches the reference."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fused_attn
from fused_attn import reference, registry
from tests.helpers import Case, assert_close_to_reference, make_inputs

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


@pytest.mark.parametrize("case", [
    Case(2, 4, 4, 33, 33, 64, 64, True, torch.float16),
    Case(1, 4, 2, 20, 47, 40, 40, False, torch.bfloat16),   # GQA, Sq != Sk, padded head dim
    Case(1, 2, 2, 16, 16, 32, 32, False, torch.float32, "bshd"),
], ids=lambda c: c.id)
def test_aten_kernels_match_the_reference(case: Case, device: str) -> None:
    """The two functions the dispatcher calls, called directly: outputs in the inputs' layouts,
    o and lse, and dq, dk, dv from the backward, all under FlashAttention's rule."""
    q, k, v, do = make_inputs(case, device)
    out, lse, _, _, max_q, max_k, *_ = registry.sdpa_flash_forward(q, k, v, 0.0, case.causal)
    assert (max_q, max_k) == (case.seq_q, case.seq_k) and out.stride() == torch.empty_like(q).stride()
    dq, dk, dv = registry.sdpa_flash_backward(do, q, k, v, out, lse, None, None, max_q, max_k, 0.0, case.causal,
                                              torch.zeros(2), torch.zeros(()))
    assert dq.stride() == torch.empty_like(q).stride() and dk.stride() == torch.empty_like(k).stride()

    golden = [t.detach().double().requires_grad_() for t in (q, k, v)]
    plain = [t.detach().requires_grad_() for t in (q, k, v)]
    expected = {}
    for name, leaves in (("golden", golden), ("plain", plain)):
        o, lse_ref = reference.attention(*leaves, causal=case.causal, return_lse=True)
        o.backward(do.to(o.dtype))
        expected[name] = [o.detach(), lse_ref.detach()] + [t.grad for t in leaves]
    for i, (name, got) in enumerate(zip(("o", "lse", "dq", "dk", "dv"), (out, lse, dq, dk, dv))):
        assert_close_to_reference(name, got, expected["golden"][i], expected["plain"][i],
                                  2 if name in ("o", "lse") else 3, case.dtype)


@pytest.mark.parametrize("kwargs,reason", [
    ({"dropout_p": 0.1}, "dropout"),
    ({"is_causal": True, "seq_k": 9}, "Sq != Sk"),
])
def test_unsupported_calls_raise_instead_of_computing_something_else(kwargs, reason) -> None:
    q = torch.randn(1, 2, 8, 16)
    k = v = torch.randn(1, 2, kwargs.pop("seq_k", 8), 16)
    with pytest.raises(RuntimeError, match=reason):
        registry.sdpa_flash_forward(q, k, v, kwargs.get("dropout_p", 0.0), kwargs.get("is_causal", False))


@pytest.mark.gpu
@needs_registry
def test_sdpa_flash_backend_runs_fused_attn_on_cuda(monkeypatch) -> None:
    calls = []
    original = registry.forward
    monkeypatch.setattr(registry, "forward", lambda *a, **kw: calls.append(1) or original(*a, **kw))
    q, k, v = (torch.randn(2, 8, 1000, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    do = torch.randn_like(q)
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
