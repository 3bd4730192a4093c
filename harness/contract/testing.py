"""The model contract as one executable check, used by ``tests/test_contract.py`` for every family.

Kept in the package (not only in tests) so that a family's author can run it on a new model before
it is registered::

    python -c "from mymodel import MyModel; from trilemma.contract.testing import check_contract; check_contract(MyModel)"
"""
from __future__ import annotations

import math
import re

import torch

from trilemma.contract.errors import TrilemmaError
from trilemma.contract.family import OPTIMIZER_TYPES, GenerativeModel, build_config, count_parameters
from trilemma.contract.likelihood import bits_per_dim

SNAKE = re.compile(r"^[a-z][a-z0-9_]*$")

CONTRACT_SHAPES = ((3, 8, 8), (1, 28, 28))  # tiny RGB, and MNIST's own shape


def structured_batch(n: int, shape: tuple[int, int, int], seed: int = 0) -> torch.Tensor:
    """uint8 images with structure (a bright square on a dark field, plus noise), not pure noise."""
    g = torch.Generator().manual_seed(seed)
    c, h, w = shape
    x = torch.randint(0, 40, (n, c, h, w), generator=g)
    for i in range(n):
        top, left = torch.randint(0, h // 2 + 1, (2,), generator=g).tolist()
        x[i, :, top:top + h // 2, left:left + w // 2] += 180
    return x.clamp(0, 255).to(torch.uint8)


def check_contract(cls: type[GenerativeModel], shape: tuple[int, int, int] = (3, 8, 8),
                   batch: int = 8) -> dict:
    """Build ``cls`` from its tiny preset and check every promise of the interface.

    Raises AssertionError on the first broken promise; returns a few facts for the caller to print.
    """
    torch.manual_seed(0)
    model = cls(build_config(cls, "tiny", {}), shape)
    optimizers = model.configure_optimizers()
    assert optimizers and all(isinstance(o, torch.optim.Optimizer) for o in optimizers.values())
    for key in optimizers:  # keyed by role ("model", "generator"), never by type ("adam")
        assert SNAKE.match(key) and key not in OPTIMIZER_TYPES, f"optimizer key {key!r} must name a role"
    x = structured_batch(batch, shape)

    # A training step is finite and changes the weights.
    before = {k: v.detach().clone() for k, v in model.state_dict().items() if v.is_floating_point()}
    model.train()
    if model.capabilities.conditional:  # class labels for the batch, as the loop passes them
        num_classes = getattr(model.config, "num_classes", None)
        assert isinstance(num_classes, int) and num_classes > 1, "a conditional family's Config has num_classes"
        labels = torch.arange(batch) % num_classes
        losses = model.train_step(x, optimizers, labels=labels)
    else:
        losses = model.train_step(x, optimizers)
    assert isinstance(losses, dict) and losses, "train_step must return a dict of losses"
    for k, v in losses.items():
        if torch.is_tensor(v):  # a detached 0-dim tensor, read by the loop at logging ticks
            assert v.ndim == 0 and not v.requires_grad, f"loss {k} must be a detached 0-dim tensor"
            v = float(v)
        assert isinstance(v, float) and math.isfinite(v), f"loss {k} = {v!r} is not a finite float"
    changed = [k for k, v in model.state_dict().items() if k in before and not torch.equal(v, before[k])]
    assert changed, "a training step changed no weight"
    for k, v in model.state_dict().items():
        if v.is_floating_point():
            assert torch.isfinite(v).all(), f"weight {k} is not finite after a step"

    # Samples have the right shape and range, for every sampler.
    model.eval()
    samplers = model.samplers()
    assert samplers, "samplers() must name at least one sampler"
    try:  # every family rejects an unknown sampler the same way (the base class does it)
        model.sample(1, sampler="no_such_sampler")
    except TrilemmaError:
        pass
    else:
        raise AssertionError("sample() accepted an unknown sampler name")
    for name, nfe in samplers.items():
        assert SNAKE.match(name) and name != "default", f"sampler {name!r}: name it by its procedure"
        assert isinstance(nfe, int) and nfe >= 1, f"sampler {name}: nfe must be a positive int"
        with torch.no_grad():
            s = model.sample(3, sampler=name)
        assert s.shape == (3, *shape), f"sampler {name}: shape {tuple(s.shape)} != {(3, *shape)}"
        assert s.is_floating_point() and torch.isfinite(s).all(), f"sampler {name}: non-finite samples"
        assert s.min() >= -1 and s.max() <= 1, f"sampler {name}: samples outside [-1, 1]"
    if model.capabilities.any_resolution:  # it samples at twice the resolution it was built for
        with torch.no_grad():
            s = model.generate_at(2, 2 * shape[1])
        assert s.shape == (2, shape[0], 2 * shape[1], 2 * shape[2]), f"generate_at: shape {tuple(s.shape)}"
        assert torch.isfinite(s).all() and s.min() >= -1 and s.max() <= 1, "generate_at: samples"
    if model.capabilities.sampling == "one_pass":
        assert next(iter(samplers.values())) == 1, "a one-pass sampler makes one network evaluation"

    # The NLL exists exactly when the capabilities say so.
    bpd = None
    if model.capabilities.density == "none":
        try:
            model.nll(x)
        except NotImplementedError:
            pass
        else:
            raise AssertionError("density 'none' but nll() returned a value")
    else:
        with torch.no_grad():
            nll = model.nll(x)
        assert nll.shape == (batch,), f"nll shape {tuple(nll.shape)} != {(batch,)}"
        assert torch.isfinite(nll).all(), "nll is not finite"
        bpd = float(bits_per_dim(nll.mean(), model.num_dims))
        assert 0 < bpd < 64, f"implausible bits/dim {bpd}"
        protocol = model.nll_protocol()
        assert isinstance(protocol, dict) and all(SNAKE.match(k) for k in protocol), "nll_protocol keys"
        assert not any(k.endswith("_samples") for k in protocol), "Monte-Carlo counts end in _draws"

    total = count_parameters([model])
    sampling = count_parameters(model.sampling_modules())
    assert 0 < sampling <= total
    return {"losses": losses, "bpd": bpd, "params": total, "sampling_params": sampling,
            "samplers": samplers}
