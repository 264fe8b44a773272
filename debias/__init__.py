"""debias: remove a bias from a Hugging Face LM by training only the W_out entries that drive SAE features.

    from debias import DebiasModule, DebiasDataModule, DebiasData, ValidationMetrics
    from debias import EditArgs, SAEArgs, TrainArgs, ObjectiveWeights
    from debias import apply_delta, load_model, InstabilityMask, EditRecord, METHODS

Names are imported on first use (PEP 562), so `import debias` and `debias --help` stay fast.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # what mypy and IDEs see; at run time `__getattr__` imports each name on first use
    from debias.callbacks import ValidationMetrics as ValidationMetrics
    from debias.edits.mask import InstabilityMask as InstabilityMask
    from debias.edits.record import EditRecord as EditRecord
    from debias.edits.record import apply_delta as apply_delta
    from debias.edits.registry import METHODS as METHODS
    from debias.evaluation.evaluate import evaluate_model as evaluate_model
    from debias.models.load import load_model as load_model
    from debias.training.args import EditArgs as EditArgs
    from debias.training.args import SAEArgs as SAEArgs
    from debias.training.args import TrainArgs as TrainArgs
    from debias.training.data import DebiasDataModule as DebiasDataModule
    from debias.training.module import DebiasModule as DebiasModule
    from debias.training.objective import ObjectiveWeights as ObjectiveWeights
    from debias.training.protocol import DebiasData as DebiasData

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
    "EditRecord": "debias.edits.record",
    "apply_delta": "debias.edits.record",
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
