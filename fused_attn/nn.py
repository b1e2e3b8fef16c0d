"""Modules: a drop-in `MultiheadAttention` and `swap_attention` for models that already exist."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from fused_attn._checks import unsupported_reason
from fused_attn._warnings import warn_once
from fused_attn.api import attention

_WARNED: set[str] = set()


class MultiheadAttention(torch.nn.MultiheadAttention):
    """`torch.nn.MultiheadAttention` with the attention computed by fused_attn's kernels.

    The constructor, parameter names, state dict and forward signature are torch's (it is a
    subclass), so ``load_state_dict`` from a torch module works and code that calls it needs no
    change. query (L, N, E) or (N, L, E) with ``batch_first``, or unbatched (L, E); key and value
    (S, N, kdim / vdim) likewise; returns (attn_output, None) on the fused path.

    ``attn_mask`` and ``key_padding_mask`` (bool, True = may not attend, or float, added) run
    inside the kernels; with ``is_causal=True`` the attn_mask is trusted to be causal, as torch
    does. So does ``dropout`` while training (none in eval mode, as in torch): its seed is drawn
    from torch's default CPU generator, so `torch.manual_seed` makes a training step repeatable,
    and `fused_attn.dropout_seed()` after re-seeding gives the seed a call used
    (`fused_attn.dropout_mask` with shape (N, num_heads, L, S) then gives its mask).
    The fused path needs ``need_weights=False`` (torch's default, True, asks for the L x S
    weights, which the kernels never form), no ``add_bias_kv`` or ``add_zero_attn``, and tensors
    the kernels run on (CUDA, or CPU under TRITON_INTERPRET=1; float16/bfloat16/float32; head dim
    <= 512). Any other call runs torch's implementation with the same arguments, after a one-time
    warning that names the reason. A query that the masks leave without any key gets zeros, as
    in torch 2.13 (older torch releases gave NaN).
    """

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                key_padding_mask: torch.Tensor | None = None, need_weights: bool = True,
                attn_mask: torch.Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        reason = self._why_not_fused(query, key, key_padding_mask, need_weights, attn_mask, is_causal)
        if reason is not None:
            warn_once(_WARNED, reason, f"fused_attn.nn.MultiheadAttention: {reason}; this call runs torch's own "
                      "implementation instead (warned once per reason)", stacklevel=2)
            return super().forward(query, key, value, key_padding_mask=key_padding_mask, need_weights=need_weights,
                                   attn_mask=attn_mask, average_attn_weights=average_attn_weights,
                                   is_causal=is_causal)
        unbatched = query.dim() == 2
        if unbatched:
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
        if not self.batch_first:  # (L, N, E) -> (N, L, E)
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        if self._qkv_same_embed_dim:
            w_q, w_k, w_v = self.in_proj_weight.chunk(3)
        else:
            w_q, w_k, w_v = self.q_proj_weight, self.k_proj_weight, self.v_proj_weight
        b_q, b_k, b_v = self.in_proj_bias.chunk(3) if self.in_proj_bias is not None else (None, None, None)
        batch, seq_q, seq_k = query.shape[0], query.shape[1], key.shape[1]
        # (N, L, E) projections seen as (N, H, L, D) without a copy.
        q = F.linear(query, w_q, b_q).view(batch, seq_q, self.num_heads, self.head_dim).transpose(1, 2)
        k = F.linear(key, w_k, b_k).view(batch, seq_k, self.num_heads, self.head_dim).transpose(1, 2)
        v = F.linear(value, w_v, b_v).view(batch, seq_k, self.num_heads, self.head_dim).transpose(1, 2)
        causal = is_causal and key_padding_mask is None and seq_q == seq_k  # torch trusts the hint likewise
        bias = None if causal else self._kernel_mask(attn_mask, key_padding_mask, batch, seq_q, seq_k, q.dtype)
        dropout_p = self.dropout if self.training else 0.0
        o = attention(q, k, v, causal=causal, attn_mask=bias, dropout_p=dropout_p)
        o = o.transpose(1, 2).reshape(batch, seq_q, self.embed_dim)
        out = self.out_proj(o)
        if not self.batch_first:
            out = out.transpose(0, 1)
        return (out.squeeze(1) if unbatched else out), None

    def _kernel_mask(self, attn_mask: torch.Tensor | None, key_padding_mask: torch.Tensor | None, batch: int,
                     seq_q: int, seq_k: int, dtype: torch.dtype) -> torch.Tensor | None:
        """torch's masks (bool: True = may NOT attend; float: added) as one kernel mask, broadcastable
        to (N, H, L, S): bool where True attends when both are bool, else a float bias."""
        masks = []
        if attn_mask is not None:  # (L, S) or (N * H, L, S)
            masks.append(attn_mask if attn_mask.dim() == 2 else attn_mask.view(batch, self.num_heads, seq_q, seq_k))
        if key_padding_mask is not None:  # (N, S), or (S,) unbatched
            masks.append(key_padding_mask.view(-1, 1, 1, seq_k))
        if not masks:
            return None
        if all(m.dtype == torch.bool for m in masks):
            keep = ~masks[0]
            for m in masks[1:]:
                keep = keep & ~m
            return keep
        bias = None
        for m in masks:
            m = torch.zeros(m.shape, dtype=dtype, device=m.device).masked_fill(m, float("-inf")) \
                if m.dtype == torch.bool else m.to(dtype)
            bias = m if bias is None else bias + m
        return bias

    def _why_not_fused(self, query: torch.Tensor, key: torch.Tensor, key_padding_mask: torch.Tensor | None,
                       need_weights: bool, attn_mask: torch.Tensor | None, is_causal: bool) -> str | None:
        if need_weights:
            return "need_weights=True (torch's default) asks for the attention weights; pass need_weights=False"
        if is_causal and attn_mask is None:
            return "is_causal=True without attn_mask (torch requires the mask as well)"
        if self.training and self.dropout >= 1.0:  # torch zeroes everything; the kernels take p < 1
            return "dropout=1 while training"
        if self.bias_k is not None or self.add_zero_attn:
            return "add_bias_kv and add_zero_attn are not supported"
        return unsupported_reason(query, self.head_dim)


def swap_attention(model: torch.nn.Module) -> int:
    """Make every `torch.nn.MultiheadAttention` in `model` a fused_attn `MultiheadAttention`, in
    place: the same object, parameters, buffers, hooks, device and dtype, only the class changes.
    Subclasses of torch's module (which may override forward) are left alone. Returns how many
    modules were swapped."""
    swapped = 0
    for module in model.modules():
        if type(module) is torch.nn.MultiheadAttention:
            module.__class__ = MultiheadAttention
            swapped += 1
    return swapped
