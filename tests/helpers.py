"""Shared test machinery: the one case class, the one input builder, FlashAttention's error rule
and the check that applies it.

- `AttentionCase`: one call, its shapes, dtype and memory layout and every option (causal,
  window, ALiBi, softcap, scale, dropout, an attn_mask, sinks; packed lengths for
  attention_varlen). Frozen, with an `id` for pytest (`str(case)` is the same).
- `make_inputs(case, device, seed)`: everything the call needs, drawn on the CPU from `seed`
  (so every device sees the same values) and cast to the case's dtype, as `Inputs`: q, k, v, the
  upstream gradient do, and the mask, slopes, sinks, cu_seqlens and the kernels' dropout mask
  where the case has them. `Inputs` runs the kernels (`run_fused`) and the reference
  (`run_reference`) on them with the same options, and unpacks as `q, k, v, do`.
- `check_under_rule(inputs)`: FlashAttention's rule for o, lse, dq, dk, dv against the float64
  reference; `check_against_reference(case, device)` is the same for a case.

GPU twins, the one convention
-----------------------------
A check that should also run at real sizes is a function of (case, device). Its CPU twin takes
the `device` fixture (conftest: "cuda" on a GPU machine, else "cpu" through the Triton
interpreter) with small, awkward cases; its GPU twin is marked `@pytest.mark.gpu` and calls the
same function with `GPU` and cases of the same kind at real sizes. The GPU twins sit at the end
of their CPU twin's file under "GPU twins" (test_gpu.py holds those of test_attention.py).
`gpu` is the only marker for "needs CUDA": conftest skips it without a GPU, and bench/gpu_suite
selects it with `-m gpu`. The reverse, a test of the no-GPU path only, is marked
`@pytest.mark.cpu_only(reason=...)`: conftest skips it where CUDA is available. Neither is
written as a skipif on torch.cuda.is_available().
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import KW_ONLY, dataclass
from typing import Callable, Iterator

import torch

import fused_attn
from fused_attn import reference

# The device of every GPU twin (see the module docstring).
GPU = "cuda"

# Kernel error may be 2x (output) or 3x (gradients) PyTorch's own error in the same dtype, plus
# this floor, which only matters where PyTorch is exact (for example a single key).
FLOOR = {torch.float32: 1e-6, torch.float16: 1e-4, torch.bfloat16: 1e-3}

DROPOUT_SEED = 1234  # generator seed of every dropout call that runs through Inputs


# --------------------------------------------------------------------------------------------
# The case
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class AttentionCase:
    """One call. Padded (`attention`): q (B, Hq, Sq, D), k (B, Hkv, Sk, D), v (B, Hkv, Sk, Dv).
    Packed (`attention_varlen`, when lengths_q is given): sequence b has lengths_q[b] queries and
    lengths_k[b] keys; q (total_q, Hq, D), k (total_k, Hkv, D), v (total_k, Hkv, Dv), and batch,
    seq_q, seq_k and layout are unused.

    The first ten fields may be given by position (batch, heads_q, heads_kv, seq_q, seq_k,
    head_dim, head_dim_v, causal, dtype, layout); the options only by keyword."""

    batch: int = 1
    heads_q: int = 2
    heads_kv: int = 1
    seq_q: int = 17
    seq_k: int = 17
    head_dim: int = 64
    head_dim_v: int | None = None  # None: head_dim
    causal: bool = False
    dtype: torch.dtype = torch.float16
    layout: str = "bhsd"  # "bhsd" contiguous, "bshd" seen through transpose(1, 2), "sliced" (gaps)
    _: KW_ONLY
    window: tuple[int, int] | None = None
    alibi: str | None = None  # "head": slopes (Hq,); "batch": (B, Hq), or (num_seqs, Hq) when packed
    softcap: float = 0.0
    scale: float | None = None
    dropout_p: float = 0.0
    # An attn_mask: "bool" (True attends), "float" (added to the scores, -inf removes a key),
    # "float-grad" (float, and the test differentiates it), "padding" (bool: keys past each batch
    # entry's length hidden, shape (B, 1, 1, Sk)). See make_attn_mask.
    mask: str | None = None
    mask_shape: tuple[int, ...] | None = None  # None: (B, 1, Sq, Sk)
    sinks: bool = False  # one learnable sink logit per query head (float32, (Hq,))
    lengths_q: tuple[int, ...] | None = None
    lengths_k: tuple[int, ...] | None = None
    name: str | None = None  # leads the id, for cases better known by a name

    def __post_init__(self) -> None:
        if (self.lengths_q is None) != (self.lengths_k is None):
            raise ValueError("a packed case needs both lengths_q and lengths_k")
        if self.lengths_q is not None and len(self.lengths_q) != len(self.lengths_k):
            raise ValueError("lengths_q and lengths_k must count the same sequences")
        if self.is_varlen and (self.mask is not None or self.layout != "bhsd"):
            raise ValueError("attention_varlen takes no attn_mask, and packed inputs have one layout")
        if self.mask == "padding" and self.mask_shape not in (None, (self.batch, 1, 1, self.seq_k)):
            raise ValueError("a padding mask has shape (B, 1, 1, Sk)")

    @property
    def dim_v(self) -> int:
        return self.head_dim if self.head_dim_v is None else self.head_dim_v

    @property
    def is_varlen(self) -> bool:
        return self.lengths_q is not None

    @property
    def num_seqs(self) -> int:
        """The batch entries: B padded, the number of sequences packed."""
        return len(self.lengths_q) if self.lengths_q is not None else self.batch

    @property
    def id(self) -> str:
        dt = str(self.dtype).replace("torch.", "")
        heads = f"h{self.heads_q}" if self.heads_q == self.heads_kv else f"h{self.heads_q}-{self.heads_kv}"
        dims = f"d{self.head_dim}" if self.head_dim == self.dim_v else f"d{self.head_dim}-{self.dim_v}"
        flavour = "causal" if self.causal else "full"
        if self.lengths_q is not None and self.lengths_k is not None:
            if len(self.lengths_q) <= 6:
                lengths = f"q{'_'.join(map(str, self.lengths_q))}-k{'_'.join(map(str, self.lengths_k))}"
            else:
                lengths = f"n{len(self.lengths_q)}-q{sum(self.lengths_q)}-k{sum(self.lengths_k)}"
            parts = [lengths, heads, dims, flavour, dt]
        else:
            parts = [f"b{self.batch}", heads, f"sq{self.seq_q}", f"sk{self.seq_k}", dims, flavour, dt, self.layout]
        if self.window is not None:
            parts.append(f"win{self.window[0]}_{self.window[1]}")
        if self.alibi:
            parts.append(f"alibi-{self.alibi}")
        if self.softcap:
            parts.append(f"cap{self.softcap:g}")
        if self.scale is not None:
            parts.append(f"scale{self.scale:g}")
        if self.dropout_p:
            parts.append(f"drop{self.dropout_p:g}")
        if self.mask:
            shape = "" if self.mask_shape is None else "x".join(map(str, self.mask_shape))
            parts.append(f"mask-{self.mask}{shape}")
        if self.sinks:
            parts.append("sinks")
        return "-".join(([self.name] if self.name else []) + parts)

    def __str__(self) -> str:
        return self.id


# --------------------------------------------------------------------------------------------
# The input builder
# --------------------------------------------------------------------------------------------

def make_tensor(shape: tuple[int, ...], dtype: torch.dtype, device: str, layout: str,
                generator: torch.Generator) -> torch.Tensor:
    """Random (B, H, S, D) tensor (or any shape, for layout "bhsd") in the requested memory
    layout, values ~ N(0, 1) drawn in float32 on the CPU and then cast."""
    if layout == "bshd":
        b, h, s, d = shape
        base = torch.randn((b, s, h, d), generator=generator, dtype=torch.float32)
        return base.to(device=device, dtype=dtype).transpose(1, 2)
    if layout == "sliced":  # gaps between rows and heads: a view into a larger buffer
        b, h, s, d = shape
        base = torch.randn((b, h + 1, s + 3, d + 5), generator=generator, dtype=torch.float32)
        return base.to(device=device, dtype=dtype)[:, 1:, 2:s + 2, 3:d + 3]
    return torch.randn(shape, generator=generator, dtype=torch.float32).to(device=device, dtype=dtype)


def alibi_slopes(kind: str | None, batch: int, heads: int, device: str) -> torch.Tensor | None:
    """float32 ALiBi slopes: the paper's 2^(-8 (h + 1) / H) per head; for kind "batch" (B, H) with
    each batch entry scaled differently, so a kernel that reads the wrong row shows."""
    if kind is None:
        return None
    slopes = torch.tensor([2.0 ** (-8.0 * (h + 1) / heads) for h in range(heads)])
    if kind == "batch":
        slopes = slopes[None, :] * (1.0 + 0.5 * torch.arange(batch))[:, None]
    return slopes.to(device)


def make_attn_mask(case: AttentionCase, gen: torch.Generator, device: str) -> torch.Tensor | None:
    """The case's attn_mask, of case.mask_shape (default (B, 1, Sq, Sk)). bool: about 70% of the
    keys kept; float: N(0, 1) with about 20% -inf, in the case's dtype (so the float64 reference
    sees exactly the values the kernels read). Both make the mask's first row (mask.view(-1,
    Sk)[0]) see no key at all. padding: batch entry b sees all keys when b is even, Sk // 3 when odd."""
    if case.mask is None:
        return None
    seq_k = case.seq_k
    if case.mask == "padding":
        lengths = torch.tensor([seq_k if b % 2 == 0 else seq_k // 3 for b in range(case.batch)])
        return (torch.arange(seq_k)[None, :] < lengths[:, None]).view(case.batch, 1, 1, seq_k).to(device)
    shape = case.mask_shape or (case.batch, 1, case.seq_q, seq_k)
    if case.mask == "bool":
        mask = torch.rand(shape, generator=gen) > 0.3
        mask.view(-1, shape[-1])[0] = False
        return mask.to(device)
    if case.mask not in ("float", "float-grad"):
        raise ValueError(f"unknown mask kind {case.mask!r}")
    mask = torch.randn(shape, generator=gen)
    mask[torch.rand(shape, generator=gen) < 0.2] = -math.inf
    mask.view(-1, shape[-1])[0] = -math.inf
    return mask.to(device=device, dtype=case.dtype)


def cu_seqlens(lengths: tuple[int, ...], device: str) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(lengths, dtype=torch.int64).cumsum(0).tolist()], dtype=torch.int32,
                        device=device)


def random_lengths(count: int, longest: int, seed: int) -> tuple[int, ...]:
    """`count` sequence lengths in [1, longest], drawn from `seed`."""
    gen = torch.Generator().manual_seed(seed)
    return tuple(torch.randint(1, longest + 1, (count,), generator=gen).tolist())


def dropout_generator(dropout_p: float) -> torch.Generator | None:
    """A fresh generator in the same state for every call, so every call draws the same seed."""
    return torch.Generator().manual_seed(DROPOUT_SEED) if dropout_p > 0 else None


def kernel_dropout_mask(dropout_p: float, batch: int, heads: int, seq_q: int, seq_k: int,
                        device: str) -> torch.Tensor | None:
    """The keep-mask a call with `dropout_generator(dropout_p)` uses, re-derived the documented
    way: re-seed the generator, ask dropout_seed for the seed, and expand it with dropout_mask."""
    if dropout_p == 0:
        return None
    gen = torch.Generator().manual_seed(DROPOUT_SEED)
    return fused_attn.dropout_mask(fused_attn.dropout_seed(gen), batch, heads, seq_q, seq_k, dropout_p, device)


def _golden(t: torch.Tensor | None, golden: bool) -> torch.Tensor | None:
    return t.double() if golden and t is not None else t


Runner = Callable[..., tuple[torch.Tensor, torch.Tensor]]


@dataclass
class Inputs:
    """What make_inputs draws for one case. Unpacks as q, k, v, do."""

    case: AttentionCase
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    do: torch.Tensor
    attn_mask: torch.Tensor | None = None
    alibi_slopes: torch.Tensor | None = None
    sinks: torch.Tensor | None = None
    cu_seqlens_q: torch.Tensor | None = None
    cu_seqlens_k: torch.Tensor | None = None
    max_seqlen_q: int | None = None
    max_seqlen_k: int | None = None
    dropout_mask: torch.Tensor | None = None  # the kernels' keep-mask (see kernel_dropout_mask)

    def __iter__(self) -> Iterator[torch.Tensor]:
        return iter((self.q, self.k, self.v, self.do))

    @property
    def qkv(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.q, self.k, self.v

    def score_options(self, golden: bool = False) -> dict[str, object]:
        """The keywords that shape the scores (causal, scale, window, softcap, alibi_slopes and,
        padded, attn_mask), as fused_attn and its reference take them; `golden`: slopes in float64."""
        case = self.case
        options: dict[str, object] = {"causal": case.causal, "scale": case.scale, "window": case.window,
                                      "softcap": case.softcap, "alibi_slopes": _golden(self.alibi_slopes, golden)}
        if not case.is_varlen:
            options["attn_mask"] = self.attn_mask
        return options

    def options(self, golden: bool = False) -> dict[str, object]:
        """score_options and dropout_p and sinks: every keyword but the generator (the kernels)
        or the dropout mask (the reference); `golden`: slopes and sinks in float64."""
        return {**self.score_options(golden), "dropout_p": self.case.dropout_p, "sinks": _golden(self.sinks, golden)}

    def run_fused(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """o, lse of the kernels on (q, k, v) with the case's options; dropout from `dropout_generator`."""
        generator = dropout_generator(self.case.dropout_p)
        if self.case.is_varlen:
            return fused_attn.attention_varlen(q, k, v, self.cu_seqlens_q, self.cu_seqlens_k, self.max_seqlen_q,
                                               self.max_seqlen_k, return_lse=True, generator=generator,
                                               **self.options())
        return fused_attn.attention(q, k, v, return_lse=True, generator=generator, **self.options())

    def run_reference(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      golden: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """o, lse of the reference with the same options and the kernels' dropout mask (packed:
        (num_seqs, Hq, max_q, max_k), which the reference slices per sequence as the kernels index it)."""
        if self.case.is_varlen:
            return reference.attention_varlen(q, k, v, self.cu_seqlens_q, self.cu_seqlens_k, return_lse=True,
                                              dropout_mask=self.dropout_mask, **self.options(golden))
        return reference.attention(q, k, v, return_lse=True, dropout_mask=self.dropout_mask, **self.options(golden))


def make_inputs(case: AttentionCase, device: str, seed: int = 0) -> Inputs:
    """The case's tensors, drawn from `seed` in this order: q, k, v (in the case's layout), do
    (contiguous), the attn_mask (make_attn_mask), the sinks (N(0, 1) + 1, float32). ALiBi slopes
    are fixed (alibi_slopes); the dropout mask is the kernels' own (kernel_dropout_mask)."""
    gen = torch.Generator().manual_seed(seed)
    hq, hkv, d, dv = case.heads_q, case.heads_kv, case.head_dim, case.dim_v
    packed: dict[str, object] = {}
    if case.lengths_q is not None and case.lengths_k is not None:
        total_q, total_k = sum(case.lengths_q), sum(case.lengths_k)
        max_q, max_k = max(case.lengths_q, default=0), max(case.lengths_k, default=0)
        shapes = ((total_q, hq, d), (total_k, hkv, d), (total_k, hkv, dv), (total_q, hq, dv))
        q, k, v, do = (make_tensor(shape, case.dtype, device, "bhsd", gen) for shape in shapes)
        packed = {"cu_seqlens_q": cu_seqlens(case.lengths_q, device), "cu_seqlens_k": cu_seqlens(case.lengths_k, device),
                  "max_seqlen_q": max_q, "max_seqlen_k": max_k}
    else:
        b, max_q, max_k = case.batch, case.seq_q, case.seq_k
        q = make_tensor((b, hq, max_q, d), case.dtype, device, case.layout, gen)
        k = make_tensor((b, hkv, max_k, d), case.dtype, device, case.layout, gen)
        v = make_tensor((b, hkv, max_k, dv), case.dtype, device, case.layout, gen)
        do = make_tensor((b, hq, max_q, dv), case.dtype, device, "bhsd", gen)
    attn_mask = make_attn_mask(case, gen, device)
    sinks = (torch.randn(hq, generator=gen) + 1.0).to(device) if case.sinks else None
    return Inputs(case, q, k, v, do, attn_mask=attn_mask,
                  alibi_slopes=alibi_slopes(case.alibi, case.num_seqs, hq, device), sinks=sinks,
                  dropout_mask=kernel_dropout_mask(case.dropout_p, case.num_seqs, hq, max_q, max_k, device),
                  **packed)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------
# FlashAttention's rule
# --------------------------------------------------------------------------------------------

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


def _rows(o: torch.Tensor) -> torch.Tensor:
    """o indexed like lse: (B, Hq, Sq, Dv) as is, packed (total, Hq, Dv) as (Hq, total, Dv)."""
    return o if o.dim() == 4 else o.transpose(0, 1)


def fused_with_grads(inputs: Inputs, tensors: tuple[torch.Tensor, ...] | None = None,
                     run: Runner | None = None) -> list[torch.Tensor]:
    """o, lse, dq, dk, dv of the kernels on fresh leaves (copies of `tensors`, default the inputs'
    q, k, v), run by `run(q, k, v)` (default inputs.run_fused), with the inputs' do."""
    leaves = [t.detach().clone().requires_grad_() for t in (tensors or inputs.qkv)]
    o, lse = (run or inputs.run_fused)(*leaves)
    return [o, lse, *torch.autograd.grad(o, leaves, inputs.do)]


def check_under_rule(inputs: Inputs, select: Callable[[str, torch.Tensor], torch.Tensor | None] | None = None,
                     tensors: tuple[torch.Tensor, ...] | None = None) -> list[torch.Tensor]:
    """FlashAttention's rule for o and lse (2x) and dq, dk, dv (3x, the inputs' random do): the
    kernels' error against the reference on float64 copies must stay within a factor of the
    error of the same reference run in the low-precision dtype itself. o has the inputs' dtype and
    shape (B, Hq, Sq, Dv) or packed (total_q, Hq, Dv), lse is float32, each gradient has its
    input's dtype and shape. Rows the reference leaves without a key must be exactly 0 with lse -inf.

    `tensors` (default the inputs' q, k, v) is what the kernels get, the references always get the
    inputs': lets a test hand the kernels poisoned copies of values they must never read.
    `select(name, t)` restricts every comparison to the part of a result that the test vouches for
    (None: none of it). Returns the kernels' o, lse, dq, dk, dv."""
    case = inputs.case
    select = select or (lambda name, t: t)
    got = fused_with_grads(inputs, tensors)
    results = {}
    for kind in ("golden", "plain"):
        leaves = [(t.double() if kind == "golden" else t).detach().clone().requires_grad_() for t in inputs.qkv]
        o, lse = inputs.run_reference(*leaves, golden=kind == "golden")
        do = inputs.do.double() if kind == "golden" else inputs.do
        results[kind] = [o, lse, *torch.autograd.grad(o, leaves, do)]
    o, lse = got[:2]
    rows = sum(case.lengths_q) if case.lengths_q is not None else None
    expected_o = (rows, case.heads_q, case.dim_v) if rows is not None else (
        case.batch, case.heads_q, case.seq_q, case.dim_v)
    expected_lse = (case.heads_q, rows) if rows is not None else (case.batch, case.heads_q, case.seq_q)
    assert o.dtype == case.dtype and lse.dtype == torch.float32
    assert o.shape == expected_o and lse.shape == expected_lse, f"o {tuple(o.shape)}, lse {tuple(lse.shape)}"
    for grad, leaf in zip(got[2:], inputs.qkv):
        assert grad.dtype == leaf.dtype and grad.shape == leaf.shape
    for i, name in enumerate(("o", "lse", "dq", "dk", "dv")):
        assert got[i].shape == results["golden"][i].shape, f"{name}: shape {tuple(got[i].shape)}"
        if select(name, got[i]) is not None:
            assert_close_to_reference(name, select(name, got[i]), select(name, results["golden"][i]),
                                      select(name, results["plain"][i]), 2.0 if i < 2 else 3.0, case.dtype)
    empty = torch.isinf(results["golden"][1])
    assert torch.all(select("o", _rows(o))[select("lse", empty)] == 0), "a row without keys has a nonzero output"
    assert torch.all(select("lse", lse)[select("lse", empty)] == -math.inf), "a row without keys has a finite lse"
    return got


def check_against_reference(case: AttentionCase, device: str) -> list[torch.Tensor]:
    """check_under_rule on the case's inputs (seed 0)."""
    return check_under_rule(make_inputs(case, device))


def assert_runs_equal(first: list[torch.Tensor], second: list[torch.Tensor]) -> None:
    for name, a, b in zip(("o", "lse", "dq", "dk", "dv"), first, second):
        assert torch.equal(a, b), f"{name} differs between two identical runs"


# --------------------------------------------------------------------------------------------
# Bad arguments
# --------------------------------------------------------------------------------------------

def other_device(device: str) -> str:
    """A device that is not `device`, for arguments that must be on q's device."""
    return "meta" if device == "cpu" else "cpu"


def forbid_attention_launch(monkeypatch) -> None:
    """Any launch for invalid input is a bug: the launcher is replaced by one that fails the test."""
    def no_launch(*args, **kwargs):
        raise AssertionError("a kernel was launched for invalid input")

    monkeypatch.setattr("fused_attn._function.attention_forward", no_launch)


def reference_with_kernels_dropout(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, dropout_p: float = 0.0,
                                   **kwargs: object) -> torch.Tensor:
    """Stand-in for fused_attn.attention: the reference, with the dropout mask the kernels would
    use (its seed drawn from torch's default generator, as `attention` draws it)."""
    keep = None
    if dropout_p > 0:
        keep = fused_attn.dropout_mask(fused_attn.dropout_seed(), q.shape[0], q.shape[1], q.shape[2], k.shape[2],
                                       dropout_p, q.device)
    return reference.attention(q, k, v, dropout_p=dropout_p, dropout_mask=keep, **kwargs)  # type: ignore[arg-type]
