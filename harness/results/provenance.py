"""Where a result came from: package versions, the code's git commit, the machine."""
from __future__ import annotations

import hashlib
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


# What "dirty" is about: the code, not the results and reports a run writes into the same checkout.
CODE_PATHSPEC = [".", ":(exclude)results", ":(exclude)reports"]


def git_state(root: Path | None = None) -> tuple[str | None, bool | None, str | None]:
    """(commit, dirty, sha256 of the diff) of the checkout trilemma runs from; Nones when it is not one.

    ``dirty`` means the tracked code differs from the commit (results and reports do not count);
    the hash of that diff then tells two dirty runs of the same commit apart.
    """
    root = root or SOURCE_ROOT
    if not ((root / "pyproject.toml").is_file() and (root / "harness").is_dir()):
        return None, None, None
    try:
        git = lambda *args: subprocess.run(["git", *args], cwd=root, capture_output=True,  # noqa: E731
                                           timeout=10).stdout
        commit = git("rev-parse", "HEAD").decode().strip() or None
        if commit is None:
            return None, None, None
        diff = git("diff", "HEAD", "--", *CODE_PATHSPEC)
        return commit, bool(diff.strip()), (hashlib.sha256(diff).hexdigest()[:16] if diff.strip() else None)
    except (OSError, subprocess.SubprocessError):
        return None, None, None


def provenance(device: str, device_name: str, seed: int) -> dict[str, Any]:
    commit, dirty, diff = git_state()
    return {
        "versions": package_versions(),
        "device": device,
        "device_name": device_name,
        "git_commit": commit,
        "git_dirty": dirty,
        "git_diff_sha256": diff,
        "seed": seed,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "started": now(),
        "finished": None,
    }
