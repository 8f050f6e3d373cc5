"""Fused GPU kernels for HPDM, each beside its plain-PyTorch reference with the same signature."""
from kernels.context_fusion import context_fusion, context_fusion_reference
from kernels.patch_gather import gather_pyramid, gather_pyramid_reference
from kernels.token_conv import token_conv, token_conv_reference

__all__ = ["context_fusion", "context_fusion_reference", "gather_pyramid", "gather_pyramid_reference", "token_conv",
           "token_conv_reference"]
