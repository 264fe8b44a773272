"""`debias fit` and `debias validate`: LightningCLI over `DebiasModule` and `DebiasDataModule`, with the validation
metrics and the report/export callback always on. Other commands build a configured module through `configured`.

A bad key or value raises `ConfigError` (jsonargparse's message) instead of printing the usage and exiting:
`debias.commands.main` shows it as one line.
"""

from __future__ import annotations

import ast
import dataclasses
import logging
import re
import sys
import warnings
from argparse import ArgumentError
from pathlib import Path

from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities import rank_zero_only

from debias.callbacks import ReportAndExport, ValidationMetrics
from debias.config import moved
from debias.evaluation.settings import EvaluationArgs
from debias.io import load_weights_only
from debias.training.args import EditArgs, SAEArgs, TrainArgs
from debias.training.data import DebiasDataModule
from debias.training.module import DebiasModule
from debias.training.objective import ObjectiveWeights

RESUME_NOTE = ("a run resumed from a mid-epoch checkpoint does not repeat an uninterrupted run exactly: the "
               "dataloader's position is not saved, so the resumed epoch does not continue where the interrupted one "
               "stopped (a checkpoint at an epoch boundary resumes exactly)")
FIT_DESCRIPTION = ("Train the edit of a config, evaluate it before and after, and export it. --ckpt_path resumes a "
                   "run; its model arguments must equal this run's. Note: " + RESUME_NOTE + ".")
_ABSENT = "<absent>"


class ConfigError(ArgumentError, ValueError):
    """A bad key or value in a config file or on the command line, with jsonargparse's message."""


def _plain(value):
    """Tuples as lists, recursively, so a config value compares equal to its saved copy."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def hparam_differences(saved, current, prefix: str = "model") -> list[tuple[str, object, object]]:
    """(dotted key, checkpoint value, this run's value) for each leaf that differs; `_`-keys are Lightning's."""
    if isinstance(saved, dict) and isinstance(current, dict):
        keys = [*saved, *(k for k in current if k not in saved)]
        return [diff for k in keys if not str(k).startswith("_")
                for diff in hparam_differences(saved.get(k, _ABSENT), current.get(k, _ABSENT), f"{prefix}.{k}")]
    return [] if _plain(saved) == _plain(current) else [(prefix, saved, current)]


#: The model's argument groups: a checkpoint written before one of their fields existed lacks it.
_GROUPS = {"sae": SAEArgs, "edit": EditArgs, "objective": ObjectiveWeights, "train": TrainArgs}


def _default(field: dataclasses.Field):
    value = field.default
    if value is dataclasses.MISSING and callable(field.default_factory):
        value = field.default_factory()
    return dataclasses.asdict(value) if dataclasses.is_dataclass(value) and not isinstance(value, type) else value


def with_predated_defaults(saved: dict, current: dict) -> dict:
    """`saved` with each group field it lacks where `current` holds that field's default: a checkpoint written
    before the field existed ran as its default (and `load_from_checkpoint` gives it the default too)."""
    filled = dict(saved)
    for name, cls in _GROUPS.items():
        ours, theirs = current.get(name), saved.get(name)
        if isinstance(ours, dict) and isinstance(theirs, dict):
            predated = {f.name: _default(f) for f in dataclasses.fields(cls) if f.name not in theirs}
            filled[name] = {**{k: v for k, v in predated.items() if k in ours and _plain(ours[k]) == _plain(v)},
                            **theirs}
    return filled


def refuse_other_hparams(saved: dict, current: dict, source: str, advice: str) -> None:
    """Refuse a checkpoint's model arguments `saved` that differ from `current` (a run's `model` config) in any key,
    naming each key with both values: `{source} was trained with ...; this run has ... ({advice})`."""
    if "_class_path" in saved:  # written by LightningCLI's subclass mode: the arguments are the rest
        saved = {k: v for k, v in saved.items() if k != "_class_path"}
    differences = hparam_differences(with_predated_defaults(saved, current), current)
    if differences:
        trained = " and ".join(f"{key}={old!r}" if old is not _ABSENT else f"no {key}" for key, old, _ in differences)
        now = " and ".join(repr(new) if new is not _ABSENT else "none" for _, _, new in differences)
        raise ValueError(f"{source} was trained with {trained}; this run has {now} ({advice})")


def check_checkpoint_hparams(ckpt_path: str, current: dict) -> None:
    """Refuse a checkpoint trained with other model arguments than `current` (this run's `model` config)."""
    checkpoint = load_weights_only(ckpt_path, "--ckpt_path checkpoint")
    saved = (checkpoint.get("hyper_parameters") if isinstance(checkpoint, dict) else None) or {}
    refuse_other_hparams(saved, current, f"--ckpt_path {ckpt_path}",
                         "resume with the checkpoint's values, or drop --ckpt_path to start a new run")


class DebiasCLI(LightningCLI):
    """LightningCLI with the validation metrics and the report/export callback always on; a `--ckpt_path` must match
    the config's model arguments (LightningCLI would merge the checkpoint's over them, silently)."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_lightning_class_args(ValidationMetrics, "metrics")
        # What is evaluated before and after is its own group, `evaluate:` (`EvaluationArgs`), which `ReportAndExport`
        # runs: its `suites` and `completions` are no keys of `export` (as `add_lightning_class_args` would make them)
        # and are handed over in `instantiate_trainer`.
        parser.callback_keys.append("export")
        parser.add_class_arguments(ReportAndExport, "export", fail_untyped=False, sub_configs=True,
                                   skip={"suites", "completions"})
        parser.add_class_arguments(EvaluationArgs, "evaluate")

    def before_instantiate_classes(self) -> None:
        """Checks across `model` and `data` that need no model: `objective.identity` needs train factual statements."""
        from debias.training.identity_term import check_identity_data

        subcommand = self.config.get("subcommand")
        config = self.config[subcommand] if subcommand else self.config
        objective, data = config.get("model.objective"), config.get("data")
        if objective is not None and data is not None:
            check_identity_data(getattr(objective, "identity", 0.0), data.get("bias", "gender"), data.get("prompt_dir"))

    def instantiate_trainer(self, **kwargs):
        self._get(self.config_init, "export").evaluate_with(self._get(self.config_init, "evaluate"))
        return super().instantiate_trainer(**kwargs)

    def parse_arguments(self, parser, args) -> None:
        """LightningCLI's, without its warning about `args` given beside `sys.argv` (`debias` passes them on)."""
        self.config = parser.parse_args(args)

    def _parse_ckpt_path(self) -> None:
        subcommand = self.config.get("subcommand")
        if not subcommand:
            return
        ckpt_path = self.config[subcommand].get("ckpt_path")
        if not ckpt_path or not Path(ckpt_path).is_file():  # "last", "best", ...: Lightning resolves those
            return
        check_checkpoint_hparams(ckpt_path, self.config[subcommand].model.clone().as_dict())
        if subcommand == "fit":
            _note(f"resuming from {ckpt_path}; {RESUME_NOTE}")


@rank_zero_only
def _note(message: str) -> None:
    print(f"debias: note: {message}", file=sys.stderr, flush=True)


def build_cli(args: list[str] | None, run: bool = True) -> DebiasCLI:
    """The CLI over `args` (`["fit", "--config", ...]` with `run`; without it, no subcommand: just the config).

    A bad key or value raises `ConfigError`, not `SystemExit` after the usage.
    """
    quiet_console()
    try:
        return DebiasCLI(
            DebiasModule, DebiasDataModule, args=args, run=run,
            trainer_defaults={"logger": {"class_path": "lightning.pytorch.loggers.CSVLogger",
                                         "init_args": {"save_dir": "runs"}}},
            save_config_kwargs={"overwrite": True},
            parser_kwargs={"exit_on_error": False, "fit": {"description": FIT_DESCRIPTION}},
        )
    except ArgumentError as err:
        if isinstance(err, ConfigError):
            raise
        raise ConfigError(None, moved_key(str(err)) or str(err)) from err


def moved_key(message: str) -> str | None:
    """`debias.config.moved`'s one line when jsonargparse's `message` refuses a key that was renamed or moved (issue
    #24), with the value given where the message shows it; None for any other message."""
    unknown = re.search(r"Group '([\w.]+)' does not accept option '(\w+)'", message)
    if unknown:
        return moved(f"{unknown[1]}.{unknown[2]}")
    unknown = re.search(r"Subcommand '\w+' does not accept option '([\w.]+)'", message)  # under `fit`
    if unknown:
        return moved(unknown[1])
    flag = re.search(r"unrecognized arguments: --([\w.]+)(?:[= ](\S+))?", message)
    if flag:
        return moved(flag[1], flag[2])
    where, key = "", None
    for line in message.splitlines():
        line = line.strip()
        nested = re.fullmatch(r'Parser key "([^"]+)":.*', line)
        if nested and key is None:  # nested keys are relative to the enclosing one ("model.sae", then "build")
            where = nested[1] if not where or nested[1].startswith(where + ".") else f"{where}.{nested[1]}"
        option = re.fullmatch(r"Option '(\w+)' is not accepted", line)
        if option and key is None:
            key = option[1]
        given = re.fullmatch(r"Given value: (.*)", line)
        if given and key is not None:
            return moved(f"{where}.{key}", _given(given[1], key))
    return moved(f"{where}.{key}") if key is not None else None


def _given(text: str, key: str) -> object:
    """The value of `key` in jsonargparse's `Given value: ...` (a dict, or a `NestedArg` of a flag); None if unread."""
    nested = re.fullmatch(r"NestedArg\(key='(\w+)', val='(.*)'\)", text)
    if nested:
        return nested[2] if nested[1] == key else None
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return None
    return value.get(key) if isinstance(value, dict) else None


#: Lightning's console lines that say nothing about the run: its advertising tips ("💡 Tip: ... litlogger") and the
#: accelerators it did not find ("GPU available: False, used: False").
CONSOLE_NOISE = re.compile(r"💡 Tip|(GPU|TPU|HPU) available: False")
#: Loggers whose console handlers drop `CONSOLE_NOISE` (Lightning's own, and the root logger it propagates to when
#: the root has handlers).
NOISY_LOGGERS = ("lightning", "lightning.pytorch", "lightning.fabric", "")


class ConsoleNoise(logging.Filter):
    """Drops `CONSOLE_NOISE` lines at a console handler; the records still reach the logger's other handlers."""

    def filter(self, record: logging.LogRecord) -> bool:
        return CONSOLE_NOISE.match(record.getMessage()) is None


#: Dependency warnings that say nothing about the user's run (deprecations inside transformers and Lightning, and
#: Lightning's note that frozen modules are in eval mode, which `DebiasModule.train` does on purpose).
QUIET_WARNINGS = (r".*is_gradient_checkpointing.*", r".*LeafSpec.*", r"Found \d+ module\(s\) in eval mode.*")
#: Packages whose deprecation notices (DeprecationWarning, FutureWarning raised in their code) are theirs to act on.
DEPENDENCIES = ("transformers", "lightning", "lightning_fabric", "pytorch_lightning", "torch", "torchmetrics",
                "sae_lens", "transformer_lens", "peft", "jsonargparse", "huggingface_hub", "datasets", "accelerate")


def quiet_console() -> None:
    """Keep the console to what the run says: drop Lightning's noise lines and the dependency warnings above."""
    for pattern in QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    packages = "|".join(re.escape(name) for name in DEPENDENCIES)
    for category in (DeprecationWarning, FutureWarning):
        warnings.filterwarnings("ignore", category=category, module=rf"({packages})(\.|$)")
    for name in NOISY_LOGGERS:
        for handler in logging.getLogger(name).handlers:
            # plain StreamHandlers write to the console; a FileHandler (a subclass) is a log and keeps every line
            if type(handler) is logging.StreamHandler and not any(isinstance(f, ConsoleNoise)
                                                                  for f in handler.filters):
                handler.addFilter(ConsoleNoise())


def fit(args: list[str]) -> None:
    build_cli(["fit", *args])


def validate(args: list[str]) -> None:
    build_cli(["validate", *args])


def configured(config: str, overrides: list[str] | None = None) -> tuple[DebiasModule, DebiasDataModule]:
    """The module and DataModule of a `debias fit` config with `overrides`, not yet prepared."""
    cli = build_cli(["--config", config, *(overrides or [])], run=False)
    return cli.model, cli.datamodule
