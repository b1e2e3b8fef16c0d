"""The backward kernels (notation in fused_attn.kernels.attention): the pre-pass (delta and
the lse in base 2), dK and dV per key tile summed over its query-head group (no atomics),
and dQ per query tile."""
import triton
import triton.language as tl

from fused_attn.kernels.scores import (
    LOG2E, _cast, _dot, _dropout_keep, _key_range, _probs, _query_range, _score_inputs, _scores,
)
from fused_attn.kernels.tiles import (
    _head_base, _key_value_streams, _load_tile, _query_tile, _rows_descriptor, _sequence,
)


@triton.jit
def _attn_bwd_preprocess(
    O, DO, LSE, DLSE, DELTA, LSE_LOG2,
    stride_ob, stride_oh, stride_om,
    stride_dob, stride_doh, stride_dom,
    num_heads_q, seq_q, head_dim_v,
    BLOCK_M: tl.constexpr, BLOCK_DV: tl.constexpr, HAS_DLSE: tl.constexpr = False,
):
    """delta[b, h, i] = sum_d o[b, h, i, d] * do[b, h, i, d], in float32, and lse_log2 = lse * log2(e)
    with +inf for rows that see no key (lse = -inf), so exp2(score - lse_log2) is 0 there, not NaN,
    without a check in the backward's inner loops. LSE, DLSE, DELTA and LSE_LOG2 are contiguous.

    With HAS_DLSE the lse has a gradient too: d lse_i / d s_ij = p_ij, so it adds p_ij * dlse_i to
    dS = p (dP - delta), which is delta - dlse in place of delta."""
    pid = tl.program_id(0)
    num_m_tiles = tl.cdiv(seq_q, BLOCK_M)
    tile_m = pid % num_m_tiles
    batch_head = pid // num_m_tiles
    batch = batch_head // num_heads_q
    head = batch_head % num_heads_q
    offs_m = tile_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_dv = tl.arange(0, BLOCK_DV)
    mask = (offs_m[:, None] < seq_q) & (offs_dv[None, :] < head_dim_v)
    o = tl.load(_head_base(O, batch, head, stride_ob, stride_oh) + offs_m[:, None].to(tl.int64) * stride_om
                + offs_dv[None, :], mask=mask, other=0.0)
    do = tl.load(_head_base(DO, batch, head, stride_dob, stride_doh) + offs_m[:, None].to(tl.int64) * stride_dom
                 + offs_dv[None, :], mask=mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)
    row_offsets = batch_head.to(tl.int64) * seq_q + offs_m
    row_ok = offs_m < seq_q
    lse = tl.load(LSE + row_offsets, mask=row_ok, other=0.0)
    if HAS_DLSE:  # a row without keys has a constant lse: nothing flows back from it
        dlse = tl.load(DLSE + row_offsets, mask=row_ok, other=0.0)
        delta = delta - tl.where(lse == float("-inf"), 0.0, dlse)
    tl.store(DELTA + row_offsets, delta, mask=row_ok)
    tl.store(LSE_LOG2 + row_offsets, tl.where(lse == float("-inf"), float("inf"), lse * LOG2E), mask=row_ok)


@triton.jit
def _attn_bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, q_desc, do_desc, lse_log2_base, delta_base, stride_qm, stride_dom,
                         bias_base, stride_bias_m, stride_bias_n, dbias_base, alibi_slope_log2,
                         offs_n, offs_d, offs_dv, tile_start, tile_end, seq_q, seq_k,
                         head_dim, head_dim_v, qk_scale_log2, softcap_in, softcap_out_log2,
                         window_left, window_right, dropout_p, dropout_seed, batch, head,
                         BLOCK_M: tl.constexpr, MASKED: tl.constexpr, MASK_LEFT: tl.constexpr,
                         MASK_RIGHT: tl.constexpr, EVEN_D: tl.constexpr, EVEN_DV: tl.constexpr,
                         BIAS_KIND: tl.constexpr, STORE_DBIAS: tl.constexpr, HAS_ALIBI: tl.constexpr,
                         HAS_SOFTCAP: tl.constexpr, HAS_DROPOUT: tl.constexpr,
                         EMULATE_BF16: tl.constexpr, INPUT_PRECISION: tl.constexpr, USE_TMA: tl.constexpr):
    """Accumulate dK and dV of one key tile over query tiles [tile_start, tile_end)."""
    offs_tile_m = tl.arange(0, BLOCK_M)
    q_offsets = offs_tile_m[:, None] * stride_qm + offs_d[None, :]
    do_offsets = offs_tile_m[:, None] * stride_dom + offs_dv[None, :]
    for start_m in range(tile_start, tile_end, BLOCK_M):
        offs_m = start_m + offs_tile_m
        q_ptrs = q_base + tl.cast(start_m, tl.int64) * stride_qm + q_offsets
        do_ptrs = do_base + tl.cast(start_m, tl.int64) * stride_dom + do_offsets
        # Rows past seq_q load as zeros (q, do, delta) and their scores are -inf (CHECK_ROWS), so
        # their p is exactly 0 and they add nothing to dK and dV, whatever k holds. Keys past
        # seq_k need no check: their rows of dK and dV are never stored, and p <= 1 cannot overflow.
        q = _load_tile(q_ptrs, q_desc, start_m, offs_m, offs_d, seq_q, head_dim, MASKED, EVEN_D, USE_TMA)
        do = _load_tile(do_ptrs, do_desc, start_m, offs_m, offs_dv, seq_q, head_dim_v, MASKED, EVEN_DV, USE_TMA)
        if MASKED:
            lse_log2 = tl.load(lse_log2_base + offs_m, mask=offs_m < seq_q, other=0.0)
            delta = tl.load(delta_base + offs_m, mask=offs_m < seq_q, other=0.0)
        else:
            lse_log2 = tl.load(lse_log2_base + offs_m)
            delta = tl.load(delta_base + offs_m)
        s_t = _dot(k, tl.trans(q), tl.zeros([k.shape[0], BLOCK_M], dtype=tl.float32), EMULATE_BF16, INPUT_PRECISION)
        qk_t, tanh_t = _scores(s_t, offs_m[None, :], offs_n[:, None], seq_q, seq_k, qk_scale_log2, softcap_in,
                               softcap_out_log2, alibi_slope_log2, bias_base, stride_bias_m, stride_bias_n,
                               window_left, window_right, False, MASKED, MASK_LEFT, MASK_RIGHT, BIAS_KIND,
                               HAS_ALIBI, HAS_SOFTCAP)
        p_t = _probs(qk_t, lse_log2[None, :])
        if HAS_DROPOUT:  # o used p * keep / (1 - p_drop): so do dV and the gradient reaching p
            keep_t = _dropout_keep(dropout_seed, batch, head, offs_m[None, :], offs_n[:, None], dropout_p)
            keep_scale = 1.0 / (1.0 - dropout_p)
            dv = _dot(_cast(tl.where(keep_t, p_t * keep_scale, 0.0), do.dtype, EMULATE_BF16), do, dv,
                      EMULATE_BF16, INPUT_PRECISION)
        else:
            dv = _dot(_cast(p_t, do.dtype, EMULATE_BF16), do, dv, EMULATE_BF16, INPUT_PRECISION)
        # dP after the dV update: both (BLOCK_N x BLOCK_M) fp32 tiles are never live at once.
        dp_t = _dot(v, tl.trans(do), tl.zeros([k.shape[0], BLOCK_M], dtype=tl.float32), EMULATE_BF16, INPUT_PRECISION)
        if HAS_DROPOUT:
            dp_t = tl.where(keep_t, dp_t * keep_scale, 0.0)
        ds_t = p_t * (dp_t - delta[None, :])
        if STORE_DBIAS:  # d loss / d score; each (row, key) of a head is visited exactly once
            tl.store(dbias_base + offs_m[None, :].to(tl.int64) * seq_k + offs_n[:, None], ds_t,
                     mask=(offs_m[None, :] < seq_q) & (offs_n[:, None] < seq_k))
        if HAS_SOFTCAP:  # through softcap * tanh(s * scale / softcap)
            ds_t = ds_t * (1.0 - tanh_t * tanh_t)
        dk = _dot(_cast(ds_t, q.dtype, EMULATE_BF16), q, dk, EMULATE_BF16, INPUT_PRECISION)
    return dk, dv


@triton.jit
def _attn_bwd_dkdv(
    Q, K, V, DO, LSE_LOG2, DELTA, DK, DV,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_dob, stride_doh, stride_dom,
    stride_dkb, stride_dkh, stride_dkn,
    stride_dvb, stride_dvh, stride_dvn,
    stride_lse_b, stride_lse_h,
    BIAS, stride_bias_b, stride_bias_h, stride_bias_m, stride_bias_n, DBIAS,
    ALIBI, stride_alibi_b, CU_SEQLENS_Q, CU_SEQLENS_K,
    num_heads_q, num_heads_kv, group_size, seq_q, seq_k, head_dim, head_dim_v, qk_scale_log2, scale,
    window_left, window_right, softcap_in, softcap_out_log2, dropout_p, dropout_seed,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    LIMIT_RIGHT: tl.constexpr, EVEN_D: tl.constexpr, EVEN_DV: tl.constexpr, BIAS_KIND: tl.constexpr,
    STORE_DBIAS: tl.constexpr, EMULATE_BF16: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    LIMIT_LEFT: tl.constexpr = False, HAS_ALIBI: tl.constexpr = False, HAS_SOFTCAP: tl.constexpr = False,
    HAS_DROPOUT: tl.constexpr = False, IS_VARLEN: tl.constexpr = False, USE_TMA: tl.constexpr = False,
):
    """One program owns one BLOCK_N tile of keys of one (batch, k/v head) and sums the
    contributions of every query head of its group: no atomics, so results are deterministic."""
    pid = tl.program_id(0)
    num_n_tiles = tl.cdiv(seq_k, BLOCK_N)
    tile_n = pid % num_n_tiles
    batch_head_kv = pid // num_n_tiles
    batch = batch_head_kv // num_heads_kv
    head_kv = batch_head_kv % num_heads_kv
    start_n = tile_n * BLOCK_N
    q_start, seq_q, k_start, seq_k = _sequence(CU_SEQLENS_Q, CU_SEQLENS_K, batch, seq_q, seq_k, IS_VARLEN)
    if IS_VARLEN:
        if start_n >= seq_k:  # the grid is sized for the longest sequence
            return

    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    col_ok = offs_n < seq_k
    k_base = _head_base(K, batch, head_kv, stride_kb, stride_kh, k_start, stride_kn)
    v_base = _head_base(V, batch, head_kv, stride_vb, stride_vh, k_start, stride_vn)
    k = tl.load(k_base + offs_n[:, None].to(tl.int64) * stride_kn + offs_d[None, :],
                mask=col_ok[:, None] & (offs_d[None, :] < head_dim), other=0.0)
    v = tl.load(v_base + offs_n[:, None].to(tl.int64) * stride_vn + offs_dv[None, :],
                mask=col_ok[:, None] & (offs_dv[None, :] < head_dim_v), other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)

    lo, unmasked_lo, unmasked_hi, hi = _query_range(start_n, seq_q, seq_k, window_left, window_right,
                                                    BLOCK_M, BLOCK_N, LIMIT_LEFT, LIMIT_RIGHT)
    for group_member in range(0, group_size):
        head = head_kv * group_size + group_member
        q_base = _head_base(Q, batch, head, stride_qb, stride_qh, q_start, stride_qm)
        do_base = _head_base(DO, batch, head, stride_dob, stride_doh, q_start, stride_dom)
        lse_log2_base = _head_base(LSE_LOG2, batch, head, stride_lse_b, stride_lse_h) + q_start
        delta_base = _head_base(DELTA, batch, head, stride_lse_b, stride_lse_h) + q_start
        q_desc = _rows_descriptor(q_base, seq_q, head_dim, stride_qm, BLOCK_M, BLOCK_D, USE_TMA)
        do_desc = _rows_descriptor(do_base, seq_q, head_dim_v, stride_dom, BLOCK_M, BLOCK_DV, USE_TMA)
        bias_base, alibi_slope_log2 = _score_inputs(BIAS, ALIBI, batch, head, stride_bias_b, stride_bias_h,
                                                    stride_alibi_b, BIAS_KIND, HAS_ALIBI)
        dbias_base = DBIAS  # None unless STORE_DBIAS
        if STORE_DBIAS:
            dbias_base = DBIAS + (batch * num_heads_q + head).to(tl.int64) * seq_q * seq_k
        if LIMIT_RIGHT:  # query tiles crossing the band's right edge (the causal diagonal)
            dk, dv = _attn_bwd_dkdv_inner(
                dk, dv, k, v, q_base, do_base, q_desc, do_desc, lse_log2_base, delta_base, stride_qm, stride_dom,
                bias_base, stride_bias_m, stride_bias_n, dbias_base, alibi_slope_log2,
                offs_n, offs_d, offs_dv, lo, tl.minimum(unmasked_lo, hi), seq_q, seq_k, head_dim, head_dim_v,
                qk_scale_log2, softcap_in, softcap_out_log2, window_left, window_right, dropout_p, dropout_seed,
                batch, head, BLOCK_M, True, LIMIT_LEFT, True, EVEN_D, EVEN_DV, BIAS_KIND, STORE_DBIAS,
                HAS_ALIBI, HAS_SOFTCAP, HAS_DROPOUT, EMULATE_BF16, INPUT_PRECISION, USE_TMA)
        dk, dv = _attn_bwd_dkdv_inner(
            dk, dv, k, v, q_base, do_base, q_desc, do_desc, lse_log2_base, delta_base, stride_qm, stride_dom,
            bias_base, stride_bias_m, stride_bias_n, dbias_base, alibi_slope_log2,
            offs_n, offs_d, offs_dv, unmasked_lo, unmasked_hi, seq_q, seq_k, head_dim, head_dim_v,
            qk_scale_log2, softcap_in, softcap_out_log2, window_left, window_right, dropout_p, dropout_seed,
            batch, head, BLOCK_M, False, False, False, EVEN_D, EVEN_DV, BIAS_KIND, STORE_DBIAS,
            HAS_ALIBI, HAS_SOFTCAP, HAS_DROPOUT, EMULATE_BF16, INPUT_PRECISION, USE_TMA)
        # query tiles crossing the band's left edge, and the ragged end of the queries
        dk, dv = _attn_bwd_dkdv_inner(
            dk, dv, k, v, q_base, do_base, q_desc, do_desc, lse_log2_base, delta_base, stride_qm, stride_dom,
            bias_base, stride_bias_m, stride_bias_n, dbias_base, alibi_slope_log2,
            offs_n, offs_d, offs_dv, tl.maximum(unmasked_lo, unmasked_hi), hi, seq_q, seq_k, head_dim,
            head_dim_v, qk_scale_log2, softcap_in, softcap_out_log2, window_left, window_right, dropout_p,
            dropout_seed, batch, head, BLOCK_M, True, LIMIT_LEFT, False, EVEN_D, EVEN_DV, BIAS_KIND,
            STORE_DBIAS, HAS_ALIBI, HAS_SOFTCAP, HAS_DROPOUT, EMULATE_BF16, INPUT_PRECISION, USE_TMA)

    dk = dk * scale
    store_k = col_ok[:, None] & (offs_d[None, :] < head_dim)
    store_v = col_ok[:, None] & (offs_dv[None, :] < head_dim_v)
    dk_base = _head_base(DK, batch, head_kv, stride_dkb, stride_dkh, k_start, stride_dkn)
    dv_base = _head_base(DV, batch, head_kv, stride_dvb, stride_dvh, k_start, stride_dvn)
    tl.store(dk_base + offs_n[:, None].to(tl.int64) * stride_dkn + offs_d[None, :],
             _cast(dk, DK.dtype.element_ty, EMULATE_BF16), mask=store_k)
    tl.store(dv_base + offs_n[:, None].to(tl.int64) * stride_dvn + offs_dv[None, :],
             _cast(dv, DV.dtype.element_ty, EMULATE_BF16), mask=store_v)


@triton.jit
def _attn_bwd_dq_inner(dq, q, do, lse_log2, delta, k_base, v_base, k_desc, v_desc, stride_kn, stride_vn,
                       bias_base, stride_bias_m, stride_bias_n, alibi_slope_log2,
                       offs_m, offs_n, offs_d, offs_dv, tile_start, tile_end, seq_q, seq_k,
                       head_dim, head_dim_v, qk_scale_log2, softcap_in, softcap_out_log2,
                       window_left, window_right, dropout_p, dropout_seed, batch, head,
                       BLOCK_N: tl.constexpr, MASKED: tl.constexpr, MASK_LEFT: tl.constexpr,
                       MASK_RIGHT: tl.constexpr, EVEN_D: tl.constexpr, EVEN_DV: tl.constexpr,
                       BIAS_KIND: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                       HAS_DROPOUT: tl.constexpr, EMULATE_BF16: tl.constexpr, INPUT_PRECISION: tl.constexpr,
                       USE_TMA: tl.constexpr):
    k_offsets = offs_n[:, None] * stride_kn + offs_d[None, :]
    v_offsets = offs_n[:, None] * stride_vn + offs_dv[None, :]
    for start_n in range(tile_start, tile_end, BLOCK_N):
        cols = start_n + offs_n
        k_ptrs = k_base + tl.cast(start_n, tl.int64) * stride_kn + k_offsets
        v_ptrs = v_base + tl.cast(start_n, tl.int64) * stride_vn + v_offsets
        k = _load_tile(k_ptrs, k_desc, start_n, cols, offs_d, seq_k, head_dim, MASKED, EVEN_D, USE_TMA)
        v = _load_tile(v_ptrs, v_desc, start_n, cols, offs_dv, seq_k, head_dim_v, MASKED, EVEN_DV, USE_TMA)
        s = _dot(q, tl.trans(k), tl.zeros([q.shape[0], BLOCK_N], dtype=tl.float32), EMULATE_BF16, INPUT_PRECISION)
        qk, tanh_s = _scores(s, offs_m[:, None], cols[None, :], seq_q, seq_k, qk_scale_log2, softcap_in,
                             softcap_out_log2, alibi_slope_log2, bias_base, stride_bias_m, stride_bias_n,
                             window_left, window_right, MASKED, False, MASK_LEFT, MASK_RIGHT, BIAS_KIND, HAS_ALIBI,
                             HAS_SOFTCAP)
        p = _probs(qk, lse_log2[:, None], NAN_FROM_DELTA=True)
        dp = _dot(do, tl.trans(v), tl.zeros([q.shape[0], BLOCK_N], dtype=tl.float32), EMULATE_BF16, INPUT_PRECISION)
        if HAS_DROPOUT:
            keep = _dropout_keep(dropout_seed, batch, head, offs_m[:, None], cols[None, :], dropout_p)
            dp = tl.where(keep, dp * (1.0 / (1.0 - dropout_p)), 0.0)
        ds = p * (dp - delta[:, None])
        if HAS_SOFTCAP:
            ds = ds * (1.0 - tanh_s * tanh_s)
        dq = _dot(_cast(ds, k.dtype, EMULATE_BF16), k, dq, EMULATE_BF16, INPUT_PRECISION)
    return dq


@triton.jit
def _attn_bwd_dq(
    Q, K, V, DO, LSE_LOG2, DELTA, DQ,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_dob, stride_doh, stride_dom,
    stride_dqb, stride_dqh, stride_dqm,
    stride_lse_b, stride_lse_h,
    BIAS, stride_bias_b, stride_bias_h, stride_bias_m, stride_bias_n,
    ALIBI, stride_alibi_b, CU_SEQLENS_Q, CU_SEQLENS_K,
    num_heads_q, group_size, seq_q, seq_k, head_dim, head_dim_v, qk_scale_log2, scale,
    window_left, window_right, softcap_in, softcap_out_log2, dropout_p, dropout_seed,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    LIMIT_RIGHT: tl.constexpr, EVEN_D: tl.constexpr, EVEN_DV: tl.constexpr, BIAS_KIND: tl.constexpr,
    EMULATE_BF16: tl.constexpr, INPUT_PRECISION: tl.constexpr, LIMIT_LEFT: tl.constexpr = False,
    HAS_ALIBI: tl.constexpr = False, HAS_SOFTCAP: tl.constexpr = False, HAS_DROPOUT: tl.constexpr = False,
    IS_VARLEN: tl.constexpr = False, USE_TMA: tl.constexpr = False,
):
    """One program computes dQ for one BLOCK_M tile of queries of one (batch, query head)."""
    batch, head, head_kv, start_m, q_start, seq_q, k_start, seq_k = _query_tile(
        CU_SEQLENS_Q, CU_SEQLENS_K, num_heads_q, group_size, seq_q, seq_k, BLOCK_M, IS_VARLEN)
    if IS_VARLEN:
        if start_m >= seq_q:  # the grid is sized for the longest sequence
            return

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    row_ok = offs_m < seq_q
    q_base = _head_base(Q, batch, head, stride_qb, stride_qh, q_start, stride_qm)
    do_base = _head_base(DO, batch, head, stride_dob, stride_doh, q_start, stride_dom)
    lse_log2_base = _head_base(LSE_LOG2, batch, head, stride_lse_b, stride_lse_h) + q_start
    delta_base = _head_base(DELTA, batch, head, stride_lse_b, stride_lse_h) + q_start
    q = tl.load(q_base + offs_m[:, None].to(tl.int64) * stride_qm + offs_d[None, :],
                mask=row_ok[:, None] & (offs_d[None, :] < head_dim), other=0.0)
    do = tl.load(do_base + offs_m[:, None].to(tl.int64) * stride_dom + offs_dv[None, :],
                 mask=row_ok[:, None] & (offs_dv[None, :] < head_dim_v), other=0.0)
    # Rows past seq_q (never stored) get lse +inf, so their p is 0 rather than an overflow.
    lse_log2 = tl.load(lse_log2_base + offs_m, mask=row_ok, other=float("inf"))
    delta = tl.load(delta_base + offs_m, mask=row_ok, other=0.0)
    bias_base, alibi_slope_log2 = _score_inputs(BIAS, ALIBI, batch, head, stride_bias_b, stride_bias_h,
                                                stride_alibi_b, BIAS_KIND, HAS_ALIBI)
    k_base, v_base, k_desc, v_desc = _key_value_streams(
        K, V, batch, head_kv, k_start, seq_k, head_dim, head_dim_v, stride_kb, stride_kh, stride_kn,
        stride_vb, stride_vh, stride_vn, BLOCK_N, BLOCK_D, BLOCK_DV, USE_TMA)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    lo, unmasked_lo, unmasked_hi, hi = _key_range(start_m, seq_q, seq_k, window_left, window_right,
                                                  BLOCK_M, BLOCK_N, LIMIT_LEFT, LIMIT_RIGHT)
    if LIMIT_LEFT:
        dq = _attn_bwd_dq_inner(
            dq, q, do, lse_log2, delta, k_base, v_base, k_desc, v_desc, stride_kn, stride_vn, bias_base, stride_bias_m,
            stride_bias_n, alibi_slope_log2, offs_m, offs_n, offs_d, offs_dv, lo, tl.minimum(unmasked_lo, hi),
            seq_q, seq_k, head_dim, head_dim_v, qk_scale_log2, softcap_in, softcap_out_log2, window_left,
            window_right, dropout_p, dropout_seed, batch, head, BLOCK_N, True, True, LIMIT_RIGHT, EVEN_D,
            EVEN_DV, BIAS_KIND, HAS_ALIBI, HAS_SOFTCAP, HAS_DROPOUT, EMULATE_BF16, INPUT_PRECISION, USE_TMA)
    dq = _attn_bwd_dq_inner(
        dq, q, do, lse_log2, delta, k_base, v_base, k_desc, v_desc, stride_kn, stride_vn, bias_base, stride_bias_m,
        stride_bias_n, alibi_slope_log2, offs_m, offs_n, offs_d, offs_dv, unmasked_lo, unmasked_hi,
        seq_q, seq_k, head_dim, head_dim_v, qk_scale_log2, softcap_in, softcap_out_log2, window_left,
        window_right, dropout_p, dropout_seed, batch, head, BLOCK_N, False, False, False, EVEN_D,
        EVEN_DV, BIAS_KIND, HAS_ALIBI, HAS_SOFTCAP, HAS_DROPOUT, EMULATE_BF16, INPUT_PRECISION, USE_TMA)
    dq = _attn_bwd_dq_inner(
        dq, q, do, lse_log2, delta, k_base, v_base, k_desc, v_desc, stride_kn, stride_vn, bias_base, stride_bias_m,
        stride_bias_n, alibi_slope_log2, offs_m, offs_n, offs_d, offs_dv, tl.maximum(unmasked_lo, unmasked_hi), hi,
        seq_q, seq_k, head_dim, head_dim_v, qk_scale_log2, softcap_in, softcap_out_log2, window_left,
        window_right, dropout_p, dropout_seed, batch, head, BLOCK_N, True, False, LIMIT_RIGHT, EVEN_D,
        EVEN_DV, BIAS_KIND, HAS_ALIBI, HAS_SOFTCAP, HAS_DROPOUT, EMULATE_BF16, INPUT_PRECISION, USE_TMA)

    dq = dq * scale
    dq_base = _head_base(DQ, batch, head, stride_dqb, stride_dqh, q_start, stride_dqm)
    tl.store(dq_base + offs_m[:, None].to(tl.int64) * stride_dqm + offs_d[None, :], _cast(dq, DQ.dtype.element_ty, EMULATE_BF16),
             mask=row_ok[:, None] & (offs_d[None, :] < head_dim))
