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

One class reached two ways (an entry point whose class is also decorated with :func:`register`) is
one registration. A name that two different sources claim, or a family that fails to import, is an
error for that name only (:func:`broken` lists them): the other families still load and list.
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
_plugin_of: dict[str, str] = {}  # family name -> the plugin that registered it (a resolved file or a module)
_plugins_loaded: list[str] = []  # the plugins loaded, as resolved files or module names, in order (for a worker)
_conflicts: dict[str, str] = {}  # name -> why it cannot be used (two entry points claim it)


def _scan() -> None:
    """Read the entry points once (names and targets only: nothing is imported)."""
    global _scanned
    if _scanned:
        return
    _scanned = True
    for ep in metadata.entry_points(group=GROUP):
        source = f"entry point {ep.name} = {ep.value}"
        if ep.name in _entries and _sources[ep.name] != source:  # only this name is unusable
            _conflicts[ep.name] = f"model {ep.name!r} is registered twice: {_sources[ep.name]} and {source}"
            continue
        _entries[ep.name] = ep
        _sources[ep.name] = source


def register(cls: type[GenerativeModel]) -> type[GenerativeModel]:
    """Class decorator: add a family (its class attribute ``name``) to the registry, validated."""
    _scan()
    name = getattr(cls, "name", "")
    validate_family(cls, name)
    source = f"{cls.__module__}.{cls.__qualname__}"
    entry = _entries.get(name)
    same = (entry is cls or _sources.get(name) == source
            or isinstance(entry, metadata.EntryPoint) and entry.value.replace(":", ".") == source)
    if entry is not None and not same:
        raise TrilemmaError(f"model {name!r} is registered twice: {_sources[name]} and {source}")
    if not isinstance(entry, metadata.EntryPoint):  # an entry point keeps naming where it came from
        _sources[name] = source
    _entries[name], _loaded[name] = cls, cls
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
    if name in _conflicts:
        raise TrilemmaError(_conflicts[name])
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


def broken() -> dict[str, str]:
    """The registered names that cannot be used, each with its one-line reason (loading the others)."""
    _scan()
    out = dict(_conflicts)
    for name in model_names():
        try:
            get_model_class(name)
        except TrilemmaError as e:
            out[name] = str(e)
    return out


def plugin_of(name: str) -> str | None:
    """The plugin (a resolved file path, or a module name) that registered ``name``; None otherwise."""
    return _plugin_of.get(name)


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
        except TrilemmaError as e:  # a family it registers fails validation: say which plugin
            message = str(e)
            named = f"plugin {spec!r}" in message or f"plugin file {spec}" in message
            raise TrilemmaError(message if named else f"{where}: plugin {spec!r}: {message}") from None
        except Exception as e:
            raise TrilemmaError(f"{where}: plugin {spec!r} failed to import: {type(e).__name__}: "
                                f"{_first_line(e)}") from None
        _plugins[spec] = module.__name__
        names = (set(model_names()) - before) | _registered_in(module)
        if not names:
            raise TrilemmaError(f"{where}: plugin {spec!r} registered no model family (decorate the "
                                f"class with @trilemma.register)")
        _plugins_loaded.append(str(Path(module.__file__).resolve()) if is_file else spec)
        origin = getattr(module, "__file__", None) if is_file else spec
        for name in names:
            _plugin_of.setdefault(name, str(origin or spec))


def loaded_plugins() -> list[str]:
    """The plugins this process loaded (resolved files and module names), for a worker to load again."""
    return list(_plugins_loaded)


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


def _registered_in(module: Any) -> set[str]:
    """The names of the registered families ``module`` holds (imported before, e.g. as a dependency)."""
    return {v.name for v in vars(module).values()
            if isinstance(v, type) and _loaded.get(getattr(v, "name", None)) is v}


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else ""


def build_model(name: str, data_shape: tuple[int, int, int], preset: str | None = None,
                overrides: dict[str, Any] | None = None) -> GenerativeModel:
    """A family's model from its name, a preset and overrides, on the CPU."""
    cls = get_model_class(name)
    return cls(build_config(cls, preset, overrides or {}), data_shape)
