"""One attention function for the whole model; on CUDA it times the backends once per shape and keeps the fastest.

Candidates: the ``flash_attn`` package (FA3 ``flash_attn_interface``, FA2), xformers, and PyTorch SDPA pinned to
each of its fused kernels (cuDNN, flash, memory-efficient). The first call for a key (shapes, dtype, device,
whether gradients are needed) runs each candidate a few times, timed with CUDA events (forward, plus backward
when the call needs gradients), caches the fastest and logs the choice once. CPU always uses SDPA, untimed;
so do calls made while a CUDA graph is captured or torch.compile traces. ``HPDM_ATTENTION=<name>`` forces a
backend. Tensors are ``[B, N, heads, head_dim]``.
"""
from __future__ import annotations

import logging
import os
import statistics
from typing import Callable

import torch
import torch.nn.functional as F

from hpdm.errors import UserError

log = logging.getLogger(__name__)

SDPA_KERNELS = ("cudnn", "flash", "efficient")
BACKENDS = ("sdpa", *(f"sdpa-{k}" for k in SDPA_KERNELS), "fa3", "fa2", "xformers")  # HPDM_ATTENTION's choices


def _import(name: str, attr: str):
    try:
        module = __import__(name, fromlist=[attr])
        return getattr(module, attr)
    except Exception:  # missing package, or one built against another torch/CUDA
        return None


_PACKAGES = {
    "fa3": lambda: _import("flash_attn_interface", "flash_attn_func"),
    "fa2": lambda: _import("flash_attn", "flash_attn_func"),
    "xformers": lambda: _import("xformers.ops", "memory_efficient_attention"),
}
_loaded: dict[str, object] = {}
_choice: dict[tuple, str] = {}


def _package(name: str):
    if name not in _loaded:
        _loaded[name] = _PACKAGES[name]()
    return _loaded[name]


def _sdpa(q, k, v):
    return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)


def _sdpa_pinned(kernel: str) -> Callable:
    from torch.nn.attention import SDPBackend, sdpa_kernel
    backend = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
               "efficient": SDPBackend.EFFICIENT_ATTENTION}[kernel]

    def run(q, k, v):
        with sdpa_kernel([backend]):
            return _sdpa(q, k, v)
    return run


def backend_fn(name: str) -> Callable | None:
    """The callable ``(q, k, v) -> out`` of a backend name (``sdpa``, ``sdpa-<kernel>``, fa3, fa2, xformers),
    or None if that package is not importable."""
    if name == "sdpa":
        return _sdpa
    if name.startswith("sdpa-"):
        return _sdpa_pinned(name[5:])
    fn = _package(name)
    if fn is None:
        return None

    def run(q, k, v):
        out = fn(q, k, v)
        return out[0] if isinstance(out, tuple) else out  # FA3 returns (out, lse)
    return run


def candidates(q: torch.Tensor) -> list[str]:
    """Backends worth timing for ``q`` (the package kernels need fp16/bf16 and head_dim <= 256)."""
    names = []
    if q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] <= 256:
        names = [n for n in ("fa3", "fa2", "xformers") if _package(n) is not None]
    return names + [f"sdpa-{k}" for k in SDPA_KERNELS]


def time_backend(fn: Callable, q, k, v, backward: bool, warmup: int = 2, reps: int = 5) -> float:
    """Median milliseconds of ``fn`` (forward, or forward + backward) on ``q``'s CUDA device."""
    if backward:
        q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    grad = torch.ones_like(q) if backward else None

    def step():
        with torch.enable_grad() if backward else torch.no_grad():
            out = fn(q, k, v)
            if backward:
                torch.autograd.backward(out, grad)
    times = []
    for i in range(warmup + reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        if i >= warmup:
            end.synchronize()
            times.append(start.elapsed_time(end))
    return statistics.median(times)


def choose(names: list[str], timer: Callable[[str], float]) -> tuple[str, dict[str, float]]:
    """The fastest of ``names`` by ``timer``; a backend that raises (shape or dtype unsupported) is skipped."""
    timings = {}
    for name in names:
        try:
            timings[name] = timer(name)
        except Exception as exc:  # noqa: BLE001 - any failure just rules the backend out
            log.debug("attention backend %s unavailable: %s", name, exc)
    if not timings:
        return "sdpa", timings
    return min(timings, key=timings.get), timings


def _tunable(q: torch.Tensor) -> bool:
    if not q.is_cuda:
        return False
    compiling = getattr(torch.compiler, "is_compiling", lambda: False)()
    return not compiling and not torch.cuda.is_current_stream_capturing()


def select_backend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor | None = None) -> str:
    """Name of the backend that ``attention`` uses for these inputs (timing them on first sight on CUDA)."""
    forced = os.environ.get("HPDM_ATTENTION")
    if forced:
        if forced not in BACKENDS:
            raise UserError(f"HPDM_ATTENTION: unknown backend {forced!r}; choose from {', '.join(BACKENDS)}")
        return forced
    if not _tunable(q):
        return "sdpa"
    v = k if v is None else v
    backward = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    key = (tuple(q.shape), tuple(k.shape), tuple(v.shape), q.dtype, q.device, backward)
    if key not in _choice:
        name, timings = choose(candidates(q), lambda n: time_backend(backend_fn(n), q, k, v, backward))
        _choice[key] = name
        shown = ", ".join(f"{n} {t:.3f}" for n, t in sorted(timings.items(), key=lambda kv: kv[1]))
        log.info("attention backend for q%s k%s %s%s: %s (ms: %s)", key[0], key[1], q.dtype,
                 " fwd+bwd" if backward else "", name, shown or "none ran")
    return _choice[key]


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Softmax attention: q [B,Nq,H,d], k and v [B,Nk,H,d] -> [B,Nq,H,d]. ``mask`` [B,Nk] (True: attend; every
    row needs one) leaves out padded keys, e.g. of captions, through PyTorch's SDPA."""
    if mask is not None:
        qkv = (a.transpose(1, 2) for a in (q, k, v))
        return F.scaled_dot_product_attention(*qkv, attn_mask=mask[:, None, None]).transpose(1, 2)
    fn = backend_fn(select_backend(q, k, v))
    if fn is None:  # only a forced backend can be missing
        raise UserError(f"HPDM_ATTENTION: {select_backend(q, k, v)} is not installed (or does not import)")
    return fn(q, k, v)
