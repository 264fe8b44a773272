"""The record of an edit: what it changed, as one frozen object (`EditRecord`) that is saved, exported and applied
without peft. The edit produces it (`Edit.record()`), as concept-erasure's fitter produces its frozen eraser.

`delta.safetensors` of one matrix: tensors `indices` ([k] int64 flat positions) and `values` ([k] float32),
metadata `parameter` and `shape` (JSON). Of several: tensors `indices.<parameter>` and `values.<parameter>` per
matrix, metadata `parameters` (JSON list) and `shapes` (JSON object: parameter -> shape). Both carry `features`
(JSON list) when the edit has any; files written before it are read with none.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn


@dataclass(frozen=True)
class MatrixDelta:
    """The edit of one matrix: `weight.flatten()[indices] += values` (weight in its module's storage layout)."""

    parameter: str
    shape: tuple[int, ...]
    indices: torch.Tensor  # [k] int64 flat positions
    values: torch.Tensor  # [k] float32


@dataclass(frozen=True)
class EditRecord:
    """What an edit changed: one `MatrixDelta` per weight it changed, in layer order (none for an inference-time
    intervention, which changes no weight), and the SAE features it was made for."""

    matrices: tuple[MatrixDelta, ...]
    features: tuple[int, ...] = ()

    def save(self, path: str | Path) -> None:
        """Write `delta.safetensors`: the one-matrix layout for one matrix, the multi-matrix one otherwise."""
        if not self.matrices:
            raise ValueError("this edit changed no weight (an inference-time intervention): there is no delta to save")
        meta = {"features": json.dumps(list(self.features))}
        if len(self.matrices) == 1:
            (m,) = self.matrices
            tensors = {"indices": m.indices, "values": m.values}
            meta.update(parameter=m.parameter, shape=json.dumps(list(m.shape)))
        else:
            tensors = {key: value for m in self.matrices
                       for key, value in ((f"indices.{m.parameter}", m.indices), (f"values.{m.parameter}", m.values))}
            meta.update(parameters=json.dumps([m.parameter for m in self.matrices]),
                        shapes=json.dumps({m.parameter: list(m.shape) for m in self.matrices}))
        tensors = {key: (t.to(torch.int64) if key.startswith("indices") else t.float()).contiguous().cpu()
                   for key, t in tensors.items()}
        save_file(tensors, str(path), metadata=meta)

    @classmethod
    def load(cls, path: str | Path) -> EditRecord:
        """The record in a `delta.safetensors` of either layout."""
        with safe_open(str(path), "pt") as f:
            meta = f.metadata()
        tensors = load_file(str(path))
        features = tuple(json.loads(meta.get("features", "[]")))
        if "parameters" not in meta:
            return cls((MatrixDelta(meta["parameter"], tuple(json.loads(meta["shape"])), tensors["indices"],
                                    tensors["values"]),), features)
        shapes = json.loads(meta["shapes"])
        return cls(tuple(MatrixDelta(name, tuple(shapes[name]), tensors[f"indices.{name}"], tensors[f"values.{name}"])
                         for name in json.loads(meta["parameters"])), features)

    def apply(self, model: nn.Module) -> nn.Module:
        """Add the edit to `model`'s weights in place (no peft needed); every shape is checked before any weight
        changes. Returns the model."""
        for m in self.matrices:
            weight = model.get_parameter(m.parameter)
            if tuple(weight.shape) != m.shape:
                raise ValueError(f"delta is for {m.parameter} of shape {m.shape}, model has {tuple(weight.shape)}")
        with torch.no_grad():
            for m in self.matrices:
                weight = model.get_parameter(m.parameter)
                weight.view(-1).index_add_(0, m.indices.to(weight.device), m.values.to(weight))
        return model


def apply_delta(model: nn.Module, path: str | Path) -> nn.Module:
    """Add a saved `delta.safetensors` (one matrix or several) to `model`'s weights in place; returns the model."""
    return EditRecord.load(path).apply(model)
