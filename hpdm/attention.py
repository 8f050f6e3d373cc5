"""One attention function for the whole model; it picks the fastest backend available and logs the choice.

Order: the ``flash_attn`` package (FA3 ``flash_attn_interface``, then FA2), xformers, then PyTorch SDPA
(which itself picks cuDNN, flash, memory-efficient or math). Tensors are ``[B, N, heads, head_dim]``.
"""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)


def _import(name: str, attr: str):
    try:
        module = __import__(name, fromlist=[attr])
        return getattr(module, attr)
    except Exception:  # missing package, or one built against another torch/CUDA
        return None


_BACKENDS = {
    "fa3": lambda: _import("flash_attn_interface", "flash_attn_func"),
    "fa2": lambda: _import("flash_attn", "flash_attn_func"),
    "xformers": lambda: _import("xformers.ops", "memory_efficient_attention"),
}
_loaded: dict[str, object] = {}
_logged: set[str] = set()


def _backend(name: str):
    if name not in _loaded:
        _loaded[name] = _BACKENDS[name]()
    return _loaded[name]


def _sdpa(q, k, v):
    return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)


def select_backend(q: torch.Tensor, k: torch.Tensor) -> str:
    """Name of the backend that ``attention`` uses for these inputs."""
    if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] <= 256:
        for name in ("fa3", "fa2", "xformers"):
            if _backend(name) is not None:
                return name
    return "sdpa"


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Softmax attention, no mask: q [B,Nq,H,d], k and v [B,Nk,H,d] -> [B,Nq,H,d]."""
    name = select_backend(q, k)
    if name not in _logged:
        _logged.add(name)
        log.info("attention backend: %s (%s, %s)", name, q.device.type, q.dtype)
    if name == "sdpa":
        return _sdpa(q, k, v)
    out = _backend(name)(q, k, v)
    return out[0] if isinstance(out, tuple) else out  # FA3 returns (out, lse)
