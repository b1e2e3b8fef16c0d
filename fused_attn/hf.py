"""Hugging Face transformers integration (optional extra: ``pip install fused-attn[hf]``).

    import fused_attn.hf
    fused_attn.hf.register()   # once; then attn_implementation="fused_attn" works everywhere
    model = AutoModelForCausalLM.from_pretrained(name, attn_implementation="fused_attn")

`register()` adds "fused_attn" to transformers' attention interface (`fused_attn_forward`) and to
its mask interface (transformers' SDPA mask builder, which hands over no mask at all when a
causal or full pattern needs none, else a bool mask that the kernels read tile by tile; except
for sequences packed by position_ids, whose O(S) sequence ids it records instead of building an
S x S mask, see `fused_attn._hf_packing`). It also
makes transformers refuse "fused_attn" for a model whose attention does not call the attention
interface (Bloom, MPT, DeBERTa-v2..., and Falcon before transformers 5.25): such a model would
only get a mask it does not understand.

The promise: a call either runs on the kernels and computes what the model's eager attention
computes, or runs the model's own eager attention function after a one-time warning naming the
reason, or raises. Nothing a caller passes is dropped. (One difference remains, on padding: a
query row that sees no key at all gets zeros from the kernels, where eager averages every key
uniformly; such rows are padding that no real token reads.)

On the kernels: causal decoders, bidirectional encoders and cross-attention with or without
padding, GQA without `repeat_kv`, generation with a dynamic or static KV cache (fused_attn's
causal mask is aligned bottom-right, as a cache needs), and

- attention dropout while training: the seed of each call is drawn from torch's default CPU
  generator, so `torch.manual_seed` makes a training step repeatable;
- logit softcapping (the `softcap` argument, Gemma 2);
- sliding windows: the builder's mask holds the window (transformers' `sliding_window_overlay`:
  a query sees itself and the `sliding_window - 1` keys before it). It hands over no mask for a
  sliding layer only when there are fewer keys than the window (`_ignore_causal_mask_sdpa`), so
  the window cannot bite; a causal call without a mask still passes the window to the kernels, so
  a caller that skips the builder gets the windowed result. With a mask the window is left to
  the mask, whose columns need not be consecutive positions (a static cache's padded slots);
- attention sinks (`s_aux`, one logit per query head: GPT-OSS, Granite-SWA, MiMo-V2-Flash...):
  passed to the kernels' `sinks`, which merge the sink into each row's softmax denominator and
  give it its gradient (also under dropout, which eager applies after dropping the sink column),
  padded and packed alike;
- an additive position bias (`position_bias`: T5 and its relatives), read by the kernels as a
  float mask added to the scaled scores, with its gradient;
- top-k sparse attention (`indices`, (batch, seq_q, k) key positions: DeepSeek-V3.2, GLM-MoE-DSA),
  folded into the mask exactly as these models fold it themselves under eager and SDPA;
- packed sequences (`cu_seq_lens_q`, `cu_seq_lens_k`, `max_length_q`, `max_length_k`, as
  `DataCollatorWithFlattening(return_flash_attn_kwargs=True)` gives them, the convention of
  transformers' flash-attention path): `fused_attn.attention_varlen` runs each sequence on its
  own with the module's causal flag, the window, softcap and dropout. Sequences packed by
  `position_ids` alone (no cu_seq_lens: DataCollatorWithFlattening's default) run the same way,
  with no S x S mask built, for models that hand the mask to the attention function untouched. With a mask, the window is
  read from the mask (PhiMoE's lives only there), and varlen runs when the mask is exactly the
  packed pattern (the block-diagonal mask the builder derives from position_ids); any other mask
  (Doge's content-dependent float mask) is what eager applies, so the packed row runs through
  the padded kernels with it.

Attention weights (`output_attentions=True`, passed down or, as most models do now, recorded by
transformers' output capturing) are recomputed exactly by `fused_attn.attention_probs` from the
forward's lse (S x S in memory: the slow path, meant for inspection).

Runs the model's own eager attention function (the default its attention layer names in
`ALL_ATTENTION_FUNCTIONS.get_interface`), given the float mask eager would get, after a warning
once per reason: attention weights together with training dropout (eager returns dropped
weights) or with sinks (models disagree on which weights they return), sinks that are not one
logit per head, a position bias together with softcapping, a head dim over 512 (or over what
the card's shared memory allows), and a keyword argument outside `IGNORED_KWARGS` and
`SERVED_KWARGS` that the eager function applies (Inkling2's per-token `sinks`).

Raises NotImplementedError: a keyword argument neither the kernels nor the eager function
apply (MiniMax-M3's `block_indices`, which the model folds into the mask only under eager and
SDPA), and a causal call with no mask whose keys past the queries are not a static cache's empty
(zero) slots (DeepSeek-V4 appends compressed keys whose visibility only its eager mask holds).
"""
from __future__ import annotations

import functools
import inspect
import re
import sys
from dataclasses import dataclass
from typing import Callable

import torch

from fused_attn._checks import unsupported_reason
from fused_attn._hf_packing import packed_mask, recorded_packing
from fused_attn._warnings import warn_once
from fused_attn.api import attention, attention_varlen
from fused_attn.kvcache import attention_with_kvcache
from fused_attn.weights import attention_probs

NAME = "fused_attn"
_WARNED: set[str] = set()
_PACKED_KWARGS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")

# Passed by transformers' models to attention functions without changing what attention
# computes: positions (RoPE is applied before the call; packing is read from the mask or the
# cu_seq_lens), cache plumbing, the encoder states cross-attention keys were made from, flags for
# other outputs, and hints for other backends.
IGNORED_KWARGS = frozenset({
    "position_ids", "position_embeddings", "seq_idx", "cache_position", "past_key_values", "past_key_value",
    "cache", "use_cache", "encoder_hidden_states", "output_hidden_states", "output_router_logits", "return_dict",
    "num_items_in_batch", "deterministic",
})
# Applied by this module or the kernels (see the module docstring).
SERVED_KWARGS = frozenset({"sliding_window", "softcap", "s_aux", "position_bias", "indices", "output_attentions",
                           *_PACKED_KWARGS})


@dataclass
class _Call:
    """What one attention call computes, in the terms the kernels take.

    mask: None, bool (True attends) or float (added to the scaled scores), broadcastable to
    (B, Hq, Sq, Sk); when given it already holds causality, padding and any window.
    causal, window: the module's pattern, applied by the kernels when there is no mask (and by
    attention_varlen, which reads no mask). keys_written: when not None, only the first
    keys_written keys exist (the prefill of an empty static cache); the rest are unwritten slots
    that no query sees. bounds: packed sequences (cu_q, cu_k, max_q, max_k), int32 cu_seqlens
    on the query's device."""
    mask: torch.Tensor | None
    causal: bool
    window: tuple[int, int] | None
    keys_written: int | None = None
    bounds: tuple[torch.Tensor, torch.Tensor, int, int] | None = None


def fused_attn_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                       attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                       is_causal: bool | None = None, **kwargs) -> tuple[torch.Tensor, torch.Tensor | None]:
    """transformers' attention-function contract: query (B, Hq, Sq, D), key and value
    (B, Hkv, Sk, D) -> (attn_output (B, Sq, Hq, Dv), None), or when attention weights are
    requested (attn_output, the weights (B, Hq, Sq, Sk) in the query's dtype, as eager returns
    them). A call the kernels cannot serve exactly runs the model's eager attention function
    after a one-time warning, or raises NotImplementedError (see the module docstring)."""
    causal = bool(is_causal if is_causal is not None else getattr(module, "is_causal", True))
    call = _describe(module, query, key, attention_mask, causal, kwargs)
    want_weights = _weights_requested(kwargs)
    reason = _fallback_reason(module, query, dropout, want_weights, kwargs, max(query.shape[-1], value.shape[-1]))
    if reason is not None:
        return _on_eager(module, query, key, value, call, reason, dropout, scaling, is_causal, kwargs)
    return _on_kernels(query, key, value, call, dropout, scaling, want_weights, kwargs)


def _describe(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, attention_mask: torch.Tensor | None,
              causal: bool, kwargs: dict) -> _Call:
    """Reads the mask, the causal flag, the window, `indices` and packing into one `_Call`."""
    seq_q, seq_k = query.shape[2], key.shape[2]
    sliding_window = kwargs.get("sliding_window")
    packing = recorded_packing(module, query, key, kwargs) if attention_mask is None else None
    if packing is not None and sliding_window is None:
        sliding_window = packing.window_for_layer()
    bounds = _packed_bounds(kwargs, query.device)
    if bounds is None and packing is not None:
        bounds = packing.bounds(query.device)
    if bounds is not None:
        # transformers' flash path: (W - 1, W - 1), with causal cutting the right side.
        window = None if sliding_window is None else (sliding_window - 1, 0 if causal else sliding_window - 1)
    else:
        window = (sliding_window - 1, 0) if causal and sliding_window is not None else None
    mask = None if attention_mask is None else attention_mask[:, :, :, :seq_k]
    # No mask and no packing: the builder decided none was needed (`_ignore_causal_mask_sdpa`).
    # For a causal module that means Sq == Sk, one query decoding against a cache (it sees every
    # key), or the prefill of an empty static cache, whose keys past Sq are unwritten slots that
    # transformers' SDPA path hides with a top-left causal mask.
    written = seq_q if mask is None and bounds is None and causal and 1 < seq_q < seq_k else None
    if written is not None and bool(key[:, :, written:].any()):
        # Not empty slots (a static cache's are zeros): keys a model appended itself, as DeepSeek-V4
        # appends compressed ones, whose visibility only its eager mask says.
        raise NotImplementedError("fused_attn: a causal call with no mask and more keys than queries is served as "
                                  "the prefill of an empty static cache, but the keys past the queries are not empty "
                                  "slots; which of them each query sees is unknown. Use attn_implementation='eager'")
    call = _Call(mask, causal, window, keys_written=written, bounds=bounds)
    indices = kwargs.get("indices")
    return call if indices is None else _with_indices(call, indices, query, key)


def _packed_bounds(kwargs: dict, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, int, int] | None:
    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    if cu_q is None or cu_k is None:
        return None
    # attention_varlen takes int32 boundaries on q's device; `.to` copies rather than changing the caller's.
    cu_q, cu_k = (cu.to(device=device, dtype=torch.int32) for cu in (cu_q, cu_k))
    max_q, max_k = kwargs.get("max_length_q"), kwargs.get("max_length_k")
    max_q = int(max_q) if max_q is not None else int((cu_q[1:] - cu_q[:-1]).max())
    max_k = int(max_k) if max_k is not None else int((cu_k[1:] - cu_k[:-1]).max())
    return cu_q, cu_k, max_q, max_k


def _with_indices(call: _Call, indices: torch.Tensor, query: torch.Tensor, key: torch.Tensor) -> _Call:
    """Top-k sparse attention: keys outside `indices` (B, Sq, k) are masked out, as DeepSeek-V3.2,
    GLM-MoE-DSA and their relatives do themselves under eager and SDPA."""
    batch, seq_q, seq_k = query.shape[0], query.shape[2], key.shape[2]
    if (not isinstance(indices, torch.Tensor) or indices.dim() != 3 or tuple(indices.shape[:2]) != (batch, seq_q)
            or indices.dtype.is_floating_point or indices.dtype == torch.bool):
        raise NotImplementedError(f"fused_attn: `indices` must be integer key positions of shape (batch, seq_q, k) = "
                                  f"({batch}, {seq_q}, k) to be applied; got {_summary(indices)}")
    selected = torch.zeros(batch, seq_q, seq_k, dtype=torch.bool, device=query.device)
    selected = selected.scatter(-1, indices.long(), True).unsqueeze(1)
    mask = call.mask if call.mask is not None else _visible_keys(call, seq_q, seq_k, query.device)
    if mask is None:
        mask = selected
    elif mask.dtype == torch.bool:
        mask = mask & selected
    else:
        mask = mask.masked_fill(~selected, torch.finfo(query.dtype).min)
    return _Call(mask, call.causal, call.window, bounds=call.bounds)


def _summary(value: object) -> str:
    if isinstance(value, torch.Tensor):
        return f"{str(value.dtype).replace('torch.', '')} tensor of shape {tuple(value.shape)}"
    return type(value).__name__


def _geometry(call: _Call, seq_q: int, seq_k: int, device: torch.device
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For every (query, key) pair: whether both lie in the same sequence (packed, or the written
    keys of a static cache), and the key's offset from the query's diagonal, aligned bottom-right
    per sequence as the kernels align it; and the key count of each row's sequence."""
    written = seq_k if call.keys_written is None else call.keys_written
    if call.bounds is not None:
        cu_q, cu_k = call.bounds[0].long(), call.bounds[1].long()
    else:
        cu_q, cu_k = (torch.tensor([0, n], device=device) for n in (seq_q, written))
    last = len(cu_q) - 2
    rows, cols = torch.arange(seq_q, device=device), torch.arange(seq_k, device=device)
    # Sequence of each row and column; past the last boundary (unwritten slots) means none.
    row_seq = torch.searchsorted(cu_q[1:], rows, right=True)
    col_seq = torch.searchsorted(cu_k[1:], cols, right=True)
    same = (row_seq[:, None] == col_seq[None, :]) & (row_seq <= last)[:, None]
    row_seq, col_seq = row_seq.clamp(max=last), col_seq.clamp(max=last)
    keys, queries = (cu_k[1:] - cu_k[:-1])[row_seq], (cu_q[1:] - cu_q[:-1])[row_seq]
    diagonal = rows - cu_q[row_seq] + keys - queries
    offset = (cols - cu_k[col_seq])[None, :] - diagonal[:, None]
    return same, offset, keys


def _visible_keys(call: _Call, seq_q: int, seq_k: int, device: torch.device) -> torch.Tensor | None:
    """bool (1, 1, Sq, Sk): the keys each query sees under the call's causal flag, window,
    packing and unwritten cache slots, ignoring its mask; None when every key is visible."""
    if (call.bounds is None and not call.causal and call.window is None
            and (call.keys_written is None or call.keys_written == seq_k)):
        return None
    visible, offset, _ = _geometry(call, seq_q, seq_k, device)
    if call.causal:
        visible &= offset <= 0
    if call.window is not None:
        left, right = call.window
        if left >= 0:
            visible &= offset >= -left
        if right >= 0:
            visible &= offset <= right
    return visible[None, None]


def _weights_requested(kwargs: dict) -> bool:
    """Whether the caller wants attention weights: `output_attentions` passed down, or
    transformers' output capturing recording attentions for this forward (most models no longer
    pass the flag to their attention layers)."""
    if kwargs.get("output_attentions"):
        return True
    try:
        from transformers.utils.output_capturing import _active_collector
    except ImportError:
        return False
    collecting = _active_collector.get()
    return bool(collecting) and any(name.endswith("attentions") for name in collecting)


def _fallback_reason(module: torch.nn.Module, query: torch.Tensor, dropout: float, want_weights: bool,
                     kwargs: dict, head_dim: int = 0) -> str | None:
    """Why this call must run the model's eager attention, or None when the kernels serve it."""
    unknown = sorted(name for name, value in kwargs.items()
                     if value is not None and name not in IGNORED_KWARGS and name not in SERVED_KWARGS)
    if unknown:
        eager = _eager_function(module)
        not_understood = [name for name in unknown if not _understands(eager, name)]
        if not_understood:
            raise NotImplementedError(
                f"fused_attn: {type(module).__name__} passes {', '.join(map(repr, not_understood))} to its attention "
                f"function, which neither the kernels nor the model's eager attention ({eager.__module__}."
                f"{eager.__qualname__}) apply, so no exact result can be given; use attn_implementation='eager'")
        return f"the keyword argument(s) {', '.join(map(repr, unknown))}"
    sinks = kwargs.get("s_aux")
    if sinks is not None:
        if not isinstance(sinks, torch.Tensor) or sinks.numel() != query.shape[1]:
            return "attention sinks (s_aux) that are not one logit per query head"
        if want_weights:
            return "attention weights requested with attention sinks (models differ in which weights they return)"
    if want_weights and dropout > 0.0:
        return "attention weights requested with attention dropout while training (eager returns dropped weights)"
    if kwargs.get("position_bias") is not None and kwargs.get("softcap"):
        return "a position bias together with softcapping"
    return unsupported_reason(query, head_dim)  # e.g. MLA's absorbed 576-wide keys


def _on_kernels(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, call: _Call, dropout: float,
                scaling: float | None, want_weights: bool, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
    """attention_varlen for packed sequences that the mask (if any) does not restrict further,
    else the padded kernels, with the sinks; the weights from the lse when requested."""
    softcap = kwargs.get("softcap") or 0.0
    sinks = kwargs.get("s_aux")
    if sinks is not None:
        sinks = sinks.reshape(-1)  # one logit per query head (checked by _fallback_reason)
    seq_k = key.shape[2]
    if call.keys_written is not None:  # an empty static cache: cut the unwritten slots, as SDPA's path does
        key, value = key[:, :, :call.keys_written], value[:, :, :call.keys_written]
    weights = None
    position_bias = kwargs.get("position_bias")
    varlen = None
    if call.bounds is not None and position_bias is None and not want_weights:
        varlen = _as_varlen(call, query, key)
    if varlen is not None:
        out = _packed(query, key, value, varlen, scaling, softcap, dropout, sinks)
    elif _is_decoding_step(call, query, key, value, dropout, want_weights, position_bias):
        # A few queries against the whole cache (a static cache's mask hides its unwritten slots):
        # the KV-cache kernel reads each k/v head once for its query-head group and splits long
        # caches over the GPU.
        options = {"attn_mask": call.mask} if call.mask is not None else {
            "causal": call.causal and query.shape[2] > 1, "window": call.window}
        out = attention_with_kvcache(query, key, value, cache_seqlens=key.shape[2], scale=scaling, softcap=softcap,
                                     sinks=sinks, **options)
        out = out.transpose(1, 2)
    else:
        options = _score_options(call, query, key, scaling, softcap, position_bias)
        if not want_weights:
            out = attention(query, key, value, dropout_p=dropout, sinks=sinks, **options)
        else:  # never with sinks (see _fallback_reason)
            out, lse = attention(query, key, value, dropout_p=dropout, return_lse=True, **options)
            weights = attention_probs(query, key, lse, **options).to(query.dtype)
            if weights.shape[-1] < seq_k:  # unwritten static-cache slots get no weight, as in eager
                weights = torch.nn.functional.pad(weights, (0, seq_k - weights.shape[-1]))
        out = out.transpose(1, 2)
    return out, weights


# Calls with at most this many queries and more keys run on the KV-cache kernel (decoding steps,
# speculative tokens); longer ones fill the prefill tiles.
DECODE_MAX_QUERIES = 16


def _is_decoding_step(call: _Call, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, dropout: float,
                      want_weights: bool, position_bias: torch.Tensor | None) -> bool:
    """A generation step the KV-cache kernel computes exactly as `attention` would: no packing,
    no unwritten slots cut, no position bias, dropout or weights, no gradient wanted, and a few
    queries against a longer cache (key/value are the cache: (B, Hkv, Sk, D); a mask, if any, is
    indexed by key position, as the kernel reads it)."""
    plain = (call.bounds is None and call.keys_written is None and position_bias is None and dropout == 0
             and not want_weights)
    wants_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value))
    return plain and not wants_grad and query.shape[2] <= DECODE_MAX_QUERIES and key.shape[2] > query.shape[2]


def _score_options(call: _Call, query: torch.Tensor, key: torch.Tensor, scaling: float | None, softcap: float,
                   position_bias: torch.Tensor | None) -> dict:
    """The padded kernels' score options: the mask, or causal and window when there is none;
    a position bias joins the mask as a float mask (eager adds it to the scaled scores, then the
    mask)."""
    options = {"scale": scaling, "softcap": softcap}
    mask = call.mask
    if mask is None and call.bounds is not None:  # packed, through the padded kernels: the pattern as a mask
        mask = _packed_pattern(call, query, key)
    elif mask is None:
        options["causal"] = call.causal and query.shape[2] > 1
        options["window"] = call.window
    if position_bias is not None:
        bias = position_bias[..., :key.shape[2]]
        if mask is None:
            mask = bias
        elif mask.dtype == torch.bool:
            mask = bias.masked_fill(~mask, torch.finfo(bias.dtype).min)
        else:
            mask = bias + mask
    if mask is not None:
        options["attn_mask"] = mask
    return options


def _packed_pattern(call: _Call, query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """The packed sequences' pattern as a bool mask, for one batch row (as transformers packs)."""
    if query.shape[0] != 1:
        raise NotImplementedError("fused_attn: packed sequences spread over more than one batch row can only run "
                                  "through attention_varlen (a mask cannot join rows); pack them into one row")
    return _visible_keys(call, query.shape[2], key.shape[2], query.device)


def _as_varlen(call: _Call, query: torch.Tensor, key: torch.Tensor) -> _Call | None:
    """The call as attention_varlen computes it, or None when it cannot. With no mask the
    boundaries say everything (the flash path's convention). With a mask (one batch row, bool,
    the same for every head), the window is read from the mask, so that a window living only in
    the mask (PhiMoE's) runs too; the mask must then be exactly the packed pattern, as the
    builder's block-diagonal mask from position_ids is. Any other mask is what eager applies."""
    if call.mask is None:
        return call
    mask = call.mask
    if query.shape[0] != 1 or mask.dtype != torch.bool or mask.shape[0] != 1:
        return None
    if mask.shape[1] != 1:
        if not bool((mask == mask[:, :1]).all()):
            return None
        mask = mask[:, :1]
    same, offset, keys = _geometry(call, query.shape[2], key.shape[2], query.device)
    seen = offset[mask[0, 0] & same]
    if seen.numel() == 0:
        return None
    # The furthest key seen on either side of the diagonal; a side that reaches every key is unbounded.
    left, right = int(-seen.min()), int(seen.max())
    left = -1 if left >= int(keys.max()) - 1 else max(left, 0)
    right = -1 if right >= call.bounds[2] - 1 else right
    if call.causal and right == 0:
        candidate = _Call(None, True, None if left < 0 else (left, 0), bounds=call.bounds)
    else:
        candidate = _Call(None, False, None if left < 0 and right < 0 else (left, right), bounds=call.bounds)
    pattern = _visible_keys(candidate, query.shape[2], key.shape[2], query.device)
    return candidate if torch.equal(mask, pattern) else None


def _packed(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, call: _Call, scaling: float | None,
            softcap: float, dropout: float, sinks: torch.Tensor | None) -> torch.Tensor:
    """Packed sequences, (B, H, total, D) with B = 1 as transformers passes them, through
    `attention_varlen`: (B, total, Hq, Dv). Flattens B like transformers' flash path does."""
    batch = query.shape[0]
    q, k, v = (t.transpose(1, 2).reshape(-1, t.shape[1], t.shape[3]) for t in (query, key, value))
    cu_q, cu_k, max_q, max_k = call.bounds
    options = {"causal": call.causal, "window": call.window, "scale": scaling, "softcap": softcap,
               "dropout_p": dropout, "sinks": sinks}
    out = attention_varlen(q, k, v, cu_q, cu_k, max_q, max_k, **options)
    return out.view(batch, -1, *out.shape[1:])


def _on_eager(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, call: _Call,
              reason: str, dropout: float, scaling: float | None, is_causal: bool | None,
              kwargs: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The model's own eager attention function, given the float mask eager would have got (the
    builder's bool mask as 0 / dtype-min, or the pattern a missing mask stood for)."""
    eager = _eager_function(module)
    warn_once(_WARNED, reason, f"fused_attn: {reason} cannot run on the kernels; these calls run the model's own "
              f"eager attention ({eager.__module__}.{eager.__qualname__}) instead (warned once per reason)",
              stacklevel=3)
    mask = call.mask
    if mask is None and call.bounds is not None:
        mask = _packed_pattern(call, query, key)
    elif mask is None:
        mask = _visible_keys(call, query.shape[2], key.shape[2], query.device)
    if mask is not None and mask.dtype == torch.bool:
        # transformers' eager_mask: 0 where a key is seen, the dtype's minimum elsewhere.
        mask = torch.where(mask, torch.zeros((), dtype=query.dtype, device=query.device), torch.finfo(query.dtype).min)
    passed = {name: value for name, value in kwargs.items() if name != "indices"}  # folded into the mask
    if scaling is not None:
        passed["scaling"] = scaling
    if is_causal is not None:
        passed["is_causal"] = is_causal
    return eager(module, query, key, value, mask, dropout=dropout, **passed)


def _eager_function(module: torch.nn.Module) -> Callable:
    eager = _eager_function_of(type(module))
    if eager is None:
        raise NotImplementedError(f"fused_attn: this call cannot run on the kernels and no eager attention function "
                                  f"was found for {type(module).__qualname__}; use attn_implementation='eager'")
    return eager


@functools.lru_cache(maxsize=None)
def _eager_function_of(module_class: type) -> Callable | None:
    """The eager function the module's forward names as its default in
    `ALL_ATTENTION_FUNCTIONS.get_interface(implementation, default)`, else the
    `eager_attention_forward` of its modeling file."""
    forward = inspect.unwrap(module_class.forward)
    name = "eager_attention_forward"
    try:
        found = re.search(r"get_interface\(\s*[^,()]+,\s*(\w+)\s*\)", inspect.getsource(forward))
        name = found.group(1) if found else name
    except (OSError, TypeError):
        pass
    eager = getattr(forward, "__globals__", {}).get(name)
    return eager if eager is not None else getattr(sys.modules.get(module_class.__module__), name, None)


@functools.lru_cache(maxsize=None)
def _understands(eager: Callable, name: str) -> bool:
    """Whether the eager function applies keyword argument `name`: a named parameter, or read
    from its **kwargs by name."""
    parameters = inspect.signature(eager).parameters
    named = {p.name for p in parameters.values() if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
    if name in named:
        return True
    try:
        source = inspect.getsource(eager)
    except (OSError, TypeError):
        return False
    return re.search(rf"""kwargs(\.get\(|\.pop\(|\[)\s*["']{re.escape(name)}["']""", source) is not None


@functools.lru_cache(maxsize=None)
def _computes_attention_itself(module_name: str) -> bool:
    """Whether a modeling file defines attention layers (`class ...Attention...(nn.Module)`) that
    never call transformers' attention interface: the same reading of the source as transformers'
    own `set_attn_implementation` makes. A file whose source cannot be read is not judged."""
    try:
        source = inspect.getsource(sys.modules[module_name])
    except (KeyError, OSError, TypeError):
        return False
    if "ALL_ATTENTION_FUNCTIONS" in source:
        return False
    return re.search(r"^class \w*Attention\w*\(nn\.Module\):", source, re.MULTILINE) is not None


def check_model_class(model_class: type) -> None:
    """Raise ValueError when "fused_attn" cannot reach the model's attention: its attention layers
    compute attention in their own code (Bloom, MPT, DeBERTa-v2...), so the name would
    only change the mask the model builds, and with it the model's results."""
    from transformers import PreTrainedModel

    for cls in model_class.__mro__:
        if cls is PreTrainedModel or not issubclass(cls, PreTrainedModel):
            continue
        if _computes_attention_itself(cls.__module__):
            raise ValueError(
                f'{model_class.__name__} does not support attn_implementation="{NAME}": its attention layers '
                f"({cls.__module__}) compute attention themselves instead of calling transformers' attention "
                f'interface, so fused_attn cannot run them. Use "eager" or "sdpa" for this model (or, for a '
                "composite model, a dict naming an implementation per sub-config).")


def _install_model_check() -> None:
    """Make transformers check `check_model_class` whenever "fused_attn" is requested: every
    path (`from_pretrained`, `_from_config`, a model's `__init__`, `set_attn_implementation` on
    sub-models) resolves the name through `PreTrainedModel.get_correct_attn_implementation`, which
    checks nothing for registered names."""
    from transformers import PreTrainedModel

    original = PreTrainedModel.get_correct_attn_implementation
    if getattr(original, "_fused_attn_checks", False):
        return

    @functools.wraps(original)
    def get_correct_attn_implementation(self, requested_attention: str | None, *args, **kwargs) -> str:
        if requested_attention == NAME:
            check_model_class(type(self))
        return original(self, requested_attention, *args, **kwargs)

    get_correct_attn_implementation._fused_attn_checks = True
    PreTrainedModel.get_correct_attn_implementation = get_correct_attn_implementation


def register() -> str:
    """Register "fused_attn" with transformers' attention and mask interfaces, and make
    transformers refuse it for models whose attention does not call the interface; returns the
    name. Safe to call more than once."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(NAME, fused_attn_forward)
    AttentionMaskInterface.register(NAME, packed_mask)
    _install_model_check()
    return NAME
