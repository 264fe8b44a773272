"""debias: remove a bias from a Hugging Face LM by training only the W_out entries that drive SAE features.

    from debias import DebiasModule, DebiasDataModule, DebiasData, ValidationMetrics
    from debias import EditArgs, SAEArgs, TrainArgs, ObjectiveWeights
    from debias import apply_delta, load_model, InstabilityMask, EditRecord, METHODS

Names are imported on first use (PEP 562), so `import debias` and `debias --help` stay fast.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "DebiasModule": "debias.training.module",
    "DebiasDataModule": "debias.training.data",
    "DebiasData": "debias.training.protocol",
    "ValidationMetrics": "debias.callbacks",
    "SAEArgs": "debias.training.args",
    "EditArgs": "debias.training.args",
    "TrainArgs": "debias.training.args",
    "ObjectiveWeights": "debias.training.objective",
    "InstabilityMask": "debias.edits.mask",
    "EditRecord": "debias.edits.sparse",
    "apply_delta": "debias.edits.sparse",
    "METHODS": "debias.edits.registry",
    "load_model": "debias.models.load",
    "evaluate_model": "debias.evaluation.evaluate",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'debias' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)


def __dir__() -> list[str]:
    return __all__
