"""The backward is bitwise deterministic with the variants combined: windows with GQA, ALiBi with
softcap, dropout with a window and a float mask, and packed sequences with every option. Two
runs on the same inputs must give the same o, lse, dq, dk and dv bits.

The GPU twins at the end (marked gpu, skipped without one) run the same check at real sizes.
"""
from __future__ import annotations

import pytest
import torch

from tests.helpers import GPU, AttentionCase, assert_runs_equal, fused_with_grads, make_inputs, random_lengths

FP16, BF16, FP32 = torch.float16, torch.bfloat16, torch.float32

pytestmark = pytest.mark.usefixtures("one_cpu_thread")


def check_backward_is_deterministic(case: AttentionCase, device: str) -> None:
    inputs = make_inputs(case, device)
    assert_runs_equal(fused_with_grads(inputs), fused_with_grads(inputs))


DETERMINISM_CASES = [
    AttentionCase(1, 4, 1, 45, 70, 64, dtype=FP16, window=(16, 8), name="window-gqa"),
    AttentionCase(2, 2, 1, 45, 40, 40, causal=True, dtype=BF16, alibi="batch", softcap=5.0, name="alibi-softcap"),
    AttentionCase(1, 4, 2, 40, 33, 64, causal=True, dtype=FP16, window=(20, 0), dropout_p=0.3, mask="float",
                  name="dropout-mask"),
    AttentionCase(heads_q=2, heads_kv=1, head_dim=40, dtype=FP32, causal=True, window=(16, 0), alibi="batch",
                  softcap=5.0, dropout_p=0.2, lengths_q=(5, 0, 37, 1), lengths_k=(9, 4, 37, 0), name="varlen-all"),
]


@pytest.mark.parametrize("case", DETERMINISM_CASES, ids=lambda c: c.name)
def test_backward_is_bitwise_deterministic(case: AttentionCase, device: str) -> None:
    check_backward_is_deterministic(case, device)


# --------------------------------------------------------------------------------------------
# GPU twins: the same check at real sizes (the GPU dropout case of test_dropout.py and the
# packed one with every option of test_varlen.py)
# --------------------------------------------------------------------------------------------

GPU_DETERMINISM_CASES = [
    AttentionCase(2, 16, 4, 2048, 1536, 128, causal=True, dtype=BF16, dropout_p=0.1),
    AttentionCase(heads_q=16, heads_kv=16, head_dim=64, dtype=FP16, window=(256, 128), alibi="batch", softcap=30.0,
                  dropout_p=0.2, lengths_q=random_lengths(8, 2048, 2), lengths_k=random_lengths(8, 2048, 3)),
]


@pytest.mark.gpu
@pytest.mark.parametrize("case", GPU_DETERMINISM_CASES, ids=str)
def test_gpu_backward_is_bitwise_deterministic(case: AttentionCase) -> None:
    check_backward_is_deterministic(case, GPU)
