"""The one table of launch configs for the attention kernels.

A config is chosen by GPU capability, padded head dim (the larger of the q/k and v dims,
rounded up to a power of two, at least 16) and element size. Every entry here is compiled
for capability 80 and 90 by `python -m fused_attn.kernel_report`, and a test checks that each
fits the card's shared memory, spills no registers (except the rows in KNOWN_SPILLS), and uses
warpgroup MMA on capability 90.
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
# capability 90 the M side of every dot must be 64 per warpgroup: block_m for the forward and dQ
# kernels, block_n for the dK/dV kernel (k @ q^T, p^T @ do, v @ do^T, ds^T @ q), so those stay >= 64.
#
# Every entry was picked with `python -m fused_attn.kernel_report` (Triton 3.9, ptxas 12.9 for
# sm_80 and 13.x for sm_90): the largest tile, in the order FlashAttention-2 and the Triton tutorial
# prefer, that spills nothing in what the kernels are launched with: causal, head dims and strides
# multiples of 16 (the launcher copies any other input into a zero-padded buffer), head dim masked
# (EVEN_D False, e.g. 80 in a 128 block). What limits the tiles is registers, not shared memory.
_TABLE: dict[tuple[int, int, int], AttentionConfigs] = {}


def _fill_table() -> None:
    def cfg(m: int, n: int, w: int, s: int) -> KernelConfig:
        return KernelConfig(block_m=m, block_n=n, num_warps=w, num_stages=s)

    # (forward, backward_dkdv, backward_dq) per head-dim bucket.
    table: dict[tuple[int, int], dict[int, tuple[KernelConfig, KernelConfig, KernelConfig]]] = {
        # fp16/bf16 on A100. Forward: 128-row tiles as in FlashAttention-2, 8 warps from D=64 on
        # (4 warps spill the 128x64 accumulator + scores); 3 stages fit easily in 163 KB.
        # dK/dV holds two fp32 accumulators of block_n x D: wide key tiles for small D, block_m 16
        # and narrower key tiles as D grows. dQ: 128x32 like the tutorial while it fits.
        (80, 2): {
            16: (cfg(128, 64, 4, 3), cfg(32, 128, 8, 2), cfg(128, 32, 8, 2)),
            32: (cfg(128, 64, 4, 3), cfg(32, 128, 8, 2), cfg(128, 32, 8, 2)),
            64: (cfg(128, 64, 8, 3), cfg(16, 64, 8, 1), cfg(128, 32, 8, 2)),
            128: (cfg(128, 64, 8, 3), cfg(16, 32, 8, 2), cfg(64, 16, 8, 2)),
            256: (cfg(64, 16, 8, 2), cfg(16, 32, 8, 2), cfg(32, 16, 8, 2)),
        },
        # fp32 on A100, for both input_precision='ieee' (FMA dots: operands held whole in registers,
        # so tiles are small and 8 warps spread them) and 'tf32' (mma). One stage: no pipelining
        # buffers. The exact-fp32 path is a correctness path, not a fast one.
        (80, 4): {
            16: (cfg(64, 32, 4, 2), cfg(16, 32, 8, 1), cfg(64, 16, 8, 1)),
            32: (cfg(64, 32, 8, 2), cfg(32, 32, 8, 1), cfg(64, 16, 8, 1)),
            64: (cfg(64, 32, 8, 2), cfg(16, 16, 4, 1), cfg(64, 16, 8, 1)),
            # dK/dV: 2 stages (1 stage spills 32 B with ieee dots). dQ: 64x32 (64x16 spills 16 B with
            # ieee dots since the variant flags; ptxas caps it at 128 registers).
            128: (cfg(32, 32, 8, 1), cfg(16, 32, 8, 2), cfg(64, 32, 8, 1)),
            256: (cfg(16, 16, 8, 1), cfg(16, 32, 8, 1), cfg(16, 16, 8, 1)),
        },
        # fp16/bf16 on H100: block_m (fwd, dQ) and block_n (dK/dV) >= 64 for HGMMA. Forward 128x64 x
        # 8 warps (two warpgroups of 64 rows), 3 stages; 128x128 spills. dK/dV 64 keys x 8 warps
        # splits the two accumulators over two warpgroups.
        (90, 2): {
            16: (cfg(128, 64, 4, 3), cfg(32, 128, 8, 2), cfg(128, 32, 8, 2)),
            32: (cfg(128, 64, 4, 3), cfg(32, 128, 8, 2), cfg(128, 32, 8, 2)),
            # dK/dV: 32x64 (64x64 sits at 255 registers and spills 8 B since the variant flags).
            64: (cfg(128, 64, 8, 3), cfg(32, 64, 8, 2), cfg(128, 32, 8, 2)),
            # dK/dV: 16x64 x 8 warps at 3 stages is the only spill-free HGMMA tile (~251 registers;
            # 1 stage spills 40 B, 32x64 and 16x128 spill too).
            128: (cfg(128, 64, 8, 3), cfg(16, 64, 8, 3), cfg(64, 32, 8, 2)),
            # dK/dV: spills in every HGMMA tile (two 64x256 fp32 accumulators are half the register
            # file; see KNOWN_SPILLS); 16x64 x 8 warps, 3 stages spills least (~400 B).
            256: (cfg(64, 32, 8, 2), cfg(16, 64, 8, 3), cfg(128, 32, 8, 2)),
        },
        # fp32 on H100: as on A100 (HGMMA is not required for fp32; tf32 dots use it anyway).
        # Forward at D<=32: 8 warps (4 warps spill 8-16 B with ieee dots on sm_90).
        (90, 4): {
            16: (cfg(64, 32, 8, 2), cfg(16, 32, 8, 1), cfg(64, 16, 8, 1)),
            32: (cfg(64, 32, 8, 2), cfg(16, 64, 8, 1), cfg(64, 16, 8, 1)),
            64: (cfg(64, 16, 8, 1), cfg(16, 32, 8, 1), cfg(64, 16, 8, 1)),
            128: (cfg(32, 32, 8, 1), cfg(32, 32, 8, 1), cfg(32, 16, 8, 1)),
            # dQ: 16x32 (32x16 spills 16 B with ieee dots since the variant flags).
            256: (cfg(16, 16, 8, 1), cfg(16, 16, 8, 1), cfg(16, 32, 8, 1)),
        },
    }
    for (cap, size), by_dim in table.items():
        for d, (fwd, dkdv, dq) in by_dim.items():
            _TABLE[(cap, d, size)] = AttentionConfigs(fwd, dkdv, dq)
    assert {key[:2] for key in _TABLE} == {(c, d) for c in CAPABILITIES for d in HEAD_DIM_BUCKETS}


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


def preprocess_block_m(block_dv: int, element_size: int) -> int:
    """Rows per program of the backward pre-pass (delta = rowsum(dO * O)), which has no dot.

    Launched with Triton's default 4 warps. At most 64 rows and 16 KB of each of O and dO per
    program for 16-bit dtypes, 8 KB for fp32 (at 4096 fp32 elements, e.g. 64 x 64, ptxas for sm_90
    spills 8 B)."""
    budget = 16384 if element_size <= 2 else 8192
    return max(8, min(64, budget // (block_dv * element_size)))


KNOWN_SPILLS: dict[tuple[int, int, str], str] = {
    (90, 256, "dkdv"): (
        "fp16/bf16 dK/dV at head dim 256 on H100 spills in every tile that keeps HGMMA (block_n >= "
        "64): the two 64 x 256 fp32 accumulators alone take 128 of the 255 registers per thread at "
        "8 warps (256 at 4); tried 16/32/64 x 64 and 16 x 128, 4 and 8 warps, 1-3 stages. Needs a "
        "kernel change (e.g. split dK and dV, or a D-split of the accumulators)."),
}
"""(capability, head-dim bucket, kernel) -> why, for the fp16/bf16 kernels (fp32 rows must pass) that spill registers in
every tile that keeps warpgroup MMA. The kernel report marks these rows "known spill" instead of
failing them; tests/test_compile.py checks they still compile, fit shared memory, use HGMMA and
really spill (remove an entry once it no longer does)."""
