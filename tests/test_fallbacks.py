"""One answer to "can the kernels serve this call": the drop-in entry points (the SDPA drop-in,
nn.MultiheadAttention, the SDPA-flash registry and the Hugging Face integration) agree with
`_checks.unsupported_reason` on a grid of calls, and each adds only reasons of its own arguments.

The copies these replace had drifted apart: the registry looked at q's head dim only, so a call
with a 600-wide v was sent to the kernels, which refused it."""
from __future__ import annotations

import pytest
import torch

from fused_attn import _checks, hf, nn, registry, sdpa

DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.int32)
HEAD_DIMS = ((16, 16), (16, 600), (600, 16), (512, 512), (513, 64))  # (q/k, v)


def _tensors(dtype: torch.dtype, head_dim: int, head_dim_v: int) -> tuple[torch.Tensor, ...]:
    q = torch.zeros(1, 2, 3, head_dim, dtype=dtype)
    return q, torch.zeros(1, 2, 3, head_dim, dtype=dtype), torch.zeros(1, 2, 3, head_dim_v, dtype=dtype)


def _hf_reason(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> str | None:
    return hf._fallback_reason(torch.nn.Module(), q, 0.0, False, {}, max(q.shape[-1], v.shape[-1]))


def _mha_reason(q: torch.Tensor, head_dim: int) -> str | None:
    mha = nn.MultiheadAttention(2 * head_dim, 2, batch_first=True).eval()
    query = torch.zeros(1, 3, 2 * head_dim, dtype=q.dtype)
    return mha._why_not_fused(query, query, None, False, None, False)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("head_dims", HEAD_DIMS, ids=str)
def test_every_entry_point_gives_the_shared_answer(dtype: torch.dtype, head_dims: tuple[int, int]) -> None:
    q, k, v = _tensors(dtype, *head_dims)
    expected = _checks.unsupported_reason(q, *head_dims)
    assert (expected is None) == (dtype in _checks.SUPPORTED_DTYPES and max(head_dims) <= _checks.MAX_HEAD_DIM)
    assert sdpa._fallback_reason(q, k, v, 0.0) == expected
    assert registry._unsupported(q, k, v, False) == expected
    assert _hf_reason(q, k, v) == expected
    if head_dims[0] == head_dims[1]:  # the module projects q, k and v to one head dim
        assert _mha_reason(q, head_dims[0]) == expected


def test_each_entry_point_keeps_only_its_own_extra_reasons() -> None:
    q, k, v = _tensors(torch.float32, 16, 16)
    assert sdpa._fallback_reason(q, k, v, 1.0) == "dropout_p=1"
    assert sdpa._fallback_reason(q[0, 0], k[0, 0], v[0, 0], 0.0) == "2-D inputs"
    assert "return_debug_mask" in registry._unsupported(q, k, v, False, return_debug_mask=True)
    assert "Sq != Sk" in registry._unsupported(q, k[:, :, :2], v[:, :, :2], True)
    mha = nn.MultiheadAttention(32, 2, batch_first=True)
    query = torch.zeros(1, 3, 32)
    assert "need_weights" in mha._why_not_fused(query, query, None, True, None, False)


def test_the_card_limit_reaches_every_entry_point(monkeypatch: pytest.MonkeyPatch) -> None:
    """What the card cannot compute (bf16 on Turing, head dims over its shared memory) comes from
    one function, which every entry point consults through unsupported_reason."""
    seen: list[int] = []

    def card_limit(q: torch.Tensor, head_dim: int = 0) -> str | None:
        seen.append(head_dim)
        return "too wide for this card" if head_dim > 256 else None

    monkeypatch.setattr(_checks, "device_fallback_reason", card_limit)
    q, k, v = _tensors(torch.float16, 64, 320)
    assert sdpa._fallback_reason(q, k, v, 0.0) == "too wide for this card"
    assert registry._unsupported(q, k, v, False) == "too wide for this card"
    assert _hf_reason(q, k, v) == "too wide for this card"
    assert seen == [320, 320, 320]  # the widest of the q/k and v head dims, everywhere
