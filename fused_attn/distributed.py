"""Context parallelism: exact attention over a sequence sharded across the ranks of a
torch.distributed group, with fused_attn's kernels as the local engine. No communication layer
of its own: collectives and point-to-point sends of torch.distributed (NCCL on GPUs, gloo on CPU).

Every rank holds one piece of q, k and v along the sequence (dimension 2 of (B, H, S, D)):
- layout "contiguous": rank r holds positions [r * S/P, (r + 1) * S/P);
- layout "zigzag": the sequence is cut into 2P chunks and rank r holds chunks r and 2P - 1 - r,
  so that under a causal mask every rank has the same amount of work.

Methods:
- "ring": K/V blocks travel around the ring (asynchronous send/receive overlapped with the
  kernels on the current block); partial results merge exactly through their lse. The backward
  sends K/V with their dK/dV accumulators around the ring once more. Memory per rank O(S / P).
  Pairs of blocks that causal masking or a window leaves empty are skipped.
- "allgather": K/V are all-gathered (Llama 3's context parallelism) and each rank attends its
  queries to the keys they see; the backward reduce-scatters dK/dV. Windows skip what they hide,
  and packed sequences (cu_seqlens over the whole sequence, spanning ranks) run as varlen.
- "ulysses": all-to-all from sequence shards to head shards, attention over the whole sequence on
  Hq / P query heads and Hkv / P k/v heads, all-to-all back. Both head counts must divide by P.

Results are deterministic for a given group size (fixed order everywhere, no atomics).
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn

from fused_attn import _launch
from fused_attn._checks import check_attention_inputs, check_flag, check_sinks, check_softcap, check_window
from fused_attn._launch import AttentionParams, check_device
from fused_attn.api import attention, attention_varlen

METHODS = ("ring", "allgather", "ulysses")
LAYOUTS = ("contiguous", "zigzag")


def _world(group: dist.ProcessGroup | None) -> tuple[int, int]:
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError("torch.distributed is not initialized: call torch.distributed.init_process_group first")
    return dist.get_world_size(group), dist.get_rank(group)


def _check_choice(name: str, value: object, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(repr(c) for c in choices)}, got {value!r}")
    return value  # type: ignore[return-value]


def chunk_ranges(seq_local: int, world: int, rank: int, layout: str) -> list[tuple[int, int]]:
    """(global start, length) of the pieces `rank` holds, in the order it stores them, when each
    rank holds `seq_local` positions."""
    if layout == "contiguous":
        return [(rank * seq_local, seq_local)]
    half = seq_local // 2
    return [(rank * half, half), ((2 * world - 1 - rank) * half, half)]


def _check_divisible(seq: int, world: int, layout: str, what: str) -> None:
    parts = world if layout == "contiguous" else 2 * world
    if seq % parts:
        raise ValueError(f"{what} ({seq}) must divide into {parts} equal parts for layout={layout!r} over {world} "
                         f"ranks")


def shard_sequence(x: torch.Tensor, *, group: dist.ProcessGroup | None = None, layout: str = "contiguous",
                   dim: int = 2) -> torch.Tensor:
    """This rank's piece of the full tensor x along `dim` (default 2: (B, H, S, D)), as laid out by
    `layout`. Every rank passes the same x; nothing is communicated."""
    _check_choice("layout", layout, LAYOUTS)
    world, rank = _world(group)
    _check_divisible(x.shape[dim], world, layout, "the sequence length")
    pieces = chunk_ranges(x.shape[dim] // world, world, rank, layout)
    return torch.cat([x.narrow(dim, start, length) for start, length in pieces], dim)


def gather_sequence(x_local: torch.Tensor, *, group: dist.ProcessGroup | None = None, layout: str = "contiguous",
                    dim: int = 2) -> torch.Tensor:
    """The full tensor from every rank's piece along `dim`, in sequence order, on every rank (for
    checks and logging: no gradient flows through it)."""
    _check_choice("layout", layout, LAYOUTS)
    world, _ = _world(group)
    if layout == "zigzag" and x_local.shape[dim] % 2:
        raise ValueError(f"layout='zigzag' pieces hold two equal chunks: the local length ({x_local.shape[dim]}) "
                         "must be even")
    gathered = [torch.empty_like(x_local) for _ in range(world)]
    dist.all_gather(gathered, x_local.contiguous(), group=group)
    return _in_sequence_order(gathered, layout, dim)


def _in_sequence_order(pieces: list[torch.Tensor] | tuple[torch.Tensor, ...], layout: str, dim: int) -> torch.Tensor:
    """Concatenate each rank's piece (rank order) into sequence order (differentiable)."""
    world, seq_local = len(pieces), pieces[0].shape[dim]
    chunks = []
    for rank, piece in enumerate(pieces):
        offset = 0
        for start, length in chunk_ranges(seq_local, world, rank, layout):
            chunks.append((start, piece.narrow(dim, offset, length)))
            offset += length
    return torch.cat([chunk for _, chunk in sorted(chunks, key=lambda item: item[0])], dim)


def _pieces_at(x: torch.Tensor, ranges: list[tuple[int, int]], dim: int) -> torch.Tensor:
    """The positions `ranges` of a tensor in sequence order, concatenated (differentiable)."""
    return torch.cat([x.narrow(dim, start, length) for start, length in ranges], dim)


@dataclass(frozen=True)
class _Block:
    """What one query chunk sees of one key chunk: rows [row_lo, row_hi) of the query chunk attend
    to keys [key_lo, key_hi) of the key chunk under the kernels' bottom-right band `window`
    (left, right; -1 unbounded), which equals the global band at these offsets."""
    row_lo: int
    row_hi: int
    key_lo: int
    key_hi: int
    window: tuple[int, int]


def _visible_block(q_start: int, q_len: int, k_start: int, k_len: int, left: int, right: int) -> _Block | None:
    """The part of a (query chunk, key chunk) pair inside the band q + left >= k >= q - ... in
    global positions (query i sees key j when i - left <= j <= i + right, -1 unbounded), or None
    when no query sees a key. The rows and keys are trimmed to those that take part, which makes
    both window sides of the local call non-negative (the kernels' band is aligned bottom-right:
    row r of the call sits at key r + Sk - Sq of the call)."""
    k_end = k_start + k_len
    key_lo = k_start if left < 0 else max(k_start, q_start - left)
    key_hi = k_end if right < 0 else min(k_end, q_start + q_len + right)
    if key_lo >= key_hi:
        return None
    row_lo = 0 if right < 0 else max(0, key_lo - right - q_start)
    row_hi = q_len if left < 0 else min(q_len, key_hi + left - q_start)
    if row_lo >= row_hi:
        return None
    shift = key_hi - (q_start + row_hi)  # the call's diagonal minus the global one
    window = (-1 if left < 0 else left + shift, -1 if right < 0 else right - shift)
    return _Block(row_lo, row_hi, key_lo - k_start, key_hi - k_start, window)


def _check_same_everywhere(group: dist.ProcessGroup | None, values: list[int], what: str) -> None:
    """Raise the same ValueError on every rank when the ranks disagree on `values`: one small
    all-gather of fixed size, so a mismatch cannot hang the collectives that follow."""
    world, _ = _world(group)
    mine = torch.tensor(values, dtype=torch.int64)
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" else "cpu"
    mine = mine.to(device)
    everyone = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(everyone, mine, group=group)
    rows = [tuple(t.tolist()) for t in everyone]
    if len(set(rows)) > 1:
        raise ValueError(f"the ranks disagree on {what}: {rows}")


def context_parallel_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                               group: dist.ProcessGroup | None = None, method: str = "ring",
                               layout: str = "contiguous", causal: bool = False, scale: float | None = None,
                               window: tuple[int, int] | None = None, softcap: float = 0.0,
                               sinks: torch.Tensor | None = None, cu_seqlens: torch.Tensor | None = None,
                               return_lse: bool = False, check_ranks: bool = True
                               ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Attention over a sequence sharded across `group` (see the module docstring).

    Args:
        q: (B, Hq, S_local, D), k: (B, Hkv, S_local, D), v: (B, Hkv, S_local, Dv): this rank's
            pieces (`shard_sequence`), the same S_local on every rank (even for "zigzag").
        group: the process group (default: the world); any group or DeviceMesh dimension's group.
        method: "ring", "allgather" or "ulysses".
        layout: "contiguous" or "zigzag" (causal load balance).
        causal, scale, window, softcap, sinks: as in `fused_attn.attention`, over the whole
            sequence (causal is aligned on the global positions; S_q = S_k).
        cu_seqlens: packed sequences ("allgather" only): int32 (num_seqs + 1,), where each sequence
            starts in the whole (global) sequence, then its length S; B must be 1. A query sees only
            its own sequence's keys, wherever they are sharded; causal and windows align per
            sequence. The same on every rank.
        return_lse: also return this rank's lse (B, Hq, S_local) float32.
        check_ranks: first compare the call across ranks (one small all-gather, and a wait for its
            result on the host), so that ranks that disagree raise instead of hanging. Pass False
            in a loop whose calls are known to agree (after its first step) to save that wait.

    Returns:
        This rank's piece of the output, (B, Hq, S_local, Dv) (`gather_sequence` gives the whole),
        differentiable for q, k, v and the sinks. The sinks' gradient on a rank is its own queries'
        share, like any replicated parameter's (a data-parallel all-reduce sums the ranks').

    Every rank must make the same call; bad input raises the same ValueError on every rank.
    """
    _check_choice("method", method, METHODS)
    _check_choice("layout", layout, LAYOUTS)
    check_flag("causal", causal)
    check_flag("return_lse", return_lse)
    world, _ = _world(group)
    scale = check_attention_inputs(q, k, v, scale)
    if q.shape[2] != k.shape[2]:
        raise ValueError(f"q and k must hold the same positions of one sequence: got {q.shape[2]} queries and "
                         f"{k.shape[2]} keys on this rank")
    left, right = check_window(window, causal)
    softcap = check_softcap(softcap, scale)
    sinks = check_sinks(sinks, q.shape[1], q.device)
    check_device(q, max(q.shape[3], v.shape[3]))
    bounds = None if cu_seqlens is None else _check_cu_seqlens(cu_seqlens, q, world, method)
    packing = [0, 0] if bounds is None else [len(bounds), sum((i + 1) * b for i, b in enumerate(bounds)) % 2**61]
    check_flag("check_ranks", check_ranks)
    if check_ranks:
        _check_same_everywhere(group, [*q.shape, *k.shape, *v.shape, METHODS.index(method), LAYOUTS.index(layout),
                                       int(causal), left, right, *packing],
                               "the shapes of q, k, v, the method, layout, mask and cu_seqlens")
    if layout == "zigzag" and q.shape[2] % 2:
        raise ValueError(f"layout='zigzag' pieces hold two equal chunks: the local length ({q.shape[2]}) must be even")
    if method == "ulysses" and (q.shape[1] % world or k.shape[1] % world):
        raise ValueError(f"method='ulysses' shards heads over the {world} ranks: q's heads ({q.shape[1]}) and k's "
                         f"heads ({k.shape[1]}) must both divide by {world}; use 'ring' or 'allgather'")
    options = {"scale": scale, "softcap": softcap}
    if method == "ulysses":
        o, lse = _ulysses(q, k, v, group, layout, causal, window, sinks, options)
    elif method == "allgather":
        o, lse = _allgather(q, k, v, group, layout, left, right, sinks, options, bounds)
    else:
        o, lse = _RingAttention.apply(q, k, v, sinks, group, layout, (left, right), scale, softcap)
    return (o, lse) if return_lse else o


# ----------------------------------------------------------------------------------------------
# all-gather


def _check_cu_seqlens(cu_seqlens: torch.Tensor, q: torch.Tensor, world: int, method: str) -> list[int]:
    if method != "allgather":
        raise ValueError(f"packed sequences (cu_seqlens) need method='allgather', got method={method!r}")
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dtype != torch.int32 or cu_seqlens.dim() != 1:
        raise TypeError("cu_seqlens must be a 1-D int32 tensor of sequence boundaries")
    if q.shape[0] != 1:
        raise ValueError(f"packed sequences lie along one row: q's batch must be 1, got {q.shape[0]}")
    bounds = cu_seqlens.tolist()
    total = q.shape[2] * world
    if len(bounds) < 2 or bounds[0] != 0 or bounds[-1] != total or any(b > c for b, c in zip(bounds, bounds[1:])):
        raise ValueError(f"cu_seqlens must rise from 0 to the whole sequence's length {total}, got {bounds}")
    return bounds


def _allgather(q, k, v, group, layout, left, right, sinks, options, bounds=None):
    world, rank = _world(group)
    seq_local = q.shape[2]
    k_full = _in_sequence_order(dist_fn.all_gather(k, group=group), layout, 2)
    v_full = _in_sequence_order(dist_fn.all_gather(v, group=group), layout, 2)
    if bounds is not None:
        return _allgather_packed(q, k_full, v_full, chunk_ranges(seq_local, world, rank, layout), bounds, left, right,
                                 sinks, options)
    outputs, lses, offset = [], [], 0
    for start, length in chunk_ranges(seq_local, world, rank, layout):
        q_chunk = q[:, :, offset:offset + length]
        offset += length
        block = _visible_block(start, length, 0, k_full.shape[2], left, right)
        outputs.append(_rows_of(q_chunk, v, sinks, block, lambda b: attention(
            q_chunk[:, :, b.row_lo:b.row_hi], k_full[:, :, b.key_lo:b.key_hi], v_full[:, :, b.key_lo:b.key_hi],
            window=_window_or_none(b.window), sinks=sinks, return_lse=True, **options)))
    return torch.cat([o for o, _ in outputs], 2), torch.cat([lse for _, lse in outputs], 2)


def _allgather_packed(q, k_full, v_full, chunks, bounds, left, right, sinks, options):
    """Packed sequences over the gathered keys: each (local chunk, sequence) overlap is a segment
    whose visible rows attend to the keys of its own sequence that their band reaches. Segments
    with the same local band go through one attention_varlen call."""
    segments = []  # (first local row, last local row + 1, first key, last key + 1, window)
    offset = 0
    for start, length in chunks:
        for seq_start, seq_end in zip(bounds[:-1], bounds[1:]):
            rows_start, rows_end = max(seq_start, start), min(seq_end, start + length)
            if rows_start >= rows_end:
                continue
            block = _visible_block(rows_start, rows_end - rows_start, seq_start, seq_end - seq_start, left, right)
            if block is not None:
                first = offset + rows_start - start
                segments.append((first + block.row_lo, first + block.row_hi, seq_start + block.key_lo,
                                 seq_start + block.key_hi, block.window))
        offset += length
    batch, heads, seq_local = q.shape[0], q.shape[1], q.shape[2]
    pieces: list[tuple[int, torch.Tensor, torch.Tensor]] = []  # (first local row, o, lse) per segment
    for window in sorted({segment[4] for segment in segments}):
        group = [segment for segment in segments if segment[4] == window]
        packed_q = torch.cat([q[0, :, r0:r1].transpose(0, 1) for r0, r1, _, _, _ in group])
        packed_k = torch.cat([k_full[0, :, k0:k1].transpose(0, 1) for _, _, k0, k1, _ in group])
        packed_v = torch.cat([v_full[0, :, k0:k1].transpose(0, 1) for _, _, k0, k1, _ in group])
        rows = [r1 - r0 for r0, r1, _, _, _ in group]
        keys = [k1 - k0 for _, _, k0, k1, _ in group]
        cu_q = torch.tensor([0, *itertools.accumulate(rows)], dtype=torch.int32, device=q.device)
        cu_k = torch.tensor([0, *itertools.accumulate(keys)], dtype=torch.int32, device=q.device)
        o, lse = attention_varlen(packed_q, packed_k, packed_v, cu_q, cu_k, max(rows), max(keys),
                                  window=_window_or_none(window), sinks=sinks, return_lse=True, **options)
        for (r0, r1, _, _, _), first in zip(group, cu_q.tolist()):
            pieces.append((r0, o[first:first + r1 - r0].transpose(0, 1)[None], lse[:, first:first + r1 - r0][None]))
    empty_o = q.new_zeros(batch, heads, seq_local, v_full.shape[3])
    empty_lse = torch.full((batch, heads, seq_local), -math.inf, device=q.device)
    if sinks is not None:  # a row that sees no key: o = 0, lse = its sink
        empty_lse = sinks.float().view(1, -1, 1).expand(batch, heads, seq_local)
    outputs, lses, row = [], [], 0
    for first, o, lse in sorted(pieces, key=lambda piece: piece[0]):
        outputs += [empty_o[:, :, row:first], o]
        lses += [empty_lse[:, :, row:first], lse]
        row = first + o.shape[2]
    outputs.append(empty_o[:, :, row:])
    lses.append(empty_lse[:, :, row:])
    return torch.cat(outputs, 2), torch.cat(lses, 2)


def _window_or_none(window: tuple[int, int]) -> tuple[int, int] | None:
    return None if window == (-1, -1) else window


def _rows_of(q_chunk, v, sinks, block, run):
    """(o, lse) of a query chunk from `run(block)` on its visible rows; rows that see no key get
    o = 0 and lse = -inf (or the sink)."""
    batch, heads, length = q_chunk.shape[0], q_chunk.shape[1], q_chunk.shape[2]
    empty_lse = torch.full((batch, heads, length), -math.inf, device=q_chunk.device)
    if sinks is not None:
        empty_lse = sinks.float().view(1, -1, 1).expand(batch, heads, length)
    empty_o = q_chunk.new_zeros(batch, heads, length, v.shape[3])
    if block is None:
        return empty_o, empty_lse
    o, lse = run(block)
    if block.row_lo == 0 and block.row_hi == length:
        return o, lse
    o = torch.cat([empty_o[:, :, :block.row_lo], o, empty_o[:, :, block.row_hi:]], 2)
    lse = torch.cat([empty_lse[:, :, :block.row_lo], lse, empty_lse[:, :, block.row_hi:]], 2)
    return o, lse


# ----------------------------------------------------------------------------------------------
# Ulysses


def _ulysses(q, k, v, group, layout, causal, window, sinks, options):
    world, rank = _world(group)
    seq_local = q.shape[2]

    def to_heads(x: torch.Tensor) -> torch.Tensor:
        """(B, H, S_local, ...) sequence shard -> (B, H / P, S, ...) head shard, sequence order."""
        parts = [part.contiguous() for part in x.chunk(world, dim=1)]
        received = dist_fn.all_to_all([torch.empty_like(parts[0]) for _ in range(world)], parts, group=group)
        return _in_sequence_order(received, layout, 2)

    def to_sequence(x: torch.Tensor) -> torch.Tensor:
        """The inverse: (B, H / P, S, ...) -> (B, H, S_local, ...)."""
        parts = [_pieces_at(x, chunk_ranges(seq_local, world, r, layout), 2).contiguous() for r in range(world)]
        received = dist_fn.all_to_all([torch.empty_like(parts[0]) for _ in range(world)], parts, group=group)
        return torch.cat(received, 1)

    heads = q.shape[1] // world
    local_sinks = None if sinks is None else sinks[rank * heads:(rank + 1) * heads]
    o, lse = attention(to_heads(q), to_heads(k), to_heads(v), causal=causal, window=window, sinks=local_sinks,
                       return_lse=True, **options)
    return to_sequence(o), to_sequence(lse.unsqueeze(-1)).squeeze(-1)


# ----------------------------------------------------------------------------------------------
# ring


def _merge(o_acc: torch.Tensor, lse_acc: torch.Tensor, o: torch.Tensor, lse: torch.Tensor
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact merge of two partial softmax results over disjoint keys (float32): -inf lse means no
    key; a NaN in either propagates."""
    lse_new = torch.logaddexp(lse_acc, lse)
    safe = torch.where(lse_new == -math.inf, 0.0, lse_new)
    weight_acc = torch.exp(lse_acc - safe).unsqueeze(-1)
    weight = torch.exp(lse - safe).unsqueeze(-1)
    return o_acc * weight_acc + o.float() * weight, lse_new


class _Ring:
    """Sends this rank's tensors to the next rank and receives the previous rank's, asynchronously."""

    def __init__(self, group: dist.ProcessGroup | None) -> None:
        self.group = group
        world, rank = _world(group)
        to_global = (lambda r: r) if group is None else (lambda r: dist.get_global_rank(group, r))
        self.next, self.previous = to_global((rank + 1) % world), to_global((rank - 1) % world)
        self.requests: list[dist.Work] = []

    def start(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        received = [torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in tensors]
        operations = [dist.P2POp(dist.isend, t.contiguous(), self.next, self.group) for t in tensors]
        operations += [dist.P2POp(dist.irecv, t, self.previous, self.group) for t in received]
        self.requests = dist.batch_isend_irecv(operations)
        return received

    def wait(self) -> None:
        for request in self.requests:
            request.wait()
        self.requests = []


class _RingAttention(torch.autograd.Function):
    """Ring attention with its own backward: the kernels' forward on each (query chunk, key chunk)
    pair merged through the lse, and the kernels' backward on each pair with the merged o and lse
    (the probabilities of a pair's keys are exp(score - merged lse), so each pair's gradients are
    exact shares of the whole)."""

    @staticmethod
    def forward(ctx, q, k, v, sinks, group, layout, band, scale, softcap):
        world, rank = _world(group)
        seq_local = q.shape[2]
        params = AttentionParams(scale=scale, softcap=softcap)
        mine = chunk_ranges(seq_local, world, rank, layout)
        o_acc = torch.zeros(*q.shape[:3], v.shape[3], dtype=torch.float32, device=q.device)
        lse_acc = torch.full(q.shape[:3], -math.inf, dtype=torch.float32, device=q.device)
        ring, kv = _Ring(group), [k, v]
        for step in range(world):
            incoming = ring.start(kv) if step < world - 1 else None
            for q_offset, k_offset, block in _pairs(mine, chunk_ranges(seq_local, world, (rank - step) % world, layout),
                                                    band):
                rows = slice(q_offset + block.row_lo, q_offset + block.row_hi)
                keys = slice(k_offset + block.key_lo, k_offset + block.key_hi)
                o, lse = _launch.attention_forward(q[:, :, rows], kv[0][:, :, keys], kv[1][:, :, keys],
                                                   _with_window(params, block.window))
                o_acc[:, :, rows], lse_acc[:, :, rows] = _merge(o_acc[:, :, rows], lse_acc[:, :, rows], o, lse)
            if incoming is not None:
                ring.wait()
                kv = incoming
        if sinks is not None:  # the sink: one more key with a zero value
            sink_lse = sinks.detach().float().view(1, -1, 1).expand_as(lse_acc)
            o_acc, lse_acc = _merge(o_acc, lse_acc, torch.zeros_like(o_acc), sink_lse)
        o = o_acc.to(q.dtype)
        ctx.save_for_backward(q, k, v, o, lse_acc, sinks)
        ctx.setup = (group, layout, band, params)
        return o, lse_acc

    @staticmethod
    def backward(ctx, do, dlse):
        q, k, v, o, lse, sinks = ctx.saved_tensors
        group, layout, band, params = ctx.setup
        world, rank = _world(group)
        seq_local = q.shape[2]
        mine = chunk_ranges(seq_local, world, rank, layout)
        do = do.to(q.dtype) if do is not None else torch.zeros_like(o)
        dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        ring = _Ring(group)
        carried = [k, v, torch.zeros(k.shape, dtype=torch.float32, device=k.device),
                   torch.zeros(v.shape, dtype=torch.float32, device=v.device)]
        for step in range(world):
            k_block, v_block, dk_block, dv_block = carried
            for q_offset, k_offset, block in _pairs(mine, chunk_ranges(seq_local, world, (rank - step) % world, layout),
                                                    band):
                rows = slice(q_offset + block.row_lo, q_offset + block.row_hi)
                keys = slice(k_offset + block.key_lo, k_offset + block.key_hi)
                dq_part, dk_part, dv_part, _, _ = _launch.attention_backward(
                    do[:, :, rows], q[:, :, rows], k_block[:, :, keys], v_block[:, :, keys], o[:, :, rows],
                    lse[:, :, rows].contiguous(), _with_window(params, block.window),
                    dlse=None if dlse is None else dlse[:, :, rows].contiguous())
                dq[:, :, rows] += dq_part.float()
                dk_block[:, :, keys] += dk_part.float()
                dv_block[:, :, keys] += dv_part.float()
            # Every block, with its gradient accumulators, moves on; after `world` moves each is home.
            carried = ring.start(carried)
            ring.wait()
        dk, dv = carried[2].to(k.dtype), carried[3].to(v.dtype)
        dsinks = None
        if sinks is not None and ctx.needs_input_grad[3]:
            delta = (do.float() * o.float()).sum(-1) - (0.0 if dlse is None else dlse)
            p_sink = torch.exp(sinks.detach().float().view(1, -1, 1) - lse).masked_fill(lse == -math.inf, 0.0)
            dsinks = (-(p_sink * delta).sum(dim=(0, 2))).to(sinks.dtype)
        return dq.to(q.dtype), dk, dv, dsinks, None, None, None, None, None


def _with_window(params: AttentionParams, window: tuple[int, int]) -> AttentionParams:
    return AttentionParams(scale=params.scale, softcap=params.softcap, window_left=window[0], window_right=window[1])


def _pairs(mine: list[tuple[int, int]], theirs: list[tuple[int, int]], band: tuple[int, int]):
    """(query offset, key offset, block) of every (my query chunk, their key chunk) pair that
    sees something under the band (left, right), in a fixed order; offsets are positions within
    the local tensors. Pairs that causal masking or a window empties are skipped."""
    q_offset = 0
    for q_start, q_len in mine:
        k_offset = 0
        for k_start, k_len in theirs:
            block = _visible_block(q_start, q_len, k_start, k_len, *band)
            if block is not None:
                yield q_offset, k_offset, block
            k_offset += k_len
        q_offset += q_len
