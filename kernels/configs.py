"""The one table of launch configs for the attention kernels.

A config is chosen by GPU capability, padded head dim (the larger of the q/k and v dims,
rounded up to a power of two, at least 16) and element size. Every entry here is compiled
for capability 80 and 90 by `python -m fused_attn.kernel_report`, and a test checks that each
fits the card's shared memory, spills no registers, and uses warpgroup MMA on capability 90.
Under the Triton interpreter one small config is pinned: autotuning there would run every config.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class KernelConfig:
    """Tile shape and launch parameters of one kernel."""

    block_m: int  # query rows per tile
    block_n: int  # key rows per tile
    num_warps: int
    num_stages: int


@dataclass(frozen=True)
class AttentionConfigs:
    """Configs of the three kernels that one attention call launches."""

    forward: KernelConfig
    backward_dkdv: KernelConfig
    backward_dq: KernelConfig


HEAD_DIM_BUCKETS = (16, 32, 64, 128, 256)
CAPABILITIES = (80, 90)
ELEMENT_SIZES = (2, 4)

# Blocks must be multiples of 16 (tl.dot) and powers of two (tl.arange). For warpgroup MMA on
# capability 90 the M side of every dot must be a multiple of 64 per 4 warps, which is why the
# backward kernels keep block_n (the M side of the dK/dV dots) at 64 or more with 4 warps.
_TABLE: dict[tuple[int, int, int], AttentionConfigs] = {}


def _fill_table() -> None:
    def cfg(m: int, n: int, w: int, s: int) -> KernelConfig:
        return KernelConfig(block_m=m, block_n=n, num_warps=w, num_stages=s)

    for cap in CAPABILITIES:
        for d in HEAD_DIM_BUCKETS:
            for size in ELEMENT_SIZES:
                wide = size == 4
                if d <= 64:
                    fwd = cfg(128, 64, 4, 3 if not wide else 2)
                    dkdv = cfg(32, 64, 4, 2)
                    dq = cfg(64, 32, 4, 2)
                elif d <= 128:
                    fwd = cfg(128, 64 if not wide else 32, 8, 3 if cap >= 90 and not wide else 2)
                    dkdv = cfg(32, 64, 4, 2)
                    dq = cfg(64, 32, 4, 2)
                else:
                    fwd = cfg(64, 32, 4, 2)
                    dkdv = cfg(16, 64, 8, 1 if wide else 2)
                    dq = cfg(64, 16, 8, 1 if wide else 2)
                _TABLE[(cap, d, size)] = AttentionConfigs(fwd, dkdv, dq)


_fill_table()

# Under the interpreter large tiles mean fewer NumPy calls; 32 keeps several tiles in small tests.
INTERPRETER_CONFIGS = AttentionConfigs(
    forward=KernelConfig(32, 32, 4, 1),
    backward_dkdv=KernelConfig(32, 32, 4, 1),
    backward_dq=KernelConfig(32, 32, 4, 1),
)


def head_dim_bucket(head_dim: int) -> int:
    """Smallest power of two >= head_dim and >= 16 (tl.dot's minimum)."""
    bucket = 16
    while bucket < head_dim:
        bucket *= 2
    return bucket


def lookup(capability: int, padded_head_dim: int, element_size: int) -> AttentionConfigs:
    """Config for a GPU of `capability` (major * 10 + minor); newer cards use the 90 row."""
    cap = 90 if capability >= 90 else 80
    size = 4 if element_size >= 4 else 2
    return _TABLE[(cap, head_dim_bucket(padded_head_dim), size)]


def all_configs() -> dict[tuple[int, int, int], AttentionConfigs]:
    """Every shipped (capability, head-dim bucket, element size) -> configs entry."""
    return dict(_TABLE)
