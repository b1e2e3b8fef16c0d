"""Sliding windows against the float64 reference under FlashAttention's error rule, that tiles
outside a window are never read, and that bad window arguments are refused before any kernel
launches.

Without a GPU the kernels run through the Triton interpreter, so the CPU cases are small but
awkward (lengths 1, 17, 97, 200, Sq != Sk both ways, head dims 40, 80, 96, GQA). The GPU twins
at the end (marked gpu, skipped without one) run the same check at real sizes.
"""
from __future__ import annotations

import pytest
import torch

import fused_attn
from fused_attn import AttentionConfigs, KernelConfig
from tests.helpers import GPU, AttentionCase, check_under_rule, forbid_attention_launch, make_inputs

FP16, BF16, FP32 = torch.float16, torch.bfloat16, torch.float32

pytestmark = pytest.mark.usefixtures("one_cpu_thread")


# --------------------------------------------------------------------------------------------
# 1. Against the reference
# --------------------------------------------------------------------------------------------

WINDOW_CASES = [
    AttentionCase(1, 2, 1, 17, 97, 40, dtype=FP16, window=(0, 0)),
    AttentionCase(1, 4, 2, 97, 17, 80, dtype=BF16, window=(5, 3)),
    AttentionCase(1, 2, 1, 200, 97, 96, dtype=FP32, window=(16, -1)),
    AttentionCase(1, 2, 2, 97, 200, 40, dtype=FP16, window=(-1, 7)),
    AttentionCase(1, 4, 2, 70, 70, 80, dtype=BF16, window=(10, 0), causal=True),
    # Sq > Sk: the first rows' bands lie left of key 0 and see nothing.
    AttentionCase(1, 2, 1, 97, 17, 96, dtype=FP32, window=(3, 3)),
    AttentionCase(1, 2, 1, 200, 17, 40, dtype=FP16, window=(10, 0), causal=True),
    AttentionCase(1, 2, 1, 1, 200, 80, dtype=BF16, window=(16, -1)),  # decoding
    AttentionCase(1, 2, 1, 200, 1, 40, dtype=FP16, window=(5, 3)),  # one key
    # (0, 0): one key per row, so dq and dk are exactly 0 and PyTorch's error is 0; in float32 the
    # kernels' dp - delta rounding (~1e-6 at |do . v| ~ 10) exceeds the 1e-6 floor, so bf16 here.
    AttentionCase(2, 2, 1, 17, 17, 96, dtype=BF16, window=(0, 0), causal=True),
    AttentionCase(2, 2, 1, 17, 17, 96, dtype=FP32, window=(1, 0), causal=True),
    AttentionCase(1, 2, 1, 17, 200, 80, dtype=BF16, window=(-1, -1)),
    AttentionCase(1, 2, 1, 17, 97, 40, dtype=FP32, window=(500, 500)),
    # Band widths around the 32-key tile size, and D != Dv.
    AttentionCase(1, 3, 1, 97, 200, 40, dtype=FP16, window=(33, 31), head_dim_v=24),
]


@pytest.mark.parametrize("case", WINDOW_CASES, ids=str)
def test_window_matches_reference(case: AttentionCase, device: str) -> None:
    check_under_rule(make_inputs(case, device))


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
    case = AttentionCase(1, 2, 1, seq_q, seq_k, 32, causal=causal, dtype=FP16, window=window)
    inputs = make_inputs(case, device)
    read_keys = set().union(*(keys_in_band_of_query_tile(m, seq_q, seq_k, window) for m in range(0, seq_q, TILE)))
    read_rows = set().union(*(rows_in_band_of_key_tile(n, seq_q, seq_k, window) for n in range(0, seq_k, TILE)))
    unread_keys = sorted(set(range(seq_k)) - read_keys)
    unread_rows = sorted(set(range(seq_q)) - read_rows)
    assert unread_keys or unread_rows, "nothing to poison: the case would prove nothing"
    q, k, v = inputs.qkv
    poisoned = (_poisoned(q, unread_rows), _poisoned(k, unread_keys), _poisoned(v, unread_keys))
    with fused_attn.override_configs(TILES_32):
        o, lse, dq, dk, dv = check_under_rule(inputs, tensors=poisoned)
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
    case = AttentionCase(1, 1, 1, 512, 512, 32, dtype=BF16, window=(16, 0))
    inputs = make_inputs(case, device)
    band = keys_in_band_of_query_tile(tile_m * TILE, 512, 512, (16, 0))
    outside = sorted(set(range(512)) - band)
    assert len(band) == (2 * TILE if tile_m else TILE)  # the first tile's band starts at key 0
    q, k, v = inputs.qkv
    rows = slice(tile_m * TILE, (tile_m + 1) * TILE)

    def tile_rows(name: str, t: torch.Tensor) -> torch.Tensor | None:
        return None if name in ("dk", "dv") else t[:, :, rows]  # dK/dV sum over rows that read the NaNs

    with fused_attn.override_configs(TILES_32):
        check_under_rule(inputs, select=tile_rows, tensors=(q, _poisoned(k, outside), _poisoned(v, outside)))


# --------------------------------------------------------------------------------------------
# 3. Bad arguments
# --------------------------------------------------------------------------------------------

# (id, window keywords for attention(), error, message)
BAD_WINDOWS = [
    ("window-int", {"window": 4}, TypeError, "window must be a pair"),
    ("window-triple", {"window": (1, 2, 3)}, TypeError, "window must be a pair"),
    ("window-float", {"window": (1.5, 2)}, TypeError, "window must be a pair"),
    ("window-bool", {"window": (True, 0)}, TypeError, "window must be a pair"),
    ("window-left-below-minus-one", {"window": (-2, 0)}, ValueError, "window sizes must be >= 0"),
    ("window-right-below-minus-one", {"window": (4, -3)}, ValueError, "window sizes must be >= 0"),
    ("causal-window-right", {"causal": True, "window": (4, 2)}, ValueError, "causal=True"),
]


@pytest.mark.parametrize("name,extra,error,message", BAD_WINDOWS, ids=[b[0] for b in BAD_WINDOWS])
def test_bad_window_arguments_raise(name, extra, error, message, device: str, monkeypatch) -> None:
    forbid_attention_launch(monkeypatch)
    q = torch.randn(1, 4, 8, 16, device=device, dtype=FP16)
    k, v = (torch.randn(1, 2, 8, 16, device=device, dtype=FP16) for _ in range(2))
    with pytest.raises(error, match=message):
        fused_attn.attention(q, k, v, **extra)


# --------------------------------------------------------------------------------------------
# GPU twins: the same check at real sizes. The float64 reference holds several (B, Hq, Sq, Sk)
# float64 tensors: B * Hq * Sq * Sk * 8 bytes is at most 1 GiB in every case here.
# --------------------------------------------------------------------------------------------

GPU_WINDOW_CASES = [
    AttentionCase(2, 16, 4, 2048, 2048, 128, causal=True, dtype=BF16, window=(256, 0)),
    AttentionCase(2, 16, 16, 1024, 2048, 64, dtype=FP16, window=(128, 64)),
    AttentionCase(2, 16, 4, 2048, 1000, 128, dtype=FP16, window=(-1, 300)),
]


@pytest.mark.gpu
@pytest.mark.parametrize("case", GPU_WINDOW_CASES, ids=str)
def test_gpu_window_matches_reference(case: AttentionCase) -> None:
    check_under_rule(make_inputs(case, GPU))
