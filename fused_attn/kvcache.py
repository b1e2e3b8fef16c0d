"""Attention over a KV cache, for generation: dense or paged caches, new keys appended in place,
and the keys of long sequences split over several programs (split-KV) when one program per
(sequence, k/v head) cannot fill the GPU."""
from __future__ import annotations

import torch

from fused_attn import _launch
from fused_attn._checks import (MAX_HEAD_DIM, SUPPORTED_DTYPES, check_alibi_slopes, check_attn_mask, check_flag,
                                check_scale, check_sinks, check_softcap, check_window)
from fused_attn._launch import MAX_DECODE_SPLITS, AttentionParams, KVCache, check_device


def attention_with_kvcache(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           k: torch.Tensor | None = None, v: torch.Tensor | None = None, *,
                           cache_seqlens: torch.Tensor | int, block_table: torch.Tensor | None = None,
                           cache_batch_idx: torch.Tensor | None = None, causal: bool = False,
                           scale: float | None = None, attn_mask: torch.Tensor | None = None, window: tuple[int, int] | None = None,
                           alibi_slopes: torch.Tensor | None = None, softcap: float = 0.0,
                           sinks: torch.Tensor | None = None, num_splits: int | None = None,
                           return_lse: bool = False, check_values: bool | None = None
                           ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Attention of new queries over the keys and values in a KV cache (inference: no gradient).

    Args:
        q: (B, Hq, Sq, D): Sq >= 1 new queries per sequence (1 for a decoding step; more for
            speculative tokens or a chunk of a prefill).
        k_cache, v_cache: dense, (B_cache, Hkv, capacity, D) and (B_cache, Hkv, capacity, Dv), any
            strides with a unit last stride; or paged (block_table given), (num_pages, page_size,
            Hkv, D) and (num_pages, page_size, Hkv, Dv), any page size.
        k, v: optional (B, Hkv, S_new, D) and (B, Hkv, S_new, Dv): written into the cache in place at
            positions cache_seqlens[b] .. cache_seqlens[b] + S_new - 1, before attending; nothing
            else in the cache is written.
        cache_seqlens: int32 (B,) (or one int for all): keys already in the cache per sequence.
            Sequence b attends to its first cache_seqlens[b] + S_new keys; entries past them are
            never read.
        block_table: int32 (B, pages_per_seq): paged mode; key j of sequence b lives in page
            block_table[b, j // page_size], slot j % page_size.
        cache_batch_idx: int32 (B,): the dense cache row of each sequence (default: row b).
        causal, scale, window, alibi_slopes, softcap, sinks: as in `fused_attn.attention`, with the
            band aligned bottom-right to the cache_seqlens[b] + S_new keys (query i sits at key
            position cache_seqlens[b] + S_new - Sq + i).
        attn_mask: optional bool (True attends) or float (added to the scaled scores), broadcastable
            to (B, Hq, Sq, capacity) and indexed by key position in the sequence (capacity: the
            dense cache's length, or pages per sequence x page size), e.g. a padding mask. Read
            tile by tile for the keys each sequence has; it gets no gradient.
        num_splits: parts each sequence's keys are cut into, merged in a fixed order by a second
            kernel. None: chosen from the shapes and the GPU (1 on the CPU); 1: no split. Results
            of one sequence depend only on its own inputs and num_splits: pass a fixed num_splits
            for batch invariance (the default depends on the batch size).
        return_lse: also return the lse (B, Hq, Sq) float32.
        check_values: check the values of cache_seqlens, block_table and cache_batch_idx
            (capacity, page range, row range) before launching. Reading them on a GPU waits for
            the device, so None checks them on the CPU only; True checks them on a GPU too.
            Unchecked bad values read or write the wrong cache entries.

    Returns:
        o (B, Hq, Sq, Dv) in q's dtype [, lse (B, Hq, Sq) float32]. A sequence with no key returns
        zeros and an lse of -inf (or the sink).
    """
    check_flag("causal", causal)
    check_flag("return_lse", return_lse)
    if check_values is not None:
        check_flag("check_values", check_values)
    paged = block_table is not None
    _check_tensor("q", q, 4, "(B, Hq, Sq, D)")
    batch, heads_q, seq_q, head_dim = q.shape
    if q.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"q has dtype {q.dtype}; expected float16, bfloat16 or float32")
    layout = "(num_pages, page_size, Hkv, {})" if paged else "(B_cache, Hkv, capacity, {})"
    _check_tensor("k_cache", k_cache, 4, layout.format("D"), q)
    _check_tensor("v_cache", v_cache, 4, layout.format("Dv"), q)
    head_axis = 2 if paged else 1
    heads_kv = k_cache.shape[head_axis]
    if v_cache.shape[:3] != k_cache.shape[:3]:
        raise ValueError(f"v_cache must match k_cache in its first three dimensions {tuple(k_cache.shape[:3])}, "
                         f"got {tuple(v_cache.shape)}")
    if k_cache.shape[3] != head_dim:
        raise ValueError(f"k_cache must have q's head dim {head_dim}, got {k_cache.shape[3]}")
    head_dim_v = v_cache.shape[3]
    if heads_kv == 0 or heads_q % heads_kv != 0:
        raise ValueError(f"q's heads ({heads_q}) must be a multiple of the cache's k/v heads ({heads_kv})")
    for name, dim in (("q/k head dim", head_dim), ("v head dim", head_dim_v)):
        if not 1 <= dim <= MAX_HEAD_DIM:
            raise ValueError(f"the {name} must be between 1 and {MAX_HEAD_DIM}, got {dim}")
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        if t.stride(-1) != 1 and t.shape[-1] > 1:
            raise ValueError(f"{name} must have a unit stride in its last dimension, got strides {t.stride()}")
    num_new = _check_new_keys(k, v, batch, heads_kv, head_dim, head_dim_v, q)
    seqlens = _check_index("cache_seqlens", cache_seqlens, (batch,), q)
    if paged:
        block_table = _check_index("block_table", block_table, (batch, None), q)
        if cache_batch_idx is not None:
            raise ValueError("cache_batch_idx selects rows of a dense cache; with block_table, give each "
                             "sequence its pages there instead")
    elif cache_batch_idx is not None:
        cache_batch_idx = _check_index("cache_batch_idx", cache_batch_idx, (batch,), q)
    cache = KVCache(k_cache, v_cache, seqlens, num_new, block_table, cache_batch_idx)
    if check_values or (check_values is None and not q.is_cuda):
        _check_cache_values(cache)

    scale = check_scale(scale, head_dim)
    bias = check_attn_mask(attn_mask, q, seq_k=cache.capacity)
    window_left, window_right = check_window(window, causal)
    slopes = check_alibi_slopes(alibi_slopes, batch, heads_q, q.device)
    softcap = check_softcap(softcap, scale)
    sinks = check_sinks(sinks, heads_q, q.device)
    if num_splits is not None and (isinstance(num_splits, bool) or not isinstance(num_splits, int)):
        raise TypeError(f"num_splits must be an int or None, got {type(num_splits).__name__}")
    if num_splits is not None and not 1 <= num_splits <= MAX_DECODE_SPLITS:
        raise ValueError(f"num_splits must be between 1 and {MAX_DECODE_SPLITS}, got {num_splits}")
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (q, k, v, slopes, sinks, attn_mask)):
        raise ValueError("attention_with_kvcache has no backward: call it under torch.no_grad() or "
                         "torch.inference_mode(), or use fused_attn.attention for training")
    check_device(q, max(head_dim, head_dim_v))

    if num_new:
        _append(cache, k, v)
    if num_splits is None:
        num_splits = _launch.decode_splits(batch, heads_kv, heads_q // heads_kv * seq_q, cache, q)
    params = AttentionParams(scale=scale, window_left=window_left, window_right=window_right, softcap=softcap,
                             bias=bias, alibi_slopes=slopes, sinks=sinks)
    o, lse = _launch.attention_decode(q, cache, params, num_splits)
    return (o, lse) if return_lse else o


def _check_tensor(name: str, t: object, dims: int, shape: str, like: torch.Tensor | None = None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != dims:
        raise ValueError(f"{name} must have {dims} dimensions {shape}, got shape {tuple(t.shape)}")
    if like is not None and t.dtype != like.dtype:
        raise TypeError(f"{name} must have q's dtype {like.dtype}, got {t.dtype}")
    if like is not None and t.device != like.device:
        raise ValueError(f"{name} must be on q's device {like.device}, got {t.device}")


def _check_new_keys(k: torch.Tensor | None, v: torch.Tensor | None, batch: int, heads_kv: int, head_dim: int,
                    head_dim_v: int, q: torch.Tensor) -> int:
    """S_new, the number of new keys per sequence (0 without k and v)."""
    if (k is None) != (v is None):
        raise ValueError("k and v must be given together (the new keys and their values), or neither")
    if k is None:
        return 0
    _check_tensor("k", k, 4, "(B, Hkv, S_new, D)", q)
    _check_tensor("v", v, 4, "(B, Hkv, S_new, Dv)", q)
    for name, t, dim in (("k", k, head_dim), ("v", v, head_dim_v)):
        expected = (batch, heads_kv, k.shape[2], dim)
        if tuple(t.shape) != expected:
            raise ValueError(f"{name} must have shape (B, Hkv, S_new, {'D' if name == 'k' else 'Dv'}) = {expected}, "
                             f"got {tuple(t.shape)}")
    return k.shape[2]


def _check_index(name: str, t: object, shape: tuple[int | None, ...], q: torch.Tensor) -> torch.Tensor | int:
    """An int32 index tensor of `shape` (None: any size) on q's device, contiguous (the kernel reads
    it through a raw pointer). cache_seqlens may also be one int for every sequence, which the
    kernel takes by value (no tensor per call, as in a decoding loop)."""
    if name == "cache_seqlens" and isinstance(t, int) and not isinstance(t, bool):
        if not 0 <= t < 2**31:
            raise ValueError(f"cache_seqlens must be >= 0 (and fit int32), got {t}")
        return t
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be an int32 torch.Tensor, got {type(t).__name__}")
    if t.dtype != torch.int32:
        raise TypeError(f"{name} must have dtype int32, got {t.dtype}")
    if t.dim() != len(shape) or any(want is not None and got != want for got, want in zip(t.shape, shape)):
        wanted = ", ".join("any" if want is None else str(want) for want in shape)
        raise ValueError(f"{name} must have shape ({wanted}), got {tuple(t.shape)}")
    if t.device != q.device:
        raise ValueError(f"{name} must be on q's device {q.device}, got {t.device}")
    return t.contiguous()


def _check_cache_values(cache: KVCache) -> None:
    """The checks that read the index tensors' values (a device sync on a GPU)."""
    # One length for all broadcasts like a (1,) tensor below.
    seqlens = cache.seqlens.cpu() if isinstance(cache.seqlens, torch.Tensor) else torch.tensor([cache.seqlens])
    if seqlens.numel() and int(seqlens.min()) < 0:
        raise ValueError(f"cache_seqlens must be >= 0, got {seqlens.tolist()}")
    if seqlens.numel() and int(seqlens.max()) + cache.num_new > cache.capacity:
        raise ValueError(f"cache_seqlens + S_new must be at most the cache's capacity of {cache.capacity} keys per "
                         f"sequence, got up to {int(seqlens.max())} + {cache.num_new}")
    if cache.block_table is not None:
        page_size, num_pages = cache.k.shape[1], cache.k.shape[0]
        used = (seqlens + cache.num_new + page_size - 1) // page_size  # pages each sequence reads
        table = cache.block_table.cpu()
        in_use = torch.arange(table.shape[1])[None, :] < used[:, None]
        bad = in_use & ((table < 0) | (table >= num_pages))
        if bad.any():
            row, col = (int(i) for i in bad.nonzero()[0])
            raise ValueError(f"block_table[{row}, {col}] = {int(table[row, col])} is not a page of the cache "
                             f"(0 to {num_pages - 1})")
    if cache.batch_idx is not None:
        rows = cache.batch_idx.cpu()
        if rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= cache.k.shape[0]):
            raise ValueError(f"cache_batch_idx must hold rows of the cache (0 to {cache.k.shape[0] - 1}), "
                             f"got {rows.tolist()}")


def _append(cache: KVCache, k: torch.Tensor, v: torch.Tensor) -> None:
    """Write k and v (B, Hkv, S_new, D / Dv) into the cache at each sequence's next positions."""
    batch, _, num_new, _ = k.shape
    first = cache.seqlens.long()[:, None] if isinstance(cache.seqlens, torch.Tensor) else cache.seqlens
    positions = (first + torch.arange(num_new, device=k.device)).expand(batch, num_new)  # (B, S_new)
    new_k, new_v = k.transpose(1, 2), v.transpose(1, 2)  # (B, S_new, Hkv, D): the indexed shape below
    if cache.block_table is not None:
        page_size = cache.k.shape[1]
        pages = cache.block_table.long().gather(1, positions // page_size)
        slots = positions % page_size
        cache.k[pages, slots] = new_k
        cache.v[pages, slots] = new_v
    else:
        rows = torch.arange(batch, device=k.device) if cache.batch_idx is None else cache.batch_idx.long()
        rows = rows[:, None].expand(batch, num_new)
        cache.k[rows, :, positions] = new_k
        cache.v[rows, :, positions] = new_v
