"""The model contract as one executable check, used by ``tests/test_contract.py`` for every family.

Kept in the package (not only in tests) so that a family's author can run it on a new model before
it is registered::

    python -c "from mymodel import MyModel; from trilemma.contract.testing import check_contract; check_contract(MyModel)"
"""
from __future__ import annotations

import copy
import math
import re

import torch

from trilemma.contract.errors import ContractError, TrilemmaError
from trilemma.contract.family import OPTIMIZER_TYPES, GenerativeModel, build_config, count_parameters
from trilemma.contract.likelihood import bits_per_dim
from trilemma.contract.update import plain_update

SNAKE = re.compile(r"^[a-z][a-z0-9_]*$")


def require(condition: object, message: str) -> None:
    """A promise of the contract: a ContractError with ``message`` when it is broken (not an
    ``assert``, which ``python -O`` strips)."""
    if not condition:
        raise ContractError(message)

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

    Raises ContractError on the first broken promise; returns a few facts for the caller to print.
    """
    torch.manual_seed(0)
    model = cls(build_config(cls, "tiny", {}), shape)
    update = plain_update(model)
    optimizers = update.optimizers
    require(optimizers and all(isinstance(o, torch.optim.Optimizer) for o in optimizers.values()),
            "configure_optimizers() must return a non-empty dict of torch optimizers")
    for key in optimizers:  # keyed by role ("model", "generator"), never by type ("adam")
        require(SNAKE.match(key) and key not in OPTIMIZER_TYPES, f"optimizer key {key!r} must name a role")
    x = structured_batch(batch, shape)

    # A training step is finite and changes the weights.
    before = {k: v.detach().clone() for k, v in model.state_dict().items() if v.is_floating_point()}
    model.train()
    if model.capabilities.conditional:  # class labels for the batch, as the loop passes them
        num_classes = getattr(model.config, "num_classes", None)
        require(isinstance(num_classes, int) and num_classes > 1,
                "a conditional family's Config has num_classes")
        labels = torch.arange(batch) % num_classes
        losses = model.train_step(x, update, labels=labels)
    else:
        losses = model.train_step(x, update)
    require(isinstance(losses, dict) and losses, "train_step must return a dict of losses")
    for k, v in losses.items():
        if torch.is_tensor(v):  # a detached 0-dim tensor, read by the loop at logging ticks
            require(v.ndim == 0 and not v.requires_grad, f"loss {k} must be a detached 0-dim tensor")
            v = float(v)
        require(isinstance(v, float) and math.isfinite(v), f"loss {k} = {v!r} is not a finite float")
    changed = [k for k, v in model.state_dict().items() if k in before and not torch.equal(v, before[k])]
    require(changed, "a training step changed no weight")
    for k, v in model.state_dict().items():
        if v.is_floating_point():
            require(torch.isfinite(v).all(), f"weight {k} is not finite after a step")

    # Samples have the right shape and range, for every sampler.
    model.eval()
    samplers = model.samplers()
    require(samplers, "samplers() must name at least one sampler")
    try:  # every family rejects an unknown sampler the same way (the base class does it)
        model.sample(1, sampler="no_such_sampler")
    except TrilemmaError:
        pass
    else:
        raise ContractError("sample() accepted an unknown sampler name")
    for name, nfe in samplers.items():
        require(SNAKE.match(name) and name != "default", f"sampler {name!r}: name it by its procedure")
        require(isinstance(nfe, int) and nfe >= 1, f"sampler {name}: nfe must be a positive int")
        with torch.no_grad():
            s = model.sample(3, sampler=name)
        require(s.shape == (3, *shape), f"sampler {name}: shape {tuple(s.shape)} != {(3, *shape)}")
        require(s.is_floating_point() and torch.isfinite(s).all(), f"sampler {name}: non-finite samples")
        require(s.min() >= -1 and s.max() <= 1, f"sampler {name}: samples outside [-1, 1]")
    if model.capabilities.any_resolution:  # it samples at twice the resolution it was built for
        with torch.no_grad():
            s = model.generate_at(2, 2 * shape[1])
        require(s.shape == (2, shape[0], 2 * shape[1], 2 * shape[2]),
                f"generate_at: shape {tuple(s.shape)}")
        require(torch.isfinite(s).all() and s.min() >= -1 and s.max() <= 1, "generate_at: samples")
    if model.capabilities.sampling == "one_pass":
        require(next(iter(samplers.values())) == 1, "a one-pass sampler makes one network evaluation")

    # The NLL exists exactly when the capabilities say so.
    bpd = None
    if model.capabilities.density == "none":
        try:
            model.nll(x)
        except NotImplementedError:
            pass
        else:
            raise ContractError("density 'none' but nll() returned a value")
    else:
        with torch.no_grad():
            nll = model.nll(x)
        require(nll.shape == (batch,), f"nll shape {tuple(nll.shape)} != {(batch,)}")
        require(torch.isfinite(nll).all(), "nll is not finite")
        bpd = float(bits_per_dim(nll.mean(), model.num_dims))
        require(0 < bpd < 64, f"implausible bits/dim {bpd}")
        protocol = model.nll_protocol()
        require(isinstance(protocol, dict) and all(SNAKE.match(k) for k in protocol), "nll_protocol keys")
        require(not any(k.endswith("_samples") for k in protocol), "Monte-Carlo counts end in _draws")

    total = count_parameters([model])
    sampling = count_parameters(model.sampling_modules())
    require(0 < sampling <= total, f"sampling parameters {sampling} must be in (0, {total}]")
    return {"losses": losses, "bpd": bpd, "params": total, "sampling_params": sampling,
            "samplers": samplers}


# --- learning -------------------------------------------------------------------------------------

LEARNING_SHAPE = (1, 16, 16)


def sample_moment_distance(samples: torch.Tensor, data: torch.Tensor) -> float:
    """How far samples in [-1, 1] are from uint8 data in their first two moments: the mean squared
    difference of the per-pixel mean images plus the squared difference of the per-pixel standard
    deviations, averaged over pixels (0 for samples with the data's mean and spread at every pixel)."""
    real = data.float() / 127.5 - 1
    mean_gap = (samples.mean(0) - real.mean(0)).pow(2).mean()
    std_gap = (samples.std(0) - real.std(0)).pow(2).mean()
    return float(mean_gap + std_gap)


def check_learning(cls: type[GenerativeModel], steps: int = 120, early: int = 30, batch: int = 16,
                   preset: str = "tiny", step_enabled: bool = True, seed: int = 0, settle: int = 20) -> dict:
    """Train ``cls`` at ``preset`` on fixed structured images of :data:`LEARNING_SHAPE` and check that
    it learns, by the quality figure it owns:

    * a family with a density: its NLL (bits/dim) of 16 held-out images is lower after ``steps`` steps
      than after ``early`` steps (by 1 %) and than at the start;
    * a family without one: the :func:`sample_moment_distance` of 64 samples after ``steps`` steps is
      under three quarters of its value at the start (samples are noisier than an NLL, so the check
      is against the start, not the early point; both are returned);
    * a family that minimises one loss per optimizer (:meth:`GenerativeModel.loss`): that loss on a
      held-out batch, with the same noise and at the schedule's start, is lower than at the start.

    The start is the model after ``settle`` steps whose optimizer steps are skipped (batch-norm
    statistics and data-dependent initialisations settled, no weight learned).

    ``step_enabled=False`` runs every part of the update but the optimizer's step: the check must then
    fail. Returns the figures; raises ContractError naming the first failed promise.
    """
    torch.manual_seed(seed)
    data = structured_batch(256, LEARNING_SHAPE, seed=seed)
    held_out = structured_batch(64, LEARNING_SHAPE, seed=seed + 1)
    model = cls(build_config(cls, preset, {}), LEARNING_SHAPE)
    update = plain_update(model)
    update.enabled = step_enabled
    conditional = model.capabilities.conditional
    labels = torch.arange(len(data)) % getattr(model.config, "num_classes", 1)
    condition = (lambda idx: {"labels": labels[idx]}) if conditional else (lambda idx: {})
    has_density = model.capabilities.density != "none"
    has_loss = type(model).loss is not GenerativeModel.loss

    def quality() -> float:
        model.eval()
        with torch.no_grad(), torch.random.fork_rng():
            torch.manual_seed(seed + 2)  # the same noise at every point: a change is the model's
            if has_density:
                value = float(bits_per_dim(model.nll(held_out[:16]).mean(), model.num_dims))
            else:
                value = sample_moment_distance(model.sample(64), held_out)
        model.train()
        return value

    def held_out_loss() -> float:
        """The summed role losses of a copy (the loss may update buffers), at progress 0."""
        twin = copy.deepcopy(model).train()
        twin.progress = 0.0
        idx = torch.arange(batch)
        with torch.random.fork_rng():
            torch.manual_seed(seed + 3)
            out = twin.loss(held_out[:batch], **condition(idx))
        return float(sum(out[role].detach() for role in update.roles if role in out))

    def train(steps_run: int, stop_at_early: bool) -> None:
        order = torch.Generator().manual_seed(seed)
        for step in range(steps_run):
            model.progress = step / steps
            update.step = step
            idx = torch.randint(0, len(data), (batch,), generator=order)
            model.train_step(data[idx], update, **condition(idx))
            if stop_at_early and step + 1 == early:
                figures["early"] = quality()

    # The start: the model after `settle` steps whose optimizer steps are skipped, so that batch-norm
    # statistics and data-dependent initialisations have settled as they do in training (alone, they
    # move a GAN's samples by half), and only learning separates the start from the end.
    figures: dict[str, object] = {"figure": "bits/dim" if has_density else "sample moment distance"}
    start = {k: v.clone() for k, v in model.state_dict().items()}
    update.enabled = False
    with torch.random.fork_rng():
        train(settle, stop_at_early=False)
    figures["initial"] = quality()
    if has_loss:
        figures["loss_initial"] = held_out_loss()
    model.load_state_dict(start)
    update = plain_update(model)  # fresh optimizer state
    update.enabled = step_enabled
    train(steps, stop_at_early=True)
    figures["final"] = quality()

    initial, early_value, final = figures["initial"], figures["early"], figures["final"]
    learned = (final < 0.99 * early_value and final < initial) if has_density else final < 0.75 * initial
    if not learned:
        raise ContractError(f"{cls.name} did not learn: {figures['figure']} {initial:.4g} at "
                            f"the start, {early_value:.4g} after {early} steps, {final:.4g} after {steps}")
    if has_loss:
        figures["loss_final"] = held_out_loss()
        if not figures["loss_final"] < figures["loss_initial"]:
            raise ContractError(f"{cls.name}: its held-out training loss did not fall "
                                f"({figures['loss_initial']:.4g} at initialisation, "
                                f"{figures['loss_final']:.4g} after {steps} steps)")
    return figures
