"""The model contract, for every registered family, at two shapes (tiny RGB and MNIST's)."""
import pytest

from trilemma.contract.registry import registered
from trilemma.contract.testing import CONTRACT_SHAPES, check_contract

MODELS = registered()


@pytest.mark.parametrize("shape", CONTRACT_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("name", list(MODELS))
def test_contract(name, shape):
    facts = check_contract(MODELS[name], shape)
    assert facts["params"] > 0


def test_registry_is_complete():
    # Every family cites its paper, names its family and declares a tiny preset.
    for name, cls in MODELS.items():
        assert cls.name == name and cls.paper and cls.family and "tiny" in cls.presets
