"""lm-evaluation-harness steer files for the inference-time edits (`steering_vector`, `sae_clamp`).

    lm_eval --model steered --model_args pretrained=BASE,steer_path=steer.pt --tasks ...

The format is the harness's (lm-eval 0.4.13, `lm_eval/models/hf_steered.py`, model type `steered`): a `torch.save`d
dict {hookpoint: {"steering_vector", "steering_coefficient", "action", "bias", "head_index"}}; the hookpoint is a
module name in `model.base_model.named_modules()` (`layers.24.mlp` for a Llama, no `model.` prefix), and the harness
edits that module's forward output (its first element when it is a tuple) at every position:

- `add`: acts + coefficient · steering_vector;
- `clamp`: with d = steering_vector / |steering_vector|, the component of acts − bias along d is set to
  coefficient: acts + d · (coefficient − ⟨acts − bias, d⟩).

What each edit becomes (each entry also holds a `debias` dict: method, hook name, `exact`, `note`; the harness
reads only its own keys):

- `steering_vector` (acts + s·alpha·v): `add` of the shift s·alpha·v itself with coefficient 1, so the harness adds
  the very tensor `SteeringVector.fn` adds: **exact**, in any dtype.
- `sae_clamp` of one latent f at value c (acts + (c − z_f) · W_dec[f], z_f from the SAE's encoder): **not exact**.
  The format has no encoder, so it becomes `clamp` along d = W_dec[f] / |W_dec[f]| with bias b_dec and coefficient
  c · |W_dec[f]|: the whole component of acts − b_dec along d is set, which equals the SAE clamp only when that
  component is z_f · |W_dec[f]| (other latents' decoder rows and the reconstruction error orthogonal to d). It is
  the harness's own reading of an SAE latent (its CSV loader clamps along W_dec[f] with bias b_dec).
- `sae_clamp` of several latents, or at a strength other than 1: refused (one direction per module; no mix).

A hook on a module's *input* (`blocks.L.hook_resid_pre`) is written on the output of the module before it
(`blocks.L-1.hook_resid_post`, the same tensor); other input hooks are refused. The harness loads the file with
`weights_only=False`: `write_steer_file` writes only tensors, numbers and strings, and `load_steer_file` reads
with `weights_only=True`.
"""

from __future__ import annotations

import io
import re
from pathlib import Path

import torch

from debias.edits.inference import InferenceEdit
from debias.edits.interventions import Intervention
from debias.io import atomic_write

KEYS = ("steering_vector", "steering_coefficient", "action", "bias", "head_index")


def intervention_of(edit) -> Intervention:
    """The `Intervention` behind `edit` (itself, or an `InferenceEdit`); a one-line error for anything else (a trained
    weight edit is no steering edit)."""
    found = edit.intervention if isinstance(edit, InferenceEdit) else edit
    if not isinstance(found, Intervention):
        raise ValueError(f"a steer file holds an inference-time edit (sae_clamp, steering_vector), not "
                         f"{type(found).__name__}: a trained edit is a weight change; evaluate its export with "
                         "`lm_eval --model hf --model_args pretrained=EXPORT`")
    return found


def hookpoint(model, site) -> str:
    """The harness's name for the module whose output is `site`'s tensor (relative to `model.base_model`)."""
    from debias.models import hooks

    if site.position == "input":
        match = re.fullmatch(r"blocks\.(\d+)\.hook_resid_pre", site.hook_name)
        if not match or int(match.group(1)) == 0:
            raise ValueError(f"the harness's steered model edits module outputs; {site.hook_name} is the input of "
                             f"{site.module_name}, which no module outputs as is")
        site = hooks.resolve_hook(model, f"blocks.{int(match.group(1)) - 1}.hook_resid_post")
        if site.position != "output":
            raise ValueError(f"{site.hook_name} is not a module output either; no steer file for it")
    target = model.get_submodule(site.module_name)
    base = model.base_model
    names = [name for name, module in base.named_modules() if module is target]
    if not names:
        raise ValueError(f"{site.module_name} is not inside {type(model).__name__}.base_model, where the harness "
                         "looks for hookpoints")
    return names[0]


def steer_entries(edit, model) -> dict[str, dict]:
    """{hookpoint: entry} in the harness's format for `edit` on `model` (the HF model it hooks)."""
    found = intervention_of(edit)
    found.check(model)  # the vector / SAE fits the hooked tensor, as when debias applies it
    return {hookpoint(model, found.site): found.harness_entry()}


def write_steer_file(edit, model, path: str | Path) -> Path:
    """Write `edit`'s steer file (a `.pt`, which the harness requires) atomically; returns its path."""
    return save_steer_entries(steer_entries(edit, model), path)


def save_steer_entries(entries: dict[str, dict], path: str | Path) -> Path:
    """Write `steer_entries`' result as a steer file (a `.pt`, which the harness requires) atomically."""
    path = Path(path)
    if path.suffix not in (".pt", ".pth"):
        raise ValueError(f"the harness reads a steer file only with a .pt or .pth name, got {path.name!r}")
    buffer = io.BytesIO()
    torch.save(entries, buffer)
    atomic_write(path, buffer.getvalue())
    return path


def load_steer_file(path: str | Path) -> dict[str, dict]:
    """A steer file's entries, read without running code (`weights_only=True`); checks the harness's keys."""
    entries = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(entries, dict) or not all(isinstance(e, dict) and set(KEYS) <= set(e) for e in entries.values()):
        raise ValueError(f"{path} is not a steer file: expected {{hookpoint: {{{', '.join(KEYS)}}}}}")
    return entries
