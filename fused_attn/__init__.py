"""fused-attn: tiled online-softmax attention kernels in Triton behind a torch autograd Function."""
from fused_attn import reference
from fused_attn._launch import interpreting, override_configs
from fused_attn.api import attention
from fused_attn.kernels.configs import AttentionConfigs, KernelConfig

__all__ = ["attention", "reference", "override_configs", "interpreting", "AttentionConfigs", "KernelConfig"]
__version__ = "0.1.0"
