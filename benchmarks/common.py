"""What every measurement shares: a `debias fit` config's module and data, its training batches, and the timer."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.benchmark import Measurement, Timer

DEFAULT_CONFIG = "configs/tiny.yaml"
PATHS = ("fast path", "plain path")


@dataclass
class Bench:
    """A config's DataModule and (on first use) its prepared `DebiasModule`, and the timing settings.

    Args:
        config: a `debias fit` YAML config (configs/tiny.yaml runs anywhere in seconds; configs/smollm2.yaml is the
            default model, minutes to prepare on a CPU).
        overrides: extra `fit`-style arguments, e.g. ["--model.train.max_length=32"].
        n_batches: distinct training batches the timed steps cycle over.
        min_run_time: seconds each timed statement runs at least (`Timer.blocked_autorange`).
        threads: torch threads while timing (None: torch's current setting).
    """

    config: str = DEFAULT_CONFIG
    overrides: Sequence[str] = ()
    n_batches: int = 2
    min_run_time: float = 0.5
    threads: int | None = None
    _module: Any = field(default=None, init=False, repr=False)
    _data: Any = field(default=None, init=False, repr=False)

    def fresh(self):
        """A new, unprepared module and DataModule of the config, its features chosen (`DebiasModule` built from
        the config's arguments, the model and SAE loaded; no edit attached)."""
        from debias.commands.fit import configured, quiet_console

        module, data = configured(self.config, list(self.overrides))
        quiet_console()
        module.choose_features(data)
        return module, data

    @property
    def data(self):
        """The DataModule the prepared `module` was built from."""
        self.module  # noqa: B018  (prepares it)
        return self._data

    @property
    def module(self):
        """The config's module, prepared (SAE, features, mask, edit) on its DataModule, in train mode."""
        if self._module is None:
            self._module, self._data = self.fresh()
            self._module.prepare(self._data)
            self._module.train()
        return self._module

    def batches(self) -> list[dict[str, list[str]]]:
        """The first `n_batches` training batches (texts by set, as `training_step` receives them)."""
        loader = iter(self.data.train_dataloader())
        return [next(loader)[0] for _ in range(self.n_batches)]

    def cycle(self) -> Iterator[dict[str, list[str]]]:
        return itertools.cycle(self.batches())

    def time(self, fn: Callable[[], object], label: str, path: str) -> Measurement:
        """`fn()` timed by `Timer.blocked_autorange` for at least `min_run_time` seconds."""
        timer = Timer(stmt="fn()", globals={"fn": fn}, label=label, sub_label=self.config, description=path,
                      num_threads=self.threads or torch.get_num_threads())
        return timer.blocked_autorange(min_run_time=self.min_run_time)


def with_fast_path(module, on: bool):
    """Set `module.use_fast_path`; returns the path's name (`PATHS`)."""
    module.use_fast_path = on
    return PATHS[0] if on else PATHS[1]
