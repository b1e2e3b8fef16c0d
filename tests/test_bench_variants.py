"""bench/variants.py at tiny sizes on the CPU: the attended-pair counts behind its TFLOP/s, the
packed lengths, that the SDPA configurations it compares against compute what fused_attn's
variants compute, its rows and CSV, and the no-GPU check."""
from __future__ import annotations

import csv

import pytest
import torch

from bench import variants
from bench.variants import VariantCase
from fused_attn import reference


@pytest.mark.parametrize("seq,window", [(1, 0), (50, 7), (50, 49), (50, 200), (97, 16)])
def test_window_pairs_count_the_window_mask(seq: int, window: int) -> None:
    case = VariantCase("window", "fwd", seq, tokens=3 * seq, window=window)
    assert case.batch == 3
    assert case.visible_pairs() == 3 * int(reference.window_mask(seq, seq, (window, 0)).sum())
    assert case.flops() == 4.0 * case.heads * case.head_dim * case.visible_pairs()
    assert VariantCase("window", "fwd+bwd", seq, tokens=3 * seq, window=window).flops() == 3.5 * case.flops()


def test_packed_lengths_fill_the_tokens_and_pairs_count_each_sequence() -> None:
    case = VariantCase("varlen", "fwd", 300, tokens=2000)
    lengths = case.lengths
    assert sum(lengths) == 2000 and max(lengths) <= 300 and min(lengths) >= 1 and len(lengths) > 1
    assert lengths == VariantCase("varlen", "fwd", 300, tokens=2000).lengths  # seeded: the same every run
    assert case.visible_pairs() == sum(int(reference.causal_mask(n, n).sum()) for n in lengths)
    assert case.batch == 1 and case.base().seq == 2000


@pytest.mark.parametrize("variant", ["window", "alibi", "dropout", "softcap", "sinks"])
def test_sdpa_configuration_computes_what_fused_attn_computes(variant: str, device: str) -> None:
    """The competitor must be asked for the same function: SDPA's dense window mask and ALiBi
    bias, and the sink as an extra zero key scored by the mask, against fused_attn's variants on the
    same inputs; SDPA refuses softcap by name."""
    case = VariantCase(variant, "fwd", 40, dtype=torch.float32, heads=2, head_dim=16, tokens=80, window=9)
    base = case.base()
    q, k, v = (torch.randn(base.batch, base.heads, base.seq, base.head_dim, device=device) for _ in range(3))
    if variant == "softcap":
        with pytest.raises(variants.Unsupported, match="softcap"):
            variants._sdpa(case)(base, torch.device(device))
        return
    sdpa = variants._sdpa(case)(base, torch.device(device))
    fused = variants._fused(case)(base, torch.device(device))
    if variant == "dropout":  # different RNGs: compare the kept fraction's effect, not values
        assert sdpa(q, k, v).shape == fused(q, k, v).shape
        return
    torch.testing.assert_close(fused(q, k, v), sdpa(q, k, v), rtol=1e-4, atol=1e-5)


def test_rows_use_the_variants_flops_and_land_in_the_csv(tmp_path, device: str) -> None:
    cases = [VariantCase("window", "fwd", 32, dtype=torch.float32, heads=2, head_dim=16, tokens=64, window=5),
             VariantCase("varlen", "fwd+bwd", 24, dtype=torch.float32, heads=2, head_dim=16, tokens=64)]
    path = tmp_path / "variants.csv"
    records = variants.measure(cases, device, path, warmup_ms=1, rep_ms=1, progress=None)
    by = {(r["variant"], r["provider"]): r for r in records}
    for case in cases:
        fused = by[(case.variant, "fused_attn")]
        assert fused["status"] == "ok", fused["reason"]
        assert fused["tflops"] == pytest.approx(case.flops() / fused["ms_p50"] / 1e9)
    assert by[("varlen", "sdpa")]["status"] == "skipped" and "packed" in by[("varlen", "sdpa")]["reason"]
    assert by[("window", "sdpa")]["status"] == "ok"
    with path.open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(records) and rows[0].keys() >= {"variant", "provider", "tflops", "run_id"}
    assert "fused_attn" in variants.gpu_table(records)


def test_no_gpu_check_passes_every_variant() -> None:
    table = variants.check_on_cpu()
    assert table.count("| pass |") == len(variants.VARIANTS), table
