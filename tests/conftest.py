import os
from pathlib import Path

import pytest
import torch

# Tiny test models run fastest on one thread, and one thread does not collapse when the machine is
# oversubscribed (two OpenMP threads spin-waiting on a busy 2-core machine run several times slower).
torch.set_num_threads(1)

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def fid_weights():
    """The local FID Inception weights, or skip (torch-fidelity cannot download them offline)."""
    path = os.environ.get("TRILEMMA_FID_WEIGHTS")
    if not path or not Path(path).is_file():
        pytest.skip("TRILEMMA_FID_WEIGHTS is not set to a weights file")
    return path


@pytest.fixture
def data_root():
    """The data root holding MNIST and cifar10-subset, or skip."""
    root = os.environ.get("TRILEMMA_DATA")
    if not root or not (Path(root) / "MNIST" / "raw").is_dir():
        pytest.skip("TRILEMMA_DATA does not hold MNIST")
    return root
