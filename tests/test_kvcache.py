"""`attention_with_kvcache`: attention over dense and paged KV caches, in-place appends and split-KV.

Every case is checked per sequence against the float64 reference over that sequence's keys
(gathered from the cache) under FlashAttention's rule, with cache entries past each sequence's
length filled with NaN (any read of them would show). Odd lengths, page sizes 1, 7, 16 and 64, GQA
and MQA, Sq in {1, 3, 17}, every score option, and 1 to 5 splits."""
from __future__ import annotations

from dataclasses import dataclass, replace

import pytest
import torch

import fused_attn
from fused_attn import reference
from tests.helpers import GPU, assert_close_to_reference

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@dataclass(frozen=True)
class CacheCase:
    """One call: per-sequence keys already cached (`lengths`), `new` keys appended by the call,
    and the cache's layout: dense (`page_size` 0) or paged."""

    name: str
    lengths: tuple[int, ...]
    seq_q: int = 1
    new: int = 0
    heads_q: int = 4
    heads_kv: int = 2
    head_dim: int = 64
    head_dim_v: int | None = None
    page_size: int = 0
    capacity: int = 112
    shuffle_rows: bool = False  # dense: sequences use permuted cache rows (cache_batch_idx)
    causal: bool = False
    window: tuple[int, int] | None = None
    alibi: bool = False
    softcap: float = 0.0
    sinks: bool = False
    mask: str | None = None  # "bool" (B, 1, Sq, capacity), or "float" (B, Hq, Sq, capacity) with some -inf
    num_splits: int | None = 1  # None: the launcher's choice

    @property
    def dim_v(self) -> int:
        return self.head_dim if self.head_dim_v is None else self.head_dim_v


CASES = [
    CacheCase("decode-gqa", (0, 1, 17, 97), heads_q=8, heads_kv=2),
    CacheCase("decode-split", (0, 1, 17, 97), heads_q=8, heads_kv=2, num_splits=3),
    CacheCase("chunk-causal-rows", (5, 40, 80), seq_q=3, head_dim=40, head_dim_v=24, causal=True,
              shuffle_rows=True, num_splits=2),
    CacheCase("append-page1", (0, 13), seq_q=17, new=5, page_size=1, causal=True),
    CacheCase("page16-options", (16, 33, 90), page_size=16, window=(31, 0), alibi=True, softcap=30.0,
              sinks=True, num_splits=4),
    # Pages a multiple of the key tile (32 under the interpreter): one page lookup per tile.
    CacheCase("page64-append-split", (31, 64, 100), new=1, page_size=64, capacity=192, num_splits=2),
    CacheCase("bool-mask-split", (3, 50, 90), seq_q=3, causal=True, mask="bool", num_splits=3),
    CacheCase("page16-float-mask-append", (0, 20), new=2, page_size=16, mask="float", sinks=True, num_splits=2),
    CacheCase("page7-mqa-append", (2, 29), seq_q=3, new=3, heads_kv=1, head_dim=96, page_size=7, causal=True,
              num_splits=5),
]


@dataclass
class CacheInputs:
    q: torch.Tensor
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    new_k: torch.Tensor | None
    new_v: torch.Tensor | None
    keys: list[torch.Tensor]  # per sequence, (1, Hkv, length + new, D): what it attends to
    values: list[torch.Tensor]
    kwargs: dict


def make_cache_inputs(case: CacheCase, dtype: torch.dtype, device: str, seed: int = 0) -> CacheInputs:
    gen = torch.Generator().manual_seed(seed)
    batch = len(case.lengths)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(dtype).to(device)

    q = randn(batch, case.heads_q, case.seq_q, case.head_dim)
    keys = [randn(1, case.heads_kv, n + case.new, case.head_dim) for n in case.lengths]
    values = [randn(1, case.heads_kv, n + case.new, case.dim_v) for n in case.lengths]
    kwargs: dict = {"cache_seqlens": torch.tensor(case.lengths, dtype=torch.int32, device=device),
                    "causal": case.causal, "window": case.window, "softcap": case.softcap,
                    "num_splits": case.num_splits, "return_lse": True}
    if case.alibi:
        kwargs["alibi_slopes"] = torch.rand(batch, case.heads_q, generator=gen).to(device)
    if case.sinks:
        kwargs["sinks"] = (torch.randn(case.heads_q, generator=gen) + 1).to(device)
    if case.mask == "bool":  # a padding-like mask: each sequence hides a few random keys
        kwargs["attn_mask"] = (torch.rand(batch, 1, case.seq_q, case.capacity, generator=gen) > 0.2).to(device)
    elif case.mask == "float":
        bias = torch.randn(batch, case.heads_q, case.seq_q, case.capacity, generator=gen)
        kwargs["attn_mask"] = bias.masked_fill(torch.rand(bias.shape, generator=gen) < 0.2, float("-inf")).to(device)
    nan = float("nan")
    if case.page_size:
        pages_per_seq = -(-case.capacity // case.page_size)
        num_pages = batch * pages_per_seq + 3  # spare pages nobody owns
        table = torch.randperm(num_pages, generator=gen)[:batch * pages_per_seq].view(batch, pages_per_seq)
        kwargs["block_table"] = table.to(torch.int32).to(device)
        k_cache = torch.full((num_pages, case.page_size, case.heads_kv, case.head_dim), nan, dtype=dtype, device=device)
        v_cache = torch.full((num_pages, case.page_size, case.heads_kv, case.dim_v), nan, dtype=dtype, device=device)
        for b, n in enumerate(case.lengths):
            for j in range(n):
                page, slot = table[b, j // case.page_size], j % case.page_size
                k_cache[page, slot] = keys[b][0, :, j]
                v_cache[page, slot] = values[b][0, :, j]
    else:
        rows = torch.randperm(batch + 1, generator=gen)[:batch] if case.shuffle_rows else torch.arange(batch)
        if case.shuffle_rows:
            kwargs["cache_batch_idx"] = rows.to(torch.int32).to(device)
        k_cache = torch.full((len(rows) + 1, case.heads_kv, case.capacity, case.head_dim), nan, dtype=dtype,
                             device=device)
        v_cache = torch.full((len(rows) + 1, case.heads_kv, case.capacity, case.dim_v), nan, dtype=dtype,
                             device=device)
        for b, n in enumerate(case.lengths):
            k_cache[rows[b], :, :n] = keys[b][0, :, :n]
            v_cache[rows[b], :, :n] = values[b][0, :, :n]
    new_k = new_v = None
    if case.new:
        new_k = torch.cat([k[:, :, -case.new:] for k in keys])
        new_v = torch.cat([v[:, :, -case.new:] for v in values])
    return CacheInputs(q, k_cache, v_cache, new_k, new_v, keys, values, kwargs)


def run_kvcache(inputs: CacheInputs, **overrides) -> tuple[torch.Tensor, torch.Tensor]:
    return fused_attn.attention_with_kvcache(inputs.q, inputs.k_cache, inputs.v_cache, inputs.new_k, inputs.new_v,
                                             **{**inputs.kwargs, **overrides})


def reference_per_sequence(inputs: CacheInputs, b: int, golden: bool) -> tuple[torch.Tensor, torch.Tensor]:
    cast = (lambda t: t.double()) if golden else (lambda t: t)
    options = {name: inputs.kwargs[name] for name in ("causal", "window", "softcap")}
    if "alibi_slopes" in inputs.kwargs:
        options["alibi_slopes"] = cast(inputs.kwargs["alibi_slopes"][b:b + 1])
    if "sinks" in inputs.kwargs:
        options["sinks"] = cast(inputs.kwargs["sinks"])
    if "attn_mask" in inputs.kwargs:
        mask = inputs.kwargs["attn_mask"][b:b + 1, :, :, :inputs.keys[b].shape[2]]
        options["attn_mask"] = mask if mask.dtype == torch.bool else cast(mask)
    return reference.attention(cast(inputs.q[b:b + 1]), cast(inputs.keys[b]), cast(inputs.values[b]),
                               return_lse=True, **options)


def check_against_reference(case: CacheCase, dtype: torch.dtype, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    inputs = make_cache_inputs(case, dtype, device)
    k_before, v_before = inputs.k_cache.clone(), inputs.v_cache.clone()
    o, lse = run_kvcache(inputs)
    assert o.shape == (len(case.lengths), case.heads_q, case.seq_q, case.dim_v) and o.dtype == dtype
    assert lse.shape == o.shape[:3] and lse.dtype == torch.float32
    for b in range(len(case.lengths)):
        golden_o, golden_lse = reference_per_sequence(inputs, b, golden=True)
        plain_o, plain_lse = reference_per_sequence(inputs, b, golden=False)
        assert_close_to_reference("o", o[b:b + 1], golden_o, plain_o, 2.0, dtype)
        assert_close_to_reference("lse", lse[b:b + 1], golden_lse, plain_lse.float(), 2.0, dtype)
    check_cache_writes(case, inputs, k_before, v_before)
    return o, lse


def check_cache_writes(case: CacheCase, inputs: CacheInputs, k_before: torch.Tensor, v_before: torch.Tensor) -> None:
    """The new keys sit at each sequence's next positions, and nothing else in the cache changed."""
    expected_k, expected_v = k_before.clone(), v_before.clone()
    for b, n in enumerate(case.lengths):
        for j in range(n, n + case.new):
            if case.page_size:
                where = (inputs.kwargs["block_table"][b, j // case.page_size], j % case.page_size)
                expected_k[where] = inputs.keys[b][0, :, j]
                expected_v[where] = inputs.values[b][0, :, j]
            else:
                row = inputs.kwargs["cache_batch_idx"][b] if case.shuffle_rows else b
                expected_k[row, :, j] = inputs.keys[b][0, :, j]
                expected_v[row, :, j] = inputs.values[b][0, :, j]
    assert torch.equal(inputs.k_cache.nan_to_num(7.0), expected_k.nan_to_num(7.0))
    assert torch.equal(inputs.v_cache.nan_to_num(7.0), expected_v.nan_to_num(7.0))


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_kvcache_matches_the_float64_reference(case: CacheCase, dtype: torch.dtype, device: str) -> None:
    check_against_reference(case, dtype, device)


@pytest.mark.parametrize("num_splits", [1, 2, 3, 4, 7])
def test_every_split_count_agrees_with_the_reference(num_splits: int, device: str) -> None:
    case = CacheCase("splits", (0, 3, 64, 65, 100), seq_q=3, heads_q=6, heads_kv=3, head_dim=32, sinks=True,
                     causal=True, num_splits=num_splits)
    check_against_reference(case, torch.bfloat16, device)


def test_splits_are_deterministic_and_batch_invariant(device: str) -> None:
    """Same call twice: the same bits. A sequence alone or among others, with the same num_splits:
    the same bits (its parts are cut from its own length)."""
    case = CacheCase("invariance", (9, 70, 111), seq_q=3, page_size=16, num_splits=3, sinks=True)
    inputs = make_cache_inputs(case, torch.bfloat16, device)
    first, second = run_kvcache(inputs), run_kvcache(inputs)
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    for b in range(len(case.lengths)):
        alone = {**inputs.kwargs, "cache_seqlens": inputs.kwargs["cache_seqlens"][b:b + 1],
                 "block_table": inputs.kwargs["block_table"][b:b + 1]}
        o, lse = fused_attn.attention_with_kvcache(inputs.q[b:b + 1], inputs.k_cache, inputs.v_cache, **alone)
        assert torch.equal(o, first[0][b:b + 1]) and torch.equal(lse, first[1][b:b + 1])


@pytest.mark.parametrize("page_size", [0, 5])
def test_append_then_attend_equals_attend_over_the_filled_cache(page_size: int, device: str) -> None:
    case = CacheCase("append", (4, 19), seq_q=3, new=3, page_size=page_size, causal=True, num_splits=2)
    inputs = make_cache_inputs(case, torch.float16, device)
    appended = run_kvcache(inputs)
    # The cache now holds the new keys: the same call without them, over lengths + new, must match.
    lengths = inputs.kwargs["cache_seqlens"] + case.new
    filled = fused_attn.attention_with_kvcache(inputs.q, inputs.k_cache, inputs.v_cache,
                                               **{**inputs.kwargs, "cache_seqlens": lengths})
    assert all(torch.equal(a, b) for a, b in zip(appended, filled))


def test_a_nan_in_a_visible_key_propagates_and_one_past_the_length_is_never_read(device: str) -> None:
    case = CacheCase("nan", (10, 10), num_splits=2)
    inputs = make_cache_inputs(case, torch.float32, device)
    inputs.k_cache[0, 0, 3, 0] = float("nan")  # sequence 0, k/v head 0, a visible key
    o, lse = run_kvcache(inputs)
    assert torch.isnan(o[0, :2]).all() and torch.isnan(lse[0, :2]).all()  # query heads 0 and 1 read k/v head 0
    assert not torch.isnan(o[0, 2:]).any() and not torch.isnan(o[1]).any()


def test_a_sequence_without_keys_returns_zeros_or_its_sink(device: str) -> None:
    case = CacheCase("empty", (0, 0), seq_q=3, sinks=True, num_splits=2)
    inputs = make_cache_inputs(case, torch.float32, device)
    for splits in (1, 2):
        o, lse = run_kvcache(inputs, num_splits=splits)
        assert torch.equal(o, torch.zeros_like(o))
        assert torch.equal(lse, inputs.kwargs["sinks"].view(1, -1, 1).expand_as(lse))


def _bad_calls(inputs: CacheInputs) -> list[tuple[dict, type, str]]:
    """(overrides, error, what the message names)."""
    seqlens = inputs.kwargs["cache_seqlens"]
    table = inputs.kwargs["block_table"]
    too_far = table.clone()
    too_far[1, 0] = inputs.k_cache.shape[0]
    return [
        ({"cache_seqlens": seqlens.long()}, TypeError, "cache_seqlens"),
        ({"cache_seqlens": seqlens[:1]}, ValueError, "cache_seqlens"),
        ({"cache_seqlens": seqlens + 200}, ValueError, "capacity"),
        ({"cache_seqlens": seqlens - 100}, ValueError, "cache_seqlens"),
        ({"block_table": too_far}, ValueError, "block_table[1, 0]"),
        ({"block_table": table.float()}, TypeError, "block_table"),
        ({"cache_batch_idx": torch.zeros(2, dtype=torch.int32)}, ValueError, "cache_batch_idx"),
        ({"num_splits": 0}, ValueError, "num_splits"),
        ({"num_splits": 2.0}, TypeError, "num_splits"),
        ({"k_cache": inputs.k_cache.double()}, TypeError, "k_cache"),
        ({"v_cache": inputs.v_cache[:, :3]}, ValueError, "v_cache"),
        ({"k": inputs.new_k, "v": None}, ValueError, "k and v"),
        ({"k": inputs.new_k[:, :, :, :5], "v": inputs.new_v}, ValueError, "k must have shape"),
        ({"q": inputs.q[0]}, ValueError, "q must have 4 dimensions"),
        ({"q": inputs.q.repeat(1, 1, 1, 2)}, ValueError, "head dim"),
        ({"window": (1, 2, 3)}, TypeError, "window"),
        ({"scale": float("inf")}, ValueError, "scale"),
        ({"scale": "big"}, TypeError, "scale"),
        ({"attn_mask": torch.ones(2, 1, 1, 15, dtype=torch.bool)}, ValueError, "attn_mask"),  # capacity is 16
        ({"attn_mask": torch.ones(2, 1, 1, 16, dtype=torch.int32)}, TypeError, "attn_mask"),
    ]


def test_bad_input_is_refused_before_the_cache_is_touched(device: str) -> None:
    case = CacheCase("errors", (3, 10), new=2, page_size=4, capacity=16)
    inputs = make_cache_inputs(case, torch.float32, device)
    before = inputs.k_cache.clone()
    for overrides, error, words in _bad_calls(inputs):
        call = {"q": inputs.q, "k_cache": inputs.k_cache, "v_cache": inputs.v_cache, "k": inputs.new_k,
                "v": inputs.new_v, **inputs.kwargs, **overrides}
        with pytest.raises(error, match=words.replace("[", r"\[").replace("]", r"\]")):
            fused_attn.attention_with_kvcache(**call)
    assert torch.equal(inputs.k_cache.nan_to_num(7.0), before.nan_to_num(7.0))


def test_inputs_that_require_grad_are_refused_outside_no_grad(device: str) -> None:
    inputs = make_cache_inputs(CacheCase("grad", (3, 4)), torch.float32, device)
    q = inputs.q.clone().requires_grad_()
    with pytest.raises(ValueError, match="no backward"):
        fused_attn.attention_with_kvcache(q, inputs.k_cache, inputs.v_cache, **inputs.kwargs)
    with torch.no_grad():
        o, _ = fused_attn.attention_with_kvcache(q, inputs.k_cache, inputs.v_cache, **inputs.kwargs)
    assert not o.requires_grad


@pytest.mark.gpu
@pytest.mark.parametrize("page_size", [0, 16, 256])
def test_kvcache_at_serving_sizes_on_the_gpu(page_size: int) -> None:
    """The CPU grid's twin at real sizes: 32 query heads on 8 k/v heads, head dim 128, bf16, caches
    of up to 4k keys, the default split count and an explicit one."""
    case = CacheCase("gpu", (1, 1000, 4095, 2048), heads_q=32, heads_kv=8, head_dim=128, page_size=page_size,
                     capacity=4096, causal=True, new=1, num_splits=None)
    check_against_reference(case, torch.bfloat16, GPU)
    check_against_reference(replace(case, new=0, num_splits=8), torch.bfloat16, GPU)


@pytest.mark.parametrize("page_size", [0, 16])
def test_one_int_length_for_every_sequence_equals_the_tensor(page_size: int, device: str) -> None:
    """cache_seqlens as one int (passed to the kernel by value, as Hugging Face's decoding steps
    do) gives the bits of the same lengths as a tensor, appends included; bad ints are refused."""
    case = CacheCase("int-length", (21, 21, 21), new=2, page_size=page_size, num_splits=2, causal=True)
    as_tensor = make_cache_inputs(case, torch.float16, device)
    as_int = make_cache_inputs(case, torch.float16, device)
    expected = run_kvcache(as_tensor)
    got = run_kvcache(as_int, cache_seqlens=21)
    assert all(torch.equal(a, b) for a, b in zip(expected, got))
    assert torch.equal(as_int.k_cache.nan_to_num(7.0), as_tensor.k_cache.nan_to_num(7.0))
    with pytest.raises(ValueError, match="capacity"):
        run_kvcache(as_int, cache_seqlens=as_int.k_cache.shape[2] if not page_size else 200)
    with pytest.raises(ValueError, match="cache_seqlens"):
        run_kvcache(as_int, cache_seqlens=-1)
