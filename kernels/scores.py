"""What every attention kernel computes on a tile of scores (notation in
fused_attn.kernels.attention): the dots, softcap, ALiBi, the user's bias or bool mask, the
band of keys a query sees (and which tiles need its mask), dropout's keep mask, and the
probabilities from a row's lse."""
import triton
import triton.language as tl

from fused_attn.kernels.tiles import _head_base

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
def _score_inputs(BIAS, ALIBI, batch, head, stride_bias_b, stride_bias_h, stride_alibi_b,
                  BIAS_KIND: tl.constexpr, HAS_ALIBI: tl.constexpr):
    """(bias_base, alibi_slope_log2): what _scores reads for one (batch, query head). BIAS and
    ALIBI are None when their flag is off (then bias_base is an unused 0: a jit function cannot
    return None)."""
    bias_base = 0
    if BIAS_KIND != 0:
        bias_base = _head_base(BIAS, batch, head, stride_bias_b, stride_bias_h)
    alibi_slope_log2 = 0.0
    if HAS_ALIBI:
        alibi_slope_log2 = tl.load(ALIBI + batch * stride_alibi_b + head) * LOG2E
    return bias_base, alibi_slope_log2


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
def _merge_sink(acc, l_i, m_i, sink_log2):
    """(acc, l, m) of rows after one more key with base-2 score `sink_log2` and a zero value (an
    attention sink), merged last into the online softmax. -inf == -inf (no key and a -inf sink)
    and +inf == +inf keep the rescale finite; a NaN sink or m propagates."""
    m_sink = tl.maximum(m_i, sink_log2)
    alpha = tl.where(m_i == m_sink, 1.0, tl.math.exp2(m_i - m_sink))
    l_i = l_i * alpha + tl.where(sink_log2 == float("-inf"), 0.0, tl.math.exp2(sink_log2 - m_sink))
    return acc * alpha[:, None], l_i, m_sink


@triton.jit
def _finish_rows(acc, l_i, m_i):
    """(o, lse_log2) of rows from the online softmax's accumulator, sum and max. A row with no
    visible key returns 0 and an lse of -inf: the band and the mask leave it l = 0 exactly (p = 0
    everywhere), while a visible key gives l >= 1 and a NaN score makes l NaN, never 0, so a NaN
    is not mistaken for "no key" and propagates (o and lse NaN); a +inf score gives NaN and lse
    +inf, as torch does. (One corner: visible keys whose scores are all exactly -inf count as no
    key here, where torch's softmax gives NaN.) o is 0 for a row without keys unless 0 * (NaN or
    inf in v), as in torch."""
    has_key = l_i != 0.0
    l_safe = tl.where(has_key, l_i, 1.0)
    lse_log2 = tl.where(has_key, m_i + tl.math.log2(l_safe), float("-inf"))
    lse_log2 = tl.where(m_i == float("inf"), float("inf"), lse_log2)
    return acc / l_safe[:, None], lse_log2
