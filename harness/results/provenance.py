"""Where a result came from: package versions, the code's git commit, the machine."""
from __future__ import annotations

import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

from trilemma.results.io import now

PACKAGES = ("torch", "torchvision", "torch-fidelity", "geomloss", "numpy", "omegaconf", "safetensors",
            "trilemma")
# The checkout this package runs from, when it runs from one (an editable install); a wheel installed
# elsewhere has no git state to report.
SOURCE_ROOT = Path(__file__).resolve().parents[2]


def package_versions() -> dict[str, str | None]:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def git_state(root: Path | None = None) -> tuple[str | None, bool | None]:
    """(commit, dirty) of the checkout trilemma runs from, or (None, None) when it is not one."""
    root = root or SOURCE_ROOT
    if not ((root / "pyproject.toml").is_file() and (root / "harness").is_dir()):
        return None, None
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                                text=True, timeout=10).stdout.strip() or None
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                                capture_output=True, text=True, timeout=10).stdout
        return commit, (bool(status.strip()) if commit else None)
    except (OSError, subprocess.SubprocessError):
        return None, None


def provenance(device: str, device_name: str, seed: int) -> dict[str, Any]:
    commit, dirty = git_state()
    return {
        "versions": package_versions(),
        "device": device,
        "device_name": device_name,
        "git_commit": commit,
        "git_dirty": dirty,
        "seed": seed,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "started": now(),
        "finished": None,
    }
