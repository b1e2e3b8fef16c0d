"""The forward kernel: one query tile's output and row lse, by online softmax over the key
tiles of its band (notation in fused_attn.kernels.attention)."""
import triton
import triton.language as tl

from fused_attn.kernels.scores import (
    LN2, LOG2E, _cast, _dot, _dropout_keep, _finish_rows, _key_range, _merge_sink, _score_inputs, _scores,
)
from fused_attn.kernels.tiles import _head_base, _key_value_streams, _load_tile, _query_tile


@triton.jit
def _attn_fwd_inner(acc, l_i, m_i, q, k_base, v_base, k_desc, v_desc, stride_kn, stride_vn,
                    bias_base, stride_bias_m, stride_bias_n, alibi_slope_log2,
                    offs_m, offs_n, offs_d, offs_dv, tile_start, tile_end,
                    seq_q, seq_k, head_dim, head_dim_v, qk_scale_log2, softcap_in, softcap_out_log2,
                    window_left, window_right, dropout_p, dropout_seed, batch, head,
                    BLOCK_N: tl.constexpr, MASKED: tl.constexpr, MASK_LEFT: tl.constexpr,
                    MASK_RIGHT: tl.constexpr, EVEN_D: tl.constexpr, EVEN_DV: tl.constexpr,
                    BIAS_KIND: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                    HAS_DROPOUT: tl.constexpr, EMULATE_BF16: tl.constexpr, INPUT_PRECISION: tl.constexpr,
                    SCALE_POSITIVE: tl.constexpr, USE_TMA: tl.constexpr):
    k_offsets = offs_n[:, None] * stride_kn + offs_d[None, :]
    v_offsets = offs_n[:, None] * stride_vn + offs_dv[None, :]
    for start_n in range(tile_start, tile_end, BLOCK_N):
        cols = start_n + offs_n
        k_ptrs = k_base + tl.cast(start_n, tl.int64) * stride_kn + k_offsets
        v_ptrs = v_base + tl.cast(start_n, tl.int64) * stride_vn + v_offsets
        k = _load_tile(k_ptrs, k_desc, start_n, cols, offs_d, seq_k, head_dim, MASKED, EVEN_D, USE_TMA)
        s = _dot(q, tl.trans(k), tl.zeros([q.shape[0], BLOCK_N], dtype=tl.float32), EMULATE_BF16, INPUT_PRECISION)
        # tl.max skips NaN (on the GPU and in the interpreter), so m is never NaN; a NaN score still
        # makes p, l and acc NaN below. A row whose keys so far are all -inf keeps m = -inf:
        # subtract 0 so exp2 gives 0, not NaN.
        if (not MASKED) and (not HAS_SOFTCAP) and (not HAS_ALIBI) and (BIAS_KIND == 0) and SCALE_POSITIVE:
            # Plain scores in the hot loop: for a scale c > 0 the row max of s * c is max(s) * c (the
            # same float, rounding is monotonic), so exp2(s * c - m) is one FMA per score instead of
            # a multiply and a subtract.
            m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale_log2)
            # A finite s whose s * c overflows makes m = +inf; fma(s, c, -inf) would then give p = 0
            # (no key) where the general path's inf - inf gives NaN: make the row NaN as there.
            m_base = tl.where(m_new == float("-inf"), 0.0, tl.where(m_new == float("inf"), float("nan"), m_new))
            p = tl.math.exp2(s * qk_scale_log2 - m_base[:, None])
        else:
            qk, _ = _scores(s, offs_m[:, None], cols[None, :], seq_q, seq_k, qk_scale_log2, softcap_in,
                            softcap_out_log2, alibi_slope_log2, bias_base, stride_bias_m, stride_bias_n,
                            window_left, window_right, MASKED, False, MASK_LEFT, MASK_RIGHT, BIAS_KIND, HAS_ALIBI,
                            HAS_SOFTCAP)
            m_new = tl.maximum(m_i, tl.max(qk, 1))
            m_base = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.math.exp2(qk - m_base[:, None])
        alpha = tl.math.exp2(m_i - m_base)
        l_i = l_i * alpha + tl.sum(p, 1)  # the softmax denominator counts dropped entries too
        acc = acc * alpha[:, None]
        v = _load_tile(v_ptrs, v_desc, start_n, cols, offs_dv, seq_k, head_dim_v, MASKED, EVEN_DV, USE_TMA)
        if HAS_DROPOUT:
            p = tl.where(_dropout_keep(dropout_seed, batch, head, offs_m[:, None], cols[None, :], dropout_p), p, 0.0)
        acc = _dot(_cast(p, v.dtype, EMULATE_BF16), v, acc, EMULATE_BF16, INPUT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _attn_fwd(
    Q, K, V, O, LSE, SINKS,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_om,
    stride_lse_b, stride_lse_h,
    BIAS, stride_bias_b, stride_bias_h, stride_bias_m, stride_bias_n,
    ALIBI, stride_alibi_b, CU_SEQLENS_Q, CU_SEQLENS_K,
    num_heads_q, group_size, seq_q, seq_k, head_dim, head_dim_v, qk_scale_log2,
    window_left, window_right, softcap_in, softcap_out_log2, dropout_p, dropout_seed,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    LIMIT_RIGHT: tl.constexpr, EVEN_D: tl.constexpr, EVEN_DV: tl.constexpr, BIAS_KIND: tl.constexpr,
    EMULATE_BF16: tl.constexpr, INPUT_PRECISION: tl.constexpr, LIMIT_LEFT: tl.constexpr = False,
    HAS_ALIBI: tl.constexpr = False, HAS_SOFTCAP: tl.constexpr = False, HAS_DROPOUT: tl.constexpr = False,
    IS_VARLEN: tl.constexpr = False, SCALE_POSITIVE: tl.constexpr = True, USE_TMA: tl.constexpr = False,
    HAS_SINKS: tl.constexpr = False,
):
    """One program computes one BLOCK_M tile of queries of one (batch, query head). With HAS_SINKS,
    SINKS holds one float32 logit per query head that joins every row's softmax denominator and
    attends to nothing (a learnable attention sink)."""
    batch, head, head_kv, start_m, q_start, seq_q, k_start, seq_k = _query_tile(
        CU_SEQLENS_Q, CU_SEQLENS_K, num_heads_q, group_size, seq_q, seq_k, BLOCK_M, IS_VARLEN)
    if IS_VARLEN:
        if start_m >= seq_q:  # the grid is sized for the longest sequence
            return
    # At the tile's first row, so that its rows are 32-bit offsets.
    q_base = _head_base(Q, batch, head, stride_qb, stride_qh, q_start + start_m, stride_qm)
    o_base = _head_base(O, batch, head, stride_ob, stride_oh, q_start + start_m, stride_om)
    lse_base = _head_base(LSE, batch, head, stride_lse_b, stride_lse_h) + q_start
    bias_base, alibi_slope_log2 = _score_inputs(BIAS, ALIBI, batch, head, stride_bias_b, stride_bias_h,
                                                stride_alibi_b, BIAS_KIND, HAS_ALIBI)
    k_base, v_base, k_desc, v_desc = _key_value_streams(
        K, V, batch, head_kv, k_start, seq_k, head_dim, head_dim_v, stride_kb, stride_kh, stride_kn,
        stride_vb, stride_vh, stride_vn, BLOCK_N, BLOCK_D, BLOCK_DV, USE_TMA)

    offs_tile_m = tl.arange(0, BLOCK_M)
    offs_m = start_m + offs_tile_m
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    row_ok = offs_m < seq_q

    q = tl.load(q_base + offs_tile_m[:, None] * stride_qm + offs_d[None, :],
                mask=row_ok[:, None] & (offs_d[None, :] < head_dim), other=0.0)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)

    lo, unmasked_lo, unmasked_hi, hi = _key_range(start_m, seq_q, seq_k, window_left, window_right,
                                                  BLOCK_M, BLOCK_N, LIMIT_LEFT, LIMIT_RIGHT)
    if LIMIT_LEFT:  # tiles crossing the band's left edge
        acc, l_i, m_i = _attn_fwd_inner(
            acc, l_i, m_i, q, k_base, v_base, k_desc, v_desc, stride_kn, stride_vn, bias_base, stride_bias_m, stride_bias_n,
            alibi_slope_log2, offs_m, offs_n, offs_d, offs_dv, lo, tl.minimum(unmasked_lo, hi), seq_q, seq_k,
            head_dim, head_dim_v, qk_scale_log2, softcap_in, softcap_out_log2, window_left, window_right,
            dropout_p, dropout_seed, batch, head, BLOCK_N, True, True, LIMIT_RIGHT, EVEN_D, EVEN_DV,
            BIAS_KIND, HAS_ALIBI, HAS_SOFTCAP, HAS_DROPOUT, EMULATE_BF16, INPUT_PRECISION, SCALE_POSITIVE, USE_TMA)
    acc, l_i, m_i = _attn_fwd_inner(
        acc, l_i, m_i, q, k_base, v_base, k_desc, v_desc, stride_kn, stride_vn, bias_base, stride_bias_m, stride_bias_n,
        alibi_slope_log2, offs_m, offs_n, offs_d, offs_dv, unmasked_lo, unmasked_hi, seq_q, seq_k,
        head_dim, head_dim_v, qk_scale_log2, softcap_in, softcap_out_log2, window_left, window_right,
        dropout_p, dropout_seed, batch, head, BLOCK_N, False, False, False, EVEN_D, EVEN_DV,
        BIAS_KIND, HAS_ALIBI, HAS_SOFTCAP, HAS_DROPOUT, EMULATE_BF16, INPUT_PRECISION, SCALE_POSITIVE, USE_TMA)
    # tiles crossing the right edge (the causal diagonal) and the ragged end of the keys
    acc, l_i, m_i = _attn_fwd_inner(
        acc, l_i, m_i, q, k_base, v_base, k_desc, v_desc, stride_kn, stride_vn, bias_base, stride_bias_m, stride_bias_n,
        alibi_slope_log2, offs_m, offs_n, offs_d, offs_dv, tl.maximum(unmasked_lo, unmasked_hi), hi, seq_q, seq_k,
        head_dim, head_dim_v, qk_scale_log2, softcap_in, softcap_out_log2, window_left, window_right,
        dropout_p, dropout_seed, batch, head, BLOCK_N, True, False, LIMIT_RIGHT, EVEN_D, EVEN_DV,
        BIAS_KIND, HAS_ALIBI, HAS_SOFTCAP, HAS_DROPOUT, EMULATE_BF16, INPUT_PRECISION, SCALE_POSITIVE, USE_TMA)

    if HAS_SINKS:  # the sink as one more key with score `sink` and a zero value, merged last
        acc, l_i, m_i = _merge_sink(acc, l_i, m_i, tl.load(SINKS + head) * LOG2E)
    out, lse_log2 = _finish_rows(acc, l_i, m_i)
    if HAS_DROPOUT:
        out = out / (1.0 - dropout_p)
    lse = lse_log2 * LN2

    tl.store(o_base + offs_tile_m[:, None] * stride_om + offs_dv[None, :], _cast(out, O.dtype.element_ty, EMULATE_BF16),
             mask=row_ok[:, None] & (offs_dv[None, :] < head_dim_v))
    tl.store(lse_base + offs_m, lse, mask=row_ok)
