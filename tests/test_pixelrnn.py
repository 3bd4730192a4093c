"""PixelRNN (Row LSTM) invariants: causality in raster + R->G->B order, the Row LSTM's triangular
receptive field, a uniform model scores exactly 8 bits/dim, and the incremental sampler reads the same
conditionals as the full network."""
import pytest
import torch

from trilemma.contract.family import build_config
from trilemma.contract.likelihood import bits_per_dim, from_signed, to_signed
from trilemma.contract.testing import structured_batch
from trilemma.contract.update import plain_update
from trilemma.models.pixelrnn import PixelRNN


def make(shape, **overrides):
    torch.manual_seed(0)
    return PixelRNN(build_config(PixelRNN, "tiny", overrides), shape)


def dependencies(model, shape):
    """dep[c, i, j] = (C, H, W) bool map of the input subpixels that logits[:, c, i, j] depend on
    (gradients at 16 random inputs at once, so that no path is off by chance at all of them)."""
    model = model.double()
    x = torch.randn(16, *shape, dtype=torch.double, requires_grad=True)
    logits = model.head(model.features(x))  # (16, 256, C, H, W)
    c, h, w = shape
    dep = torch.zeros(c, h, w, c, h, w, dtype=torch.bool)
    for ch in range(c):
        for i in range(h):
            for j in range(w):
                g, = torch.autograd.grad(logits[:, :, ch, i, j].sum(), x, retain_graph=True)
                dep[ch, i, j] = g.abs().sum(0) != 0
    return dep


def strictly_earlier(shape):
    c, h, w = shape
    ch, i, j = torch.meshgrid(torch.arange(c), torch.arange(h), torch.arange(w), indexing="ij")
    order = (i * w + j) * c + ch  # (C, H, W): position of each subpixel in the sequence
    return order[None, None, None] < order[..., None, None, None]


@pytest.mark.parametrize("shape", [(1, 6, 6), (3, 5, 5)])
def test_no_output_depends_on_its_own_or_a_later_subpixel(shape):
    dep = dependencies(make(shape), shape)
    assert not (dep & ~strictly_earlier(shape)).any()
    assert dep.any()


def test_receptive_field_is_the_row_lstm_triangle():
    # Only the 1 x 3 state-to-state kernel and the first layer's rows above reach to the right, one
    # column per row up: pixel (i, j) sees row i-e up to column j+e and no further (the paper's
    # triangle, which misses the context to the upper right). A full-row or unmasked convolution
    # anywhere would widen it.
    shape = (1, 4, 9)
    model = make(shape, layers=2, first_kernel=3, kernel=3, hidden=16, head_channels=16)
    dep = dependencies(model, shape)[0, 3, 0, 0]  # what the last row's first pixel sees (H, W)
    for e in (1, 2, 3):
        assert dep[3 - e, e], f"row {3 - e}: column {e} is in the triangle"
        assert not dep[3 - e, e + 1:].any(), f"row {3 - e}: nothing right of column {e}"
    assert not dep[3].any()  # the first pixel of its row has nothing to its left


@pytest.mark.parametrize("shape", [(1, 8, 8), (3, 6, 6)])
def test_zeroed_output_layer_scores_exactly_8_bits_per_dim(shape):
    model = make(shape)
    torch.nn.init.zeros_(model.head2.weight)
    torch.nn.init.zeros_(model.head2.bias)
    x = torch.randint(0, 256, (5, *shape), dtype=torch.uint8)
    bpd = bits_per_dim(model.nll(x), model.num_dims)
    torch.testing.assert_close(bpd, torch.full((5,), 8.0), rtol=0, atol=1e-5)


@pytest.mark.parametrize("shape", [(1, 7, 7), (3, 5, 5)])
def test_incremental_sampler_uses_the_full_networks_conditionals(shape):
    model = make(shape, first_kernel=3).eval()
    seen = []  # logits of every sampling step, in order
    hook = model.head2.register_forward_hook(lambda m, inp, out: seen.append(out[:, :, 0, -1]))
    torch.manual_seed(1)
    with torch.no_grad():
        s = model.sample(4)
        hook.remove()
        full = model.logits(from_signed(s))  # (4, 256, C, H, W)
    c, h, w = shape
    assert len(seen) == c * h * w == model.samplers()["ancestral"]
    k = 0
    for i in range(h):
        for j in range(w):
            for ch in range(c):
                step = seen[k].view(4, c, 256)[:, ch]
                torch.testing.assert_close(step, full[:, :, ch, i, j], atol=1e-4, rtol=1e-4)
                k += 1
    assert torch.equal(to_signed(from_signed(s)), s)  # samples lie on the 256 levels


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
