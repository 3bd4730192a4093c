"""PixelIQN invariants: the Huber quantile loss is minimised by the true quantile, the quantile at a
subpixel depends on the earlier subpixels and on its own level only, the cached sampler reads the
full network's quantiles, and training on a known distribution samples its frequencies."""
import pytest
import torch

from trilemma.contract.family import build_config
from trilemma.contract.likelihood import from_signed, to_signed
from trilemma.contract.update import plain_update
from trilemma.models.pixeliqn import PixelIQN, quantile_huber_loss


def make(shape, **overrides):
    torch.manual_seed(0)
    return PixelIQN(build_config(PixelIQN, "tiny", overrides), shape)


@pytest.mark.parametrize("tau", [0.1, 0.3, 0.5, 0.8, 0.95])
def test_quantile_loss_is_minimised_by_the_true_quantile(tau):
    # A skewed toy distribution (a mixture of two Gaussians); the expected loss over a grid of
    # candidate quantiles is smallest at its tau-quantile. Swapping the asymmetric weights would give
    # the (1 - tau)-quantile, and a large kappa (a squared loss) the expectile: both fail here.
    g = torch.Generator().manual_seed(0)
    x = torch.cat([0.1 * torch.randn(24_000, generator=g) - 0.5, 0.3 * torch.randn(16_000, generator=g) + 0.4])
    grid = torch.linspace(-1, 1, 1001)
    risk = torch.stack([quantile_huber_loss(x - q, torch.full_like(x, tau), 2 / 255).mean() for q in grid])
    best = grid[risk.argmin()]
    assert abs(best - torch.quantile(x, tau)) < 0.01


def test_large_kappa_gives_the_expectile_not_the_quantile():
    # The check above is not vacuous: with kappa far above the spread the loss is squared.
    x = torch.cat([torch.full((900,), -0.8), torch.full((100,), 0.8)])
    grid = torch.linspace(-1, 1, 401)
    risk = torch.stack([quantile_huber_loss(x - q, torch.full_like(x, 0.5), 10.0).mean() for q in grid])
    assert abs(grid[risk.argmin()] - x.mean()) < 0.01 and abs(x.mean() - x.median()) > 0.1


def dependencies(model, shape):
    """dep_x[c, i, j], dep_tau[c, i, j]: (C, H, W) maps of the inputs that Q[:, c, i, j] depends on."""
    model = model.double()
    x = torch.randn(16, *shape, dtype=torch.double, requires_grad=True)
    tau = torch.rand(16, *shape, dtype=torch.double, requires_grad=True)
    q = model.quantiles(x, tau)
    c, h, w = shape
    dep_x = torch.zeros(c, h, w, c, h, w, dtype=torch.bool)
    dep_tau = torch.zeros_like(dep_x)
    for ch in range(c):
        for i in range(h):
            for j in range(w):
                gx, gt = torch.autograd.grad(q[:, ch, i, j].sum(), (x, tau), retain_graph=True)
                dep_x[ch, i, j], dep_tau[ch, i, j] = gx.abs().sum(0) != 0, gt.abs().sum(0) != 0
    return dep_x, dep_tau


def order(shape):
    c, h, w = shape
    ch, i, j = torch.meshgrid(torch.arange(c), torch.arange(h), torch.arange(w), indexing="ij")
    return (i * w + j) * c + ch  # (C, H, W): position in the sequence


@pytest.mark.parametrize("shape", [(1, 6, 6), (3, 5, 5)])
def test_quantile_depends_on_earlier_subpixels_and_its_own_level(shape):
    dep_x, dep_tau = dependencies(make(shape), shape)
    pos = order(shape)
    earlier = pos[None, None, None] < pos[..., None, None, None]
    assert not (dep_x & ~earlier).any() and dep_x.any()
    assert not (dep_tau & ~(earlier | (pos[None, None, None] == pos[..., None, None, None]))).any()
    own = dep_tau.flatten(0, 2).flatten(1).diagonal()  # Q_i depends on tau_i, for every i
    assert own.all()


@pytest.mark.parametrize("shape", [(1, 7, 7), (3, 5, 5)])
def test_cached_sampler_uses_the_full_networks_quantiles(shape):
    model = make(shape).eval()
    assert model.reach_up < shape[1] - 1 and model.reach_left < shape[2] - 1
    seen = []
    hook = model.head2.register_forward_hook(lambda m, inp, out: seen.append(out[:, :, 0, -1]))
    torch.manual_seed(1)
    with torch.no_grad():
        s = model.sample(4)
        hook.remove()
        torch.manual_seed(1)
        tau = torch.rand(4, *shape)  # the levels generate drew (its first random draw)
        full = model.quantiles(s, tau)  # (4, C, H, W)
    c, h, w = shape
    assert len(seen) == c * h * w == model.samplers()["inverse_transform"]
    steps = torch.stack(seen).view(h, w, c, 4, c)  # (H, W, colour step, batch, colour output)
    for ch in range(c):
        torch.testing.assert_close(steps[:, :, ch, :, ch].permute(2, 0, 1), full[:, ch], atol=1e-4, rtol=1e-4)
    assert torch.equal(to_signed(from_signed(s)), s)  # samples lie on the 256 levels


def test_training_samples_the_frequencies_of_a_known_distribution():
    # Every pixel independently 255 with probability 0.3, else 0: inverse-transform samples of the
    # learned quantile functions must be bright about 30% of the time.
    shape = (1, 6, 6)
    model = make(shape, lr=1e-2)
    update = plain_update(model)
    g = torch.Generator().manual_seed(0)
    for _ in range(150):
        x = ((torch.rand(32, *shape, generator=g) < 0.3) * 255).to(torch.uint8)
        model.train_step(x, update)
    model.eval()
    with torch.no_grad():
        s = model.sample(200)
    assert abs((s > 0).float().mean() - 0.3) < 0.08
