"""Tiled online-softmax attention: forward, backward pre-pass, dK/dV and dQ kernels.

Notation (shared by every kernel in this file):
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
def _tanh(x):
    """float32 tanh within about 3 ulp, identical on the GPU and in the interpreter (libdevice's
    tanh has no interpreter counterpart, and 1 - 2 / (e^2x + 1) loses the small values softcap
    sees most): a Taylor polynomial below |x| = 0.55, (1 - e^-2|x|) / (1 + e^-2|x|) above."""
    near_zero = tl.abs(x) < 0.55
    small = tl.where(near_zero, x, 0.0)
    x2 = small * small
    poly = -929569.0 / 638512875.0
    poly = poly * x2 + 21844.0 / 6081075.0
    poly = poly * x2 - 1382.0 / 155925.0
    poly = poly * x2 + 62.0 / 2835.0
    poly = poly * x2 - 17.0 / 315.0
    poly = poly * x2 + 2.0 / 15.0
    poly = poly * x2 - 1.0 / 3.0
    e = tl.math.exp2(tl.abs(x) * -2.8853900817779268)  # exp(-2|x|)
    large = (1.0 - e) / (1.0 + e)
    return tl.where(near_zero, small + small * x2 * poly, tl.where(x < 0, -large, large))


@triton.jit
def _dropout_keep(seed, batch, head, rows, cols, dropout_p):
    """True where the probability of (batch, query head, row, key) survives dropout. rows and
    cols are int32 blocks of positions within the sequence that broadcast to the tile's shape;
    each element gets its own Philox counter, so any tiling regenerates the same mask."""
    cols_tile = cols + rows * 0
    rows_tile = rows + cols * 0
    random, _, _, _ = tl.philox(seed, cols_tile, rows_tile, rows_tile * 0 + head, rows_tile * 0 + batch)
    return tl.uint_to_uniform_float(random) >= dropout_p


@triton.jit
def _apply_bias(scores, bias_base, stride_bias_m, stride_bias_n, rows, cols, seq_q, seq_k, BIAS_KIND: tl.constexpr):
    """(scores, allowed) of the tile rows x cols under the user's mask: BIAS_KIND 1 adds a float
    bias (natural units, so times log2(e)) and allows every key but those at -inf; 2 allows the
    keys where a bool mask is True. A NaN bias is allowed and propagates, as in torch."""
    ptrs = bias_base + rows.to(tl.int64) * stride_bias_m + cols.to(tl.int64) * stride_bias_n
    inside = (rows < seq_q) & (cols < seq_k)
    if BIAS_KIND == 1:
        bias = tl.load(ptrs, mask=inside, other=0.0).to(tl.float32)
        allowed = bias != float("-inf")
        # Clamped so that torch.finfo(float32).min, the usual "masked" value, stays finite in base 2
        # (a row masked only that way averages its keys, as torch's softmax does, instead of losing them).
        bias = tl.maximum(bias, -2.0e38, propagate_nan=tl.PropagateNan.ALL)
        scores = scores + bias * LOG2E
    else:
        allowed = tl.load(ptrs, mask=inside, other=0) != 0
    return scores, allowed


@triton.jit
def _scores(s, rows, cols, seq_q, seq_k, qk_scale_log2, softcap_in, softcap_out_log2, alibi_slope_log2,
            bias_base, stride_bias_m, stride_bias_n, window_left, window_right,
            CHECK_KEYS: tl.constexpr, CHECK_ROWS: tl.constexpr, MASK_LEFT: tl.constexpr, MASK_RIGHT: tl.constexpr,
            BIAS_KIND: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_SOFTCAP: tl.constexpr):
    """Base-2 scores of one tile from s = q k^T (rows and cols broadcast to its shape), with -inf
    where a key is not visible, and tanh(s * scale / softcap), which the gradient needs (s itself
    without softcap). A NaN or infinite score of a visible key stays as it is, so it propagates as
    in torch. Order as in FlashAttention-2 and Gemma 2: scale, softcap, then ALiBi and the user's
    bias, then the band. Only the checks a loop needs are compiled in: CHECK_KEYS (key past
    seq_k), CHECK_ROWS (row past seq_q: needed only where rows are summed over, in dK/dV),
    MASK_LEFT and MASK_RIGHT (the band's edges)."""
    if HAS_SOFTCAP:
        tanh_s = _tanh(s * softcap_in)
        qk = tanh_s * softcap_out_log2
    else:
        tanh_s = s
        qk = s * qk_scale_log2
    if HAS_ALIBI:
        qk = qk - alibi_slope_log2 * tl.abs((rows + (seq_k - seq_q) - cols).to(tl.float32))
    if BIAS_KIND != 0:
        qk, allowed = _apply_bias(qk, bias_base, stride_bias_m, stride_bias_n, rows, cols, seq_q, seq_k, BIAS_KIND)
        qk = tl.where(allowed, qk, float("-inf"))
    if CHECK_KEYS:
        qk = tl.where(cols < seq_k, qk, float("-inf"))
    if CHECK_ROWS:
        qk = tl.where(rows < seq_q, qk, float("-inf"))
    if MASK_RIGHT:
        qk = tl.where(cols <= rows + (seq_k - seq_q + window_right), qk, float("-inf"))
    if MASK_LEFT:
        qk = tl.where(cols >= rows + (seq_k - seq_q - window_left), qk, float("-inf"))
    return qk, tanh_s


@triton.jit
def _probs(qk, lse_log2, NAN_FROM_DELTA: tl.constexpr = False):
    """exp2(qk - lse_log2), at most 1: rounding in a float32 lse far from 0 (|scores| ~ 1e6) can put
    a score above it, and an unclamped p would then overflow. A NaN score or lse gives p = NaN;
    with NAN_FROM_DELTA the caller only forms dS = p (dP - delta), and a NaN score or lse always
    comes with a NaN delta (its row's o is NaN), so a cheaper clamp that maps NaN to 1 keeps dS
    NaN there (the dQ kernel: it saves the registers that keep its fp32 tiles spill-free)."""
    if NAN_FROM_DELTA:
        return tl.minimum(tl.math.exp2(qk - lse_log2), 1.0)
    return tl.math.exp2(tl.minimum(qk - lse_log2, 0.0, propagate_nan=tl.PropagateNan.ALL))


@triton.jit
def _sequence(CU_SEQLENS_Q, CU_SEQLENS_K, batch, seq_q, seq_k, IS_VARLEN: tl.constexpr):
    """(q_start, seq_q, k_start, seq_k): where sequence `batch` starts in packed q and k, and its
    lengths. For padded input, 0 and the lengths given; packed input passes the longest ones."""
    q_start = 0
    k_start = 0
    if IS_VARLEN:
        q_start = tl.load(CU_SEQLENS_Q + batch)
        seq_q = tl.load(CU_SEQLENS_Q + batch + 1) - q_start
        k_start = tl.load(CU_SEQLENS_K + batch)
        seq_k = tl.load(CU_SEQLENS_K + batch + 1) - k_start
    return q_start, seq_q, k_start, seq_k


@triton.jit
def _key_range(start_m, seq_q, seq_k, window_left, window_right, BLOCK_M: tl.constexpr,
               BLOCK_N: tl.constexpr, LIMIT_LEFT: tl.constexpr, LIMIT_RIGHT: tl.constexpr):
    """Keys of the query tile [start_m, start_m + BLOCK_M): [lo, hi) holds every key some row
    sees, and [unmasked_lo, unmasked_hi) the key tiles every row sees whole (no mask needed).
    lo, unmasked_lo and unmasked_hi are multiples of BLOCK_N."""
    diagonal = seq_k - seq_q
    if LIMIT_LEFT:
        lo = tl.maximum(start_m + diagonal - window_left, 0) // BLOCK_N * BLOCK_N
        # From the last row's left edge on, keys are right of every row's left edge.
        unmasked_lo = tl.cdiv(tl.maximum(start_m + BLOCK_M - 1 + diagonal - window_left, 0), BLOCK_N) * BLOCK_N
    else:
        lo = 0
        unmasked_lo = 0
    if LIMIT_RIGHT:
        hi = tl.minimum(seq_k, tl.maximum(start_m + BLOCK_M + diagonal + window_right, 0))
        # Keys up to the first row's right edge are left of every row's right edge.
        unmasked_hi = tl.maximum(start_m + 1 + diagonal + window_right, 0) // BLOCK_N * BLOCK_N
    else:
        hi = seq_k
        unmasked_hi = seq_k
    unmasked_hi = tl.minimum(unmasked_hi, seq_k // BLOCK_N * BLOCK_N)
    return lo, unmasked_lo, unmasked_hi, hi


@triton.jit
def _query_range(start_n, seq_q, seq_k, window_left, window_right, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr, LIMIT_LEFT: tl.constexpr, LIMIT_RIGHT: tl.constexpr):
    """The transpose of _key_range for the key tile [start_n, start_n + BLOCK_N): [lo, hi) holds
    every query row that sees one of its keys, [unmasked_lo, unmasked_hi) the query tiles that
    see all of them."""
    diagonal = seq_k - seq_q
    if LIMIT_RIGHT:  # row i sees key j only if i >= j - diagonal - window_right
        lo = tl.maximum(start_n - diagonal - window_right, 0) // BLOCK_M * BLOCK_M
        unmasked_lo = tl.cdiv(tl.maximum(start_n + BLOCK_N - 1 - diagonal - window_right, 0), BLOCK_M) * BLOCK_M
    else:
        lo = 0
        unmasked_lo = 0
    if LIMIT_LEFT:  # row i sees key j only if i <= j - diagonal + window_left
        hi = tl.minimum(seq_q, tl.maximum(start_n + BLOCK_N - diagonal + window_left, 0))
        unmasked_hi = tl.maximum(start_n + 1 - diagonal + window_left, 0) // BLOCK_M * BLOCK_M
    else:
        hi = seq_q
        unmasked_hi = seq_q
    unmasked_hi = tl.minimum(unmasked_hi, seq_q // BLOCK_M * BLOCK_M)
    return lo, unmasked_lo, unmasked_hi, hi


@triton.jit
def _rows_descriptor(base, rows, cols, stride_row, BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr,
                     USE_TMA: tl.constexpr):
    """A TMA descriptor of the (rows, cols) matrix at `base` (row stride `stride_row`, unit column
    stride) read in (BLOCK_ROWS, BLOCK_COLS) boxes, or `base` itself without TMA. The copy engine
    fills a box's part past `rows` or `cols` with zeros, as the masked loads do, and loads need
    fewer registers for addresses. The launcher enables it on capability 9.0+ only, where its
    inputs are 16-byte aligned with strides in multiples of 16 elements (_launch._aligned)."""
    if USE_TMA:
        return tl.make_tensor_descriptor(base, shape=[rows, cols], strides=[stride_row, 1],
                                         block_shape=[BLOCK_ROWS, BLOCK_COLS])
    else:
        return base


@triton.jit
def _head_base(ptr, batch, head, stride_batch, stride_head, first_row=0, stride_row=0):
    """Address of row `first_row` of the (batch, head) matrix of a (batch, head, row, ...) tensor, in
    64-bit offsets (the tensor may hold more than 2**31 elements)."""
    base = ptr + batch.to(tl.int64) * stride_batch + head.to(tl.int64) * stride_head
    return base + tl.cast(first_row, tl.int64) * stride_row


@triton.jit
def _load_tile(ptrs, desc, start, rows, cols, num_rows, num_cols,
               MASKED: tl.constexpr, EVEN_COLS: tl.constexpr, USE_TMA: tl.constexpr):
    """The tile of rows `rows` (the first is `start`) and columns `cols` of a (num_rows, num_cols)
    matrix, with zeros past its end: zeros times garbage could be NaN in the dots. Read from
    `ptrs`, checking the rows only in a MASKED loop (the others never cross num_rows) and the
    columns unless EVEN_COLS (the head dim is its block); or as a box of the TMA descriptor `desc`,
    which the copy engine zero-fills past both ends."""
    if USE_TMA:
        tile = desc.load([start, 0])
    elif MASKED:
        tile = tl.load(ptrs, mask=(rows < num_rows)[:, None] & (cols[None, :] < num_cols), other=0.0)
    elif EVEN_COLS:
        tile = tl.load(ptrs)
    else:
        tile = tl.load(ptrs, mask=cols[None, :] < num_cols, other=0.0)
    return tile


@triton.jit
def _score_inputs(BIAS, ALIBI, batch, head, stride_bias_b, stride_bias_h, stride_alibi_b, HAS_ALIBI: tl.constexpr):
    """(bias_base, alibi_slope_log2): what _scores reads for one (batch, query head)."""
    bias_base = _head_base(BIAS, batch, head, stride_bias_b, stride_bias_h)
    alibi_slope_log2 = 0.0
    if HAS_ALIBI:
        alibi_slope_log2 = tl.load(ALIBI + batch * stride_alibi_b + head) * LOG2E
    return bias_base, alibi_slope_log2


@triton.jit
def _query_tile(CU_SEQLENS_Q, CU_SEQLENS_K, num_heads_q, group_size, seq_q, seq_k,
                BLOCK_M: tl.constexpr, IS_VARLEN: tl.constexpr):
    """The start-up of the forward and dQ programs, one per BLOCK_M queries of one (batch, query
    head): (batch, head, head_kv, start_m) and the sequence as _sequence gives it. Later query tiles
    do the most causal work, so the first programs take them. With IS_VARLEN, start_m may lie past
    this sequence (the grid is sized for the longest one): the caller returns then."""
    pid = tl.program_id(0)
    num_m_tiles = tl.cdiv(seq_q, BLOCK_M)
    tile_m = num_m_tiles - 1 - pid % num_m_tiles
    batch_head = pid // num_m_tiles
    batch = batch_head // num_heads_q
    head = batch_head % num_heads_q
    head_kv = head // group_size
    start_m = tile_m * BLOCK_M
    q_start, seq_q, k_start, seq_k = _sequence(CU_SEQLENS_Q, CU_SEQLENS_K, batch, seq_q, seq_k, IS_VARLEN)
    return batch, head, head_kv, start_m, q_start, seq_q, k_start, seq_k


@triton.jit
def _key_value_streams(K, V, batch, head_kv, k_start, seq_k, head_dim, head_dim_v,
                       stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
                       BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, USE_TMA: tl.constexpr):
    """(k_base, v_base, k_desc, v_desc): the keys and values that the forward and dQ loops stream,
    from the sequence's first key, as pointers and as TMA descriptors (see _rows_descriptor)."""
    k_base = _head_base(K, batch, head_kv, stride_kb, stride_kh, k_start, stride_kn)
    v_base = _head_base(V, batch, head_kv, stride_vb, stride_vh, k_start, stride_vn)
    k_desc = _rows_descriptor(k_base, seq_k, head_dim, stride_kn, BLOCK_N, BLOCK_D, USE_TMA)
    v_desc = _rows_descriptor(v_base, seq_k, head_dim_v, stride_vn, BLOCK_N, BLOCK_DV, USE_TMA)
    return k_base, v_base, k_desc, v_desc


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
                                                stride_alibi_b, HAS_ALIBI)
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
        sink_log2 = tl.load(SINKS + head) * LOG2E
        m_sink = tl.maximum(m_i, sink_log2)
        # -inf == -inf (no key and a -inf sink) and +inf == +inf keep alpha finite; NaN != NaN propagates.
        alpha = tl.where(m_i == m_sink, 1.0, tl.math.exp2(m_i - m_sink))
        l_i = l_i * alpha + tl.where(sink_log2 == float("-inf"), 0.0, tl.math.exp2(sink_log2 - m_sink))
        acc = acc * alpha[:, None]
        m_i = m_sink
    # A row with no visible key returns 0 and an lse of -inf. The band and the mask leave it
    # l = 0 exactly (p = 0 everywhere), while a visible key gives l >= 1 and a NaN score makes l
    # NaN, never 0: a NaN is not mistaken for "no key" and propagates (o and lse NaN); a +inf
    # score gives NaN and lse +inf, as torch does. (One corner: visible keys whose scores are all
    # exactly -inf count as no key here, where torch's softmax gives NaN.)
    has_key = l_i != 0.0
    l_safe = tl.where(has_key, l_i, 1.0)
    out = acc / l_safe[:, None]  # 0 for a row without keys, unless 0 * (NaN or inf in v), as in torch
    if HAS_DROPOUT:
        out = out / (1.0 - dropout_p)
    lse = tl.where(has_key, (m_i + tl.math.log2(l_safe)) * LN2, float("-inf"))
    lse = tl.where(m_i == float("inf"), float("inf"), lse)

    tl.store(o_base + offs_tile_m[:, None] * stride_om + offs_dv[None, :], _cast(out, O.dtype.element_ty, EMULATE_BF16),
             mask=row_ok[:, None] & (offs_dv[None, :] < head_dim_v))
    tl.store(lse_base + offs_m, lse, mask=row_ok)


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
                                                    stride_alibi_b, HAS_ALIBI)
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
                                                stride_alibi_b, HAS_ALIBI)
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


@triton.jit
def _dropout_mask(MASK, num_heads, seq_q, seq_k, dropout_p, dropout_seed,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """MASK (B, H, seq_q, seq_k) int8: 1 where the attention kernels keep a probability for the
    same seed and dropout_p. One program writes one BLOCK_M x BLOCK_N tile."""
    pid = tl.program_id(0)
    num_n_tiles = tl.cdiv(seq_k, BLOCK_N)
    num_m_tiles = tl.cdiv(seq_q, BLOCK_M)
    tile_n = pid % num_n_tiles
    tile_m = pid // num_n_tiles % num_m_tiles
    batch_head = pid // (num_n_tiles * num_m_tiles)
    rows = tile_m * BLOCK_M + tl.arange(0, BLOCK_M)[:, None]
    cols = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
    keep = _dropout_keep(dropout_seed, batch_head // num_heads, batch_head % num_heads, rows, cols, dropout_p)
    tl.store(MASK + batch_head.to(tl.int64) * seq_q * seq_k + rows.to(tl.int64) * seq_k + cols,
             keep.to(tl.int8), mask=(rows < seq_q) & (cols < seq_k))


@triton.jit
def _attn_probs(
    Q, K, LSE, P, ROWS, HEADS,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    stride_lse_b, stride_lse_h,
    stride_pb, stride_ph, stride_pm,
    BIAS, stride_bias_b, stride_bias_h, stride_bias_m, stride_bias_n,
    ALIBI, stride_alibi_b,
    num_heads_sel, num_rows, group_size, seq_q, seq_k, head_dim, qk_scale_log2,
    window_left, window_right, softcap_in, softcap_out_log2,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    LIMIT_RIGHT: tl.constexpr, EVEN_D: tl.constexpr, BIAS_KIND: tl.constexpr,
    EMULATE_BF16: tl.constexpr, INPUT_PRECISION: tl.constexpr, LIMIT_LEFT: tl.constexpr = False,
    HAS_ALIBI: tl.constexpr = False, HAS_SOFTCAP: tl.constexpr = False,
):
    """P[b, i, r, j] = exp(score(ROWS[r], j) - lse[ROWS[r]]) for query head HEADS[i]: the exact
    normalized probabilities of chosen rows and heads, from the lse the forward returned.
    One program writes one BLOCK_M x BLOCK_N tile (of chosen rows x keys) of one (batch, head)."""
    pid = tl.program_id(0)
    num_n_tiles = tl.cdiv(seq_k, BLOCK_N)
    num_m_tiles = tl.cdiv(num_rows, BLOCK_M)
    tile_n = pid % num_n_tiles
    tile_m = pid // num_n_tiles % num_m_tiles
    batch_head = pid // (num_n_tiles * num_m_tiles)
    batch = batch_head // num_heads_sel
    head_slot = batch_head % num_heads_sel
    head = tl.load(HEADS + head_slot)
    head_kv = head // group_size

    slots = tile_m * BLOCK_M + tl.arange(0, BLOCK_M)
    slot_ok = slots < num_rows
    rows = tl.load(ROWS + slots, mask=slot_ok, other=0)
    cols = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    q = tl.load(_head_base(Q, batch, head, stride_qb, stride_qh) + rows[:, None].to(tl.int64) * stride_qm
                + offs_d[None, :], mask=slot_ok[:, None] & (offs_d[None, :] < head_dim), other=0.0)
    k = tl.load(_head_base(K, batch, head_kv, stride_kb, stride_kh) + cols[:, None].to(tl.int64) * stride_kn
                + offs_d[None, :], mask=(cols[:, None] < seq_k) & (offs_d[None, :] < head_dim), other=0.0)
    bias_base, alibi_slope_log2 = _score_inputs(BIAS, ALIBI, batch, head, stride_bias_b, stride_bias_h,
                                                stride_alibi_b, HAS_ALIBI)
    s = _dot(q, tl.trans(k), tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), EMULATE_BF16, INPUT_PRECISION)
    qk, _ = _scores(s, rows[:, None], cols[None, :], seq_q, seq_k, qk_scale_log2, softcap_in, softcap_out_log2,
                    alibi_slope_log2, bias_base, stride_bias_m, stride_bias_n, window_left, window_right,
                    True, False, LIMIT_LEFT, LIMIT_RIGHT, BIAS_KIND, HAS_ALIBI, HAS_SOFTCAP)
    lse = tl.load(_head_base(LSE, batch, head, stride_lse_b, stride_lse_h) + rows, mask=slot_ok, other=0.0)
    lse_log2 = tl.where(lse == float("-inf"), float("inf"), lse * LOG2E)  # a row with no key: p = 0
    p = _probs(qk, lse_log2[:, None])
    tl.store(_head_base(P, batch, head_slot, stride_pb, stride_ph) + slots[:, None].to(tl.int64) * stride_pm
             + cols[None, :], p,
             mask=slot_ok[:, None] & (cols[None, :] < seq_k))


@triton.jit
def _attn_row_stats(
    Q, K, LSE, ENTROPY, MAX_PROB,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    BIAS, stride_bias_b, stride_bias_h, stride_bias_m, stride_bias_n,
    ALIBI, stride_alibi_b,
    num_heads_q, group_size, seq_q, seq_k, head_dim, qk_scale_log2,
    window_left, window_right, softcap_in, softcap_out_log2,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    LIMIT_RIGHT: tl.constexpr, EVEN_D: tl.constexpr, BIAS_KIND: tl.constexpr,
    EMULATE_BF16: tl.constexpr, INPUT_PRECISION: tl.constexpr, LIMIT_LEFT: tl.constexpr = False,
    HAS_ALIBI: tl.constexpr = False, HAS_SOFTCAP: tl.constexpr = False,
):
    """Per query row, in one pass over its band of keys (online, like the forward, without v):
    lse, the entropy -sum p log p and the largest probability. With m the running max and
    l = sum 2^(qk - m) (base 2), entropy = ln2 * (log2 l + B / l) where B = sum 2^(qk - m) (m - qk)
    is a sum of non-negative terms (no cancellation); the largest probability is 1 / l."""
    pid = tl.program_id(0)
    num_m_tiles = tl.cdiv(seq_q, BLOCK_M)
    tile_m = pid % num_m_tiles
    batch_head = pid // num_m_tiles
    batch = batch_head // num_heads_q
    head = batch_head % num_heads_q
    head_kv = head // group_size
    start_m = tile_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < seq_q
    q = tl.load(_head_base(Q, batch, head, stride_qb, stride_qh) + offs_m[:, None].to(tl.int64) * stride_qm
                + offs_d[None, :], mask=row_ok[:, None] & (offs_d[None, :] < head_dim), other=0.0)
    k_base = _head_base(K, batch, head_kv, stride_kb, stride_kh)
    bias_base, alibi_slope_log2 = _score_inputs(BIAS, ALIBI, batch, head, stride_bias_b, stride_bias_h,
                                                stride_alibi_b, HAS_ALIBI)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    b_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    lo, unmasked_lo, unmasked_hi, hi = _key_range(start_m, seq_q, seq_k, window_left, window_right, BLOCK_M,
                                                  BLOCK_N, LIMIT_LEFT, LIMIT_RIGHT)
    for start_n in range(lo, hi, BLOCK_N):  # every tile masked: this is the inspection path
        cols = start_n + offs_n
        k = tl.load(k_base + cols[:, None].to(tl.int64) * stride_kn + offs_d[None, :],
                    mask=(cols[:, None] < seq_k) & (offs_d[None, :] < head_dim), other=0.0)
        s = _dot(q, tl.trans(k), tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), EMULATE_BF16, INPUT_PRECISION)
        qk, tanh_s = _scores(s, offs_m[:, None], cols[None, :], seq_q, seq_k, qk_scale_log2, softcap_in,
                             softcap_out_log2, alibi_slope_log2, bias_base, stride_bias_m, stride_bias_n,
                             window_left, window_right, True, False, LIMIT_LEFT, LIMIT_RIGHT, BIAS_KIND,
                             HAS_ALIBI, HAS_SOFTCAP)
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        m_base = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.math.exp2(m_i - m_base)
        weight = tl.math.exp2(qk - m_base[:, None])
        gap = tl.where(qk != float("-inf"), m_base[:, None] - qk, 0.0)  # weight 0 there: no 0 * inf
        # B rescales like l, plus l_old times the shift of the max.
        b_i = alpha * (b_i + tl.where(m_i == float("-inf"), 0.0, m_base - m_i) * l_i) + tl.sum(weight * gap, 1)
        l_i = l_i * alpha + tl.sum(weight, 1)
        m_i = m_new
    has_key = l_i != 0.0  # as in the forward: 0 only without a visible key, NaN with a NaN score
    l_safe = tl.where(has_key, l_i, 1.0)
    lse = tl.where(has_key, (m_i + tl.math.log2(l_safe)) * LN2, float("-inf"))
    lse = tl.where(m_i == float("inf"), float("inf"), lse)
    entropy = tl.where(has_key, (tl.math.log2(l_safe) + b_i / l_safe) * LN2, 0.0)
    max_prob = tl.where(has_key, 1.0 / l_safe, 0.0)
    row_offsets = batch_head.to(tl.int64) * seq_q + offs_m
    tl.store(LSE + row_offsets, lse, mask=row_ok)
    tl.store(ENTROPY + row_offsets, entropy, mask=row_ok)
    tl.store(MAX_PROB + row_offsets, max_prob, mask=row_ok)


@triton.jit
def _attn_col_sums(
    Q, K, LSE, RECEIVED,
    stride_qb, stride_qh, stride_qm,
    stride_kb, stride_kh, stride_kn,
    BIAS, stride_bias_b, stride_bias_h, stride_bias_m, stride_bias_n,
    ALIBI, stride_alibi_b,
    num_heads_q, group_size, seq_q, seq_k, head_dim, qk_scale_log2,
    window_left, window_right, softcap_in, softcap_out_log2,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    LIMIT_RIGHT: tl.constexpr, EVEN_D: tl.constexpr, BIAS_KIND: tl.constexpr,
    EMULATE_BF16: tl.constexpr, INPUT_PRECISION: tl.constexpr, LIMIT_LEFT: tl.constexpr = False,
    HAS_ALIBI: tl.constexpr = False, HAS_SOFTCAP: tl.constexpr = False,
):
    """RECEIVED[b, h, j] = sum_i p(i, j): the attention key j receives from every query of head h,
    from the row lse (LSE is (B, Hq, Sq) float32). One program owns one key tile of one
    (batch, query head) and walks the query tiles of its band."""
    pid = tl.program_id(0)
    num_n_tiles = tl.cdiv(seq_k, BLOCK_N)
    tile_n = pid % num_n_tiles
    batch_head = pid // num_n_tiles
    batch = batch_head // num_heads_q
    head = batch_head % num_heads_q
    head_kv = head // group_size
    start_n = tile_n * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_tile_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    k = tl.load(_head_base(K, batch, head_kv, stride_kb, stride_kh) + offs_n[:, None].to(tl.int64) * stride_kn
                + offs_d[None, :], mask=(offs_n[:, None] < seq_k) & (offs_d[None, :] < head_dim), other=0.0)
    q_base = _head_base(Q, batch, head, stride_qb, stride_qh)
    lse_base = LSE + batch_head.to(tl.int64) * seq_q
    bias_base, alibi_slope_log2 = _score_inputs(BIAS, ALIBI, batch, head, stride_bias_b, stride_bias_h,
                                                stride_alibi_b, HAS_ALIBI)
    received = tl.zeros([BLOCK_N], dtype=tl.float32)
    lo, unmasked_lo, unmasked_hi, hi = _query_range(start_n, seq_q, seq_k, window_left, window_right, BLOCK_M,
                                                    BLOCK_N, LIMIT_LEFT, LIMIT_RIGHT)
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + offs_tile_m
        row_ok = offs_m < seq_q
        q = tl.load(q_base + offs_m[:, None].to(tl.int64) * stride_qm + offs_d[None, :],
                    mask=row_ok[:, None] & (offs_d[None, :] < head_dim), other=0.0)
        lse = tl.load(lse_base + offs_m, mask=row_ok, other=float("-inf"))
        s_t = _dot(k, tl.trans(q), tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32), EMULATE_BF16, INPUT_PRECISION)
        qk_t, _ = _scores(s_t, offs_m[None, :], offs_n[:, None], seq_q, seq_k, qk_scale_log2, softcap_in,
                          softcap_out_log2, alibi_slope_log2, bias_base, stride_bias_m, stride_bias_n,
                          window_left, window_right, True, True, LIMIT_LEFT, LIMIT_RIGHT, BIAS_KIND, HAS_ALIBI,
                          HAS_SOFTCAP)
        lse_log2 = tl.where(lse == float("-inf"), float("inf"), lse * LOG2E)  # rows without keys, or past seq_q
        received += tl.sum(_probs(qk_t, lse_log2[None, :]), 1)
    tl.store(RECEIVED + batch_head.to(tl.int64) * seq_k + offs_n, received, mask=offs_n < seq_k)
