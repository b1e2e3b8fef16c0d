"""fused_attn.attention_probs and fused_attn.attention_stats: where attention goes.

attention_probs recomputes exact probabilities of chosen query rows and heads from the forward's
lse; attention_stats gives per query the lse, entropy and largest probability, and per key the
attention it receives, without materializing S x S. Both are checked against the float64
reference under FlashAttention's rule (tests/helpers.py): the kernels' error may be at most 2x
that of plain PyTorch computing the same quantity in the input dtype.

The reference's probability matrix is `reference.attention(q, k, eye)`: with v the identity the
output is P itself, under every option that changes the scores (causal, window, ALiBi, softcap,
attn_mask), with rows that see no key coming out 0.

Without a GPU the kernels run through the Triton interpreter, so the CPU cases are small but
awkward (lengths 1, 17, 97, 200, Sq != Sk both ways, head dims 40 and 80, GQA). The GPU twin at
the end (marked gpu, skipped without one) runs a 64k-token sequence.
"""
from __future__ import annotations

import math

import pytest
import torch

import fused_attn
from fused_attn import AttentionConfigs, KernelConfig, reference
from tests.helpers import GPU, AttentionCase, assert_close_to_reference, make_inputs

FP16, BF16, FP32 = torch.float16, torch.bfloat16, torch.float32


pytestmark = pytest.mark.usefixtures("one_cpu_thread")


# --------------------------------------------------------------------------------------------
# Cases, inputs and the reference
# --------------------------------------------------------------------------------------------

CASES = [
    AttentionCase(1, 2, 1, 97, 200, 40, dtype=FP16),  # Sq < Sk, unpadded head dim, GQA
    AttentionCase(1, 2, 1, 200, 97, 80, dtype=BF16, causal=True),  # Sq > Sk: 103 rows see no key
    AttentionCase(1, 2, 2, 17, 17, 64, dtype=FP32, window=(5, 2)),
    AttentionCase(1, 4, 1, 1, 200, 40, dtype=FP16, causal=True),  # one query (decoding)
    AttentionCase(1, 2, 1, 97, 1, 80, dtype=BF16, causal=True),  # one key: all rows but the last are empty
    AttentionCase(2, 2, 1, 50, 97, 64, dtype=FP16, alibi="batch", softcap=5.0),  # ALiBi distances off the diagonal
    AttentionCase(1, 4, 2, 17, 97, 40, dtype=FP32, mask="bool", scale=0.3),
    AttentionCase(1, 2, 1, 60, 200, 80, dtype=BF16, causal=True, mask="float"),
    AttentionCase(1, 2, 2, 200, 17, 40, dtype=FP16, causal=True, window=(3, 0)),  # left window past an Sq > Sk diagonal
    AttentionCase(1, 2, 2, 97, 97, 80, dtype=FP32, window=(16, 16), alibi="batch", softcap=2.0),
]


def q_k_options(case: AttentionCase, device: str) -> tuple[torch.Tensor, torch.Tensor, dict[str, object]]:
    """q, k of the case's inputs (helpers.make_inputs, seed 0) and the options that shape the
    scores, which both fused_attn and the reference take. A float mask is in the input dtype, so
    the float64 reference sees exactly the values the kernels read; slopes are float32 for the
    same reason."""
    inputs = make_inputs(case, device)
    return inputs.q, inputs.k, inputs.score_options()


def reference_probs(q: torch.Tensor, k: torch.Tensor, dtype: torch.dtype, options: dict[str, object]
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference's probabilities (B, Hq, Sq, Sk) and lse (B, Hq, Sq), computed in `dtype`
    (float64: golden; the input dtype: what plain PyTorch gets). With v the identity the
    attention output is the probability matrix itself (Sk <= 256, the reference's largest v
    head dim)."""
    batch, heads_kv, seq_k = k.shape[:3]
    eye = torch.eye(seq_k, dtype=dtype, device=q.device).expand(batch, heads_kv, seq_k, seq_k)
    return reference.attention(q.to(dtype), k.to(dtype), eye, return_lse=True, **options)


def row_stats(probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """entropy (nats), max_prob and received of a probability matrix, in its own dtype (so the
    same formulas give the golden and the plain PyTorch values). 0 log 0 is 0."""
    return -torch.xlogy(probs, probs).sum(-1), probs.amax(-1), probs.sum(-2)


def fused_lse(q: torch.Tensor, k: torch.Tensor, options: dict[str, object]) -> torch.Tensor:
    """The lse of fused_attn.attention with the same options: what attention_probs is meant to get
    (k stands in for v, which the lse does not depend on)."""
    _, lse = fused_attn.attention(q, k, k, return_lse=True, **options)
    return lse


def chosen_rows(seq_q: int, gen: torch.Generator) -> torch.Tensor:
    """int64 row indices: negative, repeated and unsorted, and more than one 32-row tile of them."""
    picks = torch.tensor([seq_q - 1, 0, -1, seq_q // 2, 0, -seq_q])
    return torch.cat([picks, torch.randint(-seq_q, seq_q, (40,), generator=gen)])


def chosen_heads(heads_q: int) -> list[int]:
    """The last head, then the first (a negative index, unsorted)."""
    return [-1, 0] if heads_q > 1 else [0]


def assert_float32_accurate(name: str, got: torch.Tensor, golden: torch.Tensor) -> None:
    """A second, tighter bar besides the rule. For 16-bit inputs the rule is loose (plain PyTorch
    rounds every score and probability to 16 bits), but these kernels compute in float32 from the
    exact inputs, so they stay within float32 rounding of the float64 reference: a small error in
    the band, a bias or a slope that the rule would let through still shows here."""
    finite = torch.isfinite(golden)
    if not finite.any():
        return
    err = (got.double() - golden)[finite].abs().max().item()
    bound = 1e-5 * max(1.0, golden[finite].abs().max().item())
    assert err <= bound, f"{name}: error {err:.2e} against the float64 reference > {bound:.1e}"


def assert_rows_sum_to_one_or_zero(probs: torch.Tensor, has_key: torch.Tensor) -> None:
    """Each row sums to 1 over keys; a row without a visible key is exactly 0 everywhere."""
    sums = probs.sum(-1)
    assert torch.all(probs[~has_key] == 0), "a row with no visible key has a nonzero probability"
    torch.testing.assert_close(sums[has_key], torch.ones_like(sums[has_key]), rtol=0, atol=1e-4)


# --------------------------------------------------------------------------------------------
# 1. attention_probs against the reference
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_probs_match_reference(case: AttentionCase, device: str) -> None:
    """All rows (the default) and a selection of rows and heads, each under the rule, from the
    forward's own lse; a selection is the same numbers as the matching slice of all rows."""
    q, k, options = q_k_options(case, device)
    lse = fused_lse(q, k, options)
    golden, golden_lse = reference_probs(q, k, torch.float64, options)
    plain, _ = reference_probs(q, k, case.dtype, options)
    has_key = torch.isfinite(golden_lse)

    probs = fused_attn.attention_probs(q, k, lse, **options)
    assert probs.dtype == torch.float32
    assert probs.shape == (case.batch, case.heads_q, case.seq_q, case.seq_k)
    assert_close_to_reference("probs", probs, golden, plain, 2.0, case.dtype)
    assert_float32_accurate("probs", probs, golden)
    assert_rows_sum_to_one_or_zero(probs, has_key)

    rows = chosen_rows(case.seq_q, torch.Generator().manual_seed(1))
    heads = chosen_heads(case.heads_q)
    some = fused_attn.attention_probs(q, k, lse, rows=rows, heads=heads, **options)
    assert some.shape == (case.batch, len(heads), len(rows), case.seq_k)

    def pick(t: torch.Tensor) -> torch.Tensor:
        return t[:, heads][:, :, rows]

    assert_close_to_reference("probs", some, pick(golden), pick(plain), 2.0, case.dtype)
    assert_float32_accurate("probs", some, pick(golden))
    assert_rows_sum_to_one_or_zero(some, pick(has_key))
    # Not bitwise: a row's scores come from a dot product over a different tile of rows, and the
    # interpreter's matmul may round an element differently depending on where it sits.
    torch.testing.assert_close(some, pick(probs), rtol=1e-5, atol=1e-6)


def test_index_kinds_agree(device: str) -> None:
    """rows and heads as lists, tuples, ranges and int32/int64 tensors (negative or not) select
    the same rows, bitwise."""
    case = AttentionCase(1, 4, 2, 40, 33, 40, dtype=FP16, causal=True)
    q, k, options = q_k_options(case, device)
    lse = fused_lse(q, k, options)
    expected = fused_attn.attention_probs(q, k, lse, rows=[3, 4, 5, 39], heads=[1, 2], **options)
    for rows, heads in (((3, 4, 5, 39), (1, 2)),
                        ([3, 4, 5, -1], [-3, -2]),
                        (torch.tensor([3, 4, 5, -1], dtype=torch.int32, device=device), range(1, 3)),
                        (torch.tensor([-37, -36, -35, 39]), torch.tensor([1, 2], dtype=torch.int64))):
        got = fused_attn.attention_probs(q, k, lse, rows=rows, heads=heads, **options)
        assert torch.equal(got, expected), f"rows={rows!r}, heads={heads!r}"


# --------------------------------------------------------------------------------------------
# 2. attention_stats against the reference
# --------------------------------------------------------------------------------------------

def check_stats(case: AttentionCase, device: str, stats: fused_attn.AttentionStats) -> None:
    """lse, entropy, max_prob and received of `stats` (for q_k_options(case)) under the rule and
    within float32 rounding of the float64 reference, with the invariants that need no reference:
    rows without a key have lse -inf, entropy 0 and max_prob 0; entropy >= 0 and max_prob <= 1;
    received sums to the number of queries with a key."""
    q, k, options = q_k_options(case, device)
    golden, golden_lse = reference_probs(q, k, torch.float64, options)
    plain, plain_lse = reference_probs(q, k, case.dtype, options)
    for name, got in zip(("lse", "entropy", "max_prob", "received"), (stats.lse, stats.entropy, stats.max_prob,
                                                                      stats.received)):
        assert got.dtype == torch.float32, f"{name}: {got.dtype}"
    assert stats.lse.shape == stats.entropy.shape == stats.max_prob.shape == (case.batch, case.heads_q, case.seq_q)
    assert stats.received.shape == (case.batch, case.heads_q, case.seq_k)

    assert_close_to_reference("lse", stats.lse, golden_lse, plain_lse, 2.0, case.dtype)
    assert_float32_accurate("lse", stats.lse, golden_lse)
    for name, got, gold, flat in zip(("entropy", "max_prob", "received"),
                                     (stats.entropy, stats.max_prob, stats.received),
                                     row_stats(golden), row_stats(plain)):
        assert_close_to_reference(name, got, gold, flat, 2.0, case.dtype)
        assert_float32_accurate(name, got, gold)

    has_key = torch.isfinite(golden_lse)
    assert torch.all(stats.lse[~has_key] == -math.inf)
    assert torch.all(stats.entropy[~has_key] == 0) and torch.all(stats.max_prob[~has_key] == 0)
    assert torch.all(stats.entropy >= 0) and torch.all(stats.max_prob <= 1)
    queries_with_keys = has_key.sum(-1).to(torch.float32)
    torch.testing.assert_close(stats.received.sum(-1), queries_with_keys, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_stats_match_reference(case: AttentionCase, device: str) -> None:
    q, k, options = q_k_options(case, device)
    stats = fused_attn.attention_stats(q, k, **options)
    check_stats(case, device, stats)
    # The forward's lse is the same quantity computed by another kernel: they agree closely
    # (exactly in which rows are empty).
    lse = fused_lse(q, k, options)
    assert torch.equal(torch.isinf(stats.lse), torch.isinf(lse))
    finite = torch.isfinite(lse)
    torch.testing.assert_close(stats.lse[finite], lse[finite], rtol=1e-6, atol=1e-5)


TILES = [
    AttentionConfigs(forward=KernelConfig(16, 64, 4, 1), backward_dkdv=KernelConfig(32, 32, 4, 1),
                     backward_dq=KernelConfig(64, 16, 4, 1)),
    AttentionConfigs(forward=KernelConfig(64, 16, 4, 1), backward_dkdv=KernelConfig(32, 32, 4, 1),
                     backward_dq=KernelConfig(16, 64, 4, 1)),
]


@pytest.mark.parametrize("configs", TILES, ids=["rows16x64-cols64x16", "rows64x16-cols16x64"])
def test_stats_do_not_depend_on_tile_shapes(configs: AttentionConfigs, device: str) -> None:
    """attention_stats walks the forward's and dQ's tiles: other tile shapes put the band's edges
    and the ragged ends elsewhere, and the rule must still hold."""
    case = AttentionCase(1, 2, 1, 97, 75, 40, dtype=BF16, causal=True, window=(20, 0), alibi="batch")
    q, k, options = q_k_options(case, device)
    with fused_attn.override_configs(configs):
        stats = fused_attn.attention_stats(q, k, **options)
    check_stats(case, device, stats)


# --------------------------------------------------------------------------------------------
# 3. Inputs untouched, results deterministic and independent of memory layout
# --------------------------------------------------------------------------------------------

def test_inputs_unchanged_and_results_deterministic(device: str) -> None:
    """Head dim 64 and contiguous inputs, so the kernels read the caller's own tensors (no padded
    copy): nothing may be written to them, and two identical calls give identical bits."""
    case = AttentionCase(2, 2, 1, 40, 70, 64, dtype=FP16, causal=True, alibi="batch", mask="float")
    q, k, options = q_k_options(case, device)
    lse = fused_lse(q, k, options)
    rows, heads = torch.tensor([5, -1, 5, 0], device=device), torch.tensor([1, 0], device=device)
    tensors = {"q": q, "k": k, "lse": lse, "rows": rows, "heads": heads,
               "alibi_slopes": options["alibi_slopes"], "attn_mask": options["attn_mask"]}
    before = {name: t.clone() for name, t in tensors.items()}

    runs = []
    for _ in range(2):
        probs = fused_attn.attention_probs(q, k, lse, rows=rows, heads=heads, **options)
        stats = fused_attn.attention_stats(q, k, **options)
        runs.append([probs, stats.lse, stats.entropy, stats.max_prob, stats.received])
    for name, a, b in zip(("probs", "lse", "entropy", "max_prob", "received"), *runs):
        assert torch.equal(a, b), f"{name} differs between two identical runs"
    for name, t in tensors.items():
        assert torch.equal(t, before[name]), f"{name} was modified"


def test_strided_inputs_match_contiguous(device: str) -> None:
    """q and k seen through (B, S, H, D).transpose(1, 2), a non-contiguous lse and a broadcast
    mask read the same values as contiguous copies: the same bits come out."""
    case = AttentionCase(1, 2, 1, 33, 70, 64, dtype=BF16, window=(10, 5), mask="bool")
    q, k, options = q_k_options(case, device)
    lse = fused_lse(q, k, options)
    mask = options["attn_mask"]
    strided = {
        "q": q.transpose(1, 2).contiguous().transpose(1, 2),
        "k": k.transpose(1, 2).contiguous().transpose(1, 2),
        "lse": lse.transpose(1, 2).contiguous().transpose(1, 2),
        "attn_mask": mask.expand(case.batch, case.heads_q, case.seq_q, case.seq_k),
    }
    assert not strided["q"].is_contiguous() and not strided["lse"].is_contiguous()
    rest = {name: value for name, value in options.items() if name != "attn_mask"}
    expected = fused_attn.attention_probs(q, k, lse, rows=[0, 32, 7], **options)
    got = fused_attn.attention_probs(strided["q"], strided["k"], strided["lse"], rows=[0, 32, 7],
                                     attn_mask=strided["attn_mask"], **rest)
    assert torch.equal(got, expected)
    expected_stats = fused_attn.attention_stats(q, k, **options)
    got_stats = fused_attn.attention_stats(strided["q"], strided["k"], attn_mask=strided["attn_mask"], **rest)
    for name in ("lse", "entropy", "max_prob", "received"):
        assert torch.equal(getattr(got_stats, name), getattr(expected_stats, name)), name


# --------------------------------------------------------------------------------------------
# 4. Empty selections and empty sequences
# --------------------------------------------------------------------------------------------

@pytest.fixture
def no_kernels(monkeypatch):
    """Replace the three kernels with objects that fail the test when launched: empty results
    must come out of the launchers without a launch."""
    class NoLaunch:
        def __getitem__(self, grid):
            raise AssertionError(f"a kernel was launched with grid {grid}")

    for name in ("_attn_probs", "_attn_row_stats", "_attn_col_sums"):
        monkeypatch.setattr(fused_attn._launch._kernels, name, NoLaunch())


def test_empty_selection_gives_empty_probs(device: str, no_kernels) -> None:
    q, k = torch.randn(2, 4, 9, 16, device=device), torch.randn(2, 2, 11, 16, device=device)
    lse = torch.zeros(2, 4, 9, device=device)
    assert fused_attn.attention_probs(q, k, lse, rows=[]).shape == (2, 4, 0, 11)
    assert fused_attn.attention_probs(q, k, lse, rows=torch.empty(0, dtype=torch.long)).shape == (2, 4, 0, 11)
    assert fused_attn.attention_probs(q, k, lse, heads=[]).shape == (2, 0, 9, 11)


@pytest.mark.parametrize("batch,seq_q,seq_k", [(2, 0, 11), (2, 9, 0), (0, 9, 11)], ids=["sq0", "sk0", "b0"])
def test_empty_sequences(batch: int, seq_q: int, seq_k: int, device: str, no_kernels) -> None:
    """No query, no key or no batch: the documented shapes, and with no key every row is empty
    (lse -inf, entropy 0, max_prob 0); nothing is launched."""
    q = torch.randn(batch, 4, seq_q, 16, device=device, dtype=FP16)
    k = torch.randn(batch, 2, seq_k, 16, device=device, dtype=FP16)
    stats = fused_attn.attention_stats(q, k, causal=True)
    assert stats.lse.shape == stats.entropy.shape == stats.max_prob.shape == (batch, 4, seq_q)
    assert torch.equal(stats.received, torch.zeros(batch, 4, seq_k, device=device))
    assert torch.all(stats.lse == -math.inf)
    assert torch.all(stats.entropy == 0) and torch.all(stats.max_prob == 0)
    lse = torch.full((batch, 4, seq_q), -math.inf, device=device)
    assert fused_attn.attention_probs(q, k, lse, causal=True).shape == (batch, 4, seq_q, seq_k)


def test_empty_key_sequence_probs_from_the_forward(device: str) -> None:
    """With Sk = 0 the forward's lse is all -inf and attention_probs takes it: (B, H, Sq, 0)."""
    q = torch.randn(1, 2, 5, 16, device=device, dtype=FP16)
    k = torch.randn(1, 2, 0, 16, device=device, dtype=FP16)
    lse = fused_lse(q, k, {})
    assert torch.all(lse == -math.inf)
    assert fused_attn.attention_probs(q, k, lse, rows=[0, -1]).shape == (1, 2, 2, 0)


# --------------------------------------------------------------------------------------------
# 5. Bad inputs are refused before any launch
# --------------------------------------------------------------------------------------------

def _other_device(device: str) -> str:
    return "meta" if device == "cpu" else "cpu"


@pytest.fixture
def forbid_launch(monkeypatch):
    """Any launch for invalid input is a bug: both launchers fail the test."""
    def no_launch(*args, **kwargs):
        raise AssertionError("a kernel was launched for invalid input")

    monkeypatch.setattr(fused_attn.weights._launch, "attention_probs", no_launch)
    monkeypatch.setattr(fused_attn.weights._launch, "attention_stats", no_launch)


def _valid_args(device: str) -> dict[str, object]:
    """q (2, 4, 8, 16), k (2, 2, 8, 16) float16 and a float32 lse (2, 4, 8)."""
    return {"q": torch.randn(2, 4, 8, 16, device=device, dtype=FP16),
            "k": torch.randn(2, 2, 8, 16, device=device, dtype=FP16),
            "lse": torch.zeros(2, 4, 8, device=device)}


# (id, {argument: new value given the valid arguments}, error, message), for both functions
SHARED_BAD = [
    ("q-float64", {"q": lambda a: a["q"].double()}, TypeError, "q has dtype float64"),
    ("k-head-dim", {"k": lambda a: a["k"][..., :8]}, ValueError, "k must have head_dim 16"),
    ("k-float32", {"k": lambda a: a["k"].float()}, TypeError, "share one dtype"),
    ("k-batch", {"k": lambda a: a["k"][:1]}, ValueError, "k and v must have batch size 2"),
    ("k-heads-not-divisor", {"k": lambda a: a["k"][:, :1].expand(2, 3, 8, 16)}, ValueError, "multiple of k's"),
    ("causal-int", {"causal": lambda a: 1}, TypeError, "causal must be a bool"),
    ("window-causal-right", {"causal": lambda a: True, "window": lambda a: (4, 2)}, ValueError,
     r"window=\(4, 2\) lets queries see 2 keys past the diagonal"),
    ("window-float", {"window": lambda a: (1.5, 2)}, TypeError, "window must be a pair"),
    ("softcap-negative", {"softcap": lambda a: -1.0}, ValueError, "softcap must be >= 0"),
    ("softcap-nan", {"softcap": lambda a: math.nan}, ValueError, "softcap must be finite"),
    ("softcap-string", {"softcap": lambda a: "1"}, TypeError, "softcap must be a float"),
    ("scale-string", {"scale": lambda a: "0.1"}, TypeError, "scale must be a float"),
    ("alibi-shape", {"alibi_slopes": lambda a: torch.ones(2, device=a["q"].device)}, ValueError,
     "alibi_slopes must have shape"),
    ("mask-shape", {"attn_mask": lambda a: torch.ones(3, 8, 8, dtype=torch.bool, device=a["q"].device)},
     ValueError, "attn_mask of shape"),
    ("mask-int", {"attn_mask": lambda a: torch.ones(8, 8, dtype=torch.int32, device=a["q"].device)}, TypeError,
     "attn_mask has dtype int32"),
]

PROBS_BAD = SHARED_BAD + [
    ("lse-list", {"lse": lambda a: a["lse"].tolist()}, TypeError, "lse must be a torch.Tensor"),
    ("lse-shape", {"lse": lambda a: a["lse"][..., :-1]}, ValueError, r"lse must be float32 of shape"),
    ("lse-4d", {"lse": lambda a: a["lse"][..., None]}, ValueError, r"lse must be float32 of shape"),
    ("lse-float16", {"lse": lambda a: a["lse"].half()}, ValueError, "lse must be float32"),
    ("lse-float64", {"lse": lambda a: a["lse"].double()}, ValueError, "lse must be float32"),
    ("lse-device", {"lse": lambda a: a["lse"].to(_other_device(a["q"].device.type))}, ValueError,
     "lse must be float32 .* on "),
    ("rows-past-end", {"rows": lambda a: [0, 8]}, ValueError, r"rows must index a dimension of size 8, got \[8\]"),
    ("rows-before-start", {"rows": lambda a: [-9, 2]}, ValueError, r"rows must index a dimension of size 8, got \[-9"),
    ("rows-tensor-out-of-range", {"rows": lambda a: torch.tensor([100])}, ValueError, "rows must index"),
    ("rows-float-tensor", {"rows": lambda a: torch.tensor([0.0, 1.0])}, TypeError, "rows must be a 1-D integer tensor"),
    ("rows-bool-tensor", {"rows": lambda a: torch.ones(8, dtype=torch.bool)}, TypeError, "rows must be a 1-D integer"),
    ("rows-2d-tensor", {"rows": lambda a: torch.zeros(2, 2, dtype=torch.long)}, TypeError, "rows must be a 1-D"),
    ("rows-string", {"rows": lambda a: "01"}, TypeError, "rows must be a 1-D integer tensor or a sequence of ints"),
    ("rows-floats", {"rows": lambda a: [0, 1.0]}, TypeError, "rows must be"),
    ("rows-bools", {"rows": lambda a: [True]}, TypeError, "rows must be"),
    ("rows-int", {"rows": lambda a: 3}, TypeError, "rows must be"),
    ("heads-past-end", {"heads": lambda a: [4]}, ValueError, r"heads must index a dimension of size 4, got \[4\]"),
    ("heads-negative", {"heads": lambda a: [-5]}, ValueError, "heads must index"),
    ("heads-int", {"heads": lambda a: 0}, TypeError, "heads must be"),
    ("heads-float-tensor", {"heads": lambda a: torch.tensor([0.5])}, TypeError, "heads must be a 1-D integer"),
]


def _mutated(extra: dict, device: str) -> dict[str, object]:
    args = _valid_args(device)
    return {**args, **{name: make(args) for name, make in extra.items()}}


@pytest.mark.parametrize("name,extra,error,message", PROBS_BAD, ids=[b[0] for b in PROBS_BAD])
def test_probs_bad_arguments_raise(name, extra, error, message, device: str, forbid_launch) -> None:
    args = _mutated(extra, device)
    with pytest.raises(error, match=message):
        fused_attn.attention_probs(args.pop("q"), args.pop("k"), args.pop("lse"), **args)


@pytest.mark.parametrize("name,extra,error,message", SHARED_BAD, ids=[b[0] for b in SHARED_BAD])
def test_stats_bad_arguments_raise(name, extra, error, message, device: str, forbid_launch) -> None:
    args = _mutated(extra, device)
    del args["lse"]
    with pytest.raises(error, match=message):
        fused_attn.attention_stats(args.pop("q"), args.pop("k"), **args)


def test_unsupported_device_rejected(forbid_launch) -> None:
    args = {name: t.to("meta") for name, t in _valid_args("cpu").items()}
    with pytest.raises(ValueError, match="device type 'meta'"):
        fused_attn.attention_probs(args["q"], args["k"], args["lse"])
    with pytest.raises(ValueError, match="device type 'meta'"):
        fused_attn.attention_stats(args["q"], args["k"])


# --------------------------------------------------------------------------------------------
# 6. A long sequence (GPU), and its small CPU twin
# --------------------------------------------------------------------------------------------

def rows_reference(q: torch.Tensor, k: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """float64 causal probabilities (B, Hq, len(rows), Sk) of the chosen rows only, for Sq = Sk
    and Hq = Hkv: q_rows k^T scaled, keys after the row masked, softmax. Memory len(rows) x Sk."""
    q_rows = q[:, :, rows].double()
    scores = q_rows @ k.double().transpose(-1, -2) / math.sqrt(q.shape[-1])
    keys = torch.arange(k.shape[2], device=q.device)
    hidden = keys[None, :] > torch.tensor(rows, device=q.device)[:, None]
    return torch.softmax(scores.masked_fill(hidden, -math.inf), dim=-1)


def check_long_causal_sequence(seq: int, heads: int, device: str) -> None:
    """bf16 causal, B=1, D=64. attention_probs of 4 rows (the first, the middle and the last
    two) matches a float64 reference of those rows; attention_stats agrees with those rows'
    probabilities on entropy and max_prob, and on what the last two keys receive (under causal
    only the last two rows see them); received sums to seq. On CUDA the stats' peak memory
    stays far below seq x seq."""
    gen = torch.Generator().manual_seed(0)
    q, k = (torch.randn(1, heads, seq, 64, generator=gen).to(device=device, dtype=BF16) for _ in range(2))
    rows = [0, seq // 2, seq - 2, seq - 1]

    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    stats = fused_attn.attention_stats(q, k, causal=True)
    if device == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        assert peak < 2**30, f"attention_stats used {peak / 2**30:.2f} GiB at {seq} tokens"

    lse = fused_lse(q, k, {"causal": True})
    probs = fused_attn.attention_probs(q, k, lse, rows=rows, causal=True)
    golden = rows_reference(q, k, rows)
    torch.testing.assert_close(probs.double(), golden, rtol=1e-3, atol=1e-6)

    entropy, max_prob, _ = row_stats(probs.double())
    torch.testing.assert_close(stats.entropy[:, :, rows].double(), entropy, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(stats.max_prob[:, :, rows].double(), max_prob, rtol=1e-4, atol=1e-6)
    # Row 0 sees key 0 only: entropy 0 and max_prob 1 (exact in the interpreter; the GPU's
    # approximate log2 and division may not be).
    torch.testing.assert_close(stats.entropy[:, :, 0], torch.zeros_like(stats.entropy[:, :, 0]), rtol=0, atol=1e-6)
    torch.testing.assert_close(stats.max_prob[:, :, 0], torch.ones_like(stats.max_prob[:, :, 0]), rtol=0, atol=1e-6)
    last_two = probs[:, :, 2:, -2:].double().sum(-2)
    torch.testing.assert_close(stats.received[:, :, -2:].double(), last_two, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(stats.received.double().sum(-1), torch.full((1, heads), float(seq), dtype=torch.float64,
                                                                            device=device), rtol=1e-4, atol=0)


def test_long_causal_sequence_cpu_twin(device: str) -> None:
    """check_long_causal_sequence at 260 tokens (more keys than the eye-based reference takes), one head."""
    check_long_causal_sequence(260, 1, device)


@pytest.mark.gpu
def test_long_causal_sequence_64k() -> None:
    """65536 tokens, two heads: where S x S float32 would be 32 GiB."""
    check_long_causal_sequence(65536, 2, GPU)
