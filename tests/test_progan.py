"""ProGAN invariants: the fade-in starts at the lower resolution; the schedule follows the budget."""
import copy

import torch
import torch.nn.functional as F

from trilemma.contract.family import build_config
from trilemma.contract.testing import structured_batch
from trilemma.contract.update import plain_update
from trilemma.models.progan import ProGAN


def make(shape=(1, 28, 28), **overrides):
    torch.manual_seed(0)
    return ProGAN(build_config(ProGAN, "tiny", overrides), shape)


def test_fade_in_at_alpha_0_equals_the_lower_resolution_upsampled():
    model = make().eval()
    z = torch.randn(4, model.config.latent_dim)
    with torch.no_grad():
        for level in (1, 2):  # 7 -> 14 and 14 -> 28
            low = model.generator(z, level - 1, 1.0)  # (4, 1, 7 * 2^(level-1), ...)
            faded = model.generator(z, level, 0.0)
            torch.testing.assert_close(faded, F.interpolate(low, scale_factor=2, mode="nearest"))
            assert not torch.allclose(model.generator(z, level, 0.5), faded)  # alpha does blend


def test_discriminator_fade_in_at_alpha_0_sees_the_downsampled_image():
    model = make().eval()
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(model.discriminator(x, 2, 0.0),
                                   model.discriminator(F.avg_pool2d(x, 2), 1, 1.0))
        # The real images are blended the same way as the fakes at alpha = 0.
        low = F.avg_pool2d(x, 2)
        torch.testing.assert_close(model.reals(x, 2, 0.0), F.interpolate(low, scale_factor=2, mode="nearest"))


def test_schedule_grows_within_the_budget():
    model = make(grow_until=0.5)  # 28x28: levels 0, 1, 2; four phases of 1/8 of the budget
    assert model.schedule(0.0) == (0, 1.0) and model.schedule(0.12) == (0, 1.0)
    level, alpha = model.schedule(0.1875)  # halfway through the first fade-in
    assert level == 1 and abs(alpha - 0.5) < 1e-9
    assert model.schedule(0.3) == (1, 1.0)
    assert model.schedule(0.5) == (2, 1.0) and model.schedule(1.0) == (2, 1.0)
    seq = [model.schedule(p / 100) for p in range(101)]
    assert seq == sorted(seq)  # never shrinks, and alpha only rises within a level


def test_level_is_carried_by_the_ema_copy_and_samples_come_from_it():
    model = make()
    update = plain_update(model)
    x = structured_batch(8, (1, 28, 28))
    model.train_step(x, update)
    model.train_step(x, update)  # two steps at the base: Adam's step count is 2
    model.progress = 0.3  # stabilising 14x14
    model.train_step(x, update)
    assert {int(s["step"]) for s in update.optimizers["generator"].state.values()} == {1}  # moments reset at level 1
    ema = copy.deepcopy(make()).eval()
    ema.load_state_dict(model.state_dict())  # as the loop copies the buffers
    assert int(ema.level) == 1
    with torch.no_grad():
        s = ema.sample(3)
    assert s.shape == (3, 1, 28, 28)
    torch.testing.assert_close(s, F.interpolate(s[:, :, ::2, ::2], scale_factor=2, mode="nearest"))
