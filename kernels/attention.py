"""Tiled online-softmax attention: forward, backward pre-pass, dK/dV and dQ kernels.

Notation (shared by every kernel in this file):
    B        batch
    HQ, HKV  query heads and key/value heads; GROUP = HQ // HKV query heads share one k/v head
    SEQ_Q    query length (M axis), SEQ_K key length (N axis)
    HEAD_DIM, HEAD_DIM_V   q/k and v head dims; BLOCK_D, BLOCK_DV are their power-of-two padding
    qk_scale_log2          softmax scale * log2(e): scores are kept in base 2 so exp2 is used

Causal masking is aligned bottom-right: query row i sees key j when j <= i + SEQ_K - SEQ_Q.
Per program the key (or query) range is split into tiles that need no mask, which run through
the fast loop, and tiles on the causal diagonal or the ragged end, which run through the masked
loop. Base offsets are 64-bit so tensors with more than 2**31 elements are addressed correctly,
and the grid is one-dimensional so B * HQ is not capped at 65,535.

This module holds Triton code only; launchers live in fused_attn/_launch.py.
"""
import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def _dot(a, b, acc, EMULATE_BF16: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    # The interpreter multiplies raw bf16 bit patterns; EMULATE_BF16 is set only there.
    if EMULATE_BF16:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=INPUT_PRECISION)


@triton.jit
def _cast(x, dtype: tl.constexpr, EMULATE_BF16: tl.constexpr):
    """x (float32) -> dtype, rounding to nearest even as the GPU does. The interpreter truncates
    float32 -> bfloat16, so there the rounding is done on the bits first."""
    if EMULATE_BF16:
        if dtype == tl.bfloat16:
            bits = x.to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
            x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)


@triton.jit
def _apply_bias(scores, bias_base, stride_bias_m, stride_bias_n, rows, cols, seq_q, seq_k, BIAS_KIND: tl.constexpr):
    """scores (base 2) of the tile rows x cols with the user's mask applied: BIAS_KIND 1 adds a
    float bias (natural units, so times log2(e)), 2 keeps entries where a bool mask is True."""
    ptrs = bias_base + rows.to(tl.int64) * stride_bias_m + cols.to(tl.int64) * stride_bias_n
    inside = (rows < seq_q) & (cols < seq_k)
    if BIAS_KIND == 1:
        scores = scores + tl.load(ptrs, mask=inside, other=0.0).to(tl.float32) * LOG2E
    elif BIAS_KIND == 2:
        scores = tl.where(tl.load(ptrs, mask=inside, other=0) != 0, scores, float("-inf"))
    return scores


@triton.jit
def _causal_key_bounds(start_m, seq_q, seq_k, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                       CAUSAL: tl.constexpr):
    """Key range of one query tile: [0, unmasked_end) needs no mask, [unmasked_end, end) does."""
    if CAUSAL:
        diagonal = seq_k - seq_q
        end = tl.minimum(seq_k, tl.maximum(start_m + BLOCK_M + diagonal, 0))
        # Keys below the first row's limit are visible to every row of the tile.
        unmasked_end = tl.maximum(start_m + 1 + diagonal, 0) // BLOCK_N * BLOCK_N
    else:
        end = seq_k
        unmasked_end = seq_k
    unmasked_end = tl.minimum(unmasked_end, seq_k // BLOCK_N * BLOCK_N)
    return unmasked_end, end


@triton.jit
def _attn_fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn,
                    bias_base, stride_bias_m, stride_bias_n,
                    offs_m, offs_n, offs_d, offs_dv, tile_start, tile_end,
                    seq_q, seq_k, head_dim, head_dim_v, qk_scale_log2,
                    BLOCK_N: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr,
                    EVEN_D: tl.constexpr, EVEN_DV: tl.constexpr, BIAS_KIND: tl.constexpr,
                    EMULATE_BF16: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    k_offsets = offs_n[:, None] * stride_kn + offs_d[None, :]
    v_offsets = offs_n[:, None] * stride_vn + offs_dv[None, :]
    for start_n in range(tile_start, tile_end, BLOCK_N):
        cols = start_n + offs_n
        k_ptrs = k_base + tl.cast(start_n, tl.int64) * stride_kn + k_offsets
        v_ptrs = v_base + tl.cast(start_n, tl.int64) * stride_vn + v_offsets
        if MASKED:
            k = tl.load(k_ptrs, mask=(cols[:, None] < seq_k) & (offs_d[None, :] < head_dim), other=0.0)
        elif EVEN_D:
            k = tl.load(k_ptrs)
        else:
            k = tl.load(k_ptrs, mask=offs_d[None, :] < head_dim, other=0.0)
        qk = _dot(q, tl.trans(k), tl.zeros([q.shape[0], BLOCK_N], dtype=tl.float32),
                  EMULATE_BF16, INPUT_PRECISION) * qk_scale_log2
        if BIAS_KIND != 0:
            qk = _apply_bias(qk, bias_base, stride_bias_m, stride_bias_n, offs_m[:, None], cols[None, :],
                             seq_q, seq_k, BIAS_KIND)
        if MASKED or BIAS_KIND != 0:
            if MASKED:
                visible = cols[None, :] < seq_k
                if CAUSAL:
                    visible = visible & (cols[None, :] <= offs_m[:, None] + (seq_k - seq_q))
                qk = tl.where(visible, qk, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(qk, 1))
            # A row that has seen no key yet keeps m = -inf; subtract 0 so exp2 gives 0, not NaN.
            m_base = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:
            m_new = tl.maximum(m_i, tl.max(qk, 1))
            m_base = m_new
        p = tl.math.exp2(qk - m_base[:, None])
        alpha = tl.math.exp2(m_i - m_base)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        if MASKED:
            # Rows past seq_k load as 0: 0 * garbage could be NaN otherwise.
            v = tl.load(v_ptrs, mask=(cols[:, None] < seq_k) & (offs_dv[None, :] < head_dim_v), other=0.0)
        elif EVEN_DV:
            v = tl.load(v_ptrs)
        else:
            v = tl.load(v_ptrs, mask=offs_dv[None, :] < head_dim_v, other=0.0)
        acc = _dot(_cast(p, v.dtype, EMULATE_BF16), v, acc, EMULATE_BF16, INPUT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _attn_fwd(
    Q, K, V, O, LSE,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_om,
    BIAS, stride_bias_b, stride_bias_h, stride_bias_m, stride_bias_n,
    num_heads_q, group_size, seq_q, seq_k, head_dim, head_dim_v, qk_scale_log2,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    CAUSAL: tl.constexpr, EVEN_D: tl.constexpr, EVEN_DV: tl.constexpr, BIAS_KIND: tl.constexpr,
    EMULATE_BF16: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    """One program computes one BLOCK_M tile of queries of one (batch, query head)."""
    pid = tl.program_id(0)
    num_m_tiles = tl.cdiv(seq_q, BLOCK_M)
    # Later query tiles do the most causal work: launch them first.
    tile_m = num_m_tiles - 1 - pid % num_m_tiles
    batch_head = pid // num_m_tiles
    batch = batch_head // num_heads_q
    head = batch_head % num_heads_q
    head_kv = head // group_size
    start_m = tile_m * BLOCK_M

    q_base = Q + batch.to(tl.int64) * stride_qb + head.to(tl.int64) * stride_qh + start_m.to(tl.int64) * stride_qm
    k_base = K + batch.to(tl.int64) * stride_kb + head_kv.to(tl.int64) * stride_kh
    v_base = V + batch.to(tl.int64) * stride_vb + head_kv.to(tl.int64) * stride_vh
    o_base = O + batch.to(tl.int64) * stride_ob + head.to(tl.int64) * stride_oh + start_m.to(tl.int64) * stride_om
    bias_base = BIAS + batch.to(tl.int64) * stride_bias_b + head.to(tl.int64) * stride_bias_h

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

    unmasked_end, end = _causal_key_bounds(start_m, seq_q, seq_k, BLOCK_M, BLOCK_N, CAUSAL)
    acc, l_i, m_i = _attn_fwd_inner(
        acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn, bias_base, stride_bias_m, stride_bias_n,
        offs_m, offs_n, offs_d, offs_dv, 0, unmasked_end, seq_q, seq_k, head_dim, head_dim_v, qk_scale_log2,
        BLOCK_N, False, CAUSAL, EVEN_D, EVEN_DV, BIAS_KIND, EMULATE_BF16, INPUT_PRECISION)
    acc, l_i, m_i = _attn_fwd_inner(
        acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn, bias_base, stride_bias_m, stride_bias_n,
        offs_m, offs_n, offs_d, offs_dv, unmasked_end, end, seq_q, seq_k, head_dim, head_dim_v, qk_scale_log2,
        BLOCK_N, True, CAUSAL, EVEN_D, EVEN_DV, BIAS_KIND, EMULATE_BF16, INPUT_PRECISION)

    # A row with no visible key has l = 0: its output is 0 and its lse is -inf, never NaN.
    has_key = l_i > 0.0
    l_safe = tl.where(has_key, l_i, 1.0)
    out = acc / l_safe[:, None]
    lse = tl.where(has_key, (m_i + tl.math.log2(l_safe)) * LN2, float("-inf"))

    tl.store(o_base + offs_tile_m[:, None] * stride_om + offs_dv[None, :], _cast(out, O.dtype.element_ty, EMULATE_BF16),
             mask=row_ok[:, None] & (offs_dv[None, :] < head_dim_v))
    tl.store(LSE + batch_head.to(tl.int64) * seq_q + offs_m, lse, mask=row_ok)


@triton.jit
def _attn_bwd_preprocess(
    O, DO, DELTA,
    stride_ob, stride_oh, stride_om,
    stride_dob, stride_doh, stride_dom,
    num_heads_q, seq_q, head_dim_v,
    BLOCK_M: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """delta[b, h, i] = sum_d o[b, h, i, d] * do[b, h, i, d], in float32."""
    pid = tl.program_id(0)
    num_m_tiles = tl.cdiv(seq_q, BLOCK_M)
    tile_m = pid % num_m_tiles
    batch_head = pid // num_m_tiles
    batch = batch_head // num_heads_q
    head = batch_head % num_heads_q
    offs_m = tile_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_dv = tl.arange(0, BLOCK_DV)
    mask = (offs_m[:, None] < seq_q) & (offs_dv[None, :] < head_dim_v)
    o = tl.load(O + batch.to(tl.int64) * stride_ob + head.to(tl.int64) * stride_oh
                + offs_m[:, None].to(tl.int64) * stride_om + offs_dv[None, :], mask=mask, other=0.0)
    do = tl.load(DO + batch.to(tl.int64) * stride_dob + head.to(tl.int64) * stride_doh
                 + offs_m[:, None].to(tl.int64) * stride_dom + offs_dv[None, :], mask=mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)
    tl.store(DELTA + batch_head.to(tl.int64) * seq_q + offs_m, delta, mask=offs_m < seq_q)


@triton.jit
def _attn_bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qm, stride_dom,
                         bias_base, stride_bias_m, stride_bias_n, dbias_base,
                         offs_n, offs_d, offs_dv, tile_start, tile_end, seq_q, seq_k,
                         head_dim, head_dim_v, qk_scale_log2,
                         BLOCK_M: tl.constexpr, MASK_ROWS: tl.constexpr, CAUSAL_MASK: tl.constexpr,
                         EVEN_D: tl.constexpr, EVEN_DV: tl.constexpr, BIAS_KIND: tl.constexpr,
                         STORE_DBIAS: tl.constexpr, EMULATE_BF16: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """Accumulate dK and dV of one key tile over query tiles [tile_start, tile_end)."""
    offs_tile_m = tl.arange(0, BLOCK_M)
    q_offsets = offs_tile_m[:, None] * stride_qm + offs_d[None, :]
    do_offsets = offs_tile_m[:, None] * stride_dom + offs_dv[None, :]
    for start_m in range(tile_start, tile_end, BLOCK_M):
        offs_m = start_m + offs_tile_m
        q_ptrs = q_base + tl.cast(start_m, tl.int64) * stride_qm + q_offsets
        do_ptrs = do_base + tl.cast(start_m, tl.int64) * stride_dom + do_offsets
        # Rows past seq_q load as zeros (q, do, delta) so they add nothing to dK and dV.
        if MASK_ROWS:
            rows = offs_m < seq_q
            q = tl.load(q_ptrs, mask=rows[:, None] & (offs_d[None, :] < head_dim), other=0.0)
            do = tl.load(do_ptrs, mask=rows[:, None] & (offs_dv[None, :] < head_dim_v), other=0.0)
            lse = tl.load(lse_base + offs_m, mask=rows, other=0.0)
            delta = tl.load(delta_base + offs_m, mask=rows, other=0.0)
        elif EVEN_D and EVEN_DV:
            q = tl.load(q_ptrs)
            do = tl.load(do_ptrs)
            lse = tl.load(lse_base + offs_m)
            delta = tl.load(delta_base + offs_m)
        else:
            q = tl.load(q_ptrs, mask=offs_d[None, :] < head_dim, other=0.0)
            do = tl.load(do_ptrs, mask=offs_dv[None, :] < head_dim_v, other=0.0)
            lse = tl.load(lse_base + offs_m)
            delta = tl.load(delta_base + offs_m)
        qk_t = _dot(k, tl.trans(q), tl.zeros([k.shape[0], BLOCK_M], dtype=tl.float32),
                    EMULATE_BF16, INPUT_PRECISION) * qk_scale_log2
        if BIAS_KIND != 0:
            qk_t = _apply_bias(qk_t, bias_base, stride_bias_m, stride_bias_n, offs_m[None, :], offs_n[:, None],
                               seq_q, seq_k, BIAS_KIND)
        if BIAS_KIND != 0:
            # A row the mask leaves with no key has lse = -inf: subtracting +inf gives p = 0, not NaN.
            p_t = tl.math.exp2(qk_t - tl.where(lse == float("-inf"), float("inf"), lse * LOG2E)[None, :])
        else:
            p_t = tl.math.exp2(qk_t - (lse * LOG2E)[None, :])
        if CAUSAL_MASK:
            # Selecting after exp2 also zeroes rows whose lse is -inf (they see no key at all).
            p_t = tl.where(offs_n[:, None] <= offs_m[None, :] + (seq_k - seq_q), p_t, 0.0)
        dv = _dot(_cast(p_t, do.dtype, EMULATE_BF16), do, dv, EMULATE_BF16, INPUT_PRECISION)
        dp_t = _dot(v, tl.trans(do), tl.zeros([k.shape[0], BLOCK_M], dtype=tl.float32),
                    EMULATE_BF16, INPUT_PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])
        if STORE_DBIAS:  # d loss / d score; each (row, key) of a head is visited exactly once
            tl.store(dbias_base + offs_m[None, :].to(tl.int64) * seq_k + offs_n[:, None], ds_t,
                     mask=(offs_m[None, :] < seq_q) & (offs_n[:, None] < seq_k))
        dk = _dot(_cast(ds_t, q.dtype, EMULATE_BF16), q, dk, EMULATE_BF16, INPUT_PRECISION)
    return dk, dv


@triton.jit
def _attn_bwd_dkdv(
    Q, K, V, DO, LSE, DELTA, DK, DV,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_dob, stride_doh, stride_dom,
    stride_dkb, stride_dkh, stride_dkn,
    stride_dvb, stride_dvh, stride_dvn,
    BIAS, stride_bias_b, stride_bias_h, stride_bias_m, stride_bias_n, DBIAS,
    num_heads_q, num_heads_kv, group_size, seq_q, seq_k, head_dim, head_dim_v, qk_scale_log2, scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    CAUSAL: tl.constexpr, EVEN_D: tl.constexpr, EVEN_DV: tl.constexpr, BIAS_KIND: tl.constexpr,
    STORE_DBIAS: tl.constexpr, EMULATE_BF16: tl.constexpr, INPUT_PRECISION: tl.constexpr,
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

    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    col_ok = offs_n < seq_k
    k_base = K + batch.to(tl.int64) * stride_kb + head_kv.to(tl.int64) * stride_kh
    v_base = V + batch.to(tl.int64) * stride_vb + head_kv.to(tl.int64) * stride_vh
    k = tl.load(k_base + offs_n[:, None].to(tl.int64) * stride_kn + offs_d[None, :],
                mask=col_ok[:, None] & (offs_d[None, :] < head_dim), other=0.0)
    v = tl.load(v_base + offs_n[:, None].to(tl.int64) * stride_vn + offs_dv[None, :],
                mask=col_ok[:, None] & (offs_dv[None, :] < head_dim_v), other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)

    # Query tiles: [first, unmasked_start) hold the causal diagonal, [unmasked_start, full_end)
    # need no mask, and [max(unmasked_start, full_end), seq_q) is the ragged last tile.
    full_end = seq_q // BLOCK_M * BLOCK_M
    if CAUSAL:
        diagonal = seq_k - seq_q
        first = tl.maximum(start_n - diagonal, 0) // BLOCK_M * BLOCK_M
        unmasked_start = tl.cdiv(tl.maximum(start_n + BLOCK_N - 1 - diagonal, 0), BLOCK_M) * BLOCK_M
    else:
        first = 0
        unmasked_start = 0
    diagonal_end = tl.minimum(unmasked_start, seq_q)
    tail_start = tl.maximum(unmasked_start, full_end)

    for group_member in range(0, group_size):
        head = head_kv * group_size + group_member
        batch_head = batch * num_heads_q + head
        q_base = Q + batch.to(tl.int64) * stride_qb + head.to(tl.int64) * stride_qh
        do_base = DO + batch.to(tl.int64) * stride_dob + head.to(tl.int64) * stride_doh
        lse_base = LSE + batch_head.to(tl.int64) * seq_q
        delta_base = DELTA + batch_head.to(tl.int64) * seq_q
        bias_base = BIAS + batch.to(tl.int64) * stride_bias_b + head.to(tl.int64) * stride_bias_h
        dbias_base = DBIAS + batch_head.to(tl.int64) * seq_q * seq_k
        if CAUSAL:
            dk, dv = _attn_bwd_dkdv_inner(
                dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qm, stride_dom,
                bias_base, stride_bias_m, stride_bias_n, dbias_base,
                offs_n, offs_d, offs_dv, first, diagonal_end, seq_q, seq_k, head_dim, head_dim_v,
                qk_scale_log2, BLOCK_M, True, True, EVEN_D, EVEN_DV, BIAS_KIND, STORE_DBIAS,
                EMULATE_BF16, INPUT_PRECISION)
        dk, dv = _attn_bwd_dkdv_inner(
            dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qm, stride_dom,
            bias_base, stride_bias_m, stride_bias_n, dbias_base,
            offs_n, offs_d, offs_dv, unmasked_start, full_end, seq_q, seq_k, head_dim, head_dim_v,
            qk_scale_log2, BLOCK_M, False, False, EVEN_D, EVEN_DV, BIAS_KIND, STORE_DBIAS,
            EMULATE_BF16, INPUT_PRECISION)
        dk, dv = _attn_bwd_dkdv_inner(
            dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qm, stride_dom,
            bias_base, stride_bias_m, stride_bias_n, dbias_base,
            offs_n, offs_d, offs_dv, tail_start, seq_q, seq_q, seq_k, head_dim, head_dim_v,
            qk_scale_log2, BLOCK_M, True, False, EVEN_D, EVEN_DV, BIAS_KIND, STORE_DBIAS,
            EMULATE_BF16, INPUT_PRECISION)

    dk = dk * scale
    store_k = col_ok[:, None] & (offs_d[None, :] < head_dim)
    store_v = col_ok[:, None] & (offs_dv[None, :] < head_dim_v)
    dk_base = DK + batch.to(tl.int64) * stride_dkb + head_kv.to(tl.int64) * stride_dkh
    dv_base = DV + batch.to(tl.int64) * stride_dvb + head_kv.to(tl.int64) * stride_dvh
    tl.store(dk_base + offs_n[:, None].to(tl.int64) * stride_dkn + offs_d[None, :],
             _cast(dk, DK.dtype.element_ty, EMULATE_BF16), mask=store_k)
    tl.store(dv_base + offs_n[:, None].to(tl.int64) * stride_dvn + offs_dv[None, :],
             _cast(dv, DV.dtype.element_ty, EMULATE_BF16), mask=store_v)


@triton.jit
def _attn_bwd_dq_inner(dq, q, do, lse_log2, delta, k_base, v_base, stride_kn, stride_vn,
                       bias_base, stride_bias_m, stride_bias_n,
                       offs_m, offs_n, offs_d, offs_dv, tile_start, tile_end, seq_q, seq_k,
                       head_dim, head_dim_v, qk_scale_log2,
                       BLOCK_N: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr,
                       EVEN_D: tl.constexpr, EVEN_DV: tl.constexpr, BIAS_KIND: tl.constexpr,
                       EMULATE_BF16: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    k_offsets = offs_n[:, None] * stride_kn + offs_d[None, :]
    v_offsets = offs_n[:, None] * stride_vn + offs_dv[None, :]
    for start_n in range(tile_start, tile_end, BLOCK_N):
        cols = start_n + offs_n
        k_ptrs = k_base + tl.cast(start_n, tl.int64) * stride_kn + k_offsets
        v_ptrs = v_base + tl.cast(start_n, tl.int64) * stride_vn + v_offsets
        if MASKED:
            k = tl.load(k_ptrs, mask=(cols[:, None] < seq_k) & (offs_d[None, :] < head_dim), other=0.0)
            v = tl.load(v_ptrs, mask=(cols[:, None] < seq_k) & (offs_dv[None, :] < head_dim_v), other=0.0)
        elif EVEN_D and EVEN_DV:
            k = tl.load(k_ptrs)
            v = tl.load(v_ptrs)
        else:
            k = tl.load(k_ptrs, mask=offs_d[None, :] < head_dim, other=0.0)
            v = tl.load(v_ptrs, mask=offs_dv[None, :] < head_dim_v, other=0.0)
        qk = _dot(q, tl.trans(k), tl.zeros([q.shape[0], BLOCK_N], dtype=tl.float32),
                  EMULATE_BF16, INPUT_PRECISION) * qk_scale_log2
        if BIAS_KIND != 0:
            qk = _apply_bias(qk, bias_base, stride_bias_m, stride_bias_n, offs_m[:, None], cols[None, :],
                             seq_q, seq_k, BIAS_KIND)
        p = tl.math.exp2(qk - lse_log2[:, None])
        if MASKED:
            visible = cols[None, :] < seq_k
            if CAUSAL:
                visible = visible & (cols[None, :] <= offs_m[:, None] + (seq_k - seq_q))
            p = tl.where(visible, p, 0.0)
        dp = _dot(do, tl.trans(v), tl.zeros([q.shape[0], BLOCK_N], dtype=tl.float32),
                  EMULATE_BF16, INPUT_PRECISION)
        ds = p * (dp - delta[:, None])
        dq = _dot(_cast(ds, k.dtype, EMULATE_BF16), k, dq, EMULATE_BF16, INPUT_PRECISION)
    return dq


@triton.jit
def _attn_bwd_dq(
    Q, K, V, DO, LSE, DELTA, DQ,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_vb, stride_vh, stride_vn,
    stride_dob, stride_doh, stride_dom,
    stride_dqb, stride_dqh, stride_dqm,
    BIAS, stride_bias_b, stride_bias_h, stride_bias_m, stride_bias_n,
    num_heads_q, group_size, seq_q, seq_k, head_dim, head_dim_v, qk_scale_log2, scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    CAUSAL: tl.constexpr, EVEN_D: tl.constexpr, EVEN_DV: tl.constexpr, BIAS_KIND: tl.constexpr,
    EMULATE_BF16: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    """One program computes dQ for one BLOCK_M tile of queries of one (batch, query head)."""
    pid = tl.program_id(0)
    num_m_tiles = tl.cdiv(seq_q, BLOCK_M)
    tile_m = num_m_tiles - 1 - pid % num_m_tiles
    batch_head = pid // num_m_tiles
    batch = batch_head // num_heads_q
    head = batch_head % num_heads_q
    head_kv = head // group_size
    start_m = tile_m * BLOCK_M

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    row_ok = offs_m < seq_q
    q_base = Q + batch.to(tl.int64) * stride_qb + head.to(tl.int64) * stride_qh
    do_base = DO + batch.to(tl.int64) * stride_dob + head.to(tl.int64) * stride_doh
    q = tl.load(q_base + offs_m[:, None].to(tl.int64) * stride_qm + offs_d[None, :],
                mask=row_ok[:, None] & (offs_d[None, :] < head_dim), other=0.0)
    do = tl.load(do_base + offs_m[:, None].to(tl.int64) * stride_dom + offs_dv[None, :],
                 mask=row_ok[:, None] & (offs_dv[None, :] < head_dim_v), other=0.0)
    lse = tl.load(LSE + batch_head.to(tl.int64) * seq_q + offs_m, mask=row_ok, other=0.0)
    delta = tl.load(DELTA + batch_head.to(tl.int64) * seq_q + offs_m, mask=row_ok, other=0.0)
    lse_log2 = lse * LOG2E
    if BIAS_KIND != 0:  # a row the mask leaves with no key: subtracting +inf gives p = 0, not NaN
        lse_log2 = tl.where(lse == float("-inf"), float("inf"), lse_log2)
    bias_base = BIAS + batch.to(tl.int64) * stride_bias_b + head.to(tl.int64) * stride_bias_h
    k_base = K + batch.to(tl.int64) * stride_kb + head_kv.to(tl.int64) * stride_kh
    v_base = V + batch.to(tl.int64) * stride_vb + head_kv.to(tl.int64) * stride_vh
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    unmasked_end, end = _causal_key_bounds(start_m, seq_q, seq_k, BLOCK_M, BLOCK_N, CAUSAL)
    dq = _attn_bwd_dq_inner(
        dq, q, do, lse_log2, delta, k_base, v_base, stride_kn, stride_vn, bias_base, stride_bias_m, stride_bias_n,
        offs_m, offs_n, offs_d, offs_dv, 0, unmasked_end, seq_q, seq_k, head_dim, head_dim_v, qk_scale_log2,
        BLOCK_N, False, CAUSAL, EVEN_D, EVEN_DV, BIAS_KIND, EMULATE_BF16, INPUT_PRECISION)
    dq = _attn_bwd_dq_inner(
        dq, q, do, lse_log2, delta, k_base, v_base, stride_kn, stride_vn, bias_base, stride_bias_m, stride_bias_n,
        offs_m, offs_n, offs_d, offs_dv, unmasked_end, end, seq_q, seq_k, head_dim, head_dim_v, qk_scale_log2,
        BLOCK_N, True, CAUSAL, EVEN_D, EVEN_DV, BIAS_KIND, EMULATE_BF16, INPUT_PRECISION)

    dq = dq * scale
    dq_base = DQ + batch.to(tl.int64) * stride_dqb + head.to(tl.int64) * stride_dqh
    tl.store(dq_base + offs_m[:, None].to(tl.int64) * stride_dqm + offs_d[None, :], _cast(dq, DQ.dtype.element_ty, EMULATE_BF16),
             mask=row_ok[:, None] & (offs_d[None, :] < head_dim))
