"""`DebiasData`: what `DebiasModule` reads from the DataModule it trains beside (`DebiasDataModule` is one).

Any `LightningDataModule` with these members works with `Trainer.fit(module, datamodule=...)`; the module checks
them in `setup` and names what is missing, so each must exist before `setup` (the containers empty). Texts are raw
strings (no chat template); the module tokenises them. `ValidationMetrics` needs nothing more; the held-out
evaluation (`debias.evaluation`, `ReportAndExport`) also reads `loaders("heldout")` and the held-out texts.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable


@runtime_checkable
class DebiasData(Protocol):
    """The data side of a debias run: train texts for the mask and the objective, the bias's groups and the
    validation sets' names. Only train sets build the edit; validation sets only choose checkpoints."""

    texts: dict[str, list[str]]
    """Sets by name, after `setup`: `bias_train` (where the feature fires), `neutral_train` (the KL's text),
    `gap_<group>_train` per group and `cue_train` (explicit-cue prompts)."""
    items: dict[str, list[Any]]
    """Sentence-level train items by objective term (`statement`, `factual`, `cda`); empty when the bias has none."""
    groups: tuple[str, ...]
    """The bias's groups, in the order of `gap_texts` (gender: female, male); set by `setup`."""

    @property
    def bias(self) -> str:
        """The bias spec: a shipped name (`gender`) or a YAML path; its groups' target words score the gap."""

    @property
    def prompt_dir(self) -> str | None:
        """A directory of gender prompt files that replaces the spec's prompts, or None."""

    @property
    def eval_batch_size(self) -> int:
        """Texts per batch in the mask pass and in evaluation."""

    def setup(self, stage: str) -> None:
        """Read the texts (idempotent: the module calls it before it reads anything)."""

    def require_items(self, terms: list[str]) -> None:
        """Make `items` hold what the objective `terms` (e.g. ["counterfactual"]) need, or raise naming them."""

    def mask_batches(self, statements: bool = False) -> list[list[str]]:
        """The train bias texts in `eval_batch_size` batches (the mask's input); with `statements`, then the train
        statements."""

    def gap_texts(self, split: str = "train") -> list[list[str]]:
        """The gap prompts of `split`, one list per group of `groups`."""

    def val_sets(self) -> tuple[str, ...]:
        """What each `val_dataloader` loader holds, in order: "bias" (feature metrics) or "neutral" (LM loss, KL)."""


def protocol_members() -> list[str]:
    """The names a `DebiasData` must have (attributes and methods), in declaration order."""
    declared = [name for name in vars(DebiasData) if not name.startswith("_")]
    return list(DebiasData.__annotations__) + [name for name in declared if name not in DebiasData.__annotations__]


def check_data(datamodule: object) -> DebiasData:
    """`datamodule` when it meets `DebiasData`; otherwise one line naming what it lacks."""
    if datamodule is None:
        raise TypeError("DebiasModule trains beside a DataModule: call Trainer.fit(module, datamodule=...) with a "
                        "DebiasDataModule or another DebiasData (debias.training.protocol)")
    if isinstance(datamodule, DebiasData):
        return datamodule
    missing = [name for name in protocol_members() if not hasattr(datamodule, name)]
    raise TypeError(f"{type(datamodule).__name__} is not a DebiasData (debias.training.protocol): it lacks "
                    f"{', '.join(missing)}")
