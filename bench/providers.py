"""The attention implementations the benchmark compares, and why one may not run.

A provider turns a case into a callable ``fn(q, k, v) -> o`` or raises `Unsupported` with the
reason, which the table and the CSV show as a skip. Inputs come in the provider's layout:
(B, H, S, D) for all but the flash-attn package, which takes (B, S, H, D).
"""
from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass
from typing import Callable, ContextManager

import torch
import torch.nn.functional as F

import fused_attn
from fused_attn import reference

AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class Unsupported(Exception):
    """The provider cannot run this case here; the message says why."""


@dataclass(frozen=True)
class Case:
    """One measured configuration. Sq == Sk throughout (torch's top-left causal then agrees
    with the bottom-right alignment of fused_attn and FlashAttention)."""
    mode: str          # "fwd", "bwd" or "fwd+bwd"
    causal: bool
    dtype: torch.dtype
    batch: int
    heads: int
    seq: int
    head_dim: int
    timed: bool = True  # False: a memory-only case (the longest lengths)

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).removeprefix("torch.")

    @property
    def label(self) -> str:
        return (f"{self.mode} {'causal' if self.causal else 'full'} {self.dtype_name} "
                f"D={self.head_dim} B={self.batch} H={self.heads} S={self.seq}")


@dataclass(frozen=True)
class Provider:
    name: str
    build: Callable[[Case, torch.device], AttentionFn]
    layout: str = "bhsd"
    # Entered around a whole measurement, so selecting a backend is not part of the timed call.
    context: Callable[[], ContextManager[object]] = contextlib.nullcontext


def _fused(case: Case, device: torch.device) -> AttentionFn:
    return lambda q, k, v: fused_attn.attention(q, k, v, causal=case.causal)


def _naive(case: Case, device: torch.device) -> AttentionFn:
    return lambda q, k, v: reference.attention(q, k, v, causal=case.causal)


def _sdpa_backend(backend_name: str) -> Provider:
    """torch SDPA pinned to one backend through sdpa_kernel; a refusal becomes Unsupported."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = getattr(SDPBackend, backend_name)

    def build(case: Case, device: torch.device) -> AttentionFn:
        if device.type != "cuda" and backend_name in ("EFFICIENT_ATTENTION", "CUDNN_ATTENTION"):
            raise Unsupported(f"SDPA's {backend_name.lower()} backend runs on CUDA only")

        def call(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            return F.scaled_dot_product_attention(q, k, v, is_causal=case.causal)

        def checked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            # torch explains a refusal in warnings, then raises "No available kernel".
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                try:
                    return call(q, k, v)
                except RuntimeError as error:
                    refused = "No available kernel" in str(error) or "No viable backend" in str(error)
                    if isinstance(error, torch.OutOfMemoryError) or not refused:
                        raise
                    reasons = [str(w.message).split("\n")[0] for w in caught]
                    raise Unsupported("; ".join(reasons) or str(error).split("\n")[0]) from None

        return checked

    return Provider(f"sdpa_{backend_name.lower().replace('_attention', '')}", build,
                    context=lambda: sdpa_kernel(backend))


def _flex(case: Case, device: torch.device) -> AttentionFn:
    if device.type != "cuda":
        raise Unsupported("compiled FlexAttention is benchmarked on CUDA only (compiling it for the "
                          "CPU takes minutes and says nothing about GPU speed)")
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError as error:
        raise Unsupported(f"torch {torch.__version__} has no FlexAttention ({error})") from None
    compiled_flex, compiled_block_mask = _compiled(flex_attention), _compiled(create_block_mask)
    block_mask = None
    if case.causal:
        # Compiled, create_block_mask never materializes S x S booleans (16 GB at 128k).
        block_mask = compiled_block_mask(lambda b, h, q_idx, kv_idx: q_idx >= kv_idx, None, None,
                                         case.seq, case.seq, device=device)
    return lambda q, k, v: compiled_flex(q, k, v, block_mask=block_mask)


_COMPILED: dict[Callable[..., object], Callable[..., object]] = {}


def _compiled(fn: Callable[..., object]) -> Callable[..., object]:
    """One torch.compile wrapper per function for the whole run (a graph per shape under it)."""
    if fn not in _COMPILED:
        import torch._functorch.config

        # Past dynamo's default limit of 8 recompiles it would silently fall back to eager
        # FlexAttention and report its (much lower) speed.
        for knob in ("recompile_limit", "cache_size_limit"):
            if hasattr(torch._dynamo.config, knob):
                setattr(torch._dynamo.config, knob, 256)
        # With donated buffers (default since torch 2.6) a compiled backward refuses
        # retain_graph=True, which the backward-only timing needs to replay one graph.
        if hasattr(torch._functorch.config, "donated_buffer"):
            torch._functorch.config.donated_buffer = False
        # Default dynamic-shape policy, as users get it: static first, dynamic after a recompile.
        _COMPILED[fn] = torch.compile(fn)
    return _COMPILED[fn]


def _flash_attn_package(case: Case, device: torch.device) -> AttentionFn:
    try:
        from flash_attn import flash_attn_func
    except ImportError as error:
        raise Unsupported(f"the flash-attn package is not importable ({error})") from None
    if device.type != "cuda":
        raise Unsupported("the flash-attn package runs on CUDA only")
    if case.dtype not in (torch.float16, torch.bfloat16):
        raise Unsupported("the flash-attn package takes float16 and bfloat16 only")
    return lambda q, k, v: flash_attn_func(q, k, v, causal=case.causal)


def all_providers() -> list[Provider]:
    """Every provider in table order; fused_attn first, since ratios are taken against it."""
    return [
        Provider("fused_attn", _fused),
        Provider("naive", _naive),
        _sdpa_backend("MATH"),
        _sdpa_backend("EFFICIENT_ATTENTION"),
        _sdpa_backend("FLASH_ATTENTION"),
        _sdpa_backend("CUDNN_ATTENTION"),
        Provider("flex_compiled", _flex),
        Provider("flash_attn_pkg", _flash_attn_package, layout="bshd"),
    ]


def providers_named(names: list[str] | None) -> list[Provider]:
    """The providers with these names (all of them for None), or ValueError naming the unknown one."""
    known = {p.name: p for p in all_providers()}
    if names is None:
        return list(known.values())
    for name in names:
        if name not in known:
            raise ValueError(f"unknown provider {name!r}; known: {', '.join(known)}")
    return [known[n] for n in names]
