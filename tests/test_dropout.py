"""Dropout: the kept fraction of the kernels' mask, the kernels against the float64 reference
given that mask under FlashAttention's error rule (alone and with windows, masks, ALiBi and
softcap), reproducibility from the generator, p = 0 and the lse, and bad dropout arguments
refused before any kernel launches.

Without a GPU the kernels run through the Triton interpreter, so the CPU cases are small but
awkward. The GPU twins at the end (marked gpu, skipped without one) run the same checks at real
sizes.
"""
from __future__ import annotations

import math

import pytest
import torch

import fused_attn
from tests.helpers import (GPU, AttentionCase, assert_runs_equal, check_under_rule, forbid_attention_launch,
                           fused_with_grads, make_inputs)

FP16, BF16, FP32 = torch.float16, torch.bfloat16, torch.float32

pytestmark = pytest.mark.usefixtures("one_cpu_thread")


# --------------------------------------------------------------------------------------------
# 1. The mask
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dropout_p", [0.1, 0.5])
def test_dropout_keeps_the_expected_fraction(dropout_p: float, device: str) -> None:
    """131072 draws: the kept fraction's standard deviation is below 0.0015, so 0.01 is > 6 sigma.
    Heads and rows must get different draws (a per-(batch, head, row, key) counter)."""
    keep = fused_attn.dropout_mask(12345, 1, 2, 256, 256, dropout_p, device)
    assert keep.dtype == torch.bool and keep.shape == (1, 2, 256, 256)
    assert abs(keep.float().mean().item() - (1 - dropout_p)) <= 0.01
    assert not torch.equal(keep[0, 0], keep[0, 1])
    assert not torch.equal(keep[0, 0, 0], keep[0, 0, 1])


# --------------------------------------------------------------------------------------------
# 2. Against the reference, given the kernels' mask
# --------------------------------------------------------------------------------------------

DROPOUT_CASES = [
    AttentionCase(1, 2, 1, 45, 70, 64, causal=True, dtype=FP16, dropout_p=0.2),
    AttentionCase(2, 2, 2, 45, 33, 40, dtype=BF16, window=(8, 8), dropout_p=0.5),
    AttentionCase(1, 4, 2, 33, 33, 64, dtype=FP32, mask="bool", dropout_p=0.1),
    AttentionCase(1, 2, 1, 17, 97, 80, dtype=FP16, alibi="head", softcap=5.0, dropout_p=0.3),
    AttentionCase(1, 2, 1, 97, 45, 64, causal=True, dtype=BF16, mask="float", dropout_p=0.15),
]


@pytest.mark.parametrize("case", DROPOUT_CASES, ids=str)
def test_dropout_matches_reference_with_the_kernels_mask(case: AttentionCase, device: str) -> None:
    check_under_rule(make_inputs(case, device))


# --------------------------------------------------------------------------------------------
# 3. Reproducibility, p = 0 and the lse
# --------------------------------------------------------------------------------------------

def test_dropout_is_reproducible_from_the_generator(device: str) -> None:
    """The same generator state gives bitwise the same output (also through torch's default
    generator, as dropout_seed documents), a different seed a different one."""
    q, k, v, _ = make_inputs(AttentionCase(1, 2, 2, 33, 33, 32, dtype=FP16), device)

    def run(seed: int | None, generator_seed: int | None = None) -> torch.Tensor:
        gen = None if generator_seed is None else torch.Generator().manual_seed(generator_seed)
        if seed is not None:
            torch.manual_seed(seed)
        return fused_attn.attention(q, k, v, causal=True, dropout_p=0.3, generator=gen)

    with torch.random.fork_rng(devices=[]):
        assert torch.equal(run(None, 7), run(None, 7))
        assert not torch.equal(run(None, 7), run(None, 8))
        assert torch.equal(run(5), run(5))
        assert not torch.equal(run(5), run(6))


def test_dropout_p_zero_is_exactly_no_dropout(device: str) -> None:
    """dropout_p=0 with a generator takes the no-dropout path: no mask, no 1 / (1 - p) rescale."""
    inputs = make_inputs(AttentionCase(1, 2, 1, 33, 45, 40, causal=True, dtype=BF16, window=(16, 0)), device)

    def zero(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return fused_attn.attention(q, k, v, causal=True, window=(16, 0), return_lse=True, dropout_p=0.0,
                                    generator=torch.Generator().manual_seed(3))

    assert_runs_equal(fused_with_grads(inputs, run=zero), fused_with_grads(inputs))


def test_dropout_does_not_change_lse(device: str) -> None:
    """lse is the undropped softmax's normalizer: the kernels count dropped entries in it."""
    q, k, v, _ = make_inputs(AttentionCase(1, 2, 2, 45, 45, 64, dtype=FP16), device)
    _, lse = fused_attn.attention(q, k, v, causal=True, return_lse=True)
    _, lse_dropped = fused_attn.attention(q, k, v, causal=True, return_lse=True, dropout_p=0.4,
                                          generator=torch.Generator().manual_seed(0))
    assert torch.equal(lse_dropped, lse)


# --------------------------------------------------------------------------------------------
# 4. Bad arguments
# --------------------------------------------------------------------------------------------

# (id, dropout keywords for attention(), error, message)
BAD_DROPOUT = [
    ("dropout-negative", {"dropout_p": -0.1}, ValueError, r"dropout_p must be in \[0, 1\)"),
    ("dropout-one", {"dropout_p": 1.0}, ValueError, r"dropout_p must be in \[0, 1\)"),
    ("dropout-nan", {"dropout_p": math.nan}, ValueError, "dropout_p must be finite"),
    ("dropout-string", {"dropout_p": "0.1"}, TypeError, "dropout_p must be a float"),
]


@pytest.mark.parametrize("name,extra,error,message", BAD_DROPOUT, ids=[b[0] for b in BAD_DROPOUT])
def test_bad_dropout_arguments_raise(name, extra, error, message, device: str, monkeypatch) -> None:
    forbid_attention_launch(monkeypatch)
    q = torch.randn(1, 4, 8, 16, device=device, dtype=FP16)
    k, v = (torch.randn(1, 2, 8, 16, device=device, dtype=FP16) for _ in range(2))
    with pytest.raises(error, match=message):
        fused_attn.attention(q, k, v, **extra)


def test_dropout_mask_refuses_bad_probability(device: str) -> None:
    for bad, error in ((1.0, ValueError), (-0.5, ValueError), (math.nan, ValueError), ("0.5", TypeError)):
        with pytest.raises(error, match="dropout_p"):
            fused_attn.dropout_mask(0, 1, 1, 4, 4, bad, device)


# --------------------------------------------------------------------------------------------
# GPU twins: the same checks at real sizes. The float64 reference holds several (B, Hq, Sq, Sk)
# float64 tensors: B * Hq * Sq * Sk * 8 bytes is at most 1 GiB in every case here.
# --------------------------------------------------------------------------------------------

GPU_DROPOUT_CASES = [
    AttentionCase(2, 16, 4, 2048, 1536, 128, causal=True, dtype=BF16, dropout_p=0.1),
    AttentionCase(2, 16, 16, 2048, 2048, 64, dtype=FP16, window=(256, 256), alibi="head", softcap=30.0,
                  dropout_p=0.3),
]


@pytest.mark.gpu
@pytest.mark.parametrize("case", GPU_DROPOUT_CASES, ids=str)
def test_gpu_dropout_matches_reference_with_the_kernels_mask(case: AttentionCase) -> None:
    check_under_rule(make_inputs(case, GPU))


@pytest.mark.gpu
def test_gpu_dropout_mask_fraction_and_lse() -> None:
    """On the GPU: the kept fraction of a (2, 16, 2048, 2048) mask, and lse unchanged by dropout
    (here within float32 rounding: the compiled kernels with and without dropout may schedule the
    same arithmetic differently)."""
    keep = fused_attn.dropout_mask(99, 2, 16, 2048, 2048, 0.1, GPU)
    assert abs(keep.float().mean().item() - 0.9) <= 0.01
    q, k, v, _ = make_inputs(AttentionCase(2, 16, 16, 2048, 2048, 128, dtype=BF16), GPU)
    _, lse = fused_attn.attention(q, k, v, causal=True, return_lse=True)
    _, lse_dropped = fused_attn.attention(q, k, v, causal=True, return_lse=True, dropout_p=0.1,
                                          generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(lse_dropped, lse, rtol=1e-6, atol=1e-6)
