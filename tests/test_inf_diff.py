"""∞-Diff's invariants: the mollifier and its noise, the coordinate subsets, sampling at unseen resolutions."""
import math

import torch

from trilemma.contract.family import build_config
from trilemma.contract.testing import structured_batch
from trilemma.contract.update import plain_update
from trilemma.models.inf_diff import InfDiff, gather, gaussian_filter


def make(shape=(1, 16, 16), **overrides) -> InfDiff:
    torch.manual_seed(0)
    return InfDiff(build_config(InfDiff, "tiny", overrides), shape)


def perturbed(model: InfDiff) -> InfDiff:
    """The output layer (and each block's last layer) starts at zero; give the network a real output."""
    with torch.no_grad():
        for p in model.net.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def test_mollified_noise_has_the_kernels_covariance_at_every_resolution():
    # T xi with xi white noise: Cov(T xi(x), T xi(y)) = (k * k)(x - y) = exp(-|d|^2 / 4 s^2) / (4 pi s^2)
    # for a Gaussian kernel k of std s, with d and s in training pixels, whatever the grid.
    sigma = 1.5
    model = make(mollifier_std=sigma)
    torch.manual_seed(1)
    for r in (16, 32):
        scale = r // 16
        noise = model.mollified_noise(3000, r)[:, 0]  # (n, r, r)
        margin = math.ceil(3 * sigma * scale)  # away from the reflecting borders
        inner = slice(margin, r - margin - 3 * scale)
        for dy, dx in ((0, 0), (0, 1), (1, 1), (0, 2), (2, 1)):
            a = noise[:, inner, inner]
            b = noise[:, margin + dy * scale:, margin + dx * scale:][:, :a.shape[1], :a.shape[2]]
            empirical = (a * b).mean()  # zero-mean field: E[a b], pooled over positions (stationary)
            expected = math.exp(-(dy ** 2 + dx ** 2) / (4 * sigma ** 2)) / (4 * math.pi * sigma ** 2)
            assert abs(empirical / expected - 1) < 0.08, (r, dy, dx, float(empirical), expected)


def test_mollifier_is_a_unit_gaussian_blur_and_the_wiener_filter_undoes_it():
    delta = torch.zeros(1, 1, 33, 33)
    delta[..., 16, 16] = 1.0
    k = gaussian_filter(delta, 2.0)[0, 0]
    d2 = ((torch.arange(33) - 16.0) ** 2)
    assert abs(k.sum() - 1) < 1e-4  # gain 1: a constant image is unchanged
    assert abs((k.sum(0) * d2).sum() - 4.0) < 1e-3  # variance sigma^2 = 4 along each axis
    assert torch.allclose(k, k.T, atol=1e-6) and k.min() > -1e-6
    # A smooth image: blurred, then Wiener-deblurred, comes back far closer than the blur leaves it.
    y, x = torch.meshgrid(torch.linspace(0, 1, 32), torch.linspace(0, 1, 32), indexing="ij")
    img = torch.sin(6 * x + 3 * y)[None, None]
    blurred = gaussian_filter(img, 1.0)
    restored = gaussian_filter(blurred, 1.0, inverse_snr=0.05)
    assert (restored - img).abs().max() < 0.25 * (blurred - img).abs().max()


def test_the_coordinates_are_a_subset_and_the_loss_reads_nothing_else():
    model = perturbed(make(subsample=0.25))
    B, r = 4, 16
    idx = model.subset(B, r)
    assert idx.shape == (B, 64) and idx.min() >= 0 and idx.max() < r * r
    assert all(row.unique().numel() == 64 for row in idx), "a coordinate drawn twice"
    t = torch.tensor([3, 8, 12, 19])
    noise = model.mollified_noise(B, r)
    xt = model.diffuse(structured_batch(B, (1, r, r)), t, noise).requires_grad_()
    noise.requires_grad_()
    loss = model.subsampled_loss(xt, noise, idx, t)
    loss.backward()
    sampled = torch.zeros(B, r * r, dtype=torch.bool).scatter_(1, idx, True).view(B, 1, r, r)
    for g in (xt.grad, noise.grad):
        assert (g[~sampled] == 0).all(), "the loss depends on a coordinate outside the subset"
        assert (g[sampled] != 0).any()
    # Changing x_t and the noise anywhere off the subset leaves the loss exactly as it was.
    with torch.no_grad():
        off = (~sampled).float()
        again = model.subsampled_loss(xt + 5 * off * torch.randn_like(xt), noise + off * torch.randn_like(noise),
                                      idx, t)
    assert torch.equal(again, loss.detach())


def test_the_operator_is_consistent_across_resolutions():
    # The same smooth function seen on a 16x16 and a 32x32 grid gives nearly the same output field: the
    # kernel lives in training pixels, not in pixels of the grid. Here the error is ~1.3% of the output's
    # spread; with the kernel left in grid pixels (a plain convolution's behaviour) it is ~6%.
    model = perturbed(make(kernel_radius=2.0, grid_res=8))
    outputs = []
    for r in (16, 32):
        c = (torch.arange(r) + 0.5) / r
        y, x = torch.meshgrid(c, c, indexing="ij")
        f = torch.sin(5 * x) * torch.cos(4 * y)  # (r, r)
        idx = torch.arange(r * r)[None]
        with torch.no_grad():
            out = model.net(f.reshape(1, -1, 1), idx, r, torch.tensor([300.0]))  # (1, r*r, 1)
        outputs.append(out.view(1, 1, r, r))
    coarse = torch.nn.functional.avg_pool2d(outputs[1], 2)  # the 32-grid's field at 16-grid cells
    inner = (slice(None), slice(None), slice(2, -2), slice(2, -2))
    err = (coarse - outputs[0])[inner].abs().mean()
    assert err < 0.03 * outputs[0][inner].std(), (float(err), float(outputs[0].std()))


def test_samples_at_resolutions_it_never_trained_on():
    model = make(shape=(1, 8, 8))
    model.train_step(structured_batch(8, (1, 8, 8)), plain_update(model))  # trained on 8x8 only
    model.eval()
    with torch.no_grad():
        for r in (12, 16, 24):
            for sampler in model.samplers():
                s = model.generate_at(2, r, sampler)
                assert s.shape == (2, 1, r, r) and torch.isfinite(s).all() and s.abs().max() <= 1


def test_samplers_make_one_network_evaluation_per_step():
    model = make(sample_steps=4, ddim_steps=2).eval()
    calls = []
    model.net.register_forward_hook(lambda m, args, out: calls.append(args[2]))  # the grid size r
    for sampler, nfe in model.samplers().items():
        calls.clear()
        with torch.no_grad():
            model.generate_at(2, 24, sampler)
        assert calls == [24] * nfe, (sampler, calls)


def test_the_training_subset_follows_the_config():
    model = make(shape=(1, 8, 8), subsample=0.5)
    seen = []
    model.net.register_forward_hook(lambda m, args, out: seen.append(args[1].shape))
    model.train_step(structured_batch(4, (1, 8, 8)), plain_update(model))
    assert seen == [(4, 32)]  # half of the 64 coordinates of each image
    assert gather(torch.arange(16.0).view(1, 1, 4, 4), torch.tensor([[5, 0]])).flatten().tolist() == [5.0, 0.0]
