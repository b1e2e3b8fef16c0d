"""The launch configs of the attention kernels: which tile each GPU gets.

A config is chosen by table row (a GPU capability, see TARGETS), head-dim bucket (the larger of
the q/k and v head dims rounded up to a power of two, at least 16), element size (2 for fp16/bf16,
4 for fp32) and variant ("plain", "mask": a float or bool attn_mask, "dropout", "all": both).
For each of the three kernels the table holds a short list of vetted tiles, best first: the first
is what runs by default; the rest are the candidates `fused_attn.tune` times on the user's GPU and
the fallbacks a launch that runs out of resources retries with.

The lists are generated (`kernels/config_table.py`) by `python -m bench.kernel_report --pick`,
which compiles candidates for every target on a CPU (no GPU needed) and keeps, largest tile first,
the ones whose hot loop wastes no tensor-core work (executed/useful MMA FLOPs = 1), uses wgmma with
N >= 32 on capability 90, touches no local memory, and fits the target's shared memory, with the
head dim both masked and exact (EVEN_D False and True). Nothing in it was timed on a GPU yet.
Under the Triton interpreter one small config is pinned: autotuning there would run every config.
"""
from __future__ import annotations

from dataclasses import dataclass

from fused_attn.kernels.config_table import PICKED


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


@dataclass(frozen=True)
class Target:
    """A table row: the GPUs it is compiled for and what limits their tiles."""

    capability: int  # major * 10 + minor of the compile target
    shared_memory: int  # largest dynamic shared memory one block may opt into, bytes
    cards: str
    tensor_cores: bool  # False: Triton lowers tl.dot to FMA on this target
    bf16: bool  # the card has bf16 arithmetic


TARGETS: dict[int, Target] = {t.capability: t for t in (
    Target(75, 65_536, "T4, RTX 20xx, Quadro RTX (Turing)", tensor_cores=False, bf16=False),
    Target(80, 166_912, "A100, A30, A800 (and sm_87 Jetson Orin)", tensor_cores=True, bf16=True),
    Target(86, 101_376, "RTX 30xx, A10, A40, RTX A6000; sm_89 RTX 40xx, L4, L40S", tensor_cores=True, bf16=True),
    Target(90, 232_448, "H100, H200, GH200 (Hopper)", tensor_cores=True, bf16=True),
    Target(100, 232_448, "B200, GB200, B300 (datacenter Blackwell)", tensor_cores=True, bf16=True),
    Target(120, 101_376, "RTX 50xx, RTX PRO 6000 Blackwell (consumer Blackwell)", tensor_cores=True, bf16=True),
)}
"""Shared-memory limits: CUDA's per-block opt-in maximum of each compute capability."""

CAPABILITIES = tuple(TARGETS)
TMA_KERNELS: dict[int, frozenset[str]] = {
    90: frozenset({"forward", "backward_dkdv", "backward_dq"}),
    100: frozenset({"forward", "backward_dq"}),
    120: frozenset({"forward"}),
}
TMA_MIN_HEAD_DIM = 64
"""Where the kernels load their streamed tiles through TMA descriptors (capability 9.0 and newer
have the copy engine): the kernels of TMA_KERNELS of a table row, for fp16/bf16 calls without a
float/bool mask or dropout (the "plain" variant key) at head-dim buckets >= TMA_MIN_HEAD_DIM.
Chosen by the compile report (static figures, Triton 3.9; no GPU has timed it). On sm_90 the
plain 16-bit kernels need 10-50 fewer registers and 3-11% fewer hot-loop instructions with TMA,
as do the sm_100 forward and dQ and the sm_120 forward. Elsewhere TMA brings register spills
into the inner loop: the sm_100 and sm_120 dK/dV, the sm_120 dQ, exact fp32 (whose FMA dots
hold their operands in registers), the mask and dropout rows, and a head dim of 32 on sm_100."""


def uses_tma(row: int, kernel: str, head_dim: int, element_size: int, variant: str) -> bool:
    """Whether `kernel` ("forward", "backward_dkdv", "backward_dq") loads through TMA on a card
    of table row `row` for a call of this head dim (the larger of q/k and v), element size and
    variant key (see TMA_KERNELS)."""
    return (element_size == 2 and variant == "plain" and head_dim_bucket(head_dim) >= TMA_MIN_HEAD_DIM
            and kernel in TMA_KERNELS.get(row, frozenset()))
HEAD_DIM_BUCKETS = (16, 32, 64, 128, 256, 512)
SMALL_SHARED_HEAD_DIM = 256
"""The largest head dim on cards whose backward does not fit a head dim of 512 in shared memory even
at 16 x 16 tiles: Turing (64 KB; dK/dV and dQ need 96 KB in fp16) and fp32 on the 99 KB targets
(capability 8.6/8.9 and 12.0; 128 KB needed). See `max_head_dim`."""


def max_head_dim(row: int, element_size: int) -> int:
    """The largest q/k or v head dim the kernels serve on a card of table row `row` in this
    element size: 512, or SMALL_SHARED_HEAD_DIM where no 512-wide tile fits its shared memory."""
    if row == 75 or (element_size >= 4 and TARGETS[row].shared_memory < 131_072):
        return SMALL_SHARED_HEAD_DIM
    return HEAD_DIM_BUCKETS[-1]
ELEMENT_SIZES = (2, 4)
KERNELS = ("forward", "backward_dkdv", "backward_dq")
VARIANTS = ("plain", "mask", "dropout", "all")
"""Variant keys: the tile can change with a user mask (read per tile, plus dS stored for its
gradient) and with dropout (Philox per element); window, ALiBi, softcap and packed input use the
plain tiles (`kernel_report --variants` records what they compile to). Only the fp16/bf16 rows of
targets with tensor cores and head dims of 64 and more have variant rows: fp32 and Turing are
correctness paths, head dims of 16 and 32 leave registers to spare, and head dim 512 runs the
smallest tiles already; their variant calls run the plain row's tiles (a launch that runs out of
resources retries smaller tiles)."""


def has_variant_rows(capability: int, head_dim: int, element_size: int) -> bool:
    """Whether the table keys this row's tiles by variant too (else every variant uses "plain")."""
    return element_size == 2 and TARGETS[capability].tensor_cores and 64 <= head_dim_bucket(head_dim) <= 256


def variant_key(has_mask: bool, has_dropout: bool) -> str:
    """The table's variant key for a call with / without an attn_mask and dropout."""
    if has_mask and has_dropout:
        return "all"
    return "mask" if has_mask else "dropout" if has_dropout else "plain"


def head_dim_bucket(head_dim: int) -> int:
    """Smallest power of two >= head_dim and >= 16 (tl.dot's minimum)."""
    bucket = 16
    while bucket < head_dim:
        bucket *= 2
    return bucket


def table_capability(capability: int, shared_memory: int | None = None) -> int:
    """The table row for a GPU of `capability` (major * 10 + minor) with `shared_memory` bytes
    per block (None: the row's own limit is assumed to fit): the newest row not newer than the
    card whose tiles fit its shared memory. sm_89 gets the sm_86 row, sm_103 the sm_100 row,
    sm_121 the sm_120 row; a card older than every row gets the oldest."""
    fitting = [cap for cap, target in TARGETS.items()
               if cap <= capability and (shared_memory is None or target.shared_memory <= shared_memory)]
    return max(fitting) if fitting else min(TARGETS)


UNVETTED_ROWS: dict[tuple[int, int, int, str], str] = {
    (75, 256, 4, "plain"): ("Turing, fp32, head dim 256: dK/dV needs more than its 64 KB of shared memory at every tile "
                            "(66,560 B at 16x16, one stage), so the backward raises OutOfResources there"),
}
"""Rows the compile report has not vetted yet: their tiles are the pre-issue-12 table's (A100's row
for sm_86, H100's for sm_100 and sm_120), followed by small fallback tiles that the
out-of-resources retry launches where the first does not fit. `--pick` for these rows compiles
the exact-fp32 (FMA) candidates, the slowest compiles (up to a minute each on a CPU); the compile
test checks this list is exact."""
_UNVETTED_FALLBACKS = ((32, 32, 4, 1), (16, 16, 4, 1))


def _kernel_config(entry: tuple[int, int, int, int]) -> KernelConfig:
    return KernelConfig(*entry)


def candidates(capability: int, head_dim: int, element_size: int, variant: str = "plain",
               shared_memory: int | None = None) -> dict[str, tuple[KernelConfig, ...]]:
    """Vetted tiles of each kernel ("forward", "backward_dkdv", "backward_dq"), best first, for a
    GPU of `capability` with `shared_memory` bytes per block and a head dim (the larger of q/k
    and v) of `head_dim`."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    row, size = table_capability(capability, shared_memory), 4 if element_size >= 4 else 2
    key = (row, head_dim_bucket(head_dim), size, variant if has_variant_rows(row, head_dim, size) else "plain")
    if key in UNVETTED_ROWS:
        return {kernel: tuple(_kernel_config(e) for e in (*entries, *(f for f in _UNVETTED_FALLBACKS if f not in entries)))
                for kernel, entries in zip(KERNELS, PICKED[key])}
    return {kernel: tuple(_kernel_config(e) for e in entries) for kernel, entries in zip(KERNELS, PICKED[key])}


def lookup(capability: int, head_dim: int, element_size: int, variant: str = "plain",
           shared_memory: int | None = None) -> AttentionConfigs:
    """The table's choice (the first candidate of each kernel)."""
    by_kernel = candidates(capability, head_dim, element_size, variant, shared_memory)
    return AttentionConfigs(*(by_kernel[kernel][0] for kernel in KERNELS))


def all_configs() -> dict[tuple[int, int, int, str], AttentionConfigs]:
    """Every shipped (capability, head-dim bucket, element size, variant) -> the table's choice."""
    return {key: AttentionConfigs(*(_kernel_config(entries[0]) for entries in value))
            for key, value in PICKED.items()}


def all_candidates() -> dict[tuple[int, int, int, str], dict[str, tuple[KernelConfig, ...]]]:
    """Every shipped row -> each kernel's vetted tiles, best first."""
    return {key: {kernel: tuple(_kernel_config(e) for e in entries) for kernel, entries in zip(KERNELS, value)}
            for key, value in PICKED.items()}


_FP32_TF32 = ("fp32 with tf32 dots: the tiles that keep exact-fp32 (FMA) dots free of local memory in the hot loop are "
              "too small for tf32's MMA, whose warps then replicate work; fp32 is the correctness path")
_DKDV_256 = ("dK/dV at head dims 129-256: the two float32 BN x 256 accumulators (with the mask tile and dS, or the "
             "dropout state) leave no registers, so every large or warpgroup-MMA tile spills inside the hot loop; the "
             "listed small tile has no local memory but replicated or pre-Hopper MMA work. Needs the accumulators "
             "split along the head dim")
_MASK_256 = ("a float mask at head dim 256 on H100: every HGMMA tile spills inside the hot loop or needs more than "
             "227 KB of shared memory; the listed 32x32 tile runs HMMA without local memory")
_MASK_DKDV = ("dK/dV with a mask (and dropout): the mask tile and the stored dS take the registers the 64-row MMA "
              "tiles need, so each spills inside the hot loop; the listed tile runs without local memory but with a "
              "narrow wgmma, HMMA, or replicated MMA work")
_HEAD_DIM_512 = ("head dim 512: Q (or K and V) and the float32 accumulators fill the registers even at 16- and 32-row "
                 "tiles, so the hot loop spills, replicates MMA work or (on H100) runs the pre-Hopper MMA; the tile listed "
                 "fails least. Correct but not fast until Q stays in shared memory or the accumulators are split along "
                 "the head dim")
_TURING = ("Turing (no tensor cores: Triton lowers tl.dot to FMA, whose operand tiles sit whole in registers): at "
           "this head dim the backward spills inside the hot loop even at 16x16; T4 is the slow, correct path (warned "
           "at run time)")
ACCEPTED_FAILURES: dict[tuple[int, int, int, str, str], str] = {
    (75, 128, 2, 'plain', 'backward_dkdv'): _TURING,
    (75, 128, 2, 'plain', 'backward_dq'): _TURING,
    (75, 256, 2, 'plain', 'backward_dkdv'): _TURING,
    (75, 256, 2, 'plain', 'backward_dq'): _TURING,
    (80, 128, 2, 'all', 'backward_dkdv'): _MASK_DKDV,
    (80, 128, 4, 'plain', 'backward_dkdv'): _FP32_TF32,
    (80, 256, 2, 'all', 'backward_dkdv'): _DKDV_256,
    (80, 256, 2, 'dropout', 'backward_dkdv'): _DKDV_256,
    (80, 256, 2, 'mask', 'backward_dkdv'): _DKDV_256,
    (80, 256, 4, 'plain', 'backward_dkdv'): _FP32_TF32,
    (80, 256, 4, 'plain', 'backward_dq'): _FP32_TF32,
    (80, 256, 4, 'plain', 'forward'): _FP32_TF32,
    (86, 64, 4, 'plain', 'backward_dkdv'): _FP32_TF32,
    (86, 128, 4, 'plain', 'backward_dkdv'): _FP32_TF32,
    (86, 256, 2, 'all', 'backward_dkdv'): _DKDV_256,
    (86, 256, 2, 'mask', 'backward_dkdv'): _DKDV_256,
    (86, 256, 4, 'plain', 'forward'): _FP32_TF32,
    (86, 256, 4, 'plain', 'backward_dkdv'): _FP32_TF32,
    (86, 256, 4, 'plain', 'backward_dq'): _FP32_TF32,
    (90, 64, 2, 'all', 'backward_dkdv'): _MASK_DKDV,
    (90, 64, 4, 'plain', 'backward_dkdv'): _FP32_TF32,
    (90, 128, 2, 'all', 'backward_dkdv'): _MASK_DKDV,
    (90, 128, 2, 'mask', 'backward_dkdv'): _MASK_DKDV,
    (90, 128, 4, 'plain', 'backward_dkdv'): _FP32_TF32,
    (90, 128, 4, 'plain', 'backward_dq'): _FP32_TF32,
    (90, 256, 2, 'all', 'backward_dkdv'): _DKDV_256,
    (90, 256, 2, 'all', 'backward_dq'): _MASK_256,
    (90, 256, 2, 'all', 'forward'): _MASK_256,
    (90, 256, 2, 'dropout', 'backward_dkdv'): _DKDV_256,
    (90, 256, 2, 'mask', 'backward_dkdv'): _DKDV_256,
    (90, 256, 2, 'mask', 'backward_dq'): _MASK_256,
    (90, 256, 2, 'mask', 'forward'): _MASK_256,
    (90, 256, 2, 'plain', 'backward_dkdv'): _DKDV_256,
    (90, 256, 4, 'plain', 'backward_dkdv'): _FP32_TF32,
    (90, 256, 4, 'plain', 'backward_dq'): _FP32_TF32,
    (90, 256, 4, 'plain', 'forward'): _FP32_TF32,
    (100, 256, 2, 'all', 'backward_dkdv'): _DKDV_256,
    (100, 256, 2, 'dropout', 'backward_dkdv'): _DKDV_256,
    (100, 256, 2, 'mask', 'backward_dkdv'): _DKDV_256,
    (120, 256, 2, 'all', 'backward_dkdv'): _DKDV_256,
    (100, 64, 4, 'plain', 'backward_dkdv'): _FP32_TF32,
    (100, 128, 4, 'plain', 'backward_dq'): _FP32_TF32,
    (100, 128, 4, 'plain', 'backward_dkdv'): _FP32_TF32,
    (100, 256, 4, 'plain', 'backward_dq'): _FP32_TF32,
    (100, 256, 4, 'plain', 'forward'): _FP32_TF32,
    (100, 256, 4, 'plain', 'backward_dkdv'): _FP32_TF32,
    (120, 64, 4, 'plain', 'backward_dkdv'): _FP32_TF32,
    (120, 128, 4, 'plain', 'backward_dq'): _FP32_TF32,
    (120, 128, 4, 'plain', 'backward_dkdv'): _FP32_TF32,
    (120, 256, 4, 'plain', 'backward_dq'): _FP32_TF32,
    (120, 256, 4, 'plain', 'forward'): _FP32_TF32,
    (120, 256, 4, 'plain', 'backward_dkdv'): _FP32_TF32,
    (120, 256, 2, 'dropout', 'backward_dkdv'): _DKDV_256,
    (120, 256, 2, 'mask', 'backward_dkdv'): _DKDV_256,
    **{(cap, 512, size, 'plain', kernel): _HEAD_DIM_512 for cap, size, kernel in (
        (80, 2, 'backward_dkdv'), (80, 4, 'forward'), (80, 4, 'backward_dkdv'), (80, 4, 'backward_dq'),
        (86, 2, 'backward_dkdv'), (90, 2, 'forward'), (90, 2, 'backward_dkdv'), (90, 2, 'backward_dq'),
        (90, 4, 'forward'), (90, 4, 'backward_dkdv'), (90, 4, 'backward_dq'), (100, 2, 'backward_dkdv'),
        (100, 4, 'forward'), (100, 4, 'backward_dkdv'), (100, 4, 'backward_dq'), (120, 2, 'backward_dkdv'),
        (120, 2, 'backward_dq'))},
}
"""(capability row, head-dim bucket, element size, variant, kernel) -> why no candidate tile passes
the speed checks there; the table then holds the tile whose failures cost least, and the
compile report marks its rows "accepted" instead of failing them. A tile that does not compile or
does not fit shared memory is never accepted, and an entry whose rows pass is stale (a test fails)."""

# Under the interpreter large tiles mean fewer NumPy calls; 32 keeps several tiles in small tests.
INTERPRETER_CONFIGS = AttentionConfigs(
    forward=KernelConfig(32, 32, 4, 1),
    backward_dkdv=KernelConfig(32, 32, 4, 1),
    backward_dq=KernelConfig(32, 32, 4, 1),
)


def preprocess_block_m(block_dv: int, element_size: int) -> int:
    """Rows per program of the backward pre-pass (delta = rowsum(dO * O)), which has no dot.

    Launched with Triton's default 4 warps. At most 64 rows and 16 KB of each of O and dO per
    program for 16-bit dtypes, 8 KB for fp32 (at 4096 fp32 elements, e.g. 64 x 64, ptxas for sm_90
    spills 8 B)."""
    budget = 16384 if element_size <= 2 else 8192
    return max(8, min(64, budget // (block_dv * element_size)))


def decode_config(query_rows: int, block_d: int, interpreted: bool = False) -> KernelConfig:
    """Tile of the KV-cache kernel (`_attn_decode`) for `query_rows` packed query rows per (sequence,
    k/v head) (GQA group size x query length) and the wider head-dim block. Not yet timed on a GPU:
    the M tile is the packed rows rounded up to tl.dot's minimum of 16 (at most 64, more rows take
    more programs), and the key tile keeps q, one K and one V tile and the float32 accumulator
    about as large as the forward's 128 x 64 tiles at head dim 128."""
    block_m = min(64, max(16, 1 << (max(query_rows, 1) - 1).bit_length()))
    if interpreted:
        return KernelConfig(block_m, 32, 4, 1)
    block_n = 64 if block_d <= 128 else 32 if block_d <= 256 else 16
    return KernelConfig(block_m, block_n, 4, 2)
