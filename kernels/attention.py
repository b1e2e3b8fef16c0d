"""Tiled online-softmax attention kernels: forward, backward pre-pass, dK/dV and dQ, and inspection.

Notation (shared by every kernel of this package):
    B        batch (or, for packed variable-length input, the number of sequences)
    HQ, HKV  query heads and key/value heads; GROUP = HQ // HKV query heads share one k/v head
    SEQ_Q    query length (M axis), SEQ_K key length (N axis)
    HEAD_DIM, HEAD_DIM_V   q/k and v head dims; BLOCK_D, BLOCK_DV are their power-of-two padding
    qk_scale_log2          softmax scale * log2(e): scores are kept in base 2 so exp2 is used

Every variant is a constexpr of the same kernels:
    LIMIT_RIGHT / LIMIT_LEFT  a band of keys, aligned bottom-right: query i sees key j when
                 i + SEQ_K - SEQ_Q - window_left <= j <= i + SEQ_K - SEQ_Q + window_right.
                 Causal is LIMIT_RIGHT with window_right = 0.
    HAS_SOFTCAP  scores become softcap * tanh(scores / softcap) (before any bias).
    HAS_ALIBI    adds -slope[b, h] * |i + SEQ_K - SEQ_Q - j| to the scores.
    BIAS_KIND    1: a float bias added to the scores; 2: a bool mask (True attends).
    HAS_DROPOUT  drops probabilities with a Philox counter-based RNG keyed by (seed, batch,
                 query head, row, key), so the backward regenerates the very same mask.
    IS_VARLEN    packed sequences: CU_SEQLENS_Q/K hold each sequence's start, and seq_q/seq_k
                 arrive as the longest lengths (they size the grid).
    USE_TMA      the streamed tiles (K and V in the forward and dQ kernels, Q and dO in dK/dV) are
                 loaded through TMA descriptors built on the device (capability 9.0+); a
                 descriptor's box reads zeros past the sequence and the head dim, as the masked
                 loads do, so both paths give the same numbers.
Per program the key (or query) range is split into tiles that need no mask, which run through
the fast loop, and tiles that cross the band's edges or the ragged end, which run through the
masked loop; tiles outside the band are never visited. Base offsets are 64-bit so tensors with
more than 2**31 elements are addressed correctly, and the grid is one-dimensional so B * HQ is
not capped at 65,535.

The kernels live in modules by role, and this one gathers the launchable ones (the launchers in
fused_attn/_launch.py take them from here):
    tiles       where a kernel's tiles are: program start-up, base pointers, TMA descriptors, loads
    scores      what is computed on a score tile: dots, softcap, ALiBi, bias/mask, band, dropout
    forward     _attn_fwd
    backward    _attn_bwd_preprocess, _attn_bwd_dkdv, _attn_bwd_dq
    inspection  _dropout_mask, _attn_probs, _attn_row_stats, _attn_col_sums
    decode      _attn_decode, _attn_decode_combine: attention over a (paged) KV cache, split-KV
They hold Triton code only.
"""
# The pointer parameters a call may leave out, and the constexpr flag under which a kernel reads
# each one. The launchers pass None for an absent pointer (fused_attn._launch._run_kernel checks
# that pointer and flag agree), and bench.kernel_report compiles it as a constexpr None.
OPTIONAL_POINTERS = {"BIAS": "BIAS_KIND", "DBIAS": "STORE_DBIAS", "ALIBI": "HAS_ALIBI",
                     "CU_SEQLENS_Q": "IS_VARLEN", "CU_SEQLENS_K": "IS_VARLEN", "SINKS": "HAS_SINKS",
                     "DLSE": "HAS_DLSE", "BLOCK_TABLE": "IS_PAGED", "CACHE_BATCH_IDX": "HAS_BATCH_IDX",
                     "CACHE_SEQLENS": "PER_SEQUENCE_LENGTHS",
                     "O_PART": "SPLIT", "LSE_PART": "SPLIT"}

from fused_attn.kernels.backward import _attn_bwd_dkdv, _attn_bwd_dq, _attn_bwd_preprocess
from fused_attn.kernels.decode import _attn_decode, _attn_decode_combine
from fused_attn.kernels.forward import _attn_fwd
from fused_attn.kernels.inspection import _attn_col_sums, _attn_probs, _attn_row_stats, _dropout_mask

__all__ = ["OPTIONAL_POINTERS", "_attn_fwd", "_attn_bwd_preprocess", "_attn_bwd_dkdv", "_attn_bwd_dq",
           "_attn_decode", "_attn_decode_combine",
           "_dropout_mask", "_attn_probs", "_attn_row_stats", "_attn_col_sums"]
