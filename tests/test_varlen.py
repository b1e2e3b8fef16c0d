"""Packed variable-length sequences (attention_varlen) against the float64 reference under
FlashAttention's error rule, with every variant (causal, windows, ALiBi per head and per sequence,
softcap, scale, dropout); that packing changes nothing against attention() per sequence; inputs
untouched; views of a packed qkv; and bad arguments refused before any kernel launches.

Without a GPU the kernels run through the Triton interpreter, so the CPU cases are small but
awkward (sequences with keys but no queries and queries but no keys, lengths 1 to 70, GQA). The
GPU twins at the end (marked gpu, skipped without one) run the same check at real sizes.
"""
from __future__ import annotations

from typing import Callable

import pytest
import torch

import fused_attn
from tests.helpers import (GPU, AttentionCase, assert_runs_equal, check_under_rule, cu_seqlens,
                           forbid_attention_launch, fused_with_grads, make_inputs, make_tensor, other_device,
                           random_lengths)

FP16, BF16, FP32 = torch.float16, torch.bfloat16, torch.float32

pytestmark = pytest.mark.usefixtures("one_cpu_thread")


# --------------------------------------------------------------------------------------------
# 1. Against the reference
# --------------------------------------------------------------------------------------------

# A sequence with keys but no queries (1) and one with queries but no keys (3).
LENGTHS_Q = (5, 0, 37, 1, 20)
LENGTHS_K = (9, 4, 37, 0, 50)
PACKED = {"lengths_q": LENGTHS_Q, "lengths_k": LENGTHS_K}
VARLEN_CASES = [
    AttentionCase(heads_q=4, heads_kv=2, head_dim=40, dtype=FP16, causal=True, **PACKED),
    AttentionCase(heads_q=2, heads_kv=1, head_dim=64, dtype=BF16, **PACKED),
    AttentionCase(heads_q=2, heads_kv=1, head_dim=64, dtype=BF16, window=(8, 4), alibi="batch", **PACKED),
    AttentionCase(heads_q=2, heads_kv=2, head_dim=64, dtype=FP32, causal=True, softcap=5.0, scale=1.0, dropout_p=0.3,
                  **PACKED),
    AttentionCase(heads_q=2, heads_kv=1, head_dim=40, dtype=FP16, alibi="head", dropout_p=0.2, **PACKED),
    AttentionCase(heads_q=2, heads_kv=1, head_dim=40, dtype=FP16, causal=True, window=(16, 0), alibi="batch",
                  softcap=5.0, dropout_p=0.2, **PACKED),
    AttentionCase(heads_q=2, heads_kv=1, head_dim=40, dtype=BF16, alibi="batch", softcap=30.0, window=(-1, 10),
                  lengths_q=(33, 70, 1), lengths_k=(70, 33, 45)),
]


@pytest.mark.parametrize("case", VARLEN_CASES, ids=str)
def test_varlen_matches_reference(case: AttentionCase, device: str) -> None:
    o, lse, *_ = check_under_rule(make_inputs(case, device))
    total_q = sum(case.lengths_q)
    assert o.shape == (total_q, case.heads_q, case.head_dim) and lse.shape == (case.heads_q, total_q)


# --------------------------------------------------------------------------------------------
# 2. Packing changes nothing; inputs untouched; views of a packed qkv
# --------------------------------------------------------------------------------------------

def _split(t: torch.Tensor, lengths: tuple[int, ...]) -> list[torch.Tensor]:
    """Packed (total, H, D) -> one (1, H, len, D) view per sequence."""
    return [part.transpose(0, 1)[None] for part in torch.split(t, list(lengths))]


def test_varlen_equals_attention_per_sequence(device: str) -> None:
    """Packing changes nothing: each sequence gives bitwise what attention() gives it alone."""
    case = AttentionCase(heads_q=2, heads_kv=1, head_dim=64, dtype=FP16, causal=True, window=(12, 0), alibi="batch",
                         softcap=20.0, **PACKED)
    inputs = make_inputs(case, device)
    o, lse, dq, dk, dv = fused_with_grads(inputs)
    slopes = inputs.alibi_slopes
    parts = zip(_split(inputs.q, case.lengths_q), _split(inputs.k, case.lengths_k),
                _split(inputs.v, case.lengths_k), _split(inputs.do, case.lengths_q))
    per_seq = []
    options = {name: value for name, value in inputs.options().items() if name != "alibi_slopes"}
    for b, (q, k, v, do) in enumerate(parts):
        leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
        o_b, lse_b = fused_attn.attention(*leaves, return_lse=True, alibi_slopes=slopes[b], **options)
        per_seq.append([o_b, lse_b, *torch.autograd.grad(o_b, leaves, do)])

    def packed(i: int) -> torch.Tensor:
        return torch.cat([r[i][0].transpose(0, 1) for r in per_seq])

    assert_runs_equal([o, lse, dq, dk, dv],
                      [packed(0), torch.cat([r[1][0] for r in per_seq], dim=1), packed(2), packed(3), packed(4)])


def test_varlen_does_not_modify_its_inputs(device: str) -> None:
    case = VARLEN_CASES[-2]  # every option at once
    inputs = make_inputs(case, device)
    q, k, v = (t.requires_grad_() for t in inputs.qkv)
    cu_q, cu_k, slopes = inputs.cu_seqlens_q, inputs.cu_seqlens_k, inputs.alibi_slopes
    before = [t.detach().clone() for t in (q, k, v, cu_q, cu_k, slopes, inputs.do)]
    o = fused_attn.attention_varlen(q, k, v, cu_q, cu_k, inputs.max_seqlen_q, inputs.max_seqlen_k,
                                    **inputs.options())
    o.backward(inputs.do)
    for name, old, new in zip(("q", "k", "v", "cu_seqlens_q", "cu_seqlens_k", "alibi_slopes", "do"), before,
                              (q, k, v, cu_q, cu_k, slopes, inputs.do)):
        assert torch.equal(old, new.detach()), f"{name} was modified"


def test_varlen_accepts_views_of_a_packed_qkv(device: str) -> None:
    """q, k, v as slices of one (total, 3, H, D) tensor (token stride 3 * H * D): bitwise the same
    results as contiguous copies, and gradients land in the qkv tensor."""
    options = {"causal": True, "window": (8, 0)}
    total = sum(LENGTHS_Q)
    gen = torch.Generator().manual_seed(0)
    qkv = make_tensor((total, 3, 2, 64), BF16, device, "bhsd", gen).requires_grad_()
    do = make_tensor((total, 2, 64), BF16, device, "bhsd", gen)
    cu = cu_seqlens(LENGTHS_Q, device)
    longest = max(LENGTHS_Q)
    q, k, v = qkv.unbind(1)
    assert not q.is_contiguous()
    o, lse = fused_attn.attention_varlen(q, k, v, cu, cu, longest, longest, return_lse=True, **options)
    (dqkv,) = torch.autograd.grad(o, qkv, do)
    leaves = [t.detach().contiguous().requires_grad_() for t in (q, k, v)]
    o_ref, lse_ref = fused_attn.attention_varlen(*leaves, cu, cu, longest, longest, return_lse=True, **options)
    grads = torch.autograd.grad(o_ref, leaves, do)
    assert_runs_equal([o, lse, *dqkv.unbind(1)], [o_ref, lse_ref, *grads])


# --------------------------------------------------------------------------------------------
# 3. Bad arguments
# --------------------------------------------------------------------------------------------

def _varlen_args(device: str) -> dict[str, object]:
    """Two sequences: 5 and 7 queries, 7 and 8 keys."""
    return {"q": torch.randn(12, 4, 16, device=device, dtype=FP16),
            "k": torch.randn(15, 2, 16, device=device, dtype=FP16),
            "v": torch.randn(15, 2, 16, device=device, dtype=FP16),
            "cu_seqlens_q": torch.tensor([0, 5, 12], dtype=torch.int32, device=device),
            "cu_seqlens_k": torch.tensor([0, 7, 15], dtype=torch.int32, device=device),
            "max_seqlen_q": 7, "max_seqlen_k": 8}


def _cu(*bounds: int) -> Callable[[dict], torch.Tensor]:
    return lambda a: torch.tensor(bounds, dtype=torch.int32, device=a["q"].device)


# (id, {argument: new value given the valid arguments}, error, message)
VARLEN_BAD = [
    ("q-4d", {"q": lambda a: a["q"][None]}, ValueError, "q must have 3 dimensions"),
    ("v-2d", {"v": lambda a: a["v"][:, 0]}, ValueError, "v must have 3 dimensions"),
    ("cu-int64", {"cu_seqlens_q": lambda a: a["cu_seqlens_q"].long()}, ValueError,
     "cu_seqlens_q must be a 1-D int32 tensor"),
    ("cu-2d", {"cu_seqlens_k": lambda a: a["cu_seqlens_k"][None]}, ValueError, "cu_seqlens_k must be a 1-D int32"),
    ("cu-list", {"cu_seqlens_k": lambda a: [0, 7, 15]}, TypeError, "cu_seqlens_k must be a torch.Tensor"),
    ("cu-device", {"cu_seqlens_q": lambda a: a["cu_seqlens_q"].to(other_device(a["q"].device.type))}, ValueError,
     "cu_seqlens_q must be on q's device"),
    ("cu-not-from-zero", {"cu_seqlens_q": _cu(1, 5, 12)}, ValueError, "cu_seqlens_q must start at 0"),
    ("cu-decreasing", {"cu_seqlens_q": _cu(0, 3, 5, 12), "cu_seqlens_k": _cu(0, 9, 7, 15)},
     ValueError, "cu_seqlens_k must start at 0, never decrease"),
    ("cu-short-total", {"cu_seqlens_q": _cu(0, 5, 11)}, ValueError, "end at the total token count 12"),
    ("cu-long-total", {"cu_seqlens_k": _cu(0, 7, 16)}, ValueError, "end at the total token count 15"),
    ("cu-count-mismatch", {"cu_seqlens_k": _cu(0, 3, 7, 15)}, ValueError, "same number of sequences"),
    ("max-seqlen-q-short", {"max_seqlen_q": lambda a: 6}, ValueError,
     "max_seqlen_q is 6 but cu_seqlens_q holds a sequence of length 7"),
    ("max-seqlen-k-short", {"max_seqlen_k": lambda a: 7}, ValueError, "max_seqlen_k is 7"),
    ("max-seqlen-float", {"max_seqlen_q": lambda a: 7.0}, TypeError, "max_seqlen_q must be an int"),
    ("max-seqlen-tensor", {"max_seqlen_k": lambda a: torch.tensor(8)}, TypeError, "max_seqlen_k must be an int"),
    ("max-seqlen-bool", {"max_seqlen_k": lambda a: True}, TypeError, "max_seqlen_k must be an int"),
    ("alibi-num-seqs", {"alibi_slopes": lambda a: torch.ones(3, 4, device=a["q"].device)}, ValueError,
     "alibi_slopes must have shape"),
    ("causal-window-right", {"causal": lambda a: True, "window": lambda a: (0, 1)}, ValueError, "causal=True"),
    ("window-below-minus-one", {"window": lambda a: (-5, -1)}, ValueError, "window sizes must be >= 0"),
    ("softcap-negative", {"softcap": lambda a: -0.5}, ValueError, "softcap must be >= 0"),
    ("dropout-one", {"dropout_p": lambda a: 1.0}, ValueError, r"dropout_p must be in \[0, 1\)"),
]


@pytest.mark.parametrize("name,changes,error,message", VARLEN_BAD, ids=[b[0] for b in VARLEN_BAD])
def test_bad_varlen_arguments_raise(name, changes, error, message, device: str, monkeypatch) -> None:
    forbid_attention_launch(monkeypatch)
    args = _varlen_args(device)
    args.update({key: make(args) for key, make in changes.items()})
    with pytest.raises(error, match=message):
        fused_attn.attention_varlen(**args)


# --------------------------------------------------------------------------------------------
# GPU twins: the same check at real sizes (8 sequences of up to 2048 tokens each)
# --------------------------------------------------------------------------------------------

GPU_VARLEN_CASES = [
    AttentionCase(heads_q=16, heads_kv=4, head_dim=128, dtype=BF16, causal=True,
                  lengths_q=random_lengths(8, 2048, 0), lengths_k=random_lengths(8, 2048, 1)),
    AttentionCase(heads_q=16, heads_kv=16, head_dim=64, dtype=FP16, window=(256, 128), alibi="batch", softcap=30.0,
                  dropout_p=0.2, lengths_q=random_lengths(8, 2048, 2), lengths_k=random_lengths(8, 2048, 3)),
]


@pytest.mark.gpu
@pytest.mark.parametrize("case", GPU_VARLEN_CASES, ids=str)
def test_gpu_varlen_matches_reference(case: AttentionCase) -> None:
    check_under_rule(make_inputs(case, GPU))
