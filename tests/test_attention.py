"""Attention dispatch: CPU stays on SDPA; on CUDA the fastest backend per shape is timed once and cached."""
import logging

import pytest
import torch

from hpdm import attention as attn
from hpdm.errors import UserError


def _qkv(nq=5, nk=7, d=8, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(2, n, 3, d, generator=g, dtype=dtype) for n in (nq, nk, nk)]


def test_cpu_uses_sdpa_and_matches_softmax_attention():
    q, k, v = _qkv()
    assert attn.select_backend(q, k, v) == "sdpa"
    out = attn.attention(q, k, v)
    w = torch.softmax(torch.einsum("bqhd,bkhd->bhqk", q, k) / q.shape[-1] ** 0.5, dim=-1)
    torch.testing.assert_close(out, torch.einsum("bhqk,bkhd->bqhd", w, v), rtol=1e-5, atol=1e-5)
    assert not attn._choice  # nothing was timed on CPU


def test_choose_picks_fastest_and_skips_failures():
    times = {"fa2": 3.0, "sdpa-cudnn": 1.0, "sdpa-flash": 2.0}

    def timer(name):
        if name == "xformers":
            raise RuntimeError("unsupported head dim")
        return times[name]
    best, timings = attn.choose(["fa2", "xformers", "sdpa-cudnn", "sdpa-flash"], timer)
    assert best == "sdpa-cudnn" and set(timings) == set(times)
    assert attn.choose(["xformers"], timer) == ("sdpa", {})


def test_timed_once_per_key_cached_and_logged_once(monkeypatch, caplog):
    calls = []

    def fake_time(fn, q, k, v, backward):
        calls.append(backward)
        return 1.0 if fn is efficient else 2.0
    efficient = attn.backend_fn("sdpa")
    monkeypatch.setattr(attn, "_tunable", lambda q: True)
    monkeypatch.setattr(attn, "candidates", lambda q: ["sdpa-flash", "sdpa"])
    monkeypatch.setattr(attn, "backend_fn", lambda n: efficient if n == "sdpa" else (lambda *a: None))
    monkeypatch.setattr(attn, "time_backend", fake_time)
    monkeypatch.setattr(attn, "_choice", {})
    q, k, v = _qkv()
    with caplog.at_level(logging.INFO, logger=attn.__name__):
        assert attn.select_backend(q, k, v) == "sdpa"
        assert attn.select_backend(q, k, v) == "sdpa"
        q.requires_grad_()
        attn.select_backend(q, k, v)  # needs gradients: a new key, timed with backward
    assert calls == [False, False, True, True]
    assert len([r for r in caplog.records if "attention backend" in r.getMessage()]) == 2


def test_forced_backend(monkeypatch):
    monkeypatch.setenv("HPDM_ATTENTION", "sdpa-flash")
    q, k, _ = _qkv()
    assert attn.select_backend(q, k) == "sdpa-flash"
    for name in ("bogus", "sdpa-foo"):  # a bare KeyError
        monkeypatch.setenv("HPDM_ATTENTION", name)
        with pytest.raises(UserError, match=f"HPDM_ATTENTION: unknown backend '{name}'; choose from sdpa, sdpa-cudnn"):
            attn.attention(q, k, k)


@pytest.mark.gpu
def test_gpu_choice_is_a_working_backend():
    q, k, v = (t.cuda().bfloat16() for t in _qkv(768, 4096, 64))
    name = attn.select_backend(q, k, v)
    assert name in attn.candidates(q) or name == "sdpa"
    ref = attn.backend_fn("sdpa")(q.float(), k.float(), v.float())
    torch.testing.assert_close(attn.attention(q, k, v).float(), ref, rtol=2e-2, atol=2e-2)
