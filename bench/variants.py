"""Variant benchmark: sliding window, ALiBi, softcap, dropout, packed sequences and attention
sinks, each against the libraries that offer it, in one run.

    python -m bench.variants                 # whatever this machine has
    python -m bench.variants --quick         # one length per variant
    python -m bench.variants --csv PATH      # rows appended here (default bench/results/gpu_variants.csv)

With a CUDA GPU: bf16, D=128, H=16, forward and forward+backward, causal, at B*S = 16k tokens.
Providers, where they have the feature: fused_attn; the flash-attn package (window_size,
alibi_slopes, softcap, dropout_p, flash_attn_varlen_func); compiled FlexAttention (block masks
and score_mods; no dropout); torch SDPA with its default backend choice (a dense mask for the
window, an additive bias for ALiBi, dropout_p; no softcap, no packed input). Attention sinks
(one logit per head): FlexAttention and SDPA get one extra key whose score is the sink and whose
value is zero (a score_mod, or a dense float mask); flash-attn 2 has none. TFLOP/s count only
the (query, key) pairs the variant attends, so a window's cost is counted as S x W, not S^2.

Without a GPU: each variant runs once through the Triton interpreter at a small size against the
float64 reference (FlashAttention's rule for o, dq, dk, dv), and the run says that throughput
needs a GPU.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import random
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

if not torch.cuda.is_available():  # before triton is imported, so fused_attn's kernels interpret
    os.environ.setdefault("TRITON_INTERPRET", "1")

import fused_attn  # noqa: E402
from bench import report  # noqa: E402
from bench.measure import BACKWARD_FLOP_FACTOR  # noqa: E402
from bench.providers import AttentionFn, Case, Provider, Unsupported, _compiled  # noqa: E402
from bench.runner import Row, run_cases  # noqa: E402
from fused_attn import reference  # noqa: E402

VARIANTS = ("window", "alibi", "softcap", "dropout", "varlen", "sinks")
WINDOW = 1024       # keys left of the diagonal: Mistral's 4096 scaled to these lengths
SOFTCAP = 50.0      # Gemma 2
DROPOUT_P = 0.1
TOKENS, HEADS, HEAD_DIM = 16384, 16, 128
DEFAULT_CSV = Path(__file__).resolve().parent / "results" / "gpu_variants.csv"


@dataclass(frozen=True)
class VariantCase:
    """One variant at one size; `seq` is the padded length, or for "varlen" the longest sequence
    (the batch is then one packed sequence of TOKENS tokens)."""
    variant: str
    mode: str
    seq: int
    dtype: torch.dtype = torch.bfloat16
    heads: int = HEADS
    head_dim: int = HEAD_DIM
    tokens: int = TOKENS
    window: int = WINDOW

    @property
    def batch(self) -> int:
        return 1 if self.variant == "varlen" else max(1, self.tokens // self.seq)

    @property
    def lengths(self) -> list[int]:
        """Packed sequence lengths (varlen): seeded random lengths up to `seq`, `tokens` in all."""
        rng, lengths, left = random.Random(self.seq), [], self.tokens
        while left > 0:
            lengths.append(min(left, rng.randint(self.seq // 8, self.seq)))
            left -= lengths[-1]
        return lengths

    def base(self) -> Case:
        """The runner's case: inputs (B, H, S, D), or (1, H, total, D) for packed input."""
        seq = self.tokens if self.variant == "varlen" else self.seq
        return Case(self.mode, True, self.dtype, self.batch, self.heads, seq, self.head_dim)

    def visible_pairs(self) -> int:
        """(query, key) pairs attended, per head, over the batch (causal, bottom-right)."""
        if self.variant == "window":
            return self.batch * sum(min(i + 1, self.window + 1) for i in range(self.seq))
        lengths = self.lengths if self.variant == "varlen" else [self.seq] * self.batch
        return sum(n * (n + 1) // 2 for n in lengths)

    def flops(self) -> float:
        forward = 4.0 * self.heads * self.head_dim * self.visible_pairs()
        return forward if self.mode == "fwd" else (1 + BACKWARD_FLOP_FACTOR) * forward


def variant_cases(quick: bool = False) -> list[VariantCase]:
    seqs = {"window": (4096,) if quick else (4096, 16384), "varlen": (4096,)}
    return [VariantCase(variant, mode, seq) for variant in VARIANTS for seq in seqs.get(variant, (4096,))
            for mode in ("fwd", "fwd+bwd")]


def _slopes(heads: int, device: torch.device) -> torch.Tensor:
    return 2.0 ** (-8.0 * torch.arange(1, heads + 1, device=device, dtype=torch.float32) / heads)


def _sinks(heads: int, device: torch.device) -> torch.Tensor:
    """One sink logit per head, spread around typical row lse values."""
    return torch.linspace(-1.0, 3.0, heads, device=device)


def _with_sink_key(k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """k and v with one zero key appended: its score is set to the sink by the caller's mask or
    score_mod, and its zero value makes it attend to nothing."""
    zeros = k.new_zeros(*k.shape[:2], 1, k.shape[3]), v.new_zeros(*v.shape[:2], 1, v.shape[3])
    return torch.cat([k, zeros[0]], dim=2), torch.cat([v, zeros[1]], dim=2)


def _cu_seqlens(case: VariantCase, device: torch.device) -> tuple[torch.Tensor, int]:
    bounds = [0]
    for n in case.lengths:
        bounds.append(bounds[-1] + n)
    return torch.tensor(bounds, dtype=torch.int32, device=device), max(case.lengths)


def _fused(case: VariantCase) -> Callable[[Case, torch.device], AttentionFn]:
    def build(_: Case, device: torch.device) -> AttentionFn:
        if case.variant == "varlen":  # inputs (1, total, H, D): the packed (total, H, D) is q[0]
            cu, longest = _cu_seqlens(case, device)
            return lambda q, k, v: fused_attn.attention_varlen(q[0], k[0], v[0], cu, cu, longest, longest,
                                                               causal=True)[None]
        options = {"window": {"window": (case.window, 0)}, "alibi": {"alibi_slopes": _slopes(case.heads, device)},
                   "softcap": {"softcap": SOFTCAP}, "dropout": {"dropout_p": DROPOUT_P},
                   "sinks": {"sinks": _sinks(case.heads, device)}}[case.variant]
        return lambda q, k, v: fused_attn.attention(q, k, v, causal=True, **options)
    return build


def _flash_attn_package(case: VariantCase) -> Callable[[Case, torch.device], AttentionFn]:
    def build(_: Case, device: torch.device) -> AttentionFn:
        try:
            from flash_attn import flash_attn_func, flash_attn_varlen_func
        except ImportError as error:
            raise Unsupported(f"the flash-attn package is not importable ({error})") from None
        if device.type != "cuda":
            raise Unsupported("the flash-attn package runs on CUDA only")
        if case.variant == "sinks":
            raise Unsupported("flash_attn_func has no attention sinks")
        if case.variant == "varlen":
            cu, longest = _cu_seqlens(case, device)
            return lambda q, k, v: flash_attn_varlen_func(q[0], k[0], v[0], cu, cu, longest, longest,
                                                          causal=True)[None]
        options = {"window": {"window_size": (case.window, 0)}, "alibi": {"alibi_slopes": _slopes(case.heads, device)},
                   "softcap": {"softcap": SOFTCAP}, "dropout": {"dropout_p": DROPOUT_P}}[case.variant]
        return lambda q, k, v: flash_attn_func(q, k, v, causal=True, **options)
    return build


def _flex(case: VariantCase) -> Callable[[Case, torch.device], AttentionFn]:
    def build(base: Case, device: torch.device) -> AttentionFn:
        if device.type != "cuda":
            raise Unsupported("compiled FlexAttention is benchmarked on CUDA only")
        if case.variant == "dropout":
            raise Unsupported("FlexAttention has no dropout")
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        slopes, sinks = _slopes(case.heads, device), _sinks(case.heads, device)
        if case.variant == "sinks":  # the appended key (index seq) is visible to every query, scored `sink`
            seq = base.seq

            def sink_mask(b, h, q_idx, kv_idx):
                return (q_idx >= kv_idx) | (kv_idx == seq)

            def sink_score(score, b, h, q_idx, kv_idx):
                return torch.where(kv_idx == seq, sinks[h].to(score.dtype), score)

            block_mask = _compiled(create_block_mask)(sink_mask, None, None, seq, seq + 1, device=device)
            flex = _compiled(flex_attention)
            return lambda q, k, v: flex(q, *_with_sink_key(k, v), score_mod=sink_score, block_mask=block_mask)
        if case.variant == "varlen":
            document = torch.repeat_interleave(torch.arange(len(case.lengths), device=device),
                                               torch.tensor(case.lengths, device=device))

            def mask_mod(b, h, q_idx, kv_idx):
                return (document[q_idx] == document[kv_idx]) & (q_idx >= kv_idx)
        elif case.variant == "window":
            def mask_mod(b, h, q_idx, kv_idx):
                return (q_idx >= kv_idx) & (q_idx - kv_idx <= case.window)
        else:
            def mask_mod(b, h, q_idx, kv_idx):
                return q_idx >= kv_idx
        score_mod = None
        if case.variant == "alibi":
            def score_mod(score, b, h, q_idx, kv_idx):
                return score - slopes[h] * (q_idx - kv_idx).abs()
        elif case.variant == "softcap":
            def score_mod(score, b, h, q_idx, kv_idx):
                return SOFTCAP * torch.tanh(score / SOFTCAP)
        block_mask = _compiled(create_block_mask)(mask_mod, None, None, base.seq, base.seq, device=device)
        flex = _compiled(flex_attention)
        return lambda q, k, v: flex(q, k, v, score_mod=score_mod, block_mask=block_mask)
    return build


def _sdpa(case: VariantCase) -> Callable[[Case, torch.device], AttentionFn]:
    def build(base: Case, device: torch.device) -> AttentionFn:
        if case.variant in ("softcap", "varlen"):
            raise Unsupported(f"torch SDPA has no {'softcap' if case.variant == 'softcap' else 'packed input'}")
        if case.variant == "dropout":
            return lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=DROPOUT_P)
        visible = reference.window_mask(base.seq, base.seq, (case.window if case.variant == "window" else -1, 0), device)
        if case.variant == "sinks":  # a dense float mask: causal, plus the appended zero key scored `sink`
            causal = torch.zeros(base.seq, base.seq, device=device).masked_fill(~visible, float("-inf"))
            sink_column = _sinks(case.heads, device)[:, None, None].expand(case.heads, base.seq, 1)
            bias = torch.cat([causal.expand(case.heads, -1, -1), sink_column], dim=-1).to(case.dtype)
            return lambda q, k, v: F.scaled_dot_product_attention(q, *_with_sink_key(k, v), attn_mask=bias)
        if case.variant == "window":  # what Hugging Face hands SDPA for a sliding-window layer
            return lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=visible)
        distance = (torch.arange(base.seq, device=device)[:, None] - torch.arange(base.seq, device=device)).abs()
        bias = (-_slopes(case.heads, device)[:, None, None] * distance).masked_fill(~visible, float("-inf"))
        bias = bias.to(case.dtype)
        return lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    return build


def providers_for(case: VariantCase) -> list[Provider]:
    return [Provider("fused_attn", _fused(case), layout="bshd" if case.variant == "varlen" else "bhsd"),
            Provider("flash_attn_pkg", _flash_attn_package(case), layout="bshd"),
            Provider("flex_compiled", _flex(case)), Provider("sdpa", _sdpa(case))]


CSV_FIELDS = ("variant", *report.CSV_FIELDS)


def measure(cases: list[VariantCase], device: str, csv_path: Path | None, **options: object
            ) -> list[dict[str, object]]:
    """Every provider on every case (the runner's timing and memory), rows with the variant's FLOPs."""
    meta = report.run_metadata(device)
    records = []
    for case in cases:
        rows = run_cases([case.base()], providers_for(case), device, **options)
        for row in rows:
            if row.ms_p50:  # the runner counts dense causal FLOPs; count the variant's pairs
                row.tflops = case.flops() / row.ms_p50 / 1e9
            records.append({"variant": case.variant, **meta, **dataclasses.asdict(row)})
        if csv_path is not None:
            report.append_records(csv_path, CSV_FIELDS, records[-len(rows):])
    return records


def gpu_table(records: list[dict[str, object]]) -> str:
    providers = list(dict.fromkeys(str(r["provider"]) for r in records))
    lines = ["| variant | mode | S | B x H | " + " | ".join(providers) + " |",
             "|---|---|---|---|" + "---|" * len(providers)]
    groups: dict[tuple, dict[str, dict[str, object]]] = {}
    for r in records:
        groups.setdefault((r["variant"], r["mode"], r["seq"], r["batch"], r["heads"]), {})[str(r["provider"])] = r
    for (variant, mode, seq, batch, heads), by_provider in groups.items():
        cells = []
        for name in providers:
            r = by_provider.get(name)
            if r is None or r["status"] != "ok" or r["tflops"] is None:
                cells.append("" if r is None else f"{r['status']}: {str(r['reason'])[:60]}")
            else:
                ratio = f" ({r['speed_vs_fused']:.2f}x)" if name != "fused_attn" and r["speed_vs_fused"] else ""
                cells.append(f"{r['tflops']:.1f}{ratio}")
        lines.append(f"| {variant} | {mode} | {seq} | {batch} x {heads} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def check_on_cpu() -> str:
    """Each variant once through the interpreter against the float64 reference: the worst
    error ratio to plain PyTorch's (o, dq, dk, dv) under FlashAttention's rule (2, 3, 3, 3)."""
    gen = torch.Generator().manual_seed(0)
    lines = ["| variant | B, H, S, D | worst error / PyTorch's (o, dq, dk, dv) | result |", "|---|---|---|---|"]
    batch, heads, seq, dim = 2, 2, 80, 32
    for variant in VARIANTS:
        q, k, v, do = (torch.randn(batch, heads, seq, dim, generator=gen).to(torch.bfloat16) for _ in range(4))
        kernel_options: dict[str, object] = {"causal": True}
        reference_options: dict[str, object] = {"causal": True}
        if variant == "window":
            kernel_options["window"] = reference_options["window"] = (17, 0)
        elif variant == "alibi":
            kernel_options["alibi_slopes"] = reference_options["alibi_slopes"] = _slopes(heads, q.device)
        elif variant == "softcap":
            kernel_options["softcap"] = reference_options["softcap"] = 2.0
        elif variant == "sinks":
            kernel_options["sinks"] = reference_options["sinks"] = _sinks(heads, q.device)
        elif variant == "dropout":
            # The seed the kernels will draw from this generator, and the mask it gives; then re-seed.
            generator = torch.Generator().manual_seed(1)
            keep = fused_attn.dropout_mask(fused_attn.dropout_seed(generator), batch, heads, seq, seq, 0.3)
            kernel_options.update(dropout_p=0.3, generator=generator.manual_seed(1))
            reference_options.update(dropout_p=0.3, dropout_mask=keep)
        results = {}
        for name, dtype in (("golden", torch.float64), ("fused", torch.bfloat16), ("plain", torch.bfloat16)):
            leaves = [t.to(dtype, copy=True).requires_grad_() for t in (q, k, v)]
            options = kernel_options if name == "fused" else reference_options
            if variant == "varlen":  # two packed sequences of 30 and 50 tokens, batch 1 of the inputs
                cu = torch.tensor([0, 30, 80], dtype=torch.int32)
                packed = [t[0].transpose(0, 1) for t in leaves]
                o = (fused_attn.attention_varlen(*packed, cu, cu, 50, 50, causal=True) if name == "fused"
                     else reference.attention_varlen(*packed, cu, cu, causal=True))
                o.backward(do[0].transpose(0, 1).to(dtype))
            else:
                o = (fused_attn.attention if name == "fused" else reference.attention)(*leaves, **options)
                o.backward(do.to(dtype))
            results[name] = [o.detach()] + [t.grad for t in leaves]
        ratios = []
        for fused, plain, golden in zip(results["fused"], results["plain"], results["golden"]):
            floor = 1e-3 * max(1.0, golden.abs().max().item())
            ratios.append((fused.double() - golden).abs().max().item()
                          / max((plain.double() - golden).abs().max().item(), floor))
        passed = ratios[0] <= 2 and max(ratios[1:]) <= 3
        lines.append(f"| {variant} | {batch}, {heads}, {seq}, {dim} | {', '.join(f'{r:.2f}' for r in ratios)} "
                     f"| {'pass' if passed else 'FAIL'} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.variants", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one length per variant")
    parser.add_argument("--csv", type=Path, default=DEFAULT_CSV, help="append rows here (GPU runs)")
    parser.add_argument("--no-save", action="store_true", help="write no CSV")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("# fused_attn variants without a GPU\n")
        print("No CUDA device: each variant is checked through the Triton interpreter against the float64 "
              "reference (bf16). **Throughput needs a GPU and is not reported here.**\n")
        table = check_on_cpu()
        print(table)
        return 0 if "FAIL" not in table else 1
    records = measure(variant_cases(args.quick), "cuda", None if args.no_save else args.csv)
    print(f"# fused_attn variants: TFLOP/s of attended pairs (speed relative to fused_attn), "
          f"{torch.cuda.get_device_name()}\n")
    print(gpu_table(records))
    return 0


if __name__ == "__main__":
    sys.exit(main())
