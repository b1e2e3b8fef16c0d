"""Where the tiles of the attention kernels are (notation in fused_attn.kernels.attention):
which query tile and sequence a program takes, the base pointer of a (batch, head) matrix,
the keys and values a loop streams, and the load of a tile that reads zeros past a
matrix's ends (masked, or a TMA box)."""
import triton
import triton.language as tl


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
def _head_base(ptr, batch, head, stride_batch, stride_head, first_row=0, stride_row=0):
    """Address of row `first_row` of the (batch, head) matrix of a (batch, head, row, ...) tensor, in
    64-bit offsets (the tensor may hold more than 2**31 elements)."""
    base = ptr + batch.to(tl.int64) * stride_batch + head.to(tl.int64) * stride_head
    return base + tl.cast(first_row, tl.int64) * stride_row


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
def _load_tile(ptrs, desc, start, rows, cols, num_rows, num_cols,
               MASKED: tl.constexpr, EVEN_COLS: tl.constexpr, USE_TMA: tl.constexpr):
    """The tile of rows `rows` (the first is `start`) and columns `cols` of a (num_rows, num_cols)
    matrix, with zeros past its end (0 * garbage could be NaN in the dots). Read from
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
