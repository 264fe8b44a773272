"""`debias fit` and `debias validate`: LightningCLI over `DebiasModule` and `DebiasDataModule`, with the held-out
metrics and the report/export callback always on. Other commands build a configured module through `configured`."""

from __future__ import annotations

from lightning.pytorch.cli import LightningCLI

from debias.callbacks import HeldOutMetrics, ReportAndExport
from debias.training.data import DebiasDataModule
from debias.training.module import DebiasModule


class DebiasCLI(LightningCLI):
    """LightningCLI with the held-out metrics and the report/export callback always on."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_lightning_class_args(HeldOutMetrics, "metrics")
        parser.add_lightning_class_args(ReportAndExport, "export")


def build_cli(args: list[str] | None, run: bool = True) -> DebiasCLI:
    """The CLI over `args` (`["fit", "--config", ...]` with `run`; without it, no subcommand: just the config)."""
    return DebiasCLI(
        DebiasModule, DebiasDataModule, args=args, run=run,
        trainer_defaults={"logger": {"class_path": "lightning.pytorch.loggers.CSVLogger",
                                     "init_args": {"save_dir": "runs"}}},
        save_config_kwargs={"overwrite": True},
    )


def fit(args: list[str]) -> None:
    build_cli(["fit", *args])


def validate(args: list[str]) -> None:
    build_cli(["validate", *args])


def configured(config: str, overrides: list[str] | None = None) -> tuple[DebiasModule, DebiasDataModule]:
    """The module and DataModule of a `debias fit` config with `overrides`, not yet prepared."""
    cli = build_cli(["--config", config, *(overrides or [])], run=False)
    return cli.model, cli.datamodule
