"""What makes a grid cell a curve: its settings, the snapshots of the edit taken along training, and their files.

A trained cell keeps the edit's trainable state at every `snapshot_every`-th step and at the last one (`Snapshots`);
each snapshot is then evaluated at every α of `alphas` (`debias.edits.scaling.scaled`: α·Δ). α = 0 is the original
model at every snapshot, so it is the curves' shared anchor and is never evaluated. An inference-time or computed
method has one snapshot, step 0, its edit as built.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from lightning.pytorch import Callback

from debias.io import atomic_write, is_regular

# The defaults keep the default grid within an hour on 2 cores: each point costs a validation and a held-out
# evaluation, so a trained cell has its last step at three scales (plus α = 0, the original model).
DEFAULT_ALPHAS = (0.5, 1.0, 1.5)
DEFAULT_KL_LEVELS = (0.003, 0.01)
DEFAULT_SUITE_LEVELS = (0.01,)
DEFAULT_SNAPSHOT_EVERY = 40
#: The largest scale of `--alphas`: well past any useful strength, and far from where α·Δ overflows the weights.
MAX_ALPHA = 10.0


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True)
class FrontierSettings:
    """Where each cell's curve is evaluated, and the KL levels its matched points are chosen at."""

    alphas: tuple[float, ...] = DEFAULT_ALPHAS
    """Scales of the learned edit (α·Δ; a strength for interventions) evaluated at every snapshot; all in
    (0, `MAX_ALPHA`]."""
    snapshot_every: int = DEFAULT_SNAPSHOT_EVERY
    """A snapshot every this many training steps, and one at the last step."""
    kl_levels: tuple[float, ...] = DEFAULT_KL_LEVELS
    """Validation KLs (nats/token) at which each cell's (step, α) is chosen and the held-out split evaluated."""
    suite_levels: tuple[float, ...] = DEFAULT_SUITE_LEVELS
    """Levels of `kl_levels` whose matched point also gets CrowS-Pairs and StereoSet."""

    def problems(self) -> list[str]:
        """Every bad value, each naming the flag, the value and what is expected."""
        out = []
        if not self.alphas:
            out.append("--alphas is empty; expected one or more finite scales > 0, e.g. [0.5, 1.0, 1.5]")
        for a in self.alphas:
            if not _number(a):
                out.append(f"--alphas holds {a!r}; expected finite scales > 0, at most {MAX_ALPHA:g}")
            elif a <= 0:
                out.append(f"--alphas holds {a!r}; expected finite scales > 0 (α = 0, the original model, is every "
                           "curve's anchor, never evaluated)")
            elif a > MAX_ALPHA:
                out.append(f"--alphas holds {a!r}; expected finite scales > 0, at most {MAX_ALPHA:g} (a larger α·Δ "
                           "measures an overflowing edit, not the learned one)")
        if len(set(self.alphas)) != len(self.alphas):
            out.append(f"--alphas {list(self.alphas)} repeats a value; expected each scale once")
        for level in self.kl_levels:
            if not _number(level) or level <= 0:
                out.append(f"--kl_levels holds {level!r}; expected finite KLs > 0 (nats/token)")
        for level in self.suite_levels:
            if level not in self.kl_levels:
                out.append(f"--suite_levels holds {level!r}, which is not one of --kl_levels {list(self.kl_levels)}")
        if isinstance(self.snapshot_every, bool) or not isinstance(self.snapshot_every, int) \
                or self.snapshot_every < 1:
            out.append(f"--snapshot_every must be a whole number of steps >= 1, got {self.snapshot_every!r}")
        return out

    def steps(self, max_steps: int) -> list[int]:
        """The snapshot steps of a run of `max_steps` steps: every `snapshot_every`-th and the last."""
        return sorted({*range(self.snapshot_every, max_steps + 1, self.snapshot_every), max_steps})

    def to_dict(self) -> dict:
        return {key: list(value) if isinstance(value, tuple) else value for key, value in asdict(self).items()}

    def evaluations(self, max_steps: int, trained: bool = True) -> int:
        """Evaluations of one cell: validation + held-out at each (snapshot, α), one held-out per level."""
        snapshots = len(self.steps(max_steps)) if trained else 1
        return 2 * snapshots * len(self.alphas) + len(self.kl_levels)


class Snapshots(Callback):
    """Keeps the edit's trainable state at `steps` of a fit and at its last step (CPU copies, in memory)."""

    def __init__(self, steps: Sequence[int]):
        self.steps = set(steps)
        self.states: dict[int, dict[str, torch.Tensor]] = {}

    def _keep(self, step: int, pl_module) -> None:
        if step not in self.states:
            self.states[step] = {k: v.detach().cpu().clone() for k, v in pl_module.delta.trainable_state().items()}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step in self.steps:
            self._keep(trainer.global_step, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        self._keep(trainer.global_step, pl_module)  # the last step (a run that stopped early, or computed: 0)


def save_snapshots(path: Path, states: dict[int, dict[str, torch.Tensor]]) -> None:
    """All snapshots in one safetensors file (tensor `STEP/KEY`), written atomically."""
    from safetensors.torch import save

    tensors = {f"{step}/{key}": value.contiguous() for step, state in states.items() for key, value in state.items()}
    atomic_write(path, save(tensors, metadata={"steps": ",".join(str(s) for s in sorted(states))}))


def load_snapshots(path: Path) -> dict[int, dict[str, torch.Tensor]] | None:
    """The snapshots `save_snapshots` wrote (None when the file is missing, unreadable or not a regular file)."""
    from safetensors import SafetensorError, safe_open

    if not is_regular(path):  # a FIFO planted there would block the open
        return None
    try:
        with safe_open(str(path), "pt") as f:
            steps = (f.metadata() or {}).get("steps", "")
            states: dict[int, dict[str, torch.Tensor]] = {int(s): {} for s in steps.split(",") if s}
            for name in f.keys():
                step, _, key = name.partition("/")
                states.setdefault(int(step), {})[key] = f.get_tensor(name)
    except (OSError, ValueError, SafetensorError):  # missing, or not a whole safetensors file
        return None
    return states
