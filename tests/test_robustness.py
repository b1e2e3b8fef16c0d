"""No silent wrong answers: special values, memory safety and concurrency (issue 11).

- NaN and +/-inf scores propagate into o, lse and the gradients as they do in torch (the float64
  reference runs torch's own softmax), while rows that see no key still give 0 and -inf;
- p is exactly 0 on rows and keys outside a sequence in the backward (no NaN from padding rows);
- huge scores give no inf or NaN where torch is finite;
- tensors the kernels read through raw pointers (cu_seqlens, ALiBi slopes) are used by value,
  whatever their strides;
- the lse is differentiable;
- concurrent calls from several threads give the serial results.
"""
from __future__ import annotations

import math
import threading
import warnings

import pytest
import torch
import torch.nn.functional as F

import fused_attn
from fused_attn import reference
from tests.helpers import assert_close_to_reference

pytestmark = pytest.mark.usefixtures("one_cpu_thread")

NAN, INF = float("nan"), float("inf")


def _qkv(shape_q: tuple[int, ...], shape_kv: tuple[int, ...], device: str, dtype: torch.dtype = torch.float32,
         seed: int = 0, positive_q: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(shape_q, generator=gen)
    if positive_q:  # so that an infinite key row gives an infinite score of known sign
        q = q.abs() + 0.1
    k = torch.randn(shape_kv, generator=gen)
    v = torch.randn(shape_kv, generator=gen)
    return tuple(t.to(device=device, dtype=dtype) for t in (q, k, v))  # type: ignore[return-value]


def _run_both(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **options):
    """(o, lse, dq, dk, dv) of the kernels and of the float64 reference for one call."""
    results = []
    for fn, dtype in ((fused_attn.attention, q.dtype), (reference.attention, torch.float64)):
        leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
        o, lse = fn(*leaves, return_lse=True, **options)
        gen = torch.Generator().manual_seed(1)
        do = torch.randn(o.shape, generator=gen).to(device=o.device, dtype=dtype)
        grads = torch.autograd.grad(o, leaves, do)
        results.append((o.detach(), lse.detach(), *grads))
    return results


def _assert_same_special_values(name: str, got: torch.Tensor, golden: torch.Tensor) -> None:
    """NaN exactly where the reference has NaN, the same infinities, and the finite rest close."""
    assert torch.equal(got.isnan(), golden.isnan()), (
        f"{name}: NaN at {got.isnan().sum().item()} places, the reference at {golden.isnan().sum().item()}")
    assert torch.equal(got.isposinf(), golden.isposinf()) and torch.equal(got.isneginf(), golden.isneginf()), (
        f"{name}: infinities differ from the reference")
    finite = golden.isfinite()
    if finite.any():
        err = (got.double() - golden)[finite].abs().max().item()
        assert err <= 1e-4 * max(1.0, golden[finite].abs().max().item()), f"{name}: finite values off by {err}"


# --------------------------------------------------------------------------------------------
# NaN and infinities propagate as in torch
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("causal", [False, True])
def test_a_nan_key_makes_exactly_the_rows_that_see_it_nan(causal: bool, device: str) -> None:
    # Several key tiles; GQA: query heads 2 and 3 read key head 1.
    q, k, v = _qkv((2, 4, 40, 16), (2, 2, 70, 16), device)
    k[0, 1, 37, 3] = NAN
    mine, golden = _run_both(q, k, v, causal=causal)
    for name, got, gold in zip(("o", "lse"), mine[:2], golden[:2]):
        _assert_same_special_values(name, got, gold)
    assert mine[0][0, 2:].isnan().any() and not mine[0][1].isnan().any() and not mine[0][0, :2].isnan().any()


def test_nan_reaches_the_gradients_as_in_torch(device: str) -> None:
    # One tile of keys, so that every gradient torch's 0 * NaN reaches is reached here too.
    q, k, v = _qkv((1, 4, 20, 16), (1, 2, 24, 16), device)
    k[0, 1, 5, 2] = NAN
    mine, golden = _run_both(q, k, v)
    for name, got, gold in zip(("o", "lse", "dq", "dk", "dv"), mine, golden):
        _assert_same_special_values(name, got, gold)
    assert mine[4][0, 1].isnan().all() and not mine[4][0, 0].isnan().any()


def test_an_infinite_score_gives_nan_output_and_infinite_lse(device: str) -> None:
    q, k, v = _qkv((1, 2, 9, 16), (1, 2, 50, 16), device, positive_q=True)
    k[0, 0, 41] = INF  # every row of head 0 scores +inf on key 41
    o, lse = fused_attn.attention(q, k, v, return_lse=True)
    gold_o, gold_lse = reference.attention(q.double(), k.double(), v.double(), return_lse=True)
    _assert_same_special_values("o", o, gold_o)
    _assert_same_special_values("lse", lse, gold_lse)
    assert lse[0, 0].isposinf().all() and o[0, 0].isnan().all() and o[0, 1].isfinite().all()


def test_a_tile_of_minus_inf_scores_before_finite_ones_is_harmless(device: str) -> None:
    # Keys 0..39 score -inf for every query (a whole key tile of the unmasked loop and part of the
    # next): they get probability 0, exactly as torch's softmax gives them.
    q, k, v = _qkv((1, 2, 64, 16), (1, 2, 96, 16), device, positive_q=True)
    k[:, :, :40] = -INF
    mine, golden = _run_both(q, k, v)
    for name, got, gold in zip(("o", "lse", "dq", "dk", "dv"), mine, golden):
        _assert_same_special_values(name, got, gold)
    assert mine[0].isfinite().all()


def test_nan_alibi_slope_makes_its_head_nan(device: str) -> None:
    q, k, v = _qkv((2, 3, 17, 16), (2, 3, 23, 16), device)
    slopes = torch.tensor([0.5, NAN, 0.125], device=device)
    mine, golden = _run_both(q, k, v, causal=True, alibi_slopes=slopes)
    for name, got, gold in zip(("o", "lse"), mine[:2], golden[:2]):
        _assert_same_special_values(name, got, gold)
    assert mine[0][:, 1].isnan().all() and mine[0][:, [0, 2]].isfinite().all()


def test_nan_in_a_float_mask_makes_its_row_nan_and_minus_inf_removes_a_nan_score(device: str) -> None:
    q, k, v = _qkv((1, 2, 21, 16), (1, 2, 45, 16), device)
    k[0, 0, 7, 0] = NAN  # NaN scores on key 7 of head 0 ...
    mask = torch.zeros(1, 2, 21, 45, device=device)
    mask[0, :, :, 7] = -INF  # ... which the mask removes, for every row
    mask[0, 1, 4, 30] = NAN  # and a NaN bias: row 4 of head 1 becomes NaN
    mine, golden = _run_both(q, k, v, attn_mask=mask)
    for name, got, gold in zip(("o", "lse"), mine[:2], golden[:2]):
        _assert_same_special_values(name, got, gold)
    nan_rows = mine[0].isnan().any(-1)
    assert nan_rows.sum().item() == 1 and nan_rows[0, 1, 4]


def test_a_row_masked_with_the_float32_minimum_averages_its_keys_as_torch_does(device: str) -> None:
    # transformers and others mask with torch.finfo(dtype).min, not -inf: a row masked entirely
    # that way is not empty for torch (its softmax is uniform), and must not be here either.
    q, k, v = _qkv((1, 1, 6, 16), (1, 1, 40, 16), device)
    mask = torch.zeros(1, 1, 6, 40, device=device)
    mask[0, 0, 2] = torch.finfo(torch.float32).min
    o = fused_attn.attention(q, k, v, attn_mask=mask)
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    torch.testing.assert_close(o, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(o[0, 0, 2], v[0, 0].mean(0), atol=1e-5, rtol=1e-5)


def test_a_nan_value_no_query_sees_reaches_rows_as_in_torch(device: str) -> None:
    # v holds a NaN that no query may see. torch's matmul turns 0 * NaN into NaN for every row,
    # even the row the mask empties; the kernels' dot does the same for the rows whose key tiles
    # hold it (here all: one tile), and the lse says which rows have keys.
    q, k, v = _qkv((1, 1, 5, 16), (1, 1, 8, 16), device)
    v[0, 0, 3] = NAN
    keep = torch.ones(5, 8, dtype=torch.bool, device=device)
    keep[1] = False  # row 1 sees nothing
    keep[:, 3] = False  # nobody sees the NaN value
    o, lse = fused_attn.attention(q, k, v, attn_mask=keep, return_lse=True)
    torch_o = F.scaled_dot_product_attention(q, k, v, attn_mask=keep)
    assert torch.equal(o.isnan(), torch_o.isnan())
    assert lse[0, 0, 1] == -INF and lse[0, 0, [0, 2, 3, 4]].isfinite().all()


def test_attention_stats_propagate_nan_like_the_forward(device: str) -> None:
    q, k, _ = _qkv((1, 2, 12, 16), (1, 2, 40, 16), device)
    k[0, 0, 33, 1] = NAN
    stats = fused_attn.attention_stats(q, k, causal=True)
    _, lse = fused_attn.attention(q, k, k, causal=True, return_lse=True)
    assert torch.equal(stats.lse.isnan(), lse.isnan()) and stats.lse.isnan().any()
    assert torch.equal(stats.entropy.isnan(), lse.isnan())


# --------------------------------------------------------------------------------------------
# Rows and keys outside the sequence get p = 0 in the backward
# --------------------------------------------------------------------------------------------

def test_negative_alibi_slopes_give_finite_gradients_when_seq_q_is_ragged(device: str) -> None:
    # Rows past seq_q in the last query tile used to score exp2(+|slope| * distance): inf in fp16 dv.
    q, k, v = _qkv((1, 1, 127, 32), (1, 1, 128, 32), device, dtype=torch.float16)
    slopes = torch.tensor([-0.3], device=device)
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    golden = [t.detach().double().requires_grad_() for t in (q, k, v)]
    plain = [t.detach().requires_grad_() for t in (q, k, v)]
    fused_attn.attention(*leaves, alibi_slopes=slopes).sum().backward()
    reference.attention(*golden, alibi_slopes=slopes).sum().backward()
    reference.attention(*plain, alibi_slopes=slopes.half()).sum().backward()
    for name, got, gold, ref in zip(("dq", "dk", "dv"), leaves, golden, plain):
        assert_close_to_reference(name, got.grad, gold.grad, ref.grad, 3.0, torch.float16)


@pytest.mark.parametrize("seq_q", [13, 32])
def test_a_key_no_query_sees_gets_zero_gradient(seq_q: int, device: str) -> None:
    # Key 5 scores -inf for every query (k = -inf, q > 0): torch gives it dk = dv = 0. Padding rows
    # past seq_q (q = 0) used to score 0 * -inf = NaN on it.
    q, k, v = _qkv((1, 2, seq_q, 16), (1, 2, 20, 16), device, positive_q=True)
    k[0, :, 5] = -INF
    mine, golden = _run_both(q, k, v)
    for name, got, gold in zip(("o", "lse", "dq", "dk", "dv"), mine, golden):
        _assert_same_special_values(name, got, gold)
    assert torch.equal(mine[3][0, :, 5], torch.zeros_like(mine[3][0, :, 5]))
    assert torch.equal(mine[4][0, :, 5], torch.zeros_like(mine[4][0, :, 5]))


def test_packed_sequences_with_one_key_each_compute_no_overflow(device: str) -> None:
    # Every sequence has one key: the rest of each key tile lies past the sequence. Their p must be
    # exactly 0, not an overflow whose result is discarded (NumPy reports every overflow).
    lengths_q, lengths_k = [3, 5, 1, 4], [1, 1, 1, 1]
    cu_q = torch.tensor([0, *torch.tensor(lengths_q).cumsum(0).tolist()], dtype=torch.int32, device=device)
    cu_k = torch.tensor([0, *torch.tensor(lengths_k).cumsum(0).tolist()], dtype=torch.int32, device=device)
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(sum(lengths_q), 2, 16, generator=gen).to(device).requires_grad_()
    k = torch.randn(sum(lengths_k), 2, 16, generator=gen).to(device).requires_grad_()
    v = torch.randn(sum(lengths_k), 2, 16, generator=gen).to(device).requires_grad_()
    slopes = torch.tensor([-8.0, -0.5], device=device)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        o = fused_attn.attention_varlen(q, k, v, cu_q, cu_k, 5, 1, alibi_slopes=slopes)
        o.sum().backward()
    gold = [t.detach().double().requires_grad_() for t in (q, k, v)]
    o_ref = reference.attention_varlen(*gold, cu_q, cu_k, alibi_slopes=slopes)
    o_ref.sum().backward()
    torch.testing.assert_close(o.double(), o_ref, atol=1e-5, rtol=1e-5)
    for got, ref in zip((q, k, v), gold):
        torch.testing.assert_close(got.grad.double(), ref.grad, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------------------------
# Huge scores: no inf or NaN where torch is finite
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype,magnitude,scale", [(torch.float16, 1e3, None), (torch.float16, 3e4, None),
                                                   (torch.bfloat16, 1e3, None), (torch.float32, 30.0, 4.0),
                                                   (torch.float32, 1e4, None)])
def test_huge_scores_give_finite_results_where_the_reference_is_finite(dtype: torch.dtype, magnitude: float,
                                                                       scale: float | None, device: str) -> None:
    # |scores| from 1e4 to 1e9: softmax is nearly one-hot and a float32 lse has an ulp of up to 128
    # there. The backward recomputes p from that lse; p is clamped to 1, so it never overflows (it
    # used to reach inf at 3e4 in fp16, where torch's own float32 SDPA gradients are inf too).
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 2, 45, 32, generator=gen) for _ in range(3))
    q, k = ((t * magnitude).clamp(-6e4, 6e4) for t in (q, k))
    q, k, v = (t.to(device=device, dtype=dtype) for t in (q, k, v))
    mine = [t.detach().requires_grad_() for t in (q, k, v)]
    gold = [t.detach().double().requires_grad_() for t in (q, k, v)]
    plain = [t.detach().requires_grad_() for t in (q, k, v)]
    o, lse = fused_attn.attention(*mine, causal=True, scale=scale, return_lse=True)
    o_gold, lse_gold = reference.attention(*gold, causal=True, scale=scale, return_lse=True)
    o_plain = reference.attention(*plain, causal=True, scale=scale)
    do = torch.randn(o.shape, generator=gen).to(device=device, dtype=dtype)
    grads = torch.autograd.grad(o, mine, do)
    grads_gold = torch.autograd.grad(o_gold, gold, do.double())
    for name, got, ref in zip(("o", "lse", "dq", "dk", "dv"), (o, lse, *grads), (o_gold, lse_gold, *grads_gold)):
        assert not (ref.isfinite() & ~got.isfinite()).any(), f"{name}: inf or NaN where the reference is finite"
    # o keeps FlashAttention's rule where plain PyTorch is finite (in fp16 its scores overflow and
    # it returns NaN everywhere; then only the floor applies).
    err = (o.double() - o_gold).abs().max().item()
    plain_err = (o_plain.double() - o_gold).abs().max().item()
    assert err <= (2 * plain_err if math.isfinite(plain_err) else 0.0) + 1e-2 * o_gold.abs().max().item()


# --------------------------------------------------------------------------------------------
# Raw-pointer inputs are read by value, whatever their strides
# --------------------------------------------------------------------------------------------

def test_strided_cu_seqlens_are_read_by_value(device: str) -> None:
    q, k, v = (torch.randn(12, 2, 16, generator=torch.Generator().manual_seed(i)).to(device) for i in range(3))
    strided = torch.tensor([0, 3, 5, 7, 12, 12], dtype=torch.int32, device=device)[::2]  # values [0, 5, 12]
    dense = strided.contiguous()
    assert not strided.is_contiguous()
    o = fused_attn.attention_varlen(q, k, v, strided, strided, 7, 7, causal=True)
    o_dense = fused_attn.attention_varlen(q, k, v, dense, dense, 7, 7, causal=True)
    assert torch.equal(o, o_dense)
    gold = reference.attention_varlen(q.double(), k.double(), v.double(), dense, dense, causal=True)
    torch.testing.assert_close(o.double(), gold, atol=1e-5, rtol=1e-5)


def test_strided_alibi_slopes_are_read_by_value(device: str) -> None:
    q, k, v = _qkv((3, 2, 9, 16), (3, 2, 9, 16), device)
    per_batch = torch.tensor([[0.5, 0.25, 0.125], [1.0, 2.0, 4.0]], device=device).t()  # (3, 2), not contiguous
    per_head = torch.tensor([0.5, 9.0, 0.25, 9.0], device=device)[::2]
    for slopes in (per_batch, per_head):
        assert not slopes.is_contiguous()
        o = fused_attn.attention(q, k, v, alibi_slopes=slopes)
        gold = reference.attention(q.double(), k.double(), v.double(), alibi_slopes=slopes.contiguous())
        torch.testing.assert_close(o.double(), gold, atol=1e-5, rtol=1e-5)


def test_packed_slopes_as_a_transposed_view(device: str) -> None:
    q, k, v = (torch.randn(12, 2, 16, generator=torch.Generator().manual_seed(i)).to(device) for i in range(3))
    cu = torch.tensor([0, 5, 12], dtype=torch.int32, device=device)
    slopes = torch.tensor([[0.5, 0.25], [1.0, 2.0]], device=device).t()  # (num_seqs, Hq) view
    o = fused_attn.attention_varlen(q, k, v, cu, cu, 7, 7, alibi_slopes=slopes)
    gold = reference.attention_varlen(q.double(), k.double(), v.double(), cu, cu, alibi_slopes=slopes.contiguous())
    torch.testing.assert_close(o.double(), gold, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------------------------
# The lse is differentiable
# --------------------------------------------------------------------------------------------

LSE_GRAD_CASES = {
    "gqa-causal": dict(shape_q=(2, 4, 37, 40), shape_kv=(2, 2, 50, 40), options={"causal": True}),
    "window-alibi-softcap": dict(shape_q=(1, 2, 45, 16), shape_kv=(1, 2, 33, 16),
                                 options={"window": (9, 4), "softcap": 5.0}),
    "bool-mask-empty-row": dict(shape_q=(1, 2, 20, 16), shape_kv=(1, 2, 41, 16), options={"mask": True}),
}


@pytest.mark.parametrize("name", list(LSE_GRAD_CASES))
def test_gradients_flow_through_the_lse(name: str, device: str) -> None:
    case = LSE_GRAD_CASES[name]
    q, k, v = _qkv(case["shape_q"], case["shape_kv"], device)
    options = dict(case["options"])
    if options.pop("mask", False):
        keep = torch.rand(case["shape_q"][2], case["shape_kv"][2], generator=torch.Generator().manual_seed(5)) > 0.4
        keep[3] = False  # a row with no key: its lse is -inf and constant
        options["attn_mask"] = keep.to(device)
    if name == "window-alibi-softcap":
        options["alibi_slopes"] = torch.tensor([0.3, 0.05], device=device)
    gen = torch.Generator().manual_seed(9)
    lse_weight = torch.randn(case["shape_q"][:3], generator=gen).to(device)
    o_weight = torch.randn((*case["shape_q"][:3], case["shape_kv"][3]), generator=gen).to(device)
    grads = {}
    for label, fn, dtype in (("fused", fused_attn.attention, torch.float32),
                             ("gold", reference.attention, torch.float64),
                             ("plain", reference.attention, torch.float32)):
        leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
        o, lse = fn(*leaves, return_lse=True, **options)
        finite_lse = torch.where(lse.isinf(), 0.0, lse)
        loss = (finite_lse * lse_weight.to(dtype)).sum() + (o * o_weight.to(dtype)).sum()
        grads[label] = torch.autograd.grad(loss, leaves)
    for index, grad_name in enumerate(("dq", "dk", "dv")):
        assert_close_to_reference(grad_name, grads["fused"][index], grads["gold"][index], grads["plain"][index],
                                  3.0, torch.float32)


def test_lse_alone_has_a_gradient_and_v_gets_none_of_it(device: str) -> None:
    q, k, v = (t.requires_grad_() for t in _qkv((1, 2, 9, 16), (1, 2, 11, 16), device))
    _, lse = fused_attn.attention(q, k, v, return_lse=True)
    lse.sum().backward()
    gold = [t.detach().double().requires_grad_() for t in (q, k, v)]
    reference.attention(*gold, return_lse=True)[1].sum().backward()
    torch.testing.assert_close(q.grad.double(), gold[0].grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(k.grad.double(), gold[1].grad, atol=1e-5, rtol=1e-5)
    assert torch.equal(v.grad, torch.zeros_like(v))


def test_packed_lse_gradient_matches_the_reference(device: str) -> None:
    cu = torch.tensor([0, 5, 5, 17], dtype=torch.int32, device=device)
    gen = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(17, 2, 16, generator=gen).to(device).requires_grad_() for _ in range(3))
    weight = torch.randn(2, 17, generator=gen).to(device)
    _, lse = fused_attn.attention_varlen(q, k, v, cu, cu, 12, 12, causal=True, return_lse=True)
    (lse * weight).sum().backward()
    gold = [t.detach().double().requires_grad_() for t in (q, k, v)]
    _, gold_lse = reference.attention_varlen(*gold, cu, cu, causal=True, return_lse=True)
    (gold_lse * weight.double()).sum().backward()
    for got, ref in zip((q, k), gold):
        torch.testing.assert_close(got.grad.double(), ref.grad, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------------------------
# Concurrent calls
# --------------------------------------------------------------------------------------------

def test_concurrent_calls_from_threads_equal_serial_calls(device: str) -> None:
    inputs = [_qkv((1, 2, 33, 16), (1, 2, 40, 16), device, seed=seed) for seed in range(4)]

    def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> list[torch.Tensor]:
        leaves = [t.detach().requires_grad_() for t in (q, k, v)]
        o = fused_attn.attention(*leaves, causal=True)
        return [o.detach(), *torch.autograd.grad(o.sum(), leaves)]

    serial = [run(*qkv) for qkv in inputs]
    results: list[list[torch.Tensor] | BaseException | None] = [None] * len(inputs)

    def worker(index: int) -> None:
        try:
            results[index] = run(*inputs[index])
        except BaseException as error:  # reported below, in the test's thread
            results[index] = error

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(inputs))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for expected, got in zip(serial, results):
        assert not isinstance(got, BaseException), f"a concurrent call failed: {got!r}"
        assert got is not None and all(torch.equal(a, b) for a, b in zip(expected, got))
