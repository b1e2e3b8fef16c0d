"""attn_mask inside the kernels: bool (True attends) and float (added to the scores) masks of
every broadcastable shape, with and without causal, against the float64 reference under
FlashAttention's rule, including the float mask's gradient and rows that the mask empties."""
from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

import fused_attn
from fused_attn import reference
from tests.helpers import assert_close_to_reference


@dataclass(frozen=True)
class MaskCase:
    batch: int
    heads_q: int
    heads_kv: int
    seq_q: int
    seq_k: int
    head_dim: int
    causal: bool
    dtype: torch.dtype
    mask_shape: tuple[int, ...]
    kind: str  # "bool", "float", "float-grad" (the mask requires grad), "padding" (bool, whole rows and keys)

    @property
    def id(self) -> str:
        return (f"b{self.batch}-h{self.heads_q}:{self.heads_kv}-sq{self.seq_q}-sk{self.seq_k}-d{self.head_dim}-"
                f"{'causal' if self.causal else 'full'}-{str(self.dtype)[6:]}-{self.kind}"
                f"{'x'.join(map(str, self.mask_shape))}")


CASES = [
    MaskCase(2, 4, 2, 37, 50, 40, False, torch.float16, (2, 1, 37, 50), "bool"),
    MaskCase(2, 4, 2, 37, 50, 40, True, torch.bfloat16, (1, 4, 37, 50), "float"),
    MaskCase(1, 2, 2, 97, 97, 64, True, torch.float32, (97, 97), "float-grad"),
    MaskCase(2, 2, 1, 33, 65, 80, False, torch.bfloat16, (2, 1, 1, 65), "padding"),
    MaskCase(2, 3, 3, 17, 17, 16, True, torch.float16, (2, 3, 17, 17), "float-grad"),
    MaskCase(1, 2, 1, 70, 20, 96, True, torch.float16, (1, 1, 70, 20), "bool"),   # Sq > Sk: empty causal rows too
    MaskCase(1, 4, 4, 1, 45, 128, False, torch.bfloat16, (1, 4, 1, 45), "float-grad"),  # one query (decoding)
    MaskCase(2, 2, 2, 64, 64, 32, False, torch.float32, (2, 2, 64, 64), "bool"),
]


def _mask(case: MaskCase, gen: torch.Generator) -> torch.Tensor:
    if case.kind == "padding":  # keys past each sequence's length are hidden
        lengths = torch.tensor([case.seq_k, case.seq_k // 3])
        return (torch.arange(case.seq_k)[None, :] < lengths[:, None]).view(case.mask_shape)
    if case.kind == "bool":
        keep = torch.rand(case.mask_shape, generator=gen) > 0.35
        keep.view(-1, keep.shape[-1])[0] = False  # a row with no key at all
        return keep
    bias = torch.randn(case.mask_shape, generator=gen)
    bias[torch.rand(case.mask_shape, generator=gen) < 0.2] = float("-inf")
    bias.view(-1, bias.shape[-1])[-1] = float("-inf")  # a row with no key at all
    return bias


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_mask_matches_reference(case: MaskCase, device: str) -> None:
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(case.batch, case.heads_q, case.seq_q, case.head_dim, generator=gen)
    k = torch.randn(case.batch, case.heads_kv, case.seq_k, case.head_dim, generator=gen)
    v = torch.randn(case.batch, case.heads_kv, case.seq_k, case.head_dim, generator=gen)
    do = torch.randn(case.batch, case.heads_q, case.seq_q, case.head_dim, generator=gen)
    mask = _mask(case, gen)
    mask_grad = case.kind == "float-grad"
    results = {}
    for name, fn, dtype in (("fused", fused_attn.attention, case.dtype), ("plain", reference.attention, case.dtype),
                            ("golden", reference.attention, torch.float64)):
        leaves = [t.to(device=device, dtype=dtype, copy=True).requires_grad_() for t in (q, k, v)]
        m = mask.to(device) if mask.dtype == torch.bool else mask.to(device=device, dtype=dtype, copy=True)
        m.requires_grad_(mask_grad)
        o, lse = fn(*leaves, causal=case.causal, attn_mask=m, return_lse=True)
        o.backward(do.to(device=device, dtype=dtype))
        results[name] = [o.detach(), lse] + [t.grad for t in leaves] + ([m.grad] if mask_grad else [])
    names = ["o", "lse", "dq", "dk", "dv"] + (["dmask"] if mask_grad else [])
    for i, name in enumerate(names):
        assert_close_to_reference(name, results["fused"][i], results["golden"][i], results["plain"][i],
                                  2 if name in ("o", "lse") else 3, case.dtype)
    empty_rows = torch.isinf(results["golden"][1])
    assert empty_rows.any() or case.kind == "padding"  # the others each empty at least one row
    assert (results["fused"][0][empty_rows] == 0).all()


def test_mask_and_no_mask_agree_when_the_mask_keeps_everything(device: str) -> None:
    q, k, v = (torch.randn(1, 2, 29, 32, device=device) for _ in range(3))
    plain = fused_attn.attention(q, k, v, causal=True)
    assert torch.equal(fused_attn.attention(q, k, v, causal=True, attn_mask=torch.ones(29, 29, dtype=torch.bool,
                                                                                      device=device)), plain)
    torch.testing.assert_close(fused_attn.attention(q, k, v, causal=True, attn_mask=torch.zeros(1, 1, 29, 29,
                                                                                               device=device)), plain)


def test_masked_backward_is_deterministic(device: str) -> None:
    q, k, v, do = (torch.randn(2, 4, 45, 64, device=device, dtype=torch.float16) for _ in range(4))
    bias = torch.randn(2, 1, 45, 45, device=device, dtype=torch.float16)
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
