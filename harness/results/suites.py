"""Suite files as the results see them: reading a suite's settings, and the name of its results folder.

Kept below the runner and the report, which both need them: the runner to load a suite, the report to
find the results folder a suite (with the same command-line overrides) was run into. The suites of the
repository's ``suites/`` folder ship with the package (``trilemma/suites/`` in the wheel), so a bare
name (``trilemma run mnist``) finds one anywhere (:func:`resolve_suite`, :func:`bundled_suites`).
"""
from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Any, Optional

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from trilemma.contract.errors import TrilemmaError
from trilemma.contract.typed import SAFE_NAME, is_safe_name


def variant_name(name: str, overrides: list[str] = (), explicit: Optional[str] = None) -> str:
    """The results folder of a suite run with ``overrides``: ``name+<8 hex digits>`` (a hash of the
    overrides), so that a variant's results never replace the suite's own; ``explicit`` wins."""
    if explicit is not None:
        if not is_safe_name(explicit):
            raise TrilemmaError(f"--name {explicit!r}: must be {SAFE_NAME}")
        return explicit
    if not overrides:
        return name
    digest = hashlib.sha1("\n".join(sorted(overrides)).encode()).hexdigest()[:8]
    return f"{name}+{digest}"


def bundled_suites() -> dict[str, Path]:
    """The suites shipped with trilemma, name -> file: the installed package's ``suites/`` folder, or
    in a checkout (an editable install) the repository's own."""
    package = Path(__file__).resolve().parents[1]  # .../trilemma (the wheel) or .../harness (a checkout)
    for folder in (package / "suites", package.parent / "suites"):
        if folder.is_dir() and (folder.parent == package or (package.parent / "pyproject.toml").is_file()):
            return {path.stem: path for path in sorted(folder.glob("*.yaml"))}
    return {}


def resolve_suite(suite: str | Path) -> Path:
    """A suite argument as a file: the path itself where it is one (or looks like one: a folder or a
    .yaml suffix), else the bundled suite of that name; otherwise the path, which is then not found."""
    path = Path(suite)
    if path.exists() or path.suffix in (".yaml", ".yml") or len(path.parts) > 1:
        return path
    return bundled_suites().get(str(suite), path)


def read_suite_values(path: Path) -> dict[str, Any]:
    """A suite file's settings as plain values: YAML, with ``${key}`` references to other settings
    resolved and every other interpolation (``${oc.env:...}``, resolvers) refused."""
    if not path.is_file():
        bare = not (path.suffix or len(path.parts) > 1 or path.exists())  # a name: say which there are
        names = ", ".join(bundled_suites()) or "none installed"
        raise TrilemmaError(f"suite file {path} not found" + (f"; bundled suites: {names}" if bare else ""))
    try:
        text = path.read_text(encoding="utf-8")
        plain = yaml.safe_load(text)  # the document's shape, before omegaconf reads it
        raw = OmegaConf.create(text) if isinstance(plain, dict) else None
    except Exception as e:  # a YAML syntax error, an unreadable or binary file
        raise TrilemmaError(f"{path}: not valid YAML: {first_line(e)}") from None
    if raw is None:
        kind = {type(None): "an empty document", list: "a list"}.get(type(plain), f"a {type(plain).__name__}")
        raise TrilemmaError(f"{path}: a suite is a mapping of settings (name, models, ...), not {kind}")
    values = OmegaConf.to_container(raw, resolve=False)
    refuse_resolvers(values, str(path))
    try:
        return OmegaConf.to_container(OmegaConf.create(values), resolve=True)
    except OmegaConfBaseException as e:
        raise TrilemmaError(f"{path}: {first_line(e)}") from None


_REFERENCE = re.compile(r"\$\{\s*[A-Za-z_][\w.]*\s*\}")  # ${train.batch_size}: another setting


def refuse_resolvers(value: Any, where: str, key: str = "") -> None:
    """Refuse ``${oc.env:...}`` and every other resolver: a suite says its settings; it does not read the
    environment (which could copy a secret into the saved suite). Data and weights paths come from
    TRILEMMA_DATA and TRILEMMA_FID_WEIGHTS, which trilemma reads itself and never saves."""
    if isinstance(value, dict):
        for k, v in value.items():
            refuse_resolvers(v, where, f"{key}{k}.")
    elif isinstance(value, list):
        for i, v in enumerate(value):
            refuse_resolvers(v, where, f"{key}{i}.")
    elif isinstance(value, str) and "${" in value and _REFERENCE.sub("", value).count("${"):
        raise TrilemmaError(f"{where}: '{key.rstrip('.')}' uses an interpolation other than a reference to "
                            f"another setting ({value!r}); environment variables and resolvers are not "
                            f"allowed in suites")


def first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
