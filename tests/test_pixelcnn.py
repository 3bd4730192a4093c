"""Gated PixelCNN invariants: causality in raster + R->G->B order, no blind spot, a uniform model
scores exactly 8 bits/dim, and the cached sampler reads the same conditionals as the full network."""
import pytest
import torch

from trilemma.contract.likelihood import bits_per_dim, to_signed
from trilemma.contract.family import build_config
from trilemma.contract.testing import structured_batch
from trilemma.contract.update import plain_update
from trilemma.models.pixelcnn import PixelCNN


def make(shape, **overrides):
    torch.manual_seed(0)
    return PixelCNN(build_config(PixelCNN, "tiny", overrides), shape)


def dependencies(model, shape):
    """dep[c, i, j] = (C, H, W) bool map of the input subpixels that logits[:, c, i, j] depend on.

    Gradients at 16 random inputs at once: at one input a path can be switched off by chance (every
    ReLU of a small layer negative), not at all of them."""
    model = model.double()
    x = torch.randn(16, *shape, dtype=torch.double, requires_grad=True)
    logits = model.head(model.horizontal_stack(x, model.vertical_stack(x)))  # (8, 256, C, H, W)
    c, h, w = shape
    dep = torch.zeros(c, h, w, c, h, w, dtype=torch.bool)
    for ch in range(c):
        for i in range(h):
            for j in range(w):
                g, = torch.autograd.grad(logits[:, :, ch, i, j].sum(), x, retain_graph=True)
                dep[ch, i, j] = g.abs().sum(0) != 0  # images are independent: per-image grads
    return dep


def strictly_earlier(shape):
    """before[c, i, j] = (C, H, W) bool map of the subpixels before (c, i, j): raster order of
    pixels, then R -> G -> B within a pixel."""
    c, h, w = shape
    ch, i, j = torch.meshgrid(torch.arange(c), torch.arange(h), torch.arange(w), indexing="ij")
    order = (i * w + j) * c + ch  # (C, H, W): position of each subpixel in the sequence
    return order[None, None, None] < order[..., None, None, None]


@pytest.mark.parametrize("shape", [(1, 6, 6), (3, 5, 5)])
def test_no_output_depends_on_its_own_or_a_later_subpixel(shape):
    dep = dependencies(make(shape), shape)
    assert not (dep & ~strictly_earlier(shape)).any()
    assert dep.any()  # and the check is not vacuous


@pytest.mark.parametrize("shape", [(1, 5, 5), (3, 4, 4)])
def test_no_blind_spot(shape):
    # Deep enough that the receptive field covers the image: every earlier subpixel is seen.
    # Wider than tiny: with a few features per colour, ReLUs near the border can be off for every
    # input, which would cut a path that exists.
    model = make(shape, layers=5, first_kernel=3, kernel=3, channels=30, head_channels=48)
    dep = dependencies(model, shape)
    assert torch.equal(dep, strictly_earlier(shape))


@pytest.mark.parametrize("shape", [(1, 8, 8), (3, 8, 8)])
def test_zeroed_output_layer_scores_exactly_8_bits_per_dim(shape):
    model = make(shape)
    torch.nn.init.zeros_(model.head2.weight)
    torch.nn.init.zeros_(model.head2.bias)
    x = torch.randint(0, 256, (5, *shape), dtype=torch.uint8)
    bpd = bits_per_dim(model.nll(x), model.num_dims)
    torch.testing.assert_close(bpd, torch.full((5,), 8.0), rtol=0, atol=1e-5)


@pytest.mark.parametrize("shape", [(1, 7, 7), (3, 5, 5)])
def test_cached_sampler_uses_the_full_networks_conditionals(shape):
    model = make(shape).eval()
    # Images larger than the receptive field, so that the sampler's crops are exercised.
    assert model.reach_up < shape[1] - 1 and model.reach_left < shape[2] - 1
    seen = []  # logits of every sampling step, in order
    hook = model.head2.register_forward_hook(lambda m, inp, out: seen.append(out[:, :, 0, -1]))
    torch.manual_seed(1)
    with torch.no_grad():
        s = model.sample(4)
        hook.remove()
        seen_logits = torch.stack(seen)  # (C*H*W, 4, C*256)
        full = model.logits(((s + 1) * 127.5).round().to(torch.uint8))  # (4, 256, C, H, W)
    c, h, w = shape
    assert len(seen) == c * h * w == model.samplers()["ancestral"]
    k = 0
    for i in range(h):
        for j in range(w):
            for ch in range(c):
                step = seen_logits[k].view(4, c, 256)[:, ch]  # (4, 256)
                torch.testing.assert_close(step, full[:, :, ch, i, j], atol=1e-4, rtol=1e-4)
                k += 1
    # Samples lie on the 256 levels.
    assert torch.equal(to_signed(((s + 1) * 127.5).round().to(torch.uint8)), s)


def test_training_lowers_the_nll_of_a_batch():
    shape = (1, 8, 8)
    model = make(shape, lr=1e-2)
    update = plain_update(model)
    x = structured_batch(16, shape)
    with torch.no_grad():
        before = model.nll(x).mean()
    for _ in range(30):
        model.train_step(x, update)
    with torch.no_grad():
        after = model.nll(x).mean()
    assert after < 0.8 * before
