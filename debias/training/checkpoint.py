"""What a `DebiasModule` checkpoint holds beside Lightning's own keys, and how the edit comes back from it.

Lightning saves the module's arguments (`hyper_parameters`) and calls `on_save_checkpoint`, which adds this record:
the method and matrices, the edit's trainable state, the mask, and what `prepare` found in the data (the features
chosen at fit time, the bias's groups and their target ids). `load_from_checkpoint` builds the module from its
arguments and `on_load_checkpoint` rebuilds the edit from the record alone, with no DataModule. Everything in it is
plain values and tensors, so `torch.load(..., weights_only=True)` reads it.
"""

from __future__ import annotations

import json
from typing import Any

import torch

from debias.edits import registry
from debias.edits.mask import InstabilityMask

KEY = "debias_edit"
#: Fields a record needs to rebuild the edit without the data (checkpoints before them only restore a prepared one).
REBUILD_FIELDS = ("features", "groups", "targets")


def edit_record(module: Any) -> dict:
    """The record of `module`'s prepared edit (`checkpoint[KEY]`)."""
    return {"method": module.edit_args.method, "parameter": module.parameter,
            "parameters": list(module.parameters_edited), "state": module.delta.trainable_state(),
            "mask": module.mask.to_record() if module.mask is not None else None,
            "features": list(module.features), "groups": list(module.groups), "targets": list(module.targets),
            "bias": module.bias_spec, "feature_selection": json.dumps(module.feature_selection, default=str)}


def read_record(module: Any, checkpoint: dict, source: str) -> dict:
    """`checkpoint`'s record; refuses one without a trained state, or one of another method or matrix."""
    record = checkpoint.get(KEY)
    if not isinstance(record, dict) or "state" not in record:
        raise ValueError(f"{source} holds no trained debias edit (keys {sorted(checkpoint)[:8]})")
    ours = {"method": module.edit_args.method, "parameter": module.parameter, "parameters": module.parameters_edited}
    theirs: dict[str, Any] = {key: record.get(key) for key in ours}
    theirs["parameters"] = theirs["parameters"] or [theirs["parameter"]]  # a checkpoint of before `layers`
    if theirs != ours:
        raise ValueError(f"{source} holds a {theirs['method']} edit of {', '.join(map(str, theirs['parameters']))}"
                         f"; this run is {ours['method']} on {', '.join(module.parameters_edited)}")
    return record


def restore_edit(module: Any, checkpoint: dict, source: str) -> None:
    """Load `checkpoint`'s trained edit into `module`: into the edit `prepare` built, or (when there is none, as in
    `load_from_checkpoint`) into one rebuilt from the record."""
    record = read_record(module, checkpoint, source)
    if module.delta is None:
        rebuild_edit(module, record, source)
    module.delta.load_trainable_state(record["state"])


def rebuild_edit(module: Any, record: dict, source: str) -> None:
    """Attach the edit `record` describes to `module`, untrained: its mask as saved, its features, groups and
    targets; the trained values are loaded afterwards."""
    missing = [name for name in REBUILD_FIELDS if name not in record]
    if missing:
        raise ValueError(f"{source} records no {', '.join(missing)} of its edit (written before they were saved): "
                         "call module.prepare(datamodule), then module.load_edit_state(checkpoint, source)")
    method = registry.get(module.edit_args.method)
    if method.kind == "inference":
        raise ValueError(f"{source} holds method {method.name!r}, an inference-time intervention with no trained "
                         "state; build it with module.prepare(datamodule)")
    module.features = [int(f) for f in record["features"]]
    module.groups, module.targets = tuple(record["groups"]), tuple(int(t) for t in record["targets"])
    module.bias_spec = record.get("bias")
    module.feature_selection = json.loads(record.get("feature_selection") or "{}")
    module.feature_baseline = torch.ones(len(module.features))  # its trained value comes with the state dict
    if record.get("mask") is not None:
        module.preset_mask = InstabilityMask.from_record(record["mask"])
    else:  # an edit without a mask may be built from the SAE (feature_projection)
        module.ensure_sae()
    module.build_edit(data=None, batches=[])
