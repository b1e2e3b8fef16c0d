"""Attention over a KV cache (notation in fused_attn.kernels.attention): one program per
(sequence, k/v head, tile of packed query rows, split of the keys), and the kernel that merges
the splits.

The query heads that share a k/v head are packed along the tile's M axis: row r of a program is
query position r % SEQ_Q of query head head_kv * GROUP + r // SEQ_Q, so a decoding step (SEQ_Q = 1)
reads each k/v head's cache once for its whole group, not GROUP times. The cache is dense,
(cache rows, HKV, capacity, D) with CACHE_BATCH_IDX choosing a sequence's row, or paged with
IS_PAGED, (pages, page size, HKV, D) with BLOCK_TABLE[b, j // page_size] holding key j's page;
any page size works, since every key's address is formed on its own. Sequence b has
CACHE_SEQLENS[b] + num_new keys (or cache_len + num_new for all, without PER_SEQUENCE_LENGTHS; the
new ones were written into the cache before the launch);
keys past that are never read.

With SPLIT, program `split` takes the split-th of NUM_SPLITS equal BLOCK_N-aligned parts of its
sequence's keys and writes its rows' normalized partial output and base-2 lse (float32) to O_PART
and LSE_PART; `_attn_decode_combine` merges them in split order (deterministic). The parts are
cut from the sequence's own length, so with a fixed NUM_SPLITS a sequence's result does not
depend on the rest of the batch."""
import triton
import triton.language as tl

from fused_attn.kernels.scores import LN2, LOG2E, _cast, _dot, _finish_rows, _merge_sink, _scores


@triton.jit
def _attn_decode(
    Q, K_CACHE, V_CACHE, O, LSE, O_PART, LSE_PART, CACHE_SEQLENS, BLOCK_TABLE, CACHE_BATCH_IDX, ALIBI, SINKS, BIAS,
    stride_qb, stride_qh, stride_qm,
    stride_k_row, stride_kh, stride_kn,
    stride_v_row, stride_vh, stride_vn,
    stride_ob, stride_oh, stride_om,
    stride_block_table_b, stride_alibi_b, stride_bias_b, stride_bias_h, stride_bias_m, stride_bias_n,
    num_heads_q, num_heads_kv, group_size, seq_q, num_new, cache_len, num_splits,
    head_dim, head_dim_v, qk_scale_log2, window_left, window_right, softcap_in, softcap_out_log2,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    EMULATE_BF16: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    LIMIT_LEFT: tl.constexpr = False, LIMIT_RIGHT: tl.constexpr = False, HAS_ALIBI: tl.constexpr = False,
    HAS_SOFTCAP: tl.constexpr = False, HAS_SINKS: tl.constexpr = False, IS_PAGED: tl.constexpr = False,
    HAS_BATCH_IDX: tl.constexpr = False, SPLIT: tl.constexpr = False, PAGE_SIZE: tl.constexpr = 1,
    BIAS_KIND: tl.constexpr = 0, PER_SEQUENCE_LENGTHS: tl.constexpr = True,
):
    """stride_k_row / stride_v_row step a dense cache's rows or a paged cache's pages, stride_kn /
    stride_vn its positions or slots. LSE (B, HQ, SEQ_Q) float32 is written without SPLIT; O_PART
    (B, HQ, SEQ_Q, NUM_SPLITS, HEAD_DIM_V) and LSE_PART (B, HQ, SEQ_Q, NUM_SPLITS), contiguous,
    with it. BIAS (BIAS_KIND 1 float, 2 bool) is the user's mask (B, HQ, SEQ_Q, key position), by
    strides (0 where broadcast). PAGE_SIZE is a constexpr, so a power of two divides by shifts (one compile per page size)."""
    pid = tl.program_id(0)
    split = pid % num_splits
    rest = pid // num_splits
    num_m_tiles = tl.cdiv(group_size * seq_q, BLOCK_M)
    tile_m = rest % num_m_tiles
    batch_head_kv = rest // num_m_tiles
    batch = batch_head_kv // num_heads_kv
    head_kv = batch_head_kv % num_heads_kv
    if PER_SEQUENCE_LENGTHS:
        seq_k = tl.load(CACHE_SEQLENS + batch) + num_new
    else:  # one length for every sequence, passed by value (no tensor per call)
        seq_k = cache_len + num_new

    rows = tile_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < group_size * seq_q
    head = head_kv * group_size + rows // seq_q
    position = rows % seq_q
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    q_rows = batch.to(tl.int64) * stride_qb + head.to(tl.int64) * stride_qh + position.to(tl.int64) * stride_qm
    q = tl.load(Q + q_rows[:, None] + offs_d[None, :], mask=row_ok[:, None] & (offs_d[None, :] < head_dim), other=0.0)
    alibi_slope_log2 = 0.0
    if HAS_ALIBI:
        alibi_slope_log2 = (tl.load(ALIBI + batch * stride_alibi_b + head, mask=row_ok, other=0.0) * LOG2E)[:, None]

    bias_rows = 0  # each row's (batch, head) mask row; unused without a mask
    if BIAS_KIND != 0:
        bias_rows = BIAS + batch.to(tl.int64) * stride_bias_b + head[:, None].to(tl.int64) * stride_bias_h

    # This split's keys, cut to the band of the tile's query positions.
    keys_per_split = tl.cdiv(tl.cdiv(seq_k, num_splits), BLOCK_N) * BLOCK_N
    lo = split * keys_per_split
    hi = tl.minimum(seq_k, lo + keys_per_split)
    diagonal = seq_k - seq_q
    if LIMIT_RIGHT:
        last_position = tl.max(tl.where(row_ok, position, 0), 0)
        hi = tl.minimum(hi, tl.maximum(last_position + diagonal + window_right + 1, 0))
    if LIMIT_LEFT:
        first_position = tl.min(tl.where(row_ok, position, seq_q), 0)
        lo = tl.maximum(lo, tl.maximum(first_position + diagonal - window_left, 0) // BLOCK_N * BLOCK_N)

    if HAS_BATCH_IDX:
        cache_row = tl.load(CACHE_BATCH_IDX + batch).to(tl.int64)
    else:
        cache_row = batch.to(tl.int64)
    k_head = K_CACHE + head_kv.to(tl.int64) * stride_kh
    v_head = V_CACHE + head_kv.to(tl.int64) * stride_vh
    if not IS_PAGED:
        k_head += cache_row * stride_k_row
        v_head += cache_row * stride_v_row

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        key_ok = cols < seq_k  # past it the cache may hold anything (NaN): never read
        if IS_PAGED and PAGE_SIZE % BLOCK_N == 0:
            # Tiles start at multiples of BLOCK_N, so the whole tile lies in one page: one lookup.
            page = tl.load(BLOCK_TABLE + batch.to(tl.int64) * stride_block_table_b + start_n // PAGE_SIZE).to(tl.int64)
            slots = (start_n % PAGE_SIZE + offs_n).to(tl.int64)
            k_rows = page * stride_k_row + slots * stride_kn
            v_rows = page * stride_v_row + slots * stride_vn
        elif IS_PAGED:  # each key looks up its own page
            page = tl.load(BLOCK_TABLE + batch.to(tl.int64) * stride_block_table_b + cols // PAGE_SIZE,
                           mask=key_ok, other=0).to(tl.int64)
            k_rows = page * stride_k_row + (cols % PAGE_SIZE).to(tl.int64) * stride_kn
            v_rows = page * stride_v_row + (cols % PAGE_SIZE).to(tl.int64) * stride_vn
        else:
            k_rows = cols.to(tl.int64) * stride_kn
            v_rows = cols.to(tl.int64) * stride_vn
        k = tl.load(k_head + k_rows[:, None] + offs_d[None, :], mask=key_ok[:, None] & (offs_d[None, :] < head_dim),
                    other=0.0)
        s = _dot(q, tl.trans(k), tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), EMULATE_BF16, INPUT_PRECISION)
        qk, _ = _scores(s, position[:, None], cols[None, :], seq_q, seq_k, qk_scale_log2, softcap_in,
                        softcap_out_log2, alibi_slope_log2, bias_rows, stride_bias_m, stride_bias_n, window_left,
                        window_right, True, False, LIMIT_LEFT, LIMIT_RIGHT, BIAS_KIND, HAS_ALIBI, HAS_SOFTCAP)
        # As in the forward kernel: m never NaN (tl.max skips it), -inf rows subtract 0.
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        m_base = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(qk - m_base[:, None])
        alpha = tl.math.exp2(m_i - m_base)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_head + v_rows[:, None] + offs_dv[None, :],
                    mask=key_ok[:, None] & (offs_dv[None, :] < head_dim_v), other=0.0)
        acc = _dot(_cast(p, v.dtype, EMULATE_BF16), v, acc * alpha[:, None], EMULATE_BF16, INPUT_PRECISION)
        m_i = m_new

    row_index = (batch * num_heads_q + head).to(tl.int64) * seq_q + position  # (b, head, position)
    if HAS_SINKS:  # never with SPLIT: the combine kernel merges the sink
        sink_log2 = tl.load(SINKS + head, mask=row_ok, other=float("-inf")) * LOG2E
        acc, l_i, m_i = _merge_sink(acc, l_i, m_i, sink_log2)
    out, lse_log2 = _finish_rows(acc, l_i, m_i)
    if SPLIT:  # float32 partials in base 2; the sinks join in the combine kernel
        part = row_index * num_splits + split
        tl.store(O_PART + part[:, None] * head_dim_v + offs_dv[None, :], out,
                 mask=row_ok[:, None] & (offs_dv[None, :] < head_dim_v))
        tl.store(LSE_PART + part, lse_log2, mask=row_ok)
    else:
        o_rows = batch.to(tl.int64) * stride_ob + head.to(tl.int64) * stride_oh + position.to(tl.int64) * stride_om
        tl.store(O + o_rows[:, None] + offs_dv[None, :], _cast(out, O.dtype.element_ty, EMULATE_BF16),
                 mask=row_ok[:, None] & (offs_dv[None, :] < head_dim_v))
        tl.store(LSE + row_index, lse_log2 * LN2, mask=row_ok)


@triton.jit
def _attn_decode_combine(
    O_PART, LSE_PART, O, LSE, SINKS,
    stride_ob, stride_oh, stride_om,
    num_heads_q, seq_q, num_splits, head_dim_v,
    BLOCK_SPLITS: tl.constexpr, BLOCK_DV: tl.constexpr, EMULATE_BF16: tl.constexpr, HAS_SINKS: tl.constexpr = False,
):
    """One program merges the NUM_SPLITS partial results of one (batch, query head, position) row:
    o = sum_s w_s o_s / sum_s w_s with w_s = exp2(lse_s - max lse), in a fixed order, and the sink
    (HAS_SINKS) as one more part with a zero output."""
    row = tl.program_id(0)
    position = row % seq_q
    batch_head = row // seq_q
    head = batch_head % num_heads_q
    batch = batch_head // num_heads_q
    splits = tl.arange(0, BLOCK_SPLITS)
    split_ok = splits < num_splits
    offs_dv = tl.arange(0, BLOCK_DV)
    parts = row.to(tl.int64) * num_splits + splits
    lse_log2 = tl.load(LSE_PART + parts, mask=split_ok, other=float("-inf"))
    o_part = tl.load(O_PART + parts[:, None] * head_dim_v + offs_dv[None, :],
                     mask=split_ok[:, None] & (offs_dv[None, :] < head_dim_v), other=0.0)
    m = tl.max(lse_log2, 0)  # skips NaN; a NaN part still makes its weight NaN below
    if HAS_SINKS:
        sink_log2 = tl.load(SINKS + head) * LOG2E
        m = tl.maximum(m, sink_log2)
    m_base = tl.where(m == float("-inf"), 0.0, tl.where(m == float("inf"), float("nan"), m))
    weight = tl.where(lse_log2 == float("-inf"), 0.0, tl.math.exp2(lse_log2 - m_base))
    total = tl.sum(weight, 0)
    if HAS_SINKS:
        total += tl.where(sink_log2 == float("-inf"), 0.0, tl.math.exp2(sink_log2 - m_base))
    out = tl.sum(weight[:, None] * o_part, 0)
    has_key = total != 0.0
    total_safe = tl.where(has_key, total, 1.0)
    lse = tl.where(has_key, (m + tl.math.log2(total_safe)) * LN2, float("-inf"))
    lse = tl.where(m == float("inf"), float("inf"), lse)
    o_row = batch.to(tl.int64) * stride_ob + head.to(tl.int64) * stride_oh + position.to(tl.int64) * stride_om
    tl.store(O + o_row + offs_dv, _cast(out / total_safe, O.dtype.element_ty, EMULATE_BF16), mask=offs_dv < head_dim_v)
    tl.store(LSE + row, lse)
