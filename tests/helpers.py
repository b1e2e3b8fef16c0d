"""Shared test machinery: cases, input builders and FlashAttention's error rule."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch

import fused_attn
from fused_attn import reference

# Kernel error may be 2x (output) or 3x (gradients) PyTorch's own error in the same dtype, plus
# this floor, which only matters where PyTorch is exact (for example a single key).
FLOOR = {torch.float32: 1e-6, torch.float16: 1e-4, torch.bfloat16: 1e-3}


@dataclass(frozen=True)
class Case:
    batch: int
    heads_q: int
    heads_kv: int
    seq_q: int
    seq_k: int
    head_dim: int
    head_dim_v: int
    causal: bool
    dtype: torch.dtype = torch.float16
    layout: str = "bhsd"  # "bhsd" contiguous, "bshd" seen through transpose(1, 2), "sliced"

    @property
    def id(self) -> str:
        dt = str(self.dtype).replace("torch.", "")
        heads = f"h{self.heads_q}" if self.heads_q == self.heads_kv else f"h{self.heads_q}-{self.heads_kv}"
        dims = f"d{self.head_dim}" if self.head_dim == self.head_dim_v else f"d{self.head_dim}-{self.head_dim_v}"
        return (f"b{self.batch}-{heads}-sq{self.seq_q}-sk{self.seq_k}-{dims}-"
                f"{'causal' if self.causal else 'full'}-{dt}-{self.layout}")


def make_tensor(shape: tuple[int, int, int, int], dtype: torch.dtype, device: str, layout: str,
                generator: torch.Generator) -> torch.Tensor:
    """Random (B, H, S, D) tensor in the requested memory layout, values ~ N(0, 1)."""
    b, h, s, d = shape
    if layout == "bshd":
        base = torch.randn((b, s, h, d), generator=generator, dtype=torch.float32)
        return base.to(device=device, dtype=dtype).transpose(1, 2)
    if layout == "sliced":  # gaps between rows and heads: a view into a larger buffer
        base = torch.randn((b, h + 1, s + 3, d + 5), generator=generator, dtype=torch.float32)
        return base.to(device=device, dtype=dtype)[:, 1:, 2:s + 2, 3:d + 3]
    return torch.randn(shape, generator=generator, dtype=torch.float32).to(device=device, dtype=dtype)


def make_inputs(case: Case, device: str, seed: int = 0) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    q = make_tensor((case.batch, case.heads_q, case.seq_q, case.head_dim), case.dtype, device, case.layout, gen)
    k = make_tensor((case.batch, case.heads_kv, case.seq_k, case.head_dim), case.dtype, device, case.layout, gen)
    v = make_tensor((case.batch, case.heads_kv, case.seq_k, case.head_dim_v), case.dtype, device, case.layout, gen)
    do = make_tensor((case.batch, case.heads_q, case.seq_q, case.head_dim_v), case.dtype, device, "bhsd", gen)
    return q, k, v, do


def _record(dtype: torch.dtype, name: str, ratio: float) -> None:
    """Append one error ratio to the run's log; conftest prints the worst per dtype at the end."""
    log = os.environ.get("FUSED_ATTN_RATIO_LOG")
    if log:
        with open(log, "a") as f:
            f.write(json.dumps({"dtype": str(dtype).replace("torch.", ""), "name": name, "ratio": ratio}) + "\n")


def assert_close_to_reference(name: str, got: torch.Tensor, golden: torch.Tensor, plain: torch.Tensor,
                              factor: float, dtype: torch.dtype, magnitude: float | None = None) -> None:
    """FlashAttention's rule: max|got - golden| <= factor * max|plain - golden| + floor, where the
    floor is FLOOR[dtype] relative to `magnitude` (default: the reference's largest value, at least
    1), so a case where plain PyTorch happens to be exact still allows rounding at that scale."""
    assert got.shape == golden.shape, f"{name}: shape {tuple(got.shape)} != {tuple(golden.shape)}"
    assert not torch.isnan(got).any(), f"{name}: NaN in the kernel's result"
    finite = torch.isfinite(golden)
    assert torch.equal(torch.isfinite(got), finite), f"{name}: infinities differ from the reference"
    if not finite.any():
        return
    kernel_err = (got.double() - golden)[finite].abs().max().item()
    plain_err = (plain.double() - golden)[finite].abs().max().item()
    floor = FLOOR[dtype] * max(1.0, golden[finite].abs().max().item() if magnitude is None else magnitude)
    bound = factor * plain_err + floor
    _record(dtype, name, kernel_err / max(plain_err, floor))
    assert kernel_err <= bound, (f"{name}: kernel error {kernel_err:.3e} > {factor} x PyTorch's "
                                 f"{plain_err:.3e} + {floor:.1e}")


def check_against_reference(case: Case, device: str, with_grad: bool = True) -> None:
    """Run fused_attn and the reference (float64 and same-dtype) and apply the rule to o, lse, dq, dk, dv."""
    q, k, v, do = make_inputs(case, device)
    leaves = [t.detach().clone().requires_grad_(with_grad) for t in (q, k, v)]
    o, lse = fused_attn.attention(*leaves, causal=case.causal, return_lse=True)
    assert o.dtype == case.dtype and lse.dtype == torch.float32
    assert o.shape == (case.batch, case.heads_q, case.seq_q, case.head_dim_v)
    assert lse.shape == (case.batch, case.heads_q, case.seq_q)

    golden_leaves = [t.detach().double().requires_grad_(with_grad) for t in (q, k, v)]
    golden_o, golden_lse = reference.attention(*golden_leaves, causal=case.causal, return_lse=True)
    plain_leaves = [t.detach().clone().requires_grad_(with_grad) for t in (q, k, v)]
    plain_o, plain_lse = reference.attention(*plain_leaves, causal=case.causal, return_lse=True)

    assert_close_to_reference("o", o, golden_o, plain_o, 2.0, case.dtype)
    assert_close_to_reference("lse", lse, golden_lse, plain_lse, 2.0, case.dtype)
    # Rows with no visible key: exactly zero output and lse -inf.
    empty_rows = torch.isinf(golden_lse)
    assert torch.all(o[empty_rows] == 0)
    assert torch.all(lse[empty_rows] == float("-inf"))
    if not with_grad:
        return
    grads = torch.autograd.grad(o, leaves, do)
    golden_grads = torch.autograd.grad(golden_o, golden_leaves, do.double())
    plain_grads = torch.autograd.grad(plain_o, plain_leaves, do)
    for name, got, golden, plain, leaf in zip(("dq", "dk", "dv"), grads, golden_grads, plain_grads, leaves):
        assert got.dtype == leaf.dtype and got.shape == leaf.shape
        assert_close_to_reference(name, got, golden, plain, 3.0, case.dtype)


def reference_with_kernels_dropout(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, dropout_p: float = 0.0,
                                   **kwargs: object) -> torch.Tensor:
    """Stand-in for fused_attn.attention: the reference, with the dropout mask the kernels would
    use (its seed drawn from torch's default generator, as `attention` draws it)."""
    keep = None
    if dropout_p > 0:
        keep = fused_attn.dropout_mask(fused_attn.dropout_seed(), q.shape[0], q.shape[1], q.shape[2], k.shape[2],
                                       dropout_p, q.device)
    return reference.attention(q, k, v, dropout_p=dropout_p, dropout_mask=keep, **kwargs)  # type: ignore[arg-type]
