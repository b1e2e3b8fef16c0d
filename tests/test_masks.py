"""attn_mask inside the kernels: bool (True attends) and float (added to the scores) masks of
every broadcastable shape, with and without causal, against the float64 reference under
FlashAttention's rule, including the float mask's gradient and rows that the mask empties."""
from __future__ import annotations

import pytest
import torch

import fused_attn
from fused_attn import reference
from tests.helpers import AttentionCase, assert_close_to_reference, make_inputs

FP16, BF16, FP32 = torch.float16, torch.bfloat16, torch.float32

# mask: "bool", "float", "float-grad" (the mask requires grad), "padding" (bool, whole keys hidden)
CASES = [
    AttentionCase(2, 4, 2, 37, 50, 40, dtype=FP16, mask="bool", mask_shape=(2, 1, 37, 50)),
    AttentionCase(2, 4, 2, 37, 50, 40, causal=True, dtype=BF16, mask="float", mask_shape=(1, 4, 37, 50)),
    AttentionCase(1, 2, 2, 97, 97, 64, causal=True, dtype=FP32, mask="float-grad", mask_shape=(97, 97)),
    AttentionCase(2, 2, 1, 33, 65, 80, dtype=BF16, mask="padding", mask_shape=(2, 1, 1, 65)),
    AttentionCase(2, 3, 3, 17, 17, 16, causal=True, dtype=FP16, mask="float-grad", mask_shape=(2, 3, 17, 17)),
    # Sq > Sk: empty causal rows too
    AttentionCase(1, 2, 1, 70, 20, 96, causal=True, dtype=FP16, mask="bool", mask_shape=(1, 1, 70, 20)),
    AttentionCase(1, 4, 4, 1, 45, 128, dtype=BF16, mask="float-grad", mask_shape=(1, 4, 1, 45)),  # one query (decoding)
    AttentionCase(2, 2, 2, 64, 64, 32, dtype=FP32, mask="bool", mask_shape=(2, 2, 64, 64)),
]


@pytest.mark.parametrize("case", CASES, ids=str)
def test_mask_matches_reference(case: AttentionCase, device: str) -> None:
    """The kernels, the reference in the inputs' dtype and in float64, each on its own copies of
    the case's inputs and mask (a float mask as a leaf of the same dtype, for "float-grad")."""
    inputs = make_inputs(case, device)
    mask = inputs.attn_mask
    mask_grad = case.mask == "float-grad"
    results = {}
    for name, fn, dtype in (("fused", fused_attn.attention, case.dtype), ("plain", reference.attention, case.dtype),
                            ("golden", reference.attention, torch.float64)):
        leaves = [t.to(dtype=dtype, copy=True).requires_grad_() for t in inputs.qkv]
        m = mask if mask.dtype == torch.bool else mask.to(dtype=dtype, copy=True)
        m.requires_grad_(mask_grad)
        o, lse = fn(*leaves, causal=case.causal, attn_mask=m, return_lse=True)
        o.backward(inputs.do.to(dtype))
        results[name] = [o.detach(), lse] + [t.grad for t in leaves] + ([m.grad] if mask_grad else [])
    names = ["o", "lse", "dq", "dk", "dv"] + (["dmask"] if mask_grad else [])
    for i, name in enumerate(names):
        assert_close_to_reference(name, results["fused"][i], results["golden"][i], results["plain"][i],
                                  2 if name in ("o", "lse") else 3, case.dtype)
    empty_rows = torch.isinf(results["golden"][1])
    assert empty_rows.any() or case.mask == "padding"  # the others each empty at least one row
    assert (results["fused"][0][empty_rows] == 0).all()


def test_mask_and_no_mask_agree_when_the_mask_keeps_everything(device: str) -> None:
    q, k, v, _ = make_inputs(AttentionCase(1, 2, 2, 29, 29, 32, dtype=FP32), device)
    plain = fused_attn.attention(q, k, v, causal=True)
    assert torch.equal(fused_attn.attention(q, k, v, causal=True, attn_mask=torch.ones(29, 29, dtype=torch.bool,
                                                                                      device=device)), plain)
    torch.testing.assert_close(fused_attn.attention(q, k, v, causal=True, attn_mask=torch.zeros(1, 1, 29, 29,
                                                                                               device=device)), plain)


def test_masked_backward_is_deterministic(device: str) -> None:
    inputs = make_inputs(AttentionCase(2, 4, 4, 45, 45, 64, causal=True, dtype=FP16, mask="float"), device)
    q, k, v, do = inputs
    bias = inputs.attn_mask
    grads = []
    for _ in range(2):
        leaves = [t.detach().requires_grad_() for t in (q, k, v, bias)]
        fused_attn.attention(*leaves[:3], attn_mask=leaves[3], causal=True).backward(do)
        grads.append([t.grad for t in leaves])
    for first, second in zip(*grads):
        assert torch.equal(first, second)


@pytest.mark.parametrize("mask,error,message", [
    (torch.zeros(2, 3, dtype=torch.int64), TypeError, "attn_mask has dtype int64"),
    (torch.zeros(1, 1, 1, 1, 5), ValueError, "at most 4 dimensions"),
    (torch.zeros(3, 5, 9), ValueError, "does not broadcast"),
    ("causal", TypeError, "attn_mask must be a torch.Tensor"),
])
def test_bad_masks_raise(mask, error, message, device: str) -> None:
    q, k, v = (torch.randn(1, 2, 5, 16, device=device) for _ in range(3))
    if isinstance(mask, torch.Tensor):
        mask = mask.to(device)
    with pytest.raises(error, match=message):
        fused_attn.attention(q, k, v, attn_mask=mask)
