"""Learnable attention sinks in the kernels: `attention(..., sinks=...)` and `attention_varlen`.

A sink is one more softmax entry per query head with no value. The forward merges it into each
row's denominator (so into the lse); the backward reads that lse and adds the sink's own gradient.
Every case is checked against the float64 reference under FlashAttention's rule, o, lse and the
gradients of q, k, v and the sinks, with odd lengths, Sq != Sk and GQA."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import pytest
import torch

import fused_attn
from fused_attn import reference
from tests.helpers import assert_close_to_reference

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@dataclass(frozen=True)
class SinkCase:
    name: str
    heads_q: int = 4
    heads_kv: int = 2
    seq_q: int = 17
    seq_k: int = 97
    head_dim: int = 40
    options: dict = field(default_factory=dict)


CASES = [
    SinkCase("plain"),
    SinkCase("causal", seq_q=97, seq_k=17, options={"causal": True}),  # rows without keys: lse = sink
    SinkCase("window-mqa", heads_kv=1, seq_q=33, seq_k=33, head_dim=80, options={"window": (5, 3)}),
    SinkCase("softcap-alibi", seq_q=1, seq_k=200, options={"softcap": 20.0, "alibi_slopes": "slopes"}),
    SinkCase("float-mask", seq_q=23, seq_k=31, options={"attn_mask": "float"}),
]


def _inputs(case: SinkCase, dtype: torch.dtype, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(2, case.heads_q, case.seq_q, case.head_dim, generator=gen).to(dtype)
    k = torch.randn(2, case.heads_kv, case.seq_k, case.head_dim, generator=gen).to(dtype)
    v = torch.randn(2, case.heads_kv, case.seq_k, case.head_dim, generator=gen).to(dtype)
    sinks = torch.randn(case.heads_q, generator=gen) + 1.0
    options = dict(case.options)
    if options.get("alibi_slopes") == "slopes":
        options["alibi_slopes"] = torch.rand(case.heads_q, generator=gen) * 0.3
    if options.get("attn_mask") == "float":
        mask = torch.randn(2, 1, case.seq_q, case.seq_k, generator=gen)
        mask[:, :, 3] = -math.inf  # one row sees no key: only its sink
        options["attn_mask"] = mask.to(dtype)
    return q, k, v, sinks, options


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_sinks_match_the_float64_reference(case: SinkCase, dtype: torch.dtype) -> None:
    q, k, v, sinks, options = _inputs(case, dtype)
    leaves = [t.clone().requires_grad_() for t in (q, k, v, sinks)]
    o, lse = fused_attn.attention(*leaves[:3], sinks=leaves[3], return_lse=True, **options)
    gen = torch.Generator().manual_seed(1)
    do, dlse = torch.randn(o.shape, generator=gen).to(dtype), torch.randn(lse.shape, generator=gen)
    grads = torch.autograd.grad([o, lse], leaves, [do, dlse])

    def run(cast: torch.dtype):
        ref_leaves = [t.detach().to(cast if t is not sinks else (torch.float64 if cast == torch.float64 else t.dtype))
                      .requires_grad_() for t in (q, k, v, sinks)]
        ref_options = {name: value.to(cast) if isinstance(value, torch.Tensor) and value.is_floating_point()
                       and name == "attn_mask" else value for name, value in options.items()}
        out, out_lse = reference.attention(*ref_leaves[:3], sinks=ref_leaves[3], return_lse=True, **ref_options)
        return (out, out_lse, *torch.autograd.grad([out, out_lse], ref_leaves, [do.to(cast), dlse.to(out_lse.dtype)]))

    golden, plain = run(torch.float64), run(dtype)
    assert_close_to_reference("o", o, golden[0], plain[0], 2.0, dtype)
    assert_close_to_reference("lse", lse, golden[1], plain[1], 2.0, dtype)
    for name, got, want, torch_result in zip(("dq", "dk", "dv", "dsinks"), grads, golden[2:], plain[2:]):
        assert got.shape == want.shape and got.dtype == (torch.float32 if name == "dsinks" else dtype)
        assert_close_to_reference(name, got, want, torch_result, 3.0, dtype)


def test_torchtitan_regression_value() -> None:
    """torchtitan's sink check: q = k = 1, v = 2, sink = 0, scale = 1, one query and one key:
    p = e / (1 + e), o = 2p, dq = dk = 2 p (1 - p) = 0.39322387, d sink = -(1 - p) o."""
    q, k = torch.ones(1, 1, 1, 1, requires_grad=True), torch.ones(1, 1, 1, 1, requires_grad=True)
    v, sink = torch.full((1, 1, 1, 1), 2.0, requires_grad=True), torch.zeros(1, requires_grad=True)
    o = fused_attn.attention(q, k, v, scale=1.0, sinks=sink)
    o.sum().backward()
    p = math.e / (1 + math.e)
    assert o.item() == pytest.approx(2 * p, rel=1e-6)
    assert q.grad.item() == pytest.approx(0.39322387, rel=1e-6)
    assert k.grad.item() == pytest.approx(0.39322387, rel=1e-6)
    assert v.grad.item() == pytest.approx(p, rel=1e-6)
    assert sink.grad.item() == pytest.approx(-(1 - p) * 2 * p, rel=1e-6)


def test_sink_gradient_passes_gradcheck_through_the_reference() -> None:
    """The formula the kernels follow, checked by finite differences in float64 (the kernels do
    not run float64, so they are held to the reference's autograd in the grid above)."""
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(1, 2, 5, 8, generator=gen, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(1, 1, 7, 8, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(2))
    sinks = torch.randn(2, generator=gen, dtype=torch.float64, requires_grad=True)

    def both(q, k, v, sinks):
        return reference.attention(q, k, v, causal=True, sinks=sinks, return_lse=True)

    assert torch.autograd.gradcheck(both, (q, k, v, sinks))


def test_sink_gradient_matches_finite_differences_of_the_kernels() -> None:
    """d loss / d sink from the backward against a central difference of the kernels' own forward
    in float32 (the loss uses o and the lse)."""
    gen = torch.Generator().manual_seed(5)
    q = torch.randn(2, 3, 9, 16, generator=gen)
    k, v = (torch.randn(2, 3, 13, 16, generator=gen) for _ in range(2))
    sinks = torch.randn(3, generator=gen, dtype=torch.float64)
    do, dlse = torch.randn(2, 3, 9, 16, generator=gen), torch.randn(2, 3, 9, generator=gen)

    def loss(s: torch.Tensor) -> torch.Tensor:
        o, lse = fused_attn.attention(q, k, v, causal=True, sinks=s, return_lse=True)
        return (o.double() * do).sum() + (lse.double() * dlse).sum()

    leaf = sinks.float().requires_grad_()
    (grad,) = torch.autograd.grad(loss(leaf), leaf)
    eps = 1e-2
    for head in range(3):
        step = torch.zeros(3, dtype=torch.float64)
        step[head] = eps
        numeric = (loss((sinks + step).float()) - loss((sinks - step).float())) / (2 * eps)
        assert grad[head].item() == pytest.approx(numeric.item(), rel=2e-3, abs=2e-3)


def test_rows_without_keys_attend_only_to_their_sink() -> None:
    """Causal with Sq > Sk: the first rows see no key. With a sink they return zeros and lse = sink;
    a -inf sink is no sink at all (bitwise the sinkless call: zeros and lse -inf)."""
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, 2, 7, 16, generator=gen)
    k, v = (torch.randn(1, 2, 3, 16, generator=gen) for _ in range(2))
    sinks = torch.tensor([0.5, -1.5])
    o, lse = fused_attn.attention(q, k, v, causal=True, sinks=sinks, return_lse=True)
    assert torch.all(o[:, :, :4] == 0)
    assert torch.equal(lse[0, :, :4], sinks[:, None].expand(2, 4))
    without = fused_attn.attention(q, k, v, causal=True, return_lse=True)
    with_none = fused_attn.attention(q, k, v, causal=True, sinks=torch.full((2,), -math.inf), return_lse=True)
    assert torch.equal(with_none[0], without[0]) and torch.equal(with_none[1], without[1])


def test_no_keys_at_all_gives_lse_sink_and_a_sink_gradient_from_the_lse() -> None:
    q = torch.randn(1, 2, 3, 16)
    k = v = torch.randn(1, 2, 0, 16)
    sinks = torch.tensor([0.25, 2.0], requires_grad=True)
    o, lse = fused_attn.attention(q, k, v, sinks=sinks, return_lse=True)
    assert torch.all(o == 0) and torch.equal(lse[0], sinks.detach()[:, None].expand(2, 3))
    (grad,) = torch.autograd.grad(lse.sum() + o.sum(), sinks)
    assert torch.equal(grad, torch.full((2,), 3.0))  # lse = sink in 3 rows each


def test_nan_and_inf_sinks_propagate_as_in_torch() -> None:
    q, k, v = (torch.randn(1, 2, 5, 16) for _ in range(3))
    o, lse = fused_attn.attention(q, k, v, sinks=torch.tensor([math.nan, 0.0]), return_lse=True)
    assert torch.isnan(o[0, 0]).all() and torch.isnan(lse[0, 0]).all()
    assert torch.isfinite(o[0, 1]).all() and torch.isfinite(lse[0, 1]).all()
    o, lse = fused_attn.attention(q, k, v, sinks=torch.tensor([math.inf, 0.0]), return_lse=True)
    expected = torch.softmax(torch.cat([torch.zeros(5, 5), torch.full((5, 1), math.inf)], -1), -1)  # NaN, as torch
    assert torch.isnan(expected).all() and torch.isnan(o[0, 0]).all() and torch.all(lse[0, 0] == math.inf)


def test_sinks_with_dropout_drop_keys_but_never_the_sink() -> None:
    """Same mask as the kernels': the reference with the sink column, dropping only keys."""
    gen = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(2, 2, 19, 16, generator=gen) for _ in range(3))
    sinks = torch.randn(2, generator=gen)
    torch.manual_seed(7)
    o = fused_attn.attention(q, k, v, causal=True, sinks=sinks, dropout_p=0.25)
    torch.manual_seed(7)
    keep = fused_attn.dropout_mask(fused_attn.dropout_seed(), 2, 2, 19, 19, 0.25)
    expected = reference.attention(q.double(), k.double(), v.double(), causal=True, sinks=sinks.double(),
                                   dropout_p=0.25, dropout_mask=keep)
    torch.testing.assert_close(o.double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_varlen_sinks_match_the_reference_per_sequence(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(4)
    lengths_q, lengths_k = [5, 1, 17, 0], [7, 3, 17, 2]
    cu_q = torch.tensor([0, *torch.tensor(lengths_q).cumsum(0).tolist()], dtype=torch.int32)
    cu_k = torch.tensor([0, *torch.tensor(lengths_k).cumsum(0).tolist()], dtype=torch.int32)
    q = torch.randn(sum(lengths_q), 4, 24, generator=gen).to(dtype)
    k, v = (torch.randn(sum(lengths_k), 2, 24, generator=gen).to(dtype) for _ in range(2))
    sinks = torch.randn(4, generator=gen)
    leaves = [t.clone().requires_grad_() for t in (q, k, v, sinks)]
    o, lse = fused_attn.attention_varlen(*leaves[:3], cu_q, cu_k, 17, 17, causal=True, window=(4, 0),
                                         sinks=leaves[3], return_lse=True)
    do = torch.randn(o.shape, generator=gen).to(dtype)
    grads = torch.autograd.grad(o, leaves, do)

    def run(cast: torch.dtype):
        ref = [t.detach().to(cast if i < 3 else (torch.float64 if cast == torch.float64 else torch.float32))
               .requires_grad_() for i, t in enumerate((q, k, v, sinks))]
        out, out_lse = reference.attention_varlen(*ref[:3], cu_q, cu_k, causal=True, window=(4, 0), sinks=ref[3],
                                                  return_lse=True)
        return (out, out_lse, *torch.autograd.grad(out, ref, do.to(cast)))

    golden, plain = run(torch.float64), run(dtype)
    assert_close_to_reference("o", o, golden[0], plain[0], 2.0, dtype)
    assert_close_to_reference("lse", lse, golden[1], plain[1], 2.0, dtype)
    for name, got, want, torch_result in zip(("dq", "dk", "dv", "dsinks"), grads, golden[2:], plain[2:]):
        assert_close_to_reference(name, got, want, torch_result, 3.0, dtype)


@pytest.mark.parametrize("sinks, error, match", [
    ([0.0, 0.0], TypeError, "sinks must be a torch.Tensor"),
    (torch.zeros(2, dtype=torch.int64), TypeError, "sinks must have a float dtype"),
    (torch.zeros(3), ValueError, r"sinks must have shape \(heads_q,\) = \(2,\)"),
    (torch.zeros(1, 2), ValueError, r"sinks must have shape"),
    (torch.zeros(2, device="meta"), ValueError, "sinks must be on q's device"),
])
def test_bad_sinks_are_refused_before_launch(sinks: object, error: type, match: str) -> None:
    q, k, v = (torch.randn(1, 2, 4, 16) for _ in range(3))
    with pytest.raises(error, match=match):
        fused_attn.attention(q, k, v, sinks=sinks)
    with pytest.raises(error, match=match):
        fused_attn.attention_varlen(q[0].transpose(0, 1), k[0].transpose(0, 1), v[0].transpose(0, 1),
                                    torch.tensor([0, 4], dtype=torch.int32), torch.tensor([0, 4], dtype=torch.int32),
                                    4, 4, sinks=sinks)


def test_sinks_leave_the_inputs_untouched_and_keep_their_dtype_for_the_gradient() -> None:
    q, k, v = (torch.randn(1, 2, 6, 16) for _ in range(3))
    sinks = torch.tensor([0.5, -0.5], dtype=torch.bfloat16, requires_grad=True)
    before = sinks.detach().clone()
    fused_attn.attention(q, k, v, sinks=sinks).sum().backward()
    assert torch.equal(sinks.detach(), before) and sinks.grad.dtype == torch.bfloat16
