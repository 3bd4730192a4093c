"""Pretrained weights: a model trained anywhere, measured the way the harness measures its own.

A suite entry's ``weights:`` names what to load into the entry's family, built with its preset and
config; the run then measures everything but training (``trilemma.run.runner``). Only tensor formats
load, so a weights file cannot run code. The routes, in this order:

    * a ``trilemma export`` folder (``model.safetensors`` beside ``model.json``, as a finished run
      folder holds them), or its ``model.safetensors``: read by
      :func:`trilemma.run.checkpoint.load_weights`, its family and data shape checked against the entry;
    * a format of the family's own (a diffusers folder): the family's optional
      :meth:`~trilemma.contract.family.GenerativeModel.from_pretrained`;
    * a ``.safetensors`` file, or a torch file of a state dict (``torch.load(weights_only=True)``).

Every route ends in a state dict checked against the model the entry configures: a missing,
unexpected or misshapen tensor is one line naming the first wrong key. The weights' SHA-256
(:func:`weights_sha256`) goes into the run's config hash, its provenance and its protocol fingerprint.
"""
from __future__ import annotations

import functools
import hashlib
import os
import pickle
from pathlib import Path
from typing import Any, Optional

import torch

from trilemma.contract.errors import TrilemmaError
from trilemma.contract.family import GenerativeModel, build_config
from trilemma.contract.registry import get_model_class
from trilemma.results.io import read_json
from trilemma.results.schema import WEIGHTS_CONFIG_FILE, WEIGHTS_FILE

SAFETENSORS_SUFFIXES = (".safetensors",)
TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")  # torch.save files, read with weights_only=True
FORMATS = ("a .safetensors file, a torch file of a state dict (.pt, .pth, .bin, .ckpt) or a folder "
           "written by `trilemma export`")


# --- what a path holds ---------------------------------------------------------------------------

def export_folder(path: Path) -> Optional[Path]:
    """The ``trilemma export`` folder (or finished run folder) that ``path`` is or whose weights it names."""
    folder = path if path.is_dir() else path.parent if path.name == WEIGHTS_FILE else None
    if folder is not None and (folder / WEIGHTS_FILE).is_file() and (folder / WEIGHTS_CONFIG_FILE).is_file():
        return folder
    return None


def weights_format(cls: type[GenerativeModel], path: Path) -> Optional[str]:
    """How ``path`` is read for family ``cls`` (see the module docstring), or None when no route reads it."""
    if export_folder(path) is not None:
        return "trilemma export"
    if cls.reads_pretrained():
        return f"{cls.name}.from_pretrained"
    if path.is_file() and path.suffix in SAFETENSORS_SUFFIXES:
        return "safetensors"
    if path.is_file() and path.suffix in TORCH_SUFFIXES:
        return "torch (weights_only)"
    return None


def check_weights_path(cls: type[GenerativeModel], text: str, base: Path, where: str) -> str:
    """A suite entry's ``weights`` resolved against the suite file's folder ``base``, as an absolute
    path; a missing file, or one no route reads, is a one-line error naming ``where``."""
    path = Path(os.path.expanduser(text))
    path = (path if path.is_absolute() else Path(base) / path).resolve()
    if not path.exists():
        raise TrilemmaError(f"{where}: {path} does not exist")
    if weights_format(cls, path) is None:
        what = "folder" if path.is_dir() else f"'{path.suffix}' file" if path.suffix else "file"
        raise TrilemmaError(f"{where}: {path} is a {what} that {cls.name} cannot load: give {FORMATS} "
                            f"(or a family whose from_pretrained reads its own format)")
    return str(path)


def weights_sha256(weights: str | Path) -> str:
    """SHA-256 of the weights: of the tensor file (an export's ``model.safetensors``), or, for a
    folder in a family's own format, of every file's relative name and contents in name order."""
    path = Path(weights)
    folder = export_folder(path)
    path = folder / WEIGHTS_FILE if folder is not None else path
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    stamp = tuple((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files)
    return _sha256(str(path), stamp)


@functools.lru_cache(maxsize=64)
def _sha256(path: str, stamp: tuple) -> str:
    """Hashed once per file state (``stamp``: names, sizes, times), as a suite's status reads it often."""
    root, digest = Path(path), hashlib.sha256()
    for name, _, _ in stamp:
        if root.is_dir():
            digest.update(Path(name).relative_to(root).as_posix().encode() + b"\0")
        with open(name, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def weights_record(name: str, weights: str) -> dict[str, Any]:
    """What the provenance records of a pretrained run's weights: path, format, size and SHA-256."""
    path = Path(weights)
    folder = export_folder(path)
    file = folder / WEIGHTS_FILE if folder is not None else path
    size = sum(p.stat().st_size for p in file.rglob("*") if p.is_file()) if file.is_dir() else file.stat().st_size
    return {"path": str(path), "format": weights_format(get_model_class(name), path), "bytes": size,
            "sha256": weights_sha256(path)}


# --- reading and fitting ---------------------------------------------------------------------------

def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a ``.safetensors`` file or of a torch file of a state dict, on the CPU; anything
    else (a pickle of objects, a nested checkpoint) is a one-line error."""
    if path.suffix in SAFETENSORS_SUFFIXES:
        from safetensors.torch import load

        try:
            return load(path.read_bytes())
        except Exception as e:  # truncated, or not safetensors at all
            raise TrilemmaError(f"{path}: not a readable safetensors file ({type(e).__name__}: "
                                f"{_first_line(e)})") from None
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a pickle of classes and functions, or not a torch file
        why = ("it pickles Python objects, not only tensors" if isinstance(e, pickle.UnpicklingError)
               else f"{type(e).__name__}: {_first_line(e)}")
        raise TrilemmaError(f"{path}: not a tensor file: torch.load(weights_only=True) refused it ({why}); "
                            f"a pickle can run code when loaded, so only state dicts load (safetensors, "
                            f"or torch.save(model.state_dict()))") from None
    if not isinstance(blob, dict):
        raise TrilemmaError(f"{path}: holds a {type(blob).__name__}, not a state dict (a mapping of "
                            f"names to tensors)")
    for key, value in blob.items():
        if not torch.is_tensor(value):
            raise TrilemmaError(f"{path}: key {key!r} holds a {type(value).__name__}, not a tensor; save "
                                f"the model's state dict alone (torch.save(model.state_dict()))")
    return blob


def wrong_key(expected: dict[str, tuple], found: dict[str, tuple]) -> Optional[str]:
    """The first key (in the model's order) on which two {key: shape} maps differ, said in one
    phrase; None when they agree."""
    for key, shape in expected.items():
        if key not in found:
            return f"{key!r} is missing from the weights"
        if found[key] != shape:
            return f"{key!r} has shape {tuple(found[key])} in the weights, {tuple(shape)} in the model"
    extra = [k for k in found if k not in expected]
    return f"{extra[0]!r} is in the weights but not in the model" if extra else None


def _shapes(tensors: dict[str, torch.Tensor]) -> dict[str, tuple]:
    return {k: tuple(v.shape) for k, v in tensors.items() if torch.is_tensor(v)}


def fit(model: GenerativeModel, tensors: dict[str, torch.Tensor], path: Path, configured: str) -> None:
    """Load ``tensors`` into ``model`` after checking every key and shape; one line naming the first
    wrong key otherwise."""
    expected, found = _shapes(model.state_dict()), _shapes(tensors)
    problem = wrong_key(expected, found)
    if problem:
        shared = set(expected) & set(found)
        differing = len(set(expected) ^ set(found)) + sum(expected[k] != found[k] for k in shared)
        raise TrilemmaError(f"{path} does not fit {model.name} {configured}: {problem} "
                            f"({differing} of {len(expected)} keys differ)")
    model.load_state_dict(tensors)


def load_pretrained(name: str, model_config: dict[str, Any], weights: str,
                    data_shape: tuple[int, int, int]) -> GenerativeModel:
    """Family ``name`` built with ``model_config`` on ``data_shape``, holding ``weights``; on the CPU,
    in eval mode."""
    cls = get_model_class(name)
    config = build_config(cls, None, model_config)
    path, shape = Path(weights), tuple(data_shape)
    configured = f"as configured ({'x'.join(map(str, shape))} images)"
    folder = export_folder(path)
    if folder is not None:  # a trilemma export: the saved-run loader, then the entry's own model
        meta = read_json(folder / WEIGHTS_CONFIG_FILE)
        meta = meta if isinstance(meta, dict) else {}
        if meta.get("model") != name:
            raise TrilemmaError(f"{folder}: the weights are of model {meta.get('model')!r}, not {name!r}; "
                                f"name that family in the suite entry")
        trained_on = tuple(meta.get("data_shape") or ())
        if trained_on != shape:
            raise TrilemmaError(f"{folder}: the weights were trained on {'x'.join(map(str, trained_on))} "
                                f"images, the data set's are {'x'.join(map(str, shape))}")
        from trilemma.run.checkpoint import load_weights

        saved, _ = load_weights(folder)
        model = cls(config, shape)
        fit(model, saved.state_dict(), folder / WEIGHTS_FILE, configured)
    elif cls.reads_pretrained():  # the family's own format; the result must be what the config builds
        try:
            model = cls.from_pretrained(path, shape, config)
        except TrilemmaError:
            raise
        except Exception as e:  # the family's reader, or the library it calls
            raise TrilemmaError(f"{path}: {cls.name}.from_pretrained failed: {type(e).__name__}: "
                                f"{_first_line(e)}") from None
        if not isinstance(model, cls) or tuple(model.data_shape) != shape:
            raise TrilemmaError(f"{cls.name}.from_pretrained({path}) returned "
                                f"{type(model).__name__} for {getattr(model, 'data_shape', '?')} images, "
                                f"not a {cls.__name__} for {shape}")
        problem = wrong_key(_shapes(cls(config, shape).state_dict()), _shapes(model.state_dict()))
        if problem:  # `trilemma eval` and `export` rebuild it from the config: it must fit
            raise TrilemmaError(f"{path} does not fit {cls.name} {configured}: {problem}")
    else:
        model = cls(config, shape)
        fit(model, read_state_dict(path), path, configured)
    if not all(bool(torch.isfinite(t).all()) for t in model.state_dict().values() if t.is_floating_point()):
        raise TrilemmaError(f"{path}: the weights hold NaN or infinite values")
    return model.eval()


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
