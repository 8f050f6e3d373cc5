import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from hpdm.config import ModelConfig
from hpdm.flops import parameter_counts
from hpdm.model import HPDM
from hpdm.pyramid import boxes_from_offsets, sample_offsets
from tests.helpers import randomize, tiny_model_config

B = 2


def _inputs(cfg, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, cfg.levels, 3, *cfg.patch, generator=g).to(dtype)
    boxes = boxes_from_offsets(sample_offsets(B, cfg.levels, cfg.patch, g), cfg.patch).to(dtype)
    c_noise = torch.randn(B, cfg.levels, generator=g).to(dtype)
    return x, c_noise, boxes, torch.tensor([1, -1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_shapes_and_dtypes(dtype):
    cfg = tiny_model_config()
    model = randomize(HPDM(cfg)).to(dtype)
    x, c, boxes, labels = _inputs(cfg, dtype=dtype)
    out = model(x, c, boxes, labels)
    assert out.shape == x.shape and out.dtype == dtype and torch.isfinite(out.float()).all()
    # a prefix of the pyramid (level 0 alone, as when sampling level 0) gives the same level-0 output
    tol = dict(rtol=0, atol=1e-5) if dtype == torch.float32 else dict(rtol=0, atol=3e-2)  # bf16: a few ulps of ~1
    torch.testing.assert_close(model(x[:, :1], c[:, :1], boxes[:, :1], labels), out[:, :1], **tol)


def test_text_conditioning_shapes():
    cfg = tiny_model_config(cond="text", text_dim=12)
    model = randomize(HPDM(cfg))
    x, c, boxes, _ = _inputs(cfg)
    text, mask = torch.randn(B, 5, 12), torch.tensor([[1, 1, 0, 0, 0], [0, 0, 0, 0, 0]], dtype=torch.bool)
    out = model(x, c, boxes, text=text, text_mask=mask)
    assert out.shape == x.shape
    with pytest.raises(ValueError, match="text"):
        model(x, c, boxes)


def test_text_tokens_are_read_and_padding_is_not():
    """Caption tokens matter beyond their mean (the latents read them); padded ones do not, and the tiled
    sampler's cached coarse context gives the joint forward's finest level. In float64, so that any difference
    above rounding is the model's."""
    cfg = tiny_model_config(cond="text", text_dim=12)
    model = randomize(HPDM(cfg)).double()
    x, c, boxes = (t.double() for t in _inputs(cfg)[:3])
    text = torch.randn(B, 6, 12, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1] * 6], dtype=torch.bool)
    out = model(x, c, boxes, text=text, text_mask=mask)
    padded = text.clone()
    padded[0, 3:] = 100.0
    torch.testing.assert_close(model(x, c, boxes, text=padded, text_mask=mask), out, rtol=0, atol=1e-12)
    same_mean = text.clone()
    same_mean[0, 0] += 1.0
    same_mean[0, 1] -= 1.0  # only reading the tokens can tell these two captions apart
    assert (model(x, c, boxes, text=same_mean, text_mask=mask)[0] - out[0]).abs().max() > 1e-8
    K = cfg.levels - 1
    ctx = model.coarse_context(x[:, :K], c[:, :K], boxes[:, :K], None, text, mask)
    fine = model.forward_level(x[:, K:], c[:, K:], boxes, ctx, None, text, mask)
    torch.testing.assert_close(fine[:, 0], out[:, K], rtol=0, atol=1e-12)


@pytest.mark.parametrize("fusion", ["deep", "shallow"])
def test_information_flows_only_coarse_to_fine(fusion):
    cfg = tiny_model_config(context_fusion=fusion)
    model = randomize(HPDM(cfg))
    x, c, boxes, labels = _inputs(cfg)
    base = model(x, c, boxes, labels)
    for level in range(cfg.levels):
        x2 = x.clone()
        x2[:, level] += torch.randn_like(x2[:, level])
        out = model(x2, c, boxes, labels)
        for coarser in range(level):
            assert torch.equal(out[:, coarser], base[:, coarser]), f"level {level} changed level {coarser}"
        for finer in range(level, cfg.levels):
            assert not torch.allclose(out[:, finer], base[:, finer]), f"level {level} did not reach level {finer}"


@pytest.mark.parametrize("detach", [False, True])
def test_context_gradient_reaches_coarse_levels_unless_detached(detach):
    cfg = tiny_model_config(context_detach=detach)
    model = randomize(HPDM(cfg))
    x, c, boxes, labels = _inputs(cfg)
    x.requires_grad_(True)
    fine_loss = model(x, c, boxes, labels)[:, 2].square().mean()
    (grad,) = torch.autograd.grad(fine_loss, x)
    coarse_grad = grad[:, :2].abs().sum().item()
    assert grad[:, 2].abs().sum() > 0
    if detach:
        assert coarse_grad == 0.0
    else:
        assert coarse_grad > 0.0


def test_skipped_levels_do_not_enter_a_block():
    cfg = tiny_model_config(levels_per_block=(1, 2, 2, 3))
    model = randomize(HPDM(cfg))
    seen = []
    for block in model.blocks:
        block.register_forward_hook(lambda mod, args, out: seen.append(args[0].shape[0]))
    model(*_inputs(cfg))
    assert seen == [B * n for n in cfg.levels_per_block]
    # and computation shrinks accordingly: every level through every block costs more
    full = HPDM(tiny_model_config(levels_per_block=(3, 3, 3, 3)))
    flops = []
    for m in (model, full):
        with FlopCounterMode(display=False) as fc:
            m(*_inputs(cfg))
        flops.append(fc.get_total_flops())
    assert flops[0] < 0.75 * flops[1]


def test_shallow_fusion_only_at_a_levels_first_block():
    for fusion, expect_grad in (("deep", True), ("shallow", False)):
        cfg = tiny_model_config(context_fusion=fusion, levels_per_block=(1, 2, 2, 3))
        model = randomize(HPDM(cfg))
        model(*_inputs(cfg))[:, 1:].square().mean().backward()
        # block 1 is level 1's first block; block 2 runs level 1 again, which only deep fusion fuses
        assert model.blocks[1].fuse.weight.grad.abs().sum() > 0
        assert (model.blocks[2].fuse.weight.grad is not None and model.blocks[2].fuse.weight.grad.abs().sum() > 0) == expect_grad


def test_fusion_starts_as_identity():
    """Zero-initialised context projections: a fresh model's finer levels ignore the coarse ones."""
    cfg = tiny_model_config()
    model = HPDM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "fuse" not in name:
                p.copy_(torch.randn_like(p) * 0.1)
    x, c, boxes, labels = _inputs(cfg)
    x2 = x.clone()
    x2[:, 0] += 1.0
    torch.testing.assert_close(model(x2, c, boxes, labels)[:, 1:], model(x, c, boxes, labels)[:, 1:])


def test_pixel_head_starts_as_identity_and_reads_the_input_pixels():
    """Zero-initialised gate: a fresh pixel head passes the tokens' pixels through; trained (random) weights make
    the output depend on the input pixels directly, also across the edge between two tokens."""
    off = randomize(HPDM(tiny_model_config(pixel_head=0)))
    on = HPDM(tiny_model_config(pixel_head=4))
    missing, unexpected = on.load_state_dict(off.state_dict(), strict=False)
    assert not unexpected and missing and all(k.startswith("pixel_head.") for k in missing)
    x, c, boxes, labels = _inputs(tiny_model_config())
    torch.testing.assert_close(on(x, c, boxes, labels), off(x, c, boxes, labels), rtol=0, atol=0)
    # Trained (random) weights: each output pixel reads the input pixels of its 5x5 neighbourhood (two 3x3
    # convolutions) in its own frame, across token edges (tokens are 4x4 pixels here), and no others.
    head = randomize(on.pixel_head, std=0.3, seed=1)
    out, x = torch.randn(2, 3, 4, 16, 16), torch.randn(2, 3, 4, 16, 16, requires_grad=True)
    grad, = torch.autograd.grad(head(out, x, torch.randn(2, 32))[0, :, 1, 5, 4].sum(), x)
    reach = grad[0].abs().sum(0) > 0  # [t,h,w]
    assert reach[1, 3:8, 2:7].all() and reach.sum() == 25


@pytest.mark.parametrize("name,latent_dim,target", [("S", 256, 178e6), ("M", 512, 321e6), ("L", 1024, 725e6)])
def test_paper_parameter_counts(name, latent_dim, target):
    from hpdm.config import load_config

    cfg = load_config(f"configs/ucf101_hpdm_{name.lower()}.yaml").model
    assert cfg.latent_dim == latent_dim
    with torch.device("meta"):
        total = parameter_counts(HPDM(cfg))["total"]
    assert abs(total / target - 1) < 0.10, f"HPDM-{name}: {total:,} parameters vs {target:,.0f}"


def test_invalid_model_config_names_key():
    with pytest.raises(ValueError, match="model.levels_per_block"):
        HPDM(ModelConfig(levels=3, blocks=2, levels_per_block=(1, 3, 3)))
