"""Attention variants against the float64 reference under FlashAttention's error rule: sliding
windows, ALiBi, softcap, dropout and packed variable-length sequences; that tiles outside a
window are never read; that the backward is bitwise deterministic with every variant; and that
bad arguments are refused before any kernel launches.

Without a GPU the kernels run through the Triton interpreter, so the CPU cases are small but
awkward (lengths 1, 17, 97, 200, Sq != Sk both ways, head dims 40, 80, 96, GQA). The GPU twins
at the end of the file (marked gpu, skipped without one) run the same checks at real sizes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Callable

import pytest
import torch

import fused_attn
from fused_attn import AttentionConfigs, KernelConfig, reference
from tests.helpers import assert_close_to_reference

FP16, BF16, FP32 = torch.float16, torch.bfloat16, torch.float32
DROPOUT_SEED = 1234  # generator seed of every dropout call below


pytestmark = pytest.mark.usefixtures("one_cpu_thread")


# --------------------------------------------------------------------------------------------
# Cases and input builders
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Options:
    """The options shared by attention() and attention_varlen()."""

    causal: bool = False
    window: tuple[int, int] | None = None
    alibi: str | None = None  # "head": slopes (Hq,); "batch": slopes (B, Hq) or (num_seqs, Hq)
    softcap: float = 0.0
    scale: float | None = None
    dropout_p: float = 0.0

    def kwargs(self) -> dict[str, object]:
        """Keywords that fused_attn and its reference take alike."""
        return {"causal": self.causal, "window": self.window, "softcap": self.softcap, "scale": self.scale,
                "dropout_p": self.dropout_p}

    def tags(self) -> list[str]:
        tags = ["causal"] if self.causal else []
        if self.window is not None:
            tags.append(f"win{self.window[0]}_{self.window[1]}")
        if self.alibi:
            tags.append(f"alibi-{self.alibi}")
        if self.softcap:
            tags.append(f"cap{self.softcap:g}")
        if self.scale is not None:
            tags.append(f"scale{self.scale:g}")
        if self.dropout_p:
            tags.append(f"drop{self.dropout_p:g}")
        return tags


@dataclass(frozen=True)
class Variant(Options):
    """One padded call: q (B, Hq, Sq, D), k (B, Hkv, Sk, D), v (B, Hkv, Sk, Dv)."""

    batch: int = 1
    heads_q: int = 2
    heads_kv: int = 1
    seq_q: int = 17
    seq_k: int = 17
    head_dim: int = 64
    dtype: torch.dtype = FP16
    head_dim_v: int | None = None  # None: same as head_dim
    mask: str | None = None  # "bool" or "float": a random attn_mask (B, 1, Sq, Sk) that empties a row

    @property
    def dim_v(self) -> int:
        return self.head_dim_v or self.head_dim

    @property
    def id(self) -> str:
        dims = f"d{self.head_dim}" + (f"-{self.head_dim_v}" if self.head_dim_v else "")
        mask = [f"mask-{self.mask}"] if self.mask else []
        return "-".join([f"b{self.batch}", f"h{self.heads_q}-{self.heads_kv}", f"sq{self.seq_q}", f"sk{self.seq_k}",
                         dims, str(self.dtype)[6:], *self.tags(), *mask])


@dataclass(frozen=True)
class VarlenCase(Options):
    """One packed call: sequence b has lengths_q[b] queries and lengths_k[b] keys."""

    lengths_q: tuple[int, ...] = ()
    lengths_k: tuple[int, ...] = ()
    heads_q: int = 2
    heads_kv: int = 1
    head_dim: int = 64
    dtype: torch.dtype = FP16

    @property
    def id(self) -> str:
        if len(self.lengths_q) <= 6:
            lengths = f"q{'_'.join(map(str, self.lengths_q))}-k{'_'.join(map(str, self.lengths_k))}"
        else:
            lengths = f"n{len(self.lengths_q)}-q{sum(self.lengths_q)}-k{sum(self.lengths_k)}"
        return "-".join([lengths, f"h{self.heads_q}-{self.heads_kv}", f"d{self.head_dim}", str(self.dtype)[6:],
                         *self.tags()])


def _randn(gen: torch.Generator, shape: tuple[int, ...], dtype: torch.dtype, device: str) -> torch.Tensor:
    """N(0, 1) drawn on the CPU (the same values on every device), then cast."""
    return torch.randn(shape, generator=gen).to(device=device, dtype=dtype)


def alibi_slopes(kind: str | None, batch: int, heads: int, device: str) -> torch.Tensor | None:
    """float32 ALiBi slopes: the paper's 2^(-8 (h + 1) / H) per head; for kind "batch" (B, H) with
    each batch entry scaled differently, so a kernel that reads the wrong row shows."""
    if kind is None:
        return None
    slopes = torch.tensor([2.0 ** (-8.0 * (h + 1) / heads) for h in range(heads)])
    if kind == "batch":
        slopes = slopes[None, :] * (1.0 + 0.5 * torch.arange(batch))[:, None]
    return slopes.to(device)


def _same_shape_qkv(shape: tuple[int, ...], dtype: torch.dtype, device: str) -> tuple[torch.Tensor, ...]:
    """q, k, v of one shape from a fixed seed, for tests that compare the kernels with themselves."""
    gen = torch.Generator().manual_seed(0)
    return tuple(_randn(gen, shape, dtype, device) for _ in range(3))


def _for_reference(slopes: torch.Tensor | None, golden: bool) -> torch.Tensor | None:
    return slopes.double() if golden and slopes is not None else slopes


def _attn_mask(case: Variant, gen: torch.Generator, device: str) -> torch.Tensor | None:
    """bool (True attends) or float (added, -inf removes) mask (B, 1, Sq, Sk); row 0 sees no key."""
    if case.mask is None:
        return None
    shape = (case.batch, 1, case.seq_q, case.seq_k)
    if case.mask == "bool":
        mask = torch.rand(shape, generator=gen) > 0.3
        mask[:, :, 0] = False
    else:
        mask = torch.randn(shape, generator=gen)
        mask[torch.rand(shape, generator=gen) < 0.2] = float("-inf")
        mask[:, :, 0] = float("-inf")
        mask = mask.to(case.dtype)
    return mask.to(device)


def _dropout_generator(dropout_p: float) -> torch.Generator | None:
    """A fresh generator in the same state for every call, so every call draws the same seed."""
    return torch.Generator().manual_seed(DROPOUT_SEED) if dropout_p > 0 else None


def kernel_dropout_mask(dropout_p: float, batch: int, heads: int, seq_q: int, seq_k: int,
                        device: str) -> torch.Tensor | None:
    """The keep-mask a call with `_dropout_generator(dropout_p)` uses, re-derived the documented
    way: re-seed the generator, ask dropout_seed for the seed, and expand it with dropout_mask."""
    if dropout_p == 0:
        return None
    gen = torch.Generator().manual_seed(DROPOUT_SEED)
    return fused_attn.dropout_mask(fused_attn.dropout_seed(gen), batch, heads, seq_q, seq_k, dropout_p, device)


Runner = Callable[..., tuple[torch.Tensor, torch.Tensor]]


@dataclass
class Setup:
    """Inputs of one call, the upstream gradient, and how to run the kernels (run_fused(q, k, v))
    and the reference (run_reference(q, k, v, golden)) on them with the same options."""

    inputs: tuple[torch.Tensor, ...]
    do: torch.Tensor
    dtype: torch.dtype
    run_fused: Runner
    run_reference: Runner


def padded_setup(case: Variant, device: str, seed: int = 0) -> Setup:
    """Inputs drawn from `seed`; the dropout mask is the kernels' own (see kernel_dropout_mask)."""
    gen = torch.Generator().manual_seed(seed)
    b, hq, hkv, sq, sk = case.batch, case.heads_q, case.heads_kv, case.seq_q, case.seq_k
    shapes = ((b, hq, sq, case.head_dim), (b, hkv, sk, case.head_dim), (b, hkv, sk, case.dim_v),
              (b, hq, sq, case.dim_v))
    q, k, v, do = (_randn(gen, shape, case.dtype, device) for shape in shapes)
    attn_mask = _attn_mask(case, gen, device)
    slopes = alibi_slopes(case.alibi, b, hq, device)
    keep = kernel_dropout_mask(case.dropout_p, b, hq, sq, sk, device)

    def run_fused(q, k, v):
        return fused_attn.attention(q, k, v, return_lse=True, attn_mask=attn_mask, alibi_slopes=slopes,
                                    generator=_dropout_generator(case.dropout_p), **case.kwargs())

    def run_reference(q, k, v, golden):
        return reference.attention(q, k, v, return_lse=True, attn_mask=attn_mask,
                                   alibi_slopes=_for_reference(slopes, golden), dropout_mask=keep, **case.kwargs())

    return Setup((q, k, v), do, case.dtype, run_fused, run_reference)


def cu_seqlens(lengths: tuple[int, ...], device: str) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)


def varlen_setup(case: VarlenCase, device: str, seed: int = 0) -> Setup:
    """Packed inputs drawn from `seed`; the dropout mask is (num_seqs, Hq, max_q, max_k), which the
    reference slices per sequence as the kernels index it."""
    gen = torch.Generator().manual_seed(seed)
    total_q, total_k = sum(case.lengths_q), sum(case.lengths_k)
    max_q, max_k = max(case.lengths_q), max(case.lengths_k)
    num_seqs = len(case.lengths_q)
    shapes = ((total_q, case.heads_q, case.head_dim), (total_k, case.heads_kv, case.head_dim),
              (total_k, case.heads_kv, case.head_dim), (total_q, case.heads_q, case.head_dim))
    q, k, v, do = (_randn(gen, shape, case.dtype, device) for shape in shapes)
    cu_q, cu_k = cu_seqlens(case.lengths_q, device), cu_seqlens(case.lengths_k, device)
    slopes = alibi_slopes(case.alibi, num_seqs, case.heads_q, device)
    keep = kernel_dropout_mask(case.dropout_p, num_seqs, case.heads_q, max_q, max_k, device)

    def run_fused(q, k, v):
        return fused_attn.attention_varlen(q, k, v, cu_q, cu_k, max_q, max_k, return_lse=True, alibi_slopes=slopes,
                                           generator=_dropout_generator(case.dropout_p), **case.kwargs())

    def run_reference(q, k, v, golden):
        return reference.attention_varlen(q, k, v, cu_q, cu_k, return_lse=True,
                                          alibi_slopes=_for_reference(slopes, golden), dropout_mask=keep,
                                          **case.kwargs())

    return Setup((q, k, v), do, case.dtype, run_fused, run_reference)


# --------------------------------------------------------------------------------------------
# The checks
# --------------------------------------------------------------------------------------------

def _rows(o: torch.Tensor) -> torch.Tensor:
    """o indexed like lse: (B, Hq, Sq, Dv) as is, packed (total, Hq, Dv) as (Hq, total, Dv)."""
    return o if o.dim() == 4 else o.transpose(0, 1)


def fused_with_grads(setup: Setup, inputs: tuple[torch.Tensor, ...] | None = None) -> list[torch.Tensor]:
    """o, lse, dq, dk, dv of the kernels on fresh leaves (copies of `inputs`, default the setup's)."""
    leaves = [t.detach().clone().requires_grad_() for t in (inputs or setup.inputs)]
    o, lse = setup.run_fused(*leaves)
    return [o, lse, *torch.autograd.grad(o, leaves, setup.do)]


def check_under_rule(setup: Setup, select: Callable[[str, torch.Tensor], torch.Tensor | None] | None = None,
                     inputs: tuple[torch.Tensor, ...] | None = None) -> list[torch.Tensor]:
    """FlashAttention's rule for o and lse (2x) and dq, dk, dv (3x, same random do): the kernels'
    error against the reference on float64 copies must stay within a factor of the error of the
    same reference run in the low-precision dtype itself. Rows the reference leaves without a key
    must be exactly 0 with lse -inf.

    `inputs` (default the setup's) is what the kernels get, the references always get the setup's:
    lets a test hand the kernels poisoned copies of values they must never read. `select(name, t)`
    restricts every comparison to the part of a result that the test vouches for (None: none of it).
    Returns the kernels' o, lse, dq, dk, dv."""
    select = select or (lambda name, t: t)
    got = fused_with_grads(setup, inputs)
    results = {}
    for kind in ("golden", "plain"):
        leaves = [(t.double() if kind == "golden" else t).detach().clone().requires_grad_() for t in setup.inputs]
        o, lse = setup.run_reference(*leaves, golden=kind == "golden")
        do = setup.do.double() if kind == "golden" else setup.do
        results[kind] = [o, lse, *torch.autograd.grad(o, leaves, do)]
    o, lse = got[:2]
    assert o.dtype == setup.dtype and lse.dtype == torch.float32
    for i, name in enumerate(("o", "lse", "dq", "dk", "dv")):
        assert got[i].shape == results["golden"][i].shape, f"{name}: shape {tuple(got[i].shape)}"
        if select(name, got[i]) is not None:
            assert_close_to_reference(name, select(name, got[i]), select(name, results["golden"][i]),
                                      select(name, results["plain"][i]), 2.0 if i < 2 else 3.0, setup.dtype)
    empty = torch.isinf(results["golden"][1])
    assert torch.all(select("o", _rows(o))[select("lse", empty)] == 0), "a row without keys has a nonzero output"
    assert torch.all(select("lse", lse)[select("lse", empty)] == -math.inf), "a row without keys has a finite lse"
    return got


def assert_runs_equal(first: list[torch.Tensor], second: list[torch.Tensor]) -> None:
    for name, a, b in zip(("o", "lse", "dq", "dk", "dv"), first, second):
        assert torch.equal(a, b), f"{name} differs between two identical runs"


# --------------------------------------------------------------------------------------------
# 1. Sliding windows
# --------------------------------------------------------------------------------------------

WINDOW_CASES = [
    Variant(batch=1, heads_q=2, heads_kv=1, seq_q=17, seq_k=97, head_dim=40, dtype=FP16, window=(0, 0)),
    Variant(batch=1, heads_q=4, heads_kv=2, seq_q=97, seq_k=17, head_dim=80, dtype=BF16, window=(5, 3)),
    Variant(batch=1, heads_q=2, heads_kv=1, seq_q=200, seq_k=97, head_dim=96, dtype=FP32, window=(16, -1)),
    Variant(batch=1, heads_q=2, heads_kv=2, seq_q=97, seq_k=200, head_dim=40, dtype=FP16, window=(-1, 7)),
    Variant(batch=1, heads_q=4, heads_kv=2, seq_q=70, seq_k=70, head_dim=80, dtype=BF16, causal=True, window=(10, 0)),
    # Sq > Sk: the first rows' bands lie left of key 0 and see nothing.
    Variant(batch=1, heads_q=2, heads_kv=1, seq_q=97, seq_k=17, head_dim=96, dtype=FP32, window=(3, 3)),
    Variant(batch=1, heads_q=2, heads_kv=1, seq_q=200, seq_k=17, head_dim=40, dtype=FP16, causal=True, window=(10, 0)),
    Variant(batch=1, heads_q=2, heads_kv=1, seq_q=1, seq_k=200, head_dim=80, dtype=BF16, window=(16, -1)),  # decoding
    Variant(batch=1, heads_q=2, heads_kv=1, seq_q=200, seq_k=1, head_dim=40, dtype=FP16, window=(5, 3)),  # one key
    # (0, 0): one key per row, so dq and dk are exactly 0 and PyTorch's error is 0; in float32 the
    # kernels' dp - delta rounding (~1e-6 at |do . v| ~ 10) exceeds the 1e-6 floor, so bf16 here.
    Variant(batch=2, heads_q=2, heads_kv=1, seq_q=17, seq_k=17, head_dim=96, dtype=BF16, causal=True, window=(0, 0)),
    Variant(batch=2, heads_q=2, heads_kv=1, seq_q=17, seq_k=17, head_dim=96, dtype=FP32, causal=True, window=(1, 0)),
    Variant(batch=1, heads_q=2, heads_kv=1, seq_q=17, seq_k=200, head_dim=80, dtype=BF16, window=(-1, -1)),
    Variant(batch=1, heads_q=2, heads_kv=1, seq_q=17, seq_k=97, head_dim=40, dtype=FP32, window=(500, 500)),
    # Band widths around the 32-key tile size, and D != Dv.
    Variant(batch=1, heads_q=3, heads_kv=1, seq_q=97, seq_k=200, head_dim=40, head_dim_v=24, dtype=FP16,
            window=(33, 31)),
]


@pytest.mark.parametrize("case", WINDOW_CASES, ids=lambda c: c.id)
def test_window_matches_reference(case: Variant, device: str) -> None:
    check_under_rule(padded_setup(case, device))


# --------------------------------------------------------------------------------------------
# 2. Tiles outside the band are never read
# --------------------------------------------------------------------------------------------

TILE = 32
TILES_32 = AttentionConfigs(forward=KernelConfig(TILE, TILE, 1, 1), backward_dkdv=KernelConfig(TILE, TILE, 1, 1),
                            backward_dq=KernelConfig(TILE, TILE, 1, 1))


def _round_out(lo: int, hi: int, length: int) -> set[int]:
    """Positions of the TILE-sized tiles that hold any of [lo, hi] (clipped to the sequence)."""
    lo, hi = max(lo, 0), min(hi, length - 1)
    if lo > hi:
        return set()
    return set(range(lo // TILE * TILE, min((hi // TILE + 1) * TILE, length)))


def keys_in_band_of_query_tile(start_m: int, seq_q: int, seq_k: int, window: tuple[int, int]) -> set[int]:
    """Keys of every key tile that some row of the query tile [start_m, start_m + TILE) may see,
    computed conservatively: rows past seq_q count too, -1 is unbounded."""
    left, right = window
    diagonal = seq_k - seq_q
    lo = 0 if left < 0 else start_m + diagonal - left
    hi = seq_k - 1 if right < 0 else start_m + TILE - 1 + diagonal + right
    return _round_out(lo, hi, seq_k)


def rows_in_band_of_key_tile(start_n: int, seq_q: int, seq_k: int, window: tuple[int, int]) -> set[int]:
    """The transpose: rows of every query tile holding a row that sees a key of [start_n, start_n + TILE)."""
    left, right = window
    diagonal = seq_k - seq_q
    lo = 0 if right < 0 else start_n - diagonal - right  # row i sees key j iff j - diag - right <= i <= j - diag + left
    hi = seq_q - 1 if left < 0 else start_n + TILE - 1 - diagonal + left
    return _round_out(lo, hi, seq_q)


def _poisoned(t: torch.Tensor, positions: list[int]) -> torch.Tensor:
    """A copy of (B, H, S, D) `t` with NaN at sequence positions `positions`."""
    t = t.clone()
    t[:, :, positions] = float("nan")
    return t


# (seq_q, seq_k, window, causal). With bottom-right alignment the last row always sees the last
# key, so keys right of every band do not exist; what can be skipped globally is keys left of
# every band (Sq < Sk) and rows above every band (Sq > Sk). The per-tile test below covers the rest.
SKIP_CASES = [
    (64, 512, (16, 0), False),
    (45, 300, (20, 5), False),
    (512, 128, (16, 0), True),
    (300, 100, (-1, 3), False),
]


@pytest.mark.parametrize("seq_q,seq_k,window,causal", SKIP_CASES,
                         ids=[f"sq{sq}-sk{sk}-win{w[0]}_{w[1]}{'-causal' if c else ''}" for sq, sk, w, c in SKIP_CASES])
def test_tiles_outside_every_band_are_never_read(seq_q: int, seq_k: int, window: tuple[int, int], causal: bool,
                                                 device: str) -> None:
    """NaN in the keys/values of key tiles no query tile's band touches, and in the queries of
    query tiles no key tile's band touches (their own programs load them, but must attend to
    nothing): a kernel that visited such a tile would spread NaN into its results (0 * NaN is
    NaN). Results must be finite and match the reference on clean data under the rule."""
    case = Variant(batch=1, heads_q=2, heads_kv=1, seq_q=seq_q, seq_k=seq_k, head_dim=32, dtype=FP16,
                   causal=causal, window=window)
    setup = padded_setup(case, device)
    read_keys = set().union(*(keys_in_band_of_query_tile(m, seq_q, seq_k, window) for m in range(0, seq_q, TILE)))
    read_rows = set().union(*(rows_in_band_of_key_tile(n, seq_q, seq_k, window) for n in range(0, seq_k, TILE)))
    unread_keys = sorted(set(range(seq_k)) - read_keys)
    unread_rows = sorted(set(range(seq_q)) - read_rows)
    assert unread_keys or unread_rows, "nothing to poison: the case would prove nothing"
    q, k, v = setup.inputs
    poisoned = (_poisoned(q, unread_rows), _poisoned(k, unread_keys), _poisoned(v, unread_keys))
    with fused_attn.override_configs(TILES_32):
        o, lse, dq, dk, dv = check_under_rule(setup, inputs=poisoned)
    # Unread keys get no gradient and unread rows attend to nothing.
    assert torch.all(dk[:, :, unread_keys] == 0) and torch.all(dv[:, :, unread_keys] == 0)
    assert torch.all(dq[:, :, unread_rows] == 0) and torch.all(o[:, :, unread_rows] == 0)


@pytest.mark.parametrize("tile_m", [0, 7, 15], ids=lambda t: f"query-tile{t}")
def test_each_query_tile_reads_only_its_band(tile_m: int, device: str) -> None:
    """Sq = Sk = 512, window (16, 0), 32 x 32 tiles: every key tile is in some query tile's band,
    so poison per query tile instead: NaN in every key tile outside the band of query tile
    `tile_m`. The forward and dQ programs of that tile must still give its rows' o, lse and dq
    as on clean data, under the rule (other rows and dK/dV read the NaNs legitimately: ignored).
    Tile 0 checks that tiles right of the band are skipped, 15 left of it, 7 both."""
    case = Variant(batch=1, heads_q=1, heads_kv=1, seq_q=512, seq_k=512, head_dim=32, dtype=BF16, window=(16, 0))
    setup = padded_setup(case, device)
    band = keys_in_band_of_query_tile(tile_m * TILE, 512, 512, (16, 0))
    outside = sorted(set(range(512)) - band)
    assert len(band) == (2 * TILE if tile_m else TILE)  # the first tile's band starts at key 0
    q, k, v = setup.inputs
    rows = slice(tile_m * TILE, (tile_m + 1) * TILE)

    def tile_rows(name: str, t: torch.Tensor) -> torch.Tensor | None:
        return None if name in ("dk", "dv") else t[:, :, rows]  # dK/dV sum over rows that read the NaNs

    with fused_attn.override_configs(TILES_32):
        check_under_rule(setup, select=tile_rows, inputs=(q, _poisoned(k, outside), _poisoned(v, outside)))


# --------------------------------------------------------------------------------------------
# 3. ALiBi
# --------------------------------------------------------------------------------------------

ALIBI_CASES = [
    Variant(batch=1, heads_q=4, heads_kv=2, seq_q=45, seq_k=97, head_dim=64, dtype=FP16, causal=True, alibi="head"),
    Variant(batch=2, heads_q=4, heads_kv=1, seq_q=45, seq_k=33, head_dim=40, dtype=BF16, alibi="batch"),
    Variant(batch=2, heads_q=2, heads_kv=2, seq_q=70, seq_k=70, head_dim=80, dtype=FP32, causal=True, alibi="batch"),
    Variant(batch=1, heads_q=4, heads_kv=1, seq_q=97, seq_k=33, head_dim=64, dtype=FP32, causal=True, alibi="head"),
    Variant(batch=1, heads_q=2, heads_kv=1, seq_q=33, seq_k=97, head_dim=96, dtype=BF16, alibi="head", window=(20, 5)),
    Variant(batch=2, heads_q=2, heads_kv=1, seq_q=17, seq_k=70, head_dim=40, dtype=FP16, alibi="batch",
            mask="float"),
]


@pytest.mark.parametrize("case", ALIBI_CASES, ids=lambda c: c.id)
def test_alibi_matches_reference(case: Variant, device: str) -> None:
    check_under_rule(padded_setup(case, device))


def test_alibi_slopes_requiring_grad_are_refused(device: str) -> None:
    """The kernels compute no slope gradient: silently returning none would be wrong, so a slope
    tensor that requires grad is refused while autograd records, and accepted under no_grad."""
    q, k, v = _same_shape_qkv((1, 2, 9, 16), FP32, device)
    slopes = torch.tensor([0.5, 0.25], device=device, requires_grad=True)
    with pytest.raises(ValueError, match="alibi_slopes requires grad"):
        fused_attn.attention(q, k, v, alibi_slopes=slopes)
    with torch.no_grad():
        assert torch.equal(fused_attn.attention(q, k, v, alibi_slopes=slopes),
                           fused_attn.attention(q, k, v, alibi_slopes=slopes.detach()))


# --------------------------------------------------------------------------------------------
# 4. Softcap
# --------------------------------------------------------------------------------------------

# scale 1.0 with D = 64 gives scores of standard deviation 8, so tanh saturates for caps 1 and 5
# and bends for 30: the gradient's (1 - tanh^2) factor is far from 1 (the test checks this).
SOFTCAP_CASES = [
    Variant(batch=bt, heads_q=2, heads_kv=1, seq_q=45, seq_k=70, head_dim=64, dtype=dtype, scale=1.0, softcap=cap,
            **extra)
    for cap, dtype, bt, extra in [
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


@pytest.mark.parametrize("case", SOFTCAP_CASES, ids=lambda c: c.id)
def test_softcap_matches_reference(case: Variant, device: str) -> None:
    setup = padded_setup(case, device)
    q, k, _ = setup.inputs
    # Where |s| > cap / 2, tanh's slope is below 0.79: the cap visibly bends the scores there.
    scores = q.float() @ k.float().repeat_interleave(case.heads_q // case.heads_kv, 1).transpose(-1, -2) * case.scale
    assert (scores.abs() > case.softcap / 2).float().mean() > 0.05, "too few scores reach the cap to test it"
    check_under_rule(setup)


# --------------------------------------------------------------------------------------------
# 5. Dropout
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


DROPOUT_CASES = [
    Variant(batch=1, heads_q=2, heads_kv=1, seq_q=45, seq_k=70, head_dim=64, dtype=FP16, causal=True, dropout_p=0.2),
    Variant(batch=2, heads_q=2, heads_kv=2, seq_q=45, seq_k=33, head_dim=40, dtype=BF16, window=(8, 8),
            dropout_p=0.5),
    Variant(batch=1, heads_q=4, heads_kv=2, seq_q=33, seq_k=33, head_dim=64, dtype=FP32, mask="bool", dropout_p=0.1),
    Variant(batch=1, heads_q=2, heads_kv=1, seq_q=17, seq_k=97, head_dim=80, dtype=FP16, alibi="head", softcap=5.0,
            dropout_p=0.3),
    Variant(batch=1, heads_q=2, heads_kv=1, seq_q=97, seq_k=45, head_dim=64, dtype=BF16, causal=True, mask="float",
            dropout_p=0.15),
]


@pytest.mark.parametrize("case", DROPOUT_CASES, ids=lambda c: c.id)
def test_dropout_matches_reference_with_the_kernels_mask(case: Variant, device: str) -> None:
    check_under_rule(padded_setup(case, device))


def test_dropout_is_reproducible_from_the_generator(device: str) -> None:
    """The same generator state gives bitwise the same output (also through torch's default
    generator, as dropout_seed documents), a different seed a different one."""
    q, k, v = _same_shape_qkv((1, 2, 33, 32), FP16, device)

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
    setup = padded_setup(Variant(batch=1, heads_q=2, heads_kv=1, seq_q=33, seq_k=45, head_dim=40, dtype=BF16,
                                 causal=True, window=(16, 0)), device)
    zero = replace(setup, run_fused=lambda q, k, v: fused_attn.attention(
        q, k, v, causal=True, window=(16, 0), return_lse=True, dropout_p=0.0,
        generator=torch.Generator().manual_seed(3)))
    assert_runs_equal(fused_with_grads(zero), fused_with_grads(setup))


def test_dropout_does_not_change_lse(device: str) -> None:
    """lse is the undropped softmax's normalizer: the kernels count dropped entries in it."""
    q, k, v = _same_shape_qkv((1, 2, 45, 64), FP16, device)
    _, lse = fused_attn.attention(q, k, v, causal=True, return_lse=True)
    _, lse_dropped = fused_attn.attention(q, k, v, causal=True, return_lse=True, dropout_p=0.4,
                                          generator=torch.Generator().manual_seed(0))
    assert torch.equal(lse_dropped, lse)


# --------------------------------------------------------------------------------------------
# 6. Packed variable-length sequences
# --------------------------------------------------------------------------------------------

# A sequence with keys but no queries (1) and one with queries but no keys (3).
LENGTHS_Q = (5, 0, 37, 1, 20)
LENGTHS_K = (9, 4, 37, 0, 50)
VARLEN_CASES = [
    VarlenCase(lengths_q=LENGTHS_Q, lengths_k=LENGTHS_K, heads_q=4, heads_kv=2, head_dim=40, dtype=FP16, causal=True),
    VarlenCase(lengths_q=LENGTHS_Q, lengths_k=LENGTHS_K, heads_q=2, heads_kv=1, head_dim=64, dtype=BF16),
    VarlenCase(lengths_q=LENGTHS_Q, lengths_k=LENGTHS_K, heads_q=2, heads_kv=1, head_dim=64, dtype=BF16,
               window=(8, 4), alibi="batch"),
    VarlenCase(lengths_q=LENGTHS_Q, lengths_k=LENGTHS_K, heads_q=2, heads_kv=2, head_dim=64, dtype=FP32, causal=True,
               softcap=5.0, scale=1.0, dropout_p=0.3),
    VarlenCase(lengths_q=LENGTHS_Q, lengths_k=LENGTHS_K, heads_q=2, heads_kv=1, head_dim=40, dtype=FP16,
               alibi="head", dropout_p=0.2),
    VarlenCase(lengths_q=LENGTHS_Q, lengths_k=LENGTHS_K, heads_q=2, heads_kv=1, head_dim=40, dtype=FP16, causal=True,
               window=(16, 0), alibi="batch", softcap=5.0, dropout_p=0.2),
    VarlenCase(lengths_q=(33, 70, 1), lengths_k=(70, 33, 45), heads_q=2, heads_kv=1, head_dim=40, dtype=BF16,
               alibi="batch", softcap=30.0, window=(-1, 10)),
]


@pytest.mark.parametrize("case", VARLEN_CASES, ids=lambda c: c.id)
def test_varlen_matches_reference(case: VarlenCase, device: str) -> None:
    o, lse, *_ = check_under_rule(varlen_setup(case, device))
    total_q = sum(case.lengths_q)
    assert o.shape == (total_q, case.heads_q, case.head_dim) and lse.shape == (case.heads_q, total_q)


def _split(t: torch.Tensor, lengths: tuple[int, ...]) -> list[torch.Tensor]:
    """Packed (total, H, D) -> one (1, H, len, D) view per sequence."""
    return [part.transpose(0, 1)[None] for part in torch.split(t, list(lengths))]


def test_varlen_equals_attention_per_sequence(device: str) -> None:
    """Packing changes nothing: each sequence gives bitwise what attention() gives it alone."""
    case = VarlenCase(lengths_q=LENGTHS_Q, lengths_k=LENGTHS_K, heads_q=2, heads_kv=1, head_dim=64, dtype=FP16,
                      causal=True, window=(12, 0), alibi="batch", softcap=20.0)
    setup = varlen_setup(case, device)
    o, lse, dq, dk, dv = fused_with_grads(setup)
    slopes = alibi_slopes(case.alibi, len(case.lengths_q), case.heads_q, device)
    parts = zip(_split(setup.inputs[0], case.lengths_q), _split(setup.inputs[1], case.lengths_k),
                _split(setup.inputs[2], case.lengths_k), _split(setup.do, case.lengths_q))
    per_seq = []
    for b, (q, k, v, do) in enumerate(parts):
        leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
        o_b, lse_b = fused_attn.attention(*leaves, return_lse=True, alibi_slopes=slopes[b], **case.kwargs())
        per_seq.append([o_b, lse_b, *torch.autograd.grad(o_b, leaves, do)])

    def packed(i: int) -> torch.Tensor:
        return torch.cat([r[i][0].transpose(0, 1) for r in per_seq])

    assert_runs_equal([o, lse, dq, dk, dv],
                      [packed(0), torch.cat([r[1][0] for r in per_seq], dim=1), packed(2), packed(3), packed(4)])


def test_varlen_does_not_modify_its_inputs(device: str) -> None:
    case = VARLEN_CASES[-2]  # every option at once
    setup = varlen_setup(case, device)
    q, k, v = (t.requires_grad_() for t in setup.inputs)
    cu_q, cu_k = cu_seqlens(case.lengths_q, device), cu_seqlens(case.lengths_k, device)
    slopes = alibi_slopes(case.alibi, len(case.lengths_q), case.heads_q, device)
    before = [t.detach().clone() for t in (q, k, v, cu_q, cu_k, slopes, setup.do)]
    o = fused_attn.attention_varlen(q, k, v, cu_q, cu_k, max(case.lengths_q), max(case.lengths_k), alibi_slopes=slopes,
                                    **case.kwargs())
    o.backward(setup.do)
    for name, old, new in zip(("q", "k", "v", "cu_seqlens_q", "cu_seqlens_k", "alibi_slopes", "do"), before,
                              (q, k, v, cu_q, cu_k, slopes, setup.do)):
        assert torch.equal(old, new.detach()), f"{name} was modified"


def test_varlen_accepts_views_of_a_packed_qkv(device: str) -> None:
    """q, k, v as slices of one (total, 3, H, D) tensor (token stride 3 * H * D): bitwise the same
    results as contiguous copies, and gradients land in the qkv tensor."""
    case = VarlenCase(lengths_q=LENGTHS_Q, lengths_k=LENGTHS_Q, heads_q=2, heads_kv=2, head_dim=64, dtype=BF16,
                      causal=True, window=(8, 0))
    total = sum(case.lengths_q)
    gen = torch.Generator().manual_seed(0)
    qkv = _randn(gen, (total, 3, 2, 64), case.dtype, device).requires_grad_()
    do = _randn(gen, (total, 2, 64), case.dtype, device)
    cu = cu_seqlens(case.lengths_q, device)
    longest = max(case.lengths_q)
    q, k, v = qkv.unbind(1)
    assert not q.is_contiguous()
    o, lse = fused_attn.attention_varlen(q, k, v, cu, cu, longest, longest, return_lse=True, **case.kwargs())
    (dqkv,) = torch.autograd.grad(o, qkv, do)
    leaves = [t.detach().contiguous().requires_grad_() for t in (q, k, v)]
    o_ref, lse_ref = fused_attn.attention_varlen(*leaves, cu, cu, longest, longest, return_lse=True, **case.kwargs())
    grads = torch.autograd.grad(o_ref, leaves, do)
    assert_runs_equal([o, lse, *dqkv.unbind(1)], [o_ref, lse_ref, *grads])


# --------------------------------------------------------------------------------------------
# 7. Deterministic backward
# --------------------------------------------------------------------------------------------

DETERMINISM_CASES = {
    "window-gqa": Variant(batch=1, heads_q=4, heads_kv=1, seq_q=45, seq_k=70, head_dim=64, dtype=FP16, window=(16, 8)),
    "alibi-softcap": Variant(batch=2, heads_q=2, heads_kv=1, seq_q=45, seq_k=40, head_dim=40, dtype=BF16, causal=True,
                             alibi="batch", softcap=5.0),
    "dropout-mask": Variant(batch=1, heads_q=4, heads_kv=2, seq_q=40, seq_k=33, head_dim=64, dtype=FP16, causal=True,
                            window=(20, 0), dropout_p=0.3, mask="float"),
    "varlen-all": VarlenCase(lengths_q=(5, 0, 37, 1), lengths_k=(9, 4, 37, 0), heads_q=2, heads_kv=1, head_dim=40,
                             dtype=FP32, causal=True, window=(16, 0), alibi="batch", softcap=5.0, dropout_p=0.2),
}


@pytest.mark.parametrize("name", list(DETERMINISM_CASES))
def test_backward_is_bitwise_deterministic(name: str, device: str) -> None:
    case = DETERMINISM_CASES[name]
    setup = varlen_setup(case, device) if isinstance(case, VarlenCase) else padded_setup(case, device)
    assert_runs_equal(fused_with_grads(setup), fused_with_grads(setup))


# --------------------------------------------------------------------------------------------
# 8. Bad arguments
# --------------------------------------------------------------------------------------------

def _other_device(device: str) -> str:
    return "meta" if device == "cpu" else "cpu"


# (id, extra keywords for attention() given the device, error, message)
PADDED_BAD = [
    ("window-int", lambda d: {"window": 4}, TypeError, "window must be a pair"),
    ("window-triple", lambda d: {"window": (1, 2, 3)}, TypeError, "window must be a pair"),
    ("window-float", lambda d: {"window": (1.5, 2)}, TypeError, "window must be a pair"),
    ("window-bool", lambda d: {"window": (True, 0)}, TypeError, "window must be a pair"),
    ("window-left-below-minus-one", lambda d: {"window": (-2, 0)}, ValueError, "window sizes must be >= 0"),
    ("window-right-below-minus-one", lambda d: {"window": (4, -3)}, ValueError, "window sizes must be >= 0"),
    ("causal-window-right", lambda d: {"causal": True, "window": (4, 2)}, ValueError, "causal=True"),
    ("softcap-negative", lambda d: {"softcap": -1.0}, ValueError, "softcap must be >= 0"),
    ("softcap-nan", lambda d: {"softcap": math.nan}, ValueError, "softcap must be finite"),
    ("softcap-inf", lambda d: {"softcap": math.inf}, ValueError, "softcap must be finite"),
    ("softcap-string", lambda d: {"softcap": "5"}, TypeError, "softcap must be a float"),
    ("dropout-negative", lambda d: {"dropout_p": -0.1}, ValueError, r"dropout_p must be in \[0, 1\)"),
    ("dropout-one", lambda d: {"dropout_p": 1.0}, ValueError, r"dropout_p must be in \[0, 1\)"),
    ("dropout-nan", lambda d: {"dropout_p": math.nan}, ValueError, "dropout_p must be finite"),
    ("dropout-string", lambda d: {"dropout_p": "0.1"}, TypeError, "dropout_p must be a float"),
    ("alibi-list", lambda d: {"alibi_slopes": [0.5] * 4}, TypeError, "alibi_slopes must be a torch.Tensor"),
    ("alibi-shape", lambda d: {"alibi_slopes": torch.ones(2, device=d)}, ValueError, "alibi_slopes must have shape"),
    ("alibi-batch-shape", lambda d: {"alibi_slopes": torch.ones(3, 4, device=d)}, ValueError,
     "alibi_slopes must have shape"),
    ("alibi-3d", lambda d: {"alibi_slopes": torch.ones(1, 4, 1, device=d)}, ValueError, "alibi_slopes must have shape"),
    ("alibi-int", lambda d: {"alibi_slopes": torch.ones(4, dtype=torch.int32, device=d)}, TypeError,
     "alibi_slopes must have a float dtype"),
    ("alibi-device", lambda d: {"alibi_slopes": torch.ones(4, device=_other_device(d))}, ValueError,
     "alibi_slopes must be on q's device"),
]


def _forbid_launch(monkeypatch) -> None:
    """Any launch for invalid input is a bug: the launcher is replaced by one that fails the test."""
    def no_launch(*args, **kwargs):
        raise AssertionError("a kernel was launched for invalid input")

    monkeypatch.setattr("fused_attn._function.attention_forward", no_launch)


@pytest.mark.parametrize("name,extra,error,message", PADDED_BAD, ids=[b[0] for b in PADDED_BAD])
def test_bad_variant_arguments_raise(name, extra, error, message, device: str, monkeypatch) -> None:
    _forbid_launch(monkeypatch)
    q = torch.randn(1, 4, 8, 16, device=device, dtype=FP16)
    k, v = (torch.randn(1, 2, 8, 16, device=device, dtype=FP16) for _ in range(2))
    with pytest.raises(error, match=message):
        fused_attn.attention(q, k, v, **extra(device))


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
    ("cu-device", {"cu_seqlens_q": lambda a: a["cu_seqlens_q"].to(_other_device(a["q"].device.type))}, ValueError,
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
    _forbid_launch(monkeypatch)
    args = _varlen_args(device)
    args.update({key: make(args) for key, make in changes.items()})
    with pytest.raises(error, match=message):
        fused_attn.attention_varlen(**args)


def test_dropout_mask_refuses_bad_probability(device: str) -> None:
    for bad, error in ((1.0, ValueError), (-0.5, ValueError), (math.nan, ValueError), ("0.5", TypeError)):
        with pytest.raises(error, match="dropout_p"):
            fused_attn.dropout_mask(0, 1, 1, 4, 4, bad, device)


# --------------------------------------------------------------------------------------------
# 9. GPU twins: the same checks at real sizes (the CPU twins are the tests above)
# --------------------------------------------------------------------------------------------
# The float64 reference holds several (B, Hq, Sq, Sk) float64 tensors: B * Hq * Sq * Sk * 8 bytes
# is at most 1 GiB in every case here.

GPU = "cuda"

GPU_PADDED = [
    # windows
    Variant(batch=2, heads_q=16, heads_kv=4, seq_q=2048, seq_k=2048, head_dim=128, dtype=BF16, causal=True,
            window=(256, 0)),
    Variant(batch=2, heads_q=16, heads_kv=16, seq_q=1024, seq_k=2048, head_dim=64, dtype=FP16, window=(128, 64)),
    Variant(batch=2, heads_q=16, heads_kv=4, seq_q=2048, seq_k=1000, head_dim=128, dtype=FP16, window=(-1, 300)),
    # ALiBi
    Variant(batch=2, heads_q=16, heads_kv=4, seq_q=2048, seq_k=2048, head_dim=128, dtype=FP16, causal=True,
            alibi="batch"),
    Variant(batch=2, heads_q=16, heads_kv=16, seq_q=2048, seq_k=1536, head_dim=64, dtype=BF16, alibi="head"),
    # softcap
    Variant(batch=2, heads_q=16, heads_kv=4, seq_q=2048, seq_k=2048, head_dim=128, dtype=BF16, causal=True,
            softcap=30.0),
    Variant(batch=2, heads_q=16, heads_kv=16, seq_q=2048, seq_k=2048, head_dim=64, dtype=FP16, scale=1.0, softcap=5.0,
            window=(512, 0), alibi="head"),
    # dropout
    Variant(batch=2, heads_q=16, heads_kv=4, seq_q=2048, seq_k=1536, head_dim=128, dtype=BF16, causal=True,
            dropout_p=0.1),
    Variant(batch=2, heads_q=16, heads_kv=16, seq_q=2048, seq_k=2048, head_dim=64, dtype=FP16, window=(256, 256),
            alibi="head", softcap=30.0, dropout_p=0.3),
]


def _random_lengths(count: int, longest: int, seed: int) -> tuple[int, ...]:
    gen = torch.Generator().manual_seed(seed)
    return tuple(torch.randint(1, longest + 1, (count,), generator=gen).tolist())


GPU_VARLEN = [
    VarlenCase(lengths_q=_random_lengths(8, 2048, 0), lengths_k=_random_lengths(8, 2048, 1), heads_q=16, heads_kv=4,
               head_dim=128, dtype=BF16, causal=True),
    VarlenCase(lengths_q=_random_lengths(8, 2048, 2), lengths_k=_random_lengths(8, 2048, 3), heads_q=16, heads_kv=16,
               head_dim=64, dtype=FP16, window=(256, 128), alibi="batch", softcap=30.0, dropout_p=0.2),
]


@pytest.mark.gpu
@pytest.mark.parametrize("case", GPU_PADDED, ids=lambda c: c.id)
def test_gpu_variant_matches_reference(case: Variant) -> None:
    check_under_rule(padded_setup(case, GPU))


@pytest.mark.gpu
@pytest.mark.parametrize("case", GPU_VARLEN, ids=lambda c: c.id)
def test_gpu_varlen_matches_reference(case: VarlenCase) -> None:
    check_under_rule(varlen_setup(case, GPU))


@pytest.mark.gpu
def test_gpu_dropout_mask_fraction_and_lse() -> None:
    """On the GPU: the kept fraction of a (2, 16, 2048, 2048) mask, and lse unchanged by dropout
    (here within float32 rounding: the compiled kernels with and without dropout may schedule the
    same arithmetic differently)."""
    keep = fused_attn.dropout_mask(99, 2, 16, 2048, 2048, 0.1, GPU)
    assert abs(keep.float().mean().item() - 0.9) <= 0.01
    q, k, v = _same_shape_qkv((2, 16, 2048, 128), BF16, GPU)
    _, lse = fused_attn.attention(q, k, v, causal=True, return_lse=True)
    _, lse_dropped = fused_attn.attention(q, k, v, causal=True, return_lse=True, dropout_p=0.1,
                                          generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(lse_dropped, lse, rtol=1e-6, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.parametrize("case", [GPU_PADDED[7], GPU_VARLEN[1]], ids=lambda c: c.id)
def test_gpu_backward_is_bitwise_deterministic(case: Variant | VarlenCase) -> None:
    setup = varlen_setup(case, GPU) if isinstance(case, VarlenCase) else padded_setup(case, GPU)
    assert_runs_equal(fused_with_grads(setup), fused_with_grads(setup))
