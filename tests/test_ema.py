"""hpdm.ema: the half-life in samples, its ramp-up, bf16 parameters, and the state round trip."""
import pytest
import torch
from torch import nn

from hpdm.ema import EMA


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 2))


def test_the_gap_to_fixed_weights_halves_every_halflife_samples():
    model = _model()
    ema = EMA(model, halflife_samples=64, rampup=0)
    start = {n: t.clone() for n, t in ema.shadow.items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    for seen in range(16, 129, 16):  # 128 samples in batches of 16: two half-lives
        ema.update(model, batch_size=16, samples_seen=seen)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.detach() - ema.shadow[n], 0.25 * (p.detach() - start[n]))


def test_each_update_is_a_lerp_with_the_ramped_halflife_bit_for_bit():
    """Early in training the half-life is ``rampup`` x samples seen (EDM), capped at the configured one."""
    model = _model()
    ema = EMA(model, halflife_samples=100.0)
    ref = {n: p.detach().clone() for n, p in model.named_parameters()}
    gen = torch.Generator().manual_seed(1)
    for step in range(1, 6):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=gen))
        ema.update(model, batch_size=4, samples_seen=1000 * step)  # ramped: 50, then capped at 100 from step 2
        beta = 0.5 ** (4 / min(100.0, 1000 * step * 0.05))
        for n, p in model.named_parameters():
            ref[n].lerp_(p.detach(), 1 - beta)
    assert all(torch.equal(ref[n], ema.shadow[n]) for n in ref)


def test_bf16_parameters_keep_an_fp32_shadow_and_copy_back_rounded():
    model = _model()
    ema = EMA(model, halflife_samples=10.0, rampup=0)
    model.to(torch.bfloat16)
    ema.update(model, batch_size=10, samples_seen=10)
    assert all(t.dtype == torch.float32 for t in ema.shadow.values())
    ema.copy_to(model)
    for n, p in model.named_parameters():
        assert p.dtype == torch.bfloat16 and torch.equal(p, ema.shadow[n].to(torch.bfloat16))


def test_state_round_trip_and_a_state_that_lacks_parameters_is_refused():
    model = _model()
    ema = EMA(model, halflife_samples=10.0)
    ema.update(model, batch_size=2, samples_seen=2)
    other = EMA(_model(), halflife_samples=10.0)
    other.load_state_dict({n: t.clone() for n, t in ema.state_dict().items()})
    assert all(torch.equal(other.shadow[n], t) for n, t in ema.shadow.items())
    partial = dict(list(ema.state_dict().items())[1:])
    with pytest.raises(KeyError, match="EMA state lacks 1 parameters"):
        other.load_state_dict(partial)
