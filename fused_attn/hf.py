"""Hugging Face transformers integration (optional extra: ``pip install fused-attn[hf]``).

    import fused_attn.hf
    fused_attn.hf.register()   # once; then attn_implementation="fused_attn" works everywhere
    model = AutoModelForCausalLM.from_pretrained(name, attn_implementation="fused_attn")

`register()` adds "fused_attn" to transformers' attention interface (the function below) and to
its mask interface (transformers' SDPA mask builder, which hands over no mask at all when a
causal or full pattern needs none, else a bool mask that the kernels read tile by tile). The
kernels serve causal decoders, bidirectional encoders and cross-attention with or without
padding, GQA without `repeat_kv`, and generation with a KV cache (fused_attn's causal mask is
aligned bottom-right, as a cache needs). A call they cannot serve yet (dropout while training,
sliding windows, softcap, an attention bias such as T5's, packed sequences,
`output_attentions`) runs transformers' SDPA path instead, after a one-time warning naming the
reason: never a silent change of meaning.
"""
from __future__ import annotations

import warnings

import torch

from fused_attn.api import attention

NAME = "fused_attn"
_WARNED: set[str] = set()


def _fallback_reason(module: torch.nn.Module, attention_mask: torch.Tensor | None, dropout: float,
                     kwargs: dict) -> str | None:
    if dropout > 0.0:
        return "attention dropout while training"
    if kwargs.get("sliding_window") is not None:
        return "a sliding window"
    if kwargs.get("softcap") is not None:
        return "logit softcapping"
    if kwargs.get("position_bias") is not None or kwargs.get("s_aux") is not None:
        return "an additive attention bias or attention sinks"
    if kwargs.get("cu_seq_lens_q") is not None or kwargs.get("cu_seq_lens_k") is not None:
        return "packed sequences (cu_seq_lens)"
    if kwargs.get("output_attentions"):
        return "output_attentions=True (the kernels never form the weights)"
    return None


def fused_attn_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                       attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                       is_causal: bool | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention-function contract: query (B, Hq, Sq, D), key and value
    (B, Hkv, Sk, D) -> (attn_output (B, Sq, Hq, Dv), None)."""
    reason = _fallback_reason(module, attention_mask, dropout, kwargs)
    if reason is not None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        if reason not in _WARNED:
            _WARNED.add(reason)
            warnings.warn(f"fused_attn: {reason} is not supported by the kernels yet; these calls run "
                          "transformers' SDPA attention instead (warned once per reason)", stacklevel=2)
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    if attention_mask is not None:
        # The mask builder's mask (bool, True attends; or float, added) already holds causality
        # and padding; the kernels read it tile by tile.
        out = attention(query, key, value, scale=scaling, attn_mask=attention_mask[:, :, :, : key.shape[-2]])
        return out.transpose(1, 2), None
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    # With no mask the builder decided none was needed: for a causal module that means Sq == Sk,
    # or decoding against a cache; bottom-right alignment is right for both.
    out = attention(query, key, value, causal=bool(causal) and query.shape[2] > 1, scale=scaling)
    return out.transpose(1, 2), None


def register() -> str:
    """Register "fused_attn" with transformers' attention and mask interfaces; returns the name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, fused_attn_forward)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    return NAME
