"""trilemma: train and measure deep generative models under one runner.

The package is laid out by role, each layer importing only the layers below it:

    contract/   the family interface and its validating registry, likelihood (bits/dim), errors
    models/     the families, one file each, and the blocks three or more of them share
    results/    the result schema, atomic reading and writing, provenance, show and compare
    measure/    the timing protocol, sample speed, FID, NLL, resolution scaling
    run/        typed settings, data, the training loop, checkpoints, the suite runner
    report/     the table, its marks and caption, Markdown/LaTeX, figures
    cli         the ``trilemma`` command

What a family author needs is importable from here: ``GenerativeModel``, ``Capabilities``,
``GradientRule``, ``register`` and the ``likelihood`` module.
"""
from __future__ import annotations

__version__ = "0.1.0"

_EXPORTS = {
    "GenerativeModel": "trilemma.contract.family",
    "Capabilities": "trilemma.contract.family",
    "GradientRule": "trilemma.contract.update",
    "TrilemmaError": "trilemma.contract.errors",
    "register": "trilemma.contract.registry",
    "get_model_class": "trilemma.contract.registry",
    "model_names": "trilemma.contract.registry",
}


def __getattr__(name: str):
    """Lazy exports: ``import trilemma`` stays cheap (no torch) until a name is used."""
    import importlib

    if name == "likelihood":
        return importlib.import_module("trilemma.contract.likelihood")
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'trilemma' has no attribute {name!r}")
