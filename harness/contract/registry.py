"""The registry of model families: entry points, plugin files, loaded only when asked for.

Families are found in three ways, all ending in the same validated table:

    * the entry-point group ``trilemma.models`` of every installed distribution, the built-in
      families included (``pyproject.toml``: ``dcgan = "trilemma.models.dcgan:DCGAN"``); an outside
      package adds its own the same way;
    * a plugin: a Python file or an importable module named by a suite's ``plugins:`` or the command
      line's ``--plugin``, whose families are decorated with :func:`register`;
    * :func:`register` called directly (a notebook, a test).

Listing the names imports nothing; a family's module is imported (and its class validated by
:func:`trilemma.contract.family.validate_family`) the first time it is asked for. No family module is
imported by the contract itself, so the contract sits below the models and nothing imports upwards.
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import sys
from importlib import metadata
from pathlib import Path
from typing import Any, Union

from trilemma.contract.errors import TrilemmaError
from trilemma.contract.family import GenerativeModel, build_config, validate_family

GROUP = "trilemma.models"
Entry = Union[metadata.EntryPoint, type]

_entries: dict[str, Entry] = {}  # name -> entry point (not yet loaded) or class
_sources: dict[str, str] = {}  # name -> where it came from, for messages
_loaded: dict[str, type[GenerativeModel]] = {}
_scanned = False
_plugins: dict[str, str] = {}  # plugin spec -> module name, each imported once


def _scan() -> None:
    """Read the entry points once (names and targets only: nothing is imported)."""
    global _scanned
    if _scanned:
        return
    _scanned = True
    for ep in metadata.entry_points(group=GROUP):
        source = f"entry point {ep.name} = {ep.value}"
        if ep.name in _entries and _sources[ep.name] != source:
            raise TrilemmaError(f"model {ep.name!r} is registered twice: {_sources[ep.name]} and {source}")
        _entries[ep.name] = ep
        _sources[ep.name] = source


def register(cls: type[GenerativeModel]) -> type[GenerativeModel]:
    """Class decorator: add a family (its class attribute ``name``) to the registry, validated."""
    _scan()
    name = getattr(cls, "name", "")
    validate_family(cls, name)
    source = f"{cls.__module__}.{cls.__qualname__}"
    if name in _entries and _entries[name] is not cls and _sources[name] != source:
        raise TrilemmaError(f"model {name!r} is registered twice: {_sources[name]} and {source}")
    _entries[name], _sources[name], _loaded[name] = cls, source, cls
    return cls


def model_names() -> list[str]:
    """Every registered name, in registration order (the built-ins in ``pyproject.toml``'s order)."""
    _scan()
    return list(_entries)


def get_model_class(name: str) -> type[GenerativeModel]:
    """The family registered as ``name``, imported and validated on first use."""
    _scan()
    if name in _loaded:
        return _loaded[name]
    if name not in _entries:
        known = ", ".join(model_names()) or "none (is trilemma installed? pip install -e .)"
        raise TrilemmaError(f"unknown model {name!r}; registered models: {known}")
    entry = _entries[name]
    try:
        cls = entry.load() if isinstance(entry, metadata.EntryPoint) else entry
    except Exception as e:  # an outside package's broken import is the user's to fix: say which
        raise TrilemmaError(f"cannot load model {name!r} from {_sources[name]}: "
                            f"{type(e).__name__}: {_first_line(e)}") from None
    validate_family(cls, name)
    _loaded[name] = cls
    return cls


def registered() -> dict[str, type[GenerativeModel]]:
    """Every family, loaded, by name, in registration order."""
    return {name: get_model_class(name) for name in model_names()}


def load_plugins(specs: list[str], where: str = "plugins", base: Path | None = None) -> None:
    """Import each plugin (a ``.py`` file, relative to ``base``, or a module name) once.

    A plugin registers its families with :func:`register` when imported; one that registers none is
    an error, as is one that fails to import (the message names it).
    """
    for spec in specs:
        if spec in _plugins:
            continue
        before = set(model_names())
        is_file = spec.endswith(".py") or "/" in spec or spec.startswith(".")
        try:
            module = _import_file(spec, base) if is_file else importlib.import_module(spec)
        except TrilemmaError:
            raise
        except Exception as e:
            raise TrilemmaError(f"{where}: plugin {spec!r} failed to import: {type(e).__name__}: "
                                f"{_first_line(e)}") from None
        _plugins[spec] = module.__name__
        if not set(model_names()) - before and not _defines_registered(module):
            raise TrilemmaError(f"{where}: plugin {spec!r} registered no model family (decorate the "
                                f"class with @trilemma.register)")


def _import_file(spec: str, base: Path | None) -> Any:
    path = Path(spec).expanduser()
    if not path.is_absolute() and base is not None and not path.exists():
        path = Path(base) / path
    if not path.is_file():
        raise TrilemmaError(f"plugin file {spec} not found")
    path = path.resolve()
    # A stable, unique module name per file, so two plugins called model.py do not collide.
    name = f"trilemma_plugin_{path.stem}_{hashlib.sha1(str(path).encode()).hexdigest()[:8]}"
    if name in sys.modules:
        return sys.modules[name]
    module_spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module
    try:
        module_spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def _defines_registered(module: Any) -> bool:
    """Whether ``module`` holds a registered family (imported before, e.g. as a dependency)."""
    return any(isinstance(v, type) and _loaded.get(getattr(v, "name", None)) is v for v in vars(module).values())


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else ""


def build_model(name: str, data_shape: tuple[int, int, int], preset: str | None = None,
                overrides: dict[str, Any] | None = None) -> GenerativeModel:
    """A family's model from its name, a preset and overrides, on the CPU."""
    cls = get_model_class(name)
    return cls(build_config(cls, preset, overrides or {}), data_shape)
