"""The shared ODE density (trilemma.models.ode) on a linear flow whose density is known in closed form."""
import math

import torch

from trilemma.models.ode import ode_log_likelihood, ode_sample, standard_normal_log_prob


def _linear(a: float):
    # dx/dt = -a x: x(t) = x(0) e^{-a t}. With p_1 = N(0, e^{-2a} I) at t = 1, p_0 = N(0, I).
    drift = lambda t, x: -a * x  # noqa: E731
    prior = lambda z: (-0.5 * (z ** 2) * math.exp(2 * a) - 0.5 * math.log(2 * math.pi) + a).flatten(1).sum(1)  # noqa: E731
    return drift, prior


def test_exact_trace_gives_the_closed_form_log_density():
    drift, prior = _linear(0.7)
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    log_p, z1, nfe = ode_log_likelihood(drift, x, 0.0, 1.0, prior, trace="exact", rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(log_p, standard_normal_log_prob(x), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(z1, x * math.exp(-0.7), rtol=1e-6, atol=1e-6)
    assert nfe > 2


def test_hutchinson_trace_is_unbiased_over_draws():
    weights = torch.tensor([[0.3, 1.2], [-0.8, 0.1]], dtype=torch.float64)
    drift = lambda t, x: x @ weights.T  # noqa: E731  (trace of the Jacobian: 0.4)
    x = torch.randn(4000, 2, dtype=torch.float64)
    prior = lambda z: torch.zeros(z.shape[0], dtype=z.dtype)  # noqa: E731  (only the integral matters)
    g = torch.Generator().manual_seed(0)
    estimate, _, _ = ode_log_likelihood(drift, x, 0.0, 1.0, prior, trace="hutchinson", generator=g)
    exact, _, _ = ode_log_likelihood(drift, x, 0.0, 1.0, prior, trace="exact")
    torch.testing.assert_close(exact, torch.full_like(exact, 0.4), rtol=1e-4, atol=1e-4)
    assert estimate.std() > 0.1  # each draw is noisy...
    assert abs(estimate.mean().item() - 0.4) < 4 * estimate.std().item() / math.sqrt(len(x))  # ...the mean is not


def test_sampling_inverts_the_encoding():
    drift, _ = _linear(0.5)
    z = torch.randn(3, 4, dtype=torch.float64)
    x, nfe = ode_sample(drift, z, 1.0, 0.0, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(x, z * math.exp(0.5), rtol=1e-6, atol=1e-6)


def test_exact_divergence_in_blocks_is_the_jacobian_trace(monkeypatch):
    import trilemma.models.ode as ode

    g = torch.Generator().manual_seed(0)
    w1, w2 = (torch.randn(6, 6, dtype=torch.float64, generator=g) for _ in range(2))
    f = lambda x: torch.tanh(x.flatten(1) @ w1.T) @ w2.T  # noqa: E731  (B, 6) -> (B, 6), a dense Jacobian
    x = torch.randn(3, 6, dtype=torch.float64, generator=g)
    want = torch.stack([torch.trace(torch.autograd.functional.jacobian(f, xi[None]).view(6, 6)) for xi in x])
    monkeypatch.setattr(ode, "VJP_ROWS", 6)  # two rows of df/dx a block for 3 samples: three blocks
    xr = x.clone().requires_grad_(True)
    got = ode.divergence(f(xr), xr, None, create_graph=False)
    torch.testing.assert_close(got, want)
    rows = ode.jacobian_rows(f(xr), xr, torch.tensor([4, 1]))  # (2, B, D): rows 4 and 1 of each J
    torch.testing.assert_close(rows[0, 2], torch.autograd.functional.jacobian(f, x[2:3]).view(6, 6)[4])
    torch.testing.assert_close(rows[1, 0], torch.autograd.functional.jacobian(f, x[0:1]).view(6, 6)[1])
