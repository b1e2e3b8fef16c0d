"""Hugging Face transformers integration (optional extra: ``pip install fused-attn[hf]``).

    import fused_attn.hf
    fused_attn.hf.register()   # once; then attn_implementation="fused_attn" works everywhere
    model = AutoModelForCausalLM.from_pretrained(name, attn_implementation="fused_attn")

`register()` adds "fused_attn" to transformers' attention interface (the function below) and to
its mask interface (transformers' SDPA mask builder, which hands over no mask at all when a
causal or full pattern needs none, else a bool mask that the kernels read tile by tile). The
kernels serve causal decoders, bidirectional encoders and cross-attention with or without
padding, GQA without `repeat_kv`, generation with a dynamic or static KV cache (fused_attn's
causal mask is aligned bottom-right, as a cache needs), and:

- attention dropout while training: the seed of each call is drawn from torch's default CPU
  generator, so `torch.manual_seed` makes a training step repeatable;
- logit softcapping (the `softcap` argument, Gemma 2);
- sliding windows: the builder's mask holds the window (transformers' `sliding_window_overlay`:
  a query sees itself and the `sliding_window - 1` keys before it). It hands over no mask for a
  sliding layer only when there are fewer keys than the window (`_ignore_causal_mask_sdpa`), so
  the window cannot bite; a causal call without a mask still passes the window to the kernels, so
  a caller that skips the builder gets the windowed result. With a mask the window is left to
  the mask, whose columns need not be consecutive positions (a static cache's padded slots);
- packed sequences (`cu_seq_lens_q`, `cu_seq_lens_k`, `max_length_q`, `max_length_k`, as
  `DataCollatorWithFlattening(return_flash_attn_kwargs=True)` gives them, the convention of
  transformers' flash-attention path): `fused_attn.attention_varlen` runs each sequence on its
  own with the module's causal flag, the window, softcap and dropout. The attention_mask is not
  read then: for a packed batch the builder gives either none or the block-diagonal mask it
  derives from position_ids, which the boundaries already say; a padding mask passed together
  with the boundaries is not applied.

`output_attentions=True` returns the real weights, recomputed exactly by
`fused_attn.attention_probs` from the forward's lse (S x S in memory: the slow path, meant for
inspection). A call the kernels cannot serve (an attention bias such as T5's, attention sinks,
`output_attentions` together with dropout while training or with packed sequences) runs
transformers' SDPA path instead, after a one-time warning naming the reason: never a silent
change of meaning.
"""
from __future__ import annotations

import warnings

import torch

from fused_attn.api import attention, attention_varlen
from fused_attn.weights import attention_probs

NAME = "fused_attn"
_WARNED: set[str] = set()
_PACKED_KWARGS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")


def _fallback_reason(dropout: float, kwargs: dict) -> str | None:
    if kwargs.get("position_bias") is not None or kwargs.get("s_aux") is not None:
        return "an additive attention bias or attention sinks"
    if kwargs.get("output_attentions"):
        # The weights come from fused_attn.attention_probs, which gives the undropped
        # probabilities of padded input; eager would return dropped ones.
        if dropout > 0.0:
            return "output_attentions=True with attention dropout while training"
        if all(kwargs.get(name) is not None for name in _PACKED_KWARGS):
            return "output_attentions=True with packed sequences"
    return None


def fused_attn_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                       attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                       is_causal: bool | None = None, **kwargs) -> tuple[torch.Tensor, torch.Tensor | None]:
    """transformers' attention-function contract: query (B, Hq, Sq, D), key and value
    (B, Hkv, Sk, D) -> (attn_output (B, Sq, Hq, Dv), None), or with ``output_attentions=True``
    (attn_output, the attention weights (B, Hq, Sq, Sk) in the query's dtype, as eager returns
    them). The weights are recomputed by `fused_attn.attention_probs` from the forward's lse:
    exact, but S x S in memory, so it is the slow path, for inspection."""
    reason = _fallback_reason(dropout, kwargs)
    if reason is not None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        if reason not in _WARNED:
            _WARNED.add(reason)
            warnings.warn(f"fused_attn: {reason} is not supported by the kernels yet; these calls run "
                          "transformers' SDPA attention instead (warned once per reason)", stacklevel=2)
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    causal = bool(is_causal if is_causal is not None else getattr(module, "is_causal", True))
    sliding_window = kwargs.get("sliding_window")
    options = {"scale": scaling, "softcap": kwargs.get("softcap") or 0.0, "dropout_p": dropout}
    if all(kwargs.get(name) is not None for name in _PACKED_KWARGS):
        return _packed(query, key, value, causal, sliding_window, options, kwargs), None
    if attention_mask is not None:
        # The mask builder's mask (bool, True attends; or float, added) already holds causality,
        # padding and any sliding window; the kernels read it tile by tile.
        score_options = {"attn_mask": attention_mask[:, :, :, : key.shape[-2]], "scale": scaling,
                         "softcap": options["softcap"]}
        return _run(query, key, value, score_options, dropout, bool(kwargs.get("output_attentions")))
    # No mask: the builder decided none was needed (`_ignore_causal_mask_sdpa`). For a causal
    # module that means Sq == Sk, one query decoding against a cache (it sees every key), or the
    # prefill of an empty static cache, whose keys past Sq are unwritten slots that transformers'
    # SDPA path hides with a top-left causal mask; cut them off, as that path does.
    seq_q = query.shape[2]
    if causal and seq_q > 1 and key.shape[2] > seq_q:
        key, value = key[:, :, :seq_q], value[:, :, :seq_q]
    window = (sliding_window - 1, 0) if causal and sliding_window is not None else None
    score_options = {"causal": causal and seq_q > 1, "window": window, "scale": scaling, "softcap": options["softcap"]}
    return _run(query, key, value, score_options, dropout, bool(kwargs.get("output_attentions")))


def _run(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, score_options: dict, dropout: float,
         output_attentions: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The kernels on padded input; with output_attentions also the weights, from the lse."""
    if not output_attentions:
        return attention(query, key, value, dropout_p=dropout, **score_options).transpose(1, 2), None
    out, lse = attention(query, key, value, return_lse=True, **score_options)
    weights = attention_probs(query, key, lse, **score_options).to(query.dtype)
    return out.transpose(1, 2), weights


def _packed(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, causal: bool, sliding_window: int | None,
            options: dict, kwargs: dict) -> torch.Tensor:
    """Packed sequences, (B, H, total, D) with B = 1 as transformers passes them, through
    `attention_varlen`; (B, total, Hq, Dv) out. Flattens B like transformers' flash path does."""
    batch = query.shape[0]
    q, k, v = (t.transpose(1, 2).reshape(-1, t.shape[1], t.shape[3]) for t in (query, key, value))
    # attention_varlen takes int32 boundaries on q's device; `.to` copies rather than changing the caller's.
    cu_q, cu_k = (kwargs[name].to(device=q.device, dtype=torch.int32) for name in ("cu_seq_lens_q", "cu_seq_lens_k"))
    max_q, max_k = int(kwargs["max_length_q"]), int(kwargs["max_length_k"])
    window = None
    if sliding_window is not None:  # transformers' flash path: (W - 1, W - 1), with causal cutting the right side
        window = (sliding_window - 1, 0 if causal else sliding_window - 1)
    out = attention_varlen(q, k, v, cu_q, cu_k, max_q, max_k, causal=causal, window=window, **options)
    return out.view(batch, -1, *out.shape[1:])


def register() -> str:
    """Register "fused_attn" with transformers' attention and mask interfaces; returns the name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, fused_attn_forward)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    return NAME
