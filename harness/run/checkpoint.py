"""What a run keeps on disk: the resumable checkpoint while it trains, the evaluated weights after.

``checkpoint.pt`` holds the model, its EMA, the optimizers, the loop state and every RNG state, as
tensors and plain Python values only, and is loaded with ``torch.load(weights_only=True)``: a file
dropped into a results folder cannot run code. A checkpoint that does not load is moved aside as
``checkpoint.pt.corrupt`` and named in the error, so the next attempt starts afresh rather than
failing on it again; so is one that holds another model's weights (another family, or the same one
configured otherwise), found before training by :func:`checkpoint_problem`.

``model.safetensors`` (the ``safetensors`` format: tensors and a JSON header, nothing executable)
holds the evaluated weights of a finished run (the EMA where there is one), and ``model.json`` beside
it the run's resolved settings and the data shape, so :func:`load_weights` rebuilds the model without
the suite file: ``trilemma eval`` and ``trilemma sample`` read them.
"""
from __future__ import annotations

import dataclasses
import io
import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from trilemma.contract.errors import TrilemmaError
from trilemma.contract.family import GenerativeModel, build_config
from trilemma.contract.registry import get_model_class, plugin_of
from trilemma.results.io import atomic_write_bytes, atomic_write_json, read_json
from trilemma.results.schema import SUITE_FILE, WEIGHTS_CONFIG_FILE, WEIGHTS_FILE

WEIGHTS_FORMAT = "trilemma.weights/1"


# --- RNG state as plain values (numpy's tuple holds an array, which weights_only refuses) -----------

def rng_state() -> dict[str, Any]:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_tuples(state["python"]))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _tuples(value):
    """random.setstate wants the tuples back that serialization may have turned into lists."""
    return tuple(_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


# --- the training checkpoint ------------------------------------------------------------------------

def save_checkpoint(path: Path, blob: dict[str, Any]) -> None:
    """Write a checkpoint atomically (a unique temporary file, then a rename over the last one)."""
    buffer = io.BytesIO()
    torch.save(blob, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def load_checkpoint(path: Path, device: torch.device) -> dict[str, Any]:
    """A checkpoint's contents, tensors on ``device``; an unreadable one is moved aside and named."""
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # truncated, garbage, or holding objects other than tensors and plain values
        aside = quarantine(path)
        raise TrilemmaError(f"checkpoint {path} could not be loaded ({type(e).__name__}: "
                            f"{str(e).strip().splitlines()[0] if str(e).strip() else ''}); moved to {aside.name}, "
                            f"the run will start afresh next time") from None


def checkpoint_loads(path: Path, model: GenerativeModel | None = None) -> bool:
    """Whether a checkpoint loads as tensors and plain values (without keeping it), and, given the
    run's freshly built ``model``, holds that model's weights (every key, every shape)."""
    return checkpoint_problem(path, model) is None


def checkpoint_problem(path: Path, model: GenerativeModel | None = None) -> str | None:
    """Why a checkpoint cannot resume ``model`` (one line), or None when it can."""
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, garbage, or a pickle of other objects
        return f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else 'unreadable'}"
    if not isinstance(blob, dict) or not isinstance(blob.get("model"), dict):
        return "not a trilemma checkpoint (no 'model' state)"
    if model is None:
        return None
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    found = {k: tuple(v.shape) for k, v in blob["model"].items() if torch.is_tensor(v)}
    if expected == found:
        return None
    missing, unexpected = sorted(set(expected) - set(found)), sorted(set(found) - set(expected))
    shapes = sorted(k for k in set(expected) & set(found) if expected[k] != found[k])
    detail = (f"missing {', '.join(missing[:2])}" if missing else f"unexpected {', '.join(unexpected[:2])}"
              if unexpected else f"{shapes[0]} is {found[shapes[0]]}, not {expected[shapes[0]]}")
    return f"the weights of another model, not {model.name} as configured ({detail})"


def quarantine(path: Path) -> Path:
    """Move a bad file aside as ``<name>.corrupt`` (numbered if one is there already)."""
    path = Path(path)
    aside = path.with_name(path.name + ".corrupt")
    n = 1
    while aside.exists():
        aside, n = path.with_name(f"{path.name}.corrupt{n}"), n + 1
    path.replace(aside)
    return aside


# --- the evaluated weights of a finished run -------------------------------------------------------

def save_weights(run_dir: Path, model: GenerativeModel, run_config: dict[str, Any]) -> Path:
    """``model.safetensors`` and ``model.json`` in ``run_dir``; returns the weights' path."""
    from safetensors.torch import save

    # Every tensor of the state dict on its own storage (safetensors refuses shared ones), on the CPU.
    tensors = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in model.state_dict().items()}
    path = Path(run_dir) / WEIGHTS_FILE
    atomic_write_bytes(path, save(tensors, metadata={"format": WEIGHTS_FORMAT, "model": model.name}))
    atomic_write_json(Path(run_dir) / WEIGHTS_CONFIG_FILE, {
        "format": WEIGHTS_FORMAT, "model": model.name, "plugin": plugin_of(model.name),
        "data_shape": list(model.data_shape),
        "model_config": json.loads(json.dumps(dataclasses.asdict(model.config))), "run_config": run_config})
    return path


def _family(run_dir: Path, meta: dict[str, Any]) -> type[GenerativeModel]:
    """The family of saved weights; one from a plugin that is not loaded says which --plugin to pass
    (the plugin recorded in model.json, else the suite's plugins, recorded in its suite.json)."""
    try:
        return get_model_class(meta["model"])
    except TrilemmaError:
        plugins = [meta["plugin"]] if meta.get("plugin") else []
        suite_file = run_dir.parent / SUITE_FILE
        if not plugins and suite_file.is_file():
            try:
                plugins = [str(p) for p in (read_json(suite_file).get("plugins") or [])]
            except (TrilemmaError, AttributeError):
                plugins = []
        if not plugins:
            raise
        raise TrilemmaError(f"{run_dir}: its model {meta['model']!r} comes from a plugin, which is not "
                            f"loaded; pass {' '.join(f'--plugin {p}' for p in plugins)}") from None


def load_weights(run_dir: Path, device: torch.device | str = "cpu") -> tuple[GenerativeModel, dict[str, Any]]:
    """The model saved in ``run_dir`` (in eval mode, on ``device``) and its ``model.json``."""
    from safetensors.torch import load

    run_dir = Path(run_dir)
    path, meta_path = run_dir / WEIGHTS_FILE, run_dir / WEIGHTS_CONFIG_FILE
    if not path.is_file() or not meta_path.is_file():
        raise TrilemmaError(f"{run_dir} holds no saved model ({WEIGHTS_FILE} and {WEIGHTS_CONFIG_FILE}); "
                            f"only runs finished by this version of trilemma keep their weights")
    meta = read_json(meta_path)
    if not isinstance(meta, dict) or meta.get("format") != WEIGHTS_FORMAT:
        raise TrilemmaError(f"{meta_path}: not a trilemma weights record (format {WEIGHTS_FORMAT!r})")
    cls = _family(run_dir, meta)
    config = build_config(cls, None, meta["model_config"], f"{meta_path}")
    model = cls(config, tuple(meta["data_shape"]))
    try:
        tensors = load(path.read_bytes())
    except Exception as e:
        raise TrilemmaError(f"{path}: not a readable safetensors file ({type(e).__name__}: "
                            f"{str(e).strip().splitlines()[0] if str(e).strip() else ''})") from None
    expected = set(model.state_dict())
    missing, unexpected = expected - set(tensors), set(tensors) - expected
    if missing or unexpected:
        raise TrilemmaError(f"{path} does not match {cls.name}'s architecture (missing: "
                            f"{', '.join(sorted(missing)[:3]) or 'none'}; unexpected: "
                            f"{', '.join(sorted(unexpected)[:3]) or 'none'})")
    try:
        model.load_state_dict(tensors)
    except RuntimeError as e:  # a shape that does not match the config
        raise TrilemmaError(f"{path} does not fit {cls.name} as configured in {meta_path.name}: "
                            f"{str(e).strip().splitlines()[-1]}") from None
    return model.to(device).eval(), meta
