"""fused-attn: tiled online-softmax attention kernels in Triton behind a torch autograd formula."""
from fused_attn import nn, reference
from fused_attn._launch import interpreting, override_configs
from fused_attn.api import attention, attention_varlen, dropout_mask, dropout_seed
from fused_attn.kvcache import attention_with_kvcache
from fused_attn.kernels.configs import AttentionConfigs, KernelConfig
from fused_attn.nn import swap_attention
from fused_attn.registry import activate, deactivate
from fused_attn.sdpa import scaled_dot_product_attention
from fused_attn.weights import AttentionStats, attention_probs, attention_stats

__all__ = ["attention", "attention_varlen", "attention_with_kvcache", "dropout_seed", "dropout_mask", "attention_probs", "attention_stats",
           "AttentionStats", "scaled_dot_product_attention", "reference", "nn", "swap_attention", "activate", "deactivate", "override_configs",
           "interpreting", "AttentionConfigs", "KernelConfig"]
__version__ = "0.1.0"
