"""The training step's randomness: a pure function of the generator's state, drawn on the training device."""
import torch

from hpdm.config import Config
from hpdm.diffusion import EDM, Condition
from hpdm.pyramid import boxes_from_offsets, sample_offsets
from hpdm.step_rng import draw_step_randomness, restore_generator, step_generator


def _same(a, b):
    for x, y in zip((a.offsets, a.drop, a.sigma, a.noise), (b.offsets, b.drop, b.sigma, b.noise)):
        assert torch.equal(x, y)


def test_draws_are_a_pure_function_of_the_generator_state():
    cfg = Config()
    cfg.model.cond_dropout = 0.5
    gen = step_generator(7, "cpu")
    draw_step_randomness(gen, 4, cfg)  # advance past the seed: the saved state is mid-stream
    state = gen.get_state()
    first = draw_step_randomness(gen, 4, cfg)
    second = draw_step_randomness(gen, 4, cfg)
    assert not torch.equal(first.noise, second.noise)
    restored = step_generator(0, "cpu")
    restore_generator(restored, state)
    _same(draw_step_randomness(restored, 4, cfg), first)
    _same(draw_step_randomness(restored, 4, cfg), second)


def test_draws_live_on_the_training_device_with_their_shapes():
    cfg = Config()
    cfg.model.cond_dropout = 0.5
    gen = step_generator(0, "cpu")
    assert gen.device.type == "cpu"
    d = draw_step_randomness(gen, 3, cfg)
    m = cfg.model
    assert d.offsets.shape == (3, m.levels, 3) and d.offsets.dtype == torch.int64
    assert d.sigma.shape == (3, m.levels) and d.drop.shape == (3,) and d.drop.dtype == torch.bool
    assert d.noise.shape == (3, m.levels, 3, *m.patch)
    assert all(t.device.type == "cpu" for t in (d.offsets, d.drop, d.sigma, d.noise))
    assert boxes_from_offsets(d.offsets, m.patch).device.type == "cpu"
    assert draw_step_randomness(gen, 3, cfg, conditioned=False).drop is None


def test_same_stream_as_the_former_per_call_cpu_draws():
    """Draw order and values equal the former _step's (offsets, dropout, sigma, noise), so CPU runs and CPU
    checkpoints written before the device generator continue identically."""
    cfg = Config()
    cfg.model.cond_dropout = 0.3
    m, micro = cfg.model, 5
    d = draw_step_randomness(step_generator(11, "cpu"), micro, cfg)
    g = torch.Generator().manual_seed(11)
    offsets = sample_offsets(micro, m.levels, m.patch, g)
    labels = Condition(labels=torch.arange(micro)).dropped(m.cond_dropout, g).labels
    sigma = EDM(cfg.diffusion).sample_sigma(micro, m.levels, "cpu", g)
    noise = torch.randn((micro, m.levels, 3, *m.patch), generator=g)
    assert torch.equal(d.offsets, offsets) and torch.equal(d.sigma, sigma) and torch.equal(d.noise, noise)
    assert torch.equal(torch.arange(micro).masked_fill(d.drop, -1), labels)


def test_restore_accepts_another_generator_kinds_state():
    """A state of the wrong size (a CUDA generator's, 16 bytes, on a CPU run) reseeds deterministically."""
    foreign = torch.arange(16, dtype=torch.uint8)
    a, b = step_generator(1, "cpu"), step_generator(2, "cpu")
    restore_generator(a, foreign)
    restore_generator(b, foreign)
    assert torch.equal(torch.rand(8, generator=a), torch.rand(8, generator=b))
