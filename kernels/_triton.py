"""Lazy access to Triton: kernel modules are imported on first use, so ``TRITON_INTERPRET`` is read then.

Triton decides between compiling and interpreting when a ``@triton.jit`` decorator runs, i.e. when a kernel
module is imported. Importing the kernel modules lazily (not from ``kernels/__init__``) lets a test module set
``TRITON_INTERPRET=1`` at its top whatever the collection order, and keeps ``import kernels`` free of Triton.
"""
from __future__ import annotations

import importlib
import os

import torch


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def load(module: str, tensor: torch.Tensor):
    """Import ``kernels.<module>`` for a kernel on ``tensor``'s device, or say clearly why it cannot run."""
    if not tensor.is_cuda and not interpreting():
        raise RuntimeError(f"the fused kernel in kernels.{module} runs on CUDA tensors, or on CPU tensors only "
                           "under Triton's interpreter (set TRITON_INTERPRET=1 before the first fused call); "
                           "use impl='reference' (model.kernels=reference or auto) on CPU")
    try:
        return importlib.import_module(f"kernels.{module}")
    except ImportError as exc:
        raise RuntimeError(f"the fused kernel in kernels.{module} needs Triton: {exc}") from exc
