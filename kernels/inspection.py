"""Kernels that show what the attention computed, from the lse the forward returned
(notation in fused_attn.kernels.attention): the dropout mask, the probabilities of chosen
rows, each row's lse, entropy and largest probability, and the attention each key
receives."""
import triton
import triton.language as tl

from fused_attn.kernels.scores import (
    LN2, LOG2E, _dot, _dropout_keep, _key_range, _probs, _query_range, _score_inputs, _scores,
)
from fused_attn.kernels.tiles import _head_base


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
                                                stride_alibi_b, BIAS_KIND, HAS_ALIBI)
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
                                                stride_alibi_b, BIAS_KIND, HAS_ALIBI)
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
                                                stride_alibi_b, BIAS_KIND, HAS_ALIBI)
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
