"""ALiBi and softcap against the float64 reference under FlashAttention's error rule (alone and
with windows, masks and each other), slopes that require grad refused, and bad ALiBi and
softcap arguments refused before any kernel launches.

Without a GPU the kernels run through the Triton interpreter, so the CPU cases are small but
awkward (lengths 17 to 97, Sq != Sk both ways, head dims 40 to 96, GQA, slopes per head and per
batch entry). The GPU twins at the end (marked gpu, skipped without one) run the same check at
real sizes.
"""
from __future__ import annotations

import math

import pytest
import torch

import fused_attn
from tests.helpers import GPU, AttentionCase, check_under_rule, forbid_attention_launch, make_inputs, other_device

FP16, BF16, FP32 = torch.float16, torch.bfloat16, torch.float32

pytestmark = pytest.mark.usefixtures("one_cpu_thread")


# --------------------------------------------------------------------------------------------
# 1. ALiBi
# --------------------------------------------------------------------------------------------

ALIBI_CASES = [
    AttentionCase(1, 4, 2, 45, 97, 64, causal=True, dtype=FP16, alibi="head"),
    AttentionCase(2, 4, 1, 45, 33, 40, dtype=BF16, alibi="batch"),
    AttentionCase(2, 2, 2, 70, 70, 80, causal=True, dtype=FP32, alibi="batch"),
    AttentionCase(1, 4, 1, 97, 33, 64, causal=True, dtype=FP32, alibi="head"),
    AttentionCase(1, 2, 1, 33, 97, 96, dtype=BF16, alibi="head", window=(20, 5)),
    AttentionCase(2, 2, 1, 17, 70, 40, dtype=FP16, alibi="batch", mask="float"),
]


@pytest.mark.parametrize("case", ALIBI_CASES, ids=str)
def test_alibi_matches_reference(case: AttentionCase, device: str) -> None:
    check_under_rule(make_inputs(case, device))


def test_alibi_slopes_requiring_grad_are_refused(device: str) -> None:
    """The kernels compute no slope gradient: silently returning none would be wrong, so a slope
    tensor that requires grad is refused while autograd records, and accepted under no_grad."""
    q, k, v, _ = make_inputs(AttentionCase(1, 2, 2, 9, 9, 16, dtype=FP32), device)
    slopes = torch.tensor([0.5, 0.25], device=device, requires_grad=True)
    with pytest.raises(ValueError, match="alibi_slopes requires grad"):
        fused_attn.attention(q, k, v, alibi_slopes=slopes)
    with torch.no_grad():
        assert torch.equal(fused_attn.attention(q, k, v, alibi_slopes=slopes),
                           fused_attn.attention(q, k, v, alibi_slopes=slopes.detach()))


# --------------------------------------------------------------------------------------------
# 2. Softcap
# --------------------------------------------------------------------------------------------

# scale 1.0 with D = 64 gives scores of standard deviation 8, so tanh saturates for caps 1 and 5
# and bends for 30: the gradient's (1 - tanh^2) factor is far from 1 (the test checks this).
SOFTCAP_CASES = [
    AttentionCase(batch, 2, 1, 45, 70, 64, dtype=dtype, scale=1.0, softcap=cap, **extra)  # type: ignore[arg-type]
    for cap, dtype, batch, extra in [
        (1.0, FP16, 1, {"causal": True}),
        (1.0, BF16, 1, {"window": (16, 4)}),
        (1.0, FP32, 1, {"alibi": "head"}),
        (5.0, FP16, 2, {"alibi": "batch", "causal": True}),
        (5.0, BF16, 1, {}),
        (5.0, FP32, 1, {"causal": True, "window": (8, 0)}),
        (30.0, FP16, 1, {"window": (10, 10)}),
        (30.0, BF16, 1, {"causal": True, "alibi": "head"}),
        (30.0, FP32, 1, {}),
    ]
]


@pytest.mark.parametrize("case", SOFTCAP_CASES, ids=str)
def test_softcap_matches_reference(case: AttentionCase, device: str) -> None:
    inputs = make_inputs(case, device)
    q, k = inputs.q, inputs.k
    # Where |s| > cap / 2, tanh's slope is below 0.79: the cap visibly bends the scores there.
    scores = q.float() @ k.float().repeat_interleave(case.heads_q // case.heads_kv, 1).transpose(-1, -2) * case.scale
    assert (scores.abs() > case.softcap / 2).float().mean() > 0.05, "too few scores reach the cap to test it"
    check_under_rule(inputs)


# --------------------------------------------------------------------------------------------
# 3. Bad arguments
# --------------------------------------------------------------------------------------------

# (id, extra keywords for attention() given the device, error, message)
BAD_ARGUMENTS = [
    ("softcap-negative", lambda d: {"softcap": -1.0}, ValueError, "softcap must be >= 0"),
    ("softcap-nan", lambda d: {"softcap": math.nan}, ValueError, "softcap must be finite"),
    ("softcap-inf", lambda d: {"softcap": math.inf}, ValueError, "softcap must be finite"),
    ("softcap-string", lambda d: {"softcap": "5"}, TypeError, "softcap must be a float"),
    ("alibi-list", lambda d: {"alibi_slopes": [0.5] * 4}, TypeError, "alibi_slopes must be a torch.Tensor"),
    ("alibi-shape", lambda d: {"alibi_slopes": torch.ones(2, device=d)}, ValueError, "alibi_slopes must have shape"),
    ("alibi-batch-shape", lambda d: {"alibi_slopes": torch.ones(3, 4, device=d)}, ValueError,
     "alibi_slopes must have shape"),
    ("alibi-3d", lambda d: {"alibi_slopes": torch.ones(1, 4, 1, device=d)}, ValueError, "alibi_slopes must have shape"),
    ("alibi-int", lambda d: {"alibi_slopes": torch.ones(4, dtype=torch.int32, device=d)}, TypeError,
     "alibi_slopes must have a float dtype"),
    ("alibi-device", lambda d: {"alibi_slopes": torch.ones(4, device=other_device(d))}, ValueError,
     "alibi_slopes must be on q's device"),
]


@pytest.mark.parametrize("name,extra,error,message", BAD_ARGUMENTS, ids=[b[0] for b in BAD_ARGUMENTS])
def test_bad_alibi_and_softcap_arguments_raise(name, extra, error, message, device: str, monkeypatch) -> None:
    forbid_attention_launch(monkeypatch)
    q = torch.randn(1, 4, 8, 16, device=device, dtype=FP16)
    k, v = (torch.randn(1, 2, 8, 16, device=device, dtype=FP16) for _ in range(2))
    with pytest.raises(error, match=message):
        fused_attn.attention(q, k, v, **extra(device))


# --------------------------------------------------------------------------------------------
# GPU twins: the same check at real sizes. The float64 reference holds several (B, Hq, Sq, Sk)
# float64 tensors: B * Hq * Sq * Sk * 8 bytes is at most 1 GiB in every case here.
# --------------------------------------------------------------------------------------------

GPU_ALIBI_CASES = [
    AttentionCase(2, 16, 4, 2048, 2048, 128, causal=True, dtype=FP16, alibi="batch"),
    AttentionCase(2, 16, 16, 2048, 1536, 64, dtype=BF16, alibi="head"),
]
GPU_SOFTCAP_CASES = [
    AttentionCase(2, 16, 4, 2048, 2048, 128, causal=True, dtype=BF16, softcap=30.0),
    AttentionCase(2, 16, 16, 2048, 2048, 64, dtype=FP16, scale=1.0, softcap=5.0, window=(512, 0), alibi="head"),
]


@pytest.mark.gpu
@pytest.mark.parametrize("case", GPU_ALIBI_CASES, ids=str)
def test_gpu_alibi_matches_reference(case: AttentionCase) -> None:
    check_under_rule(make_inputs(case, GPU))


@pytest.mark.gpu
@pytest.mark.parametrize("case", GPU_SOFTCAP_CASES, ids=str)
def test_gpu_softcap_matches_reference(case: AttentionCase) -> None:
    check_under_rule(make_inputs(case, GPU))
