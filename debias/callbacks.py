"""Callbacks: validation-split metrics and the checkpoint score at validation, and the held-out before/after report
with the export at the end of `fit`."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, Trainer

from debias.dashboards.contexts import DEFAULT_TOKENS
from debias.evaluation.heldout import HeldOutAggregate, behaviour_metrics, format_table, outcome
from debias.evaluation.settings import EvaluationArgs


def datamodule_of(trainer: Trainer) -> Any:
    """The DataModule `Trainer.fit(datamodule=...)` attached (an attribute Lightning sets at run time)."""
    return trainer.datamodule  # type: ignore[attr-defined]


class ValidationMetrics(Callback):
    """Logs the validation split's metrics at each validation, and `val/score`, the number that
    `ModelCheckpoint(monitor="val/score", mode="min")` chooses the exported step by.

    Logged (progress bar and loggers): `val/feature_act`, `val/feature_fire_rate`, `val/lm_loss`, `val/kl`,
    `val/bias_gap`, `val/cue_margin`, and with a spec's statements `val/statement_gap` and `val/factual_margin`:
    the spec's validation prompts, and the data's validation neutral text. Held-out prompts are never read here.

    `val/score` (lower is better) = the mean remaining share of the gaps (|gap| / |gap of the original|, over
    the profession and the statement gap) + `penalty` × (max(0, kl / kl_budget − 1) + max(0, cue_floor − cue
    kept) + max(0, factual_floor − factual kept)), each margin kept being after / before on the validation split.
    """

    def __init__(self, kl_budget: float = 0.01, cue_floor: float = 0.75, factual_floor: float = 0.9,
                 penalty: float = 10.0, cue_limit: int = 128):
        """
        Args:
            kl_budget: neutral-text KL the edit may spend before the score charges for it.
            cue_floor: share of the explicit-cue margin the edit must keep.
            factual_floor: share of the factual statements' margin the edit must keep.
            penalty: weight of a missed budget or floor against the gaps.
            cue_limit: validation cue prompts scored (a seeded, balanced subset).
        """
        problems = [f"metrics.{name} must be a finite number > 0, got {value}" for name, value in
                    (("kl_budget", kl_budget), ("penalty", penalty)) if not (0 < value < float("inf"))]
        problems += [f"metrics.{name} must be in [0, 1], got {value}" for name, value in
                     (("cue_floor", cue_floor), ("factual_floor", factual_floor)) if not 0 <= value <= 1]
        if cue_limit < 1:
            problems.append(f"metrics.cue_limit must be >= 1, got {cue_limit}")
        if problems:
            raise ValueError("; ".join(problems))
        self.kl_budget, self.cue_floor, self.factual_floor = kl_budget, cue_floor, factual_floor
        self.penalty, self.cue_limit = penalty, cue_limit
        self.original: dict | None = None

    def behaviour(self, trainer: Trainer, pl_module: Any, edited: bool) -> dict:
        with pl_module.fast_path():
            metrics = behaviour_metrics(pl_module, datamodule_of(trainer), edited, self.cue_limit, "validation",
                                        n_boot=1)
        return {k: v for k, v in metrics.items() if isinstance(v, float)}

    def on_fit_start(self, trainer: Trainer, pl_module: Any) -> None:
        if datamodule_of(trainer).prompt_dir is not None:
            monitored = [c for c in trainer.checkpoint_callbacks if getattr(c, "monitor", None) == "val/score"]
            if monitored:
                raise ValueError("a ModelCheckpoint monitors val/score, which needs the bias spec's validation split; "
                                 "data.prompt_dir has none: monitor val/kl, or drop the checkpoint's monitor")
        else:
            from debias.evaluation.base_cache import original_validation
            from debias.training.console import say

            self.original, cached = original_validation(pl_module, datamodule_of(trainer), self.cue_limit,
                                                        lambda: self.behaviour(trainer, pl_module, edited=False))
            say(f"scored the original model on the validation split{' (cached)' if cached else ''} "
                "(val/score compares against it)")
            for logger in trainer.loggers:
                logger.log_metrics({f"val_original/{k}": v for k, v in self.original.items()}, step=0)

    def on_validation_epoch_start(self, trainer: Trainer, pl_module: Any) -> None:
        self.agg = HeldOutAggregate(len(pl_module.features), pl_module.device)

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self.agg.update(datamodule_of(trainer).val_sets()[dataloader_idx], outputs)

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: Any) -> None:
        if trainer.sanity_checking:
            return
        metrics = self.agg.compute()
        if self.original is not None:
            metrics.update(self.behaviour(trainer, pl_module, edited=True))
            metrics["score"] = self.score(self.original, metrics)
        shown = ("kl", "bias_gap", "statement_gap", "score")
        for name, value in metrics.items():
            pl_module.log(f"val/{name}", value, prog_bar=name in shown, add_dataloader_idx=False)

    def score(self, original: dict, current: dict) -> float:
        """`val/score` of `current` validation metrics against the original model's."""
        summary = outcome(original, current)
        remaining = [1 - summary[k] for k in ("bias_gap_reduction", "statement_gap_reduction") if k in summary]
        missed = max(0.0, current["kl"] / self.kl_budget - 1)
        for key, floor in (("cue_kept", self.cue_floor), ("factual_kept", self.factual_floor)):
            if key in summary:
                missed += max(0.0, floor - summary[key])
        return sum(remaining) / max(len(remaining), 1) + self.penalty * missed


def run_dirs(trainer: Trainer) -> dict[str, Path]:
    """The directories the run itself writes: the trainer's root, each logger's and checkpoint callback's."""
    dirs = {"trainer.default_root_dir": Path(trainer.default_root_dir)}
    for logger in trainer.loggers:
        path = getattr(logger, "log_dir", None) or logger.save_dir
        if path:
            dirs[f"the log directory of {type(logger).__name__}"] = Path(path)
    for checkpoint in trainer.checkpoint_callbacks:
        dirpath = getattr(checkpoint, "dirpath", None)  # None until its own setup: then inside one of the above
        if dirpath:
            dirs[f"the checkpoint directory of {type(checkpoint).__name__}"] = Path(dirpath)
    return dirs


def check_run_dirs(trainer: Trainer, export_dir: Path) -> None:
    """Refuse an export directory that is, or contains, a directory the run writes (it would be replaced)."""
    target = export_dir.expanduser().resolve()
    for name, path in run_dirs(trainer).items():
        resolved = path.expanduser().resolve()
        if resolved == target or target in resolved.parents:
            raise ValueError(f"export.export_dir {str(export_dir)!r} is or contains {name}, {str(path)!r}: the export "
                             "would replace the run's own checkpoints and logs; choose an export_dir outside it")


def format_duration(seconds: float) -> str:
    """`12.3 s`, `3 min 2 s`, `1 h 5 min`."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {secs} s"
    return f"{minutes // 60} h {minutes % 60} min"


#: How `format_timings` names the phases of `ReportAndExport.timings`.
PHASES = {"prepare": "prepare", "before_eval": "before", "train": "train", "after_eval": "after",
          "completions": "completions", "export": "export", "plots": "plots", "total": "total"}


def format_timings(timings: dict[str, float], before_source: str = "computed") -> str:
    """`prepare 2.0 s, before 12.3 s (cached), train 48.1 s, ..., total 3 min 2 s`."""
    parts = []
    for key, name in PHASES.items():
        if key in timings:
            note = f" ({before_source})" if key == "before_eval" and before_source != "computed" else ""
            parts.append(f"{name} {format_duration(timings[key])}{note}")
    return ", ".join(parts)


def record_timings(report_path: Path, timings: dict[str, float]) -> None:
    """Put the final `timings` (export and plots included) into an export's `report.json`, atomically."""
    from debias.io import atomic_write

    report = json.loads(report_path.read_text())
    report["timings"] = timings
    atomic_write(report_path, json.dumps(report, indent=2, default=str))


class ReportAndExport(Callback):
    """Evaluates the original model before `fit`, the edited one after, prints both and exports the edit.

    With a `ModelCheckpoint(monitor=...)` in the trainer, the exported delta is the best checkpoint's, not the
    last step's. Only rank 0 writes. The original model's numbers come from `debias.evaluation.base_cache` when it
    holds them. Each phase's wall time goes into the report as `timings` (seconds: prepare = the module's setup,
    SAE, features and mask; before_eval, train, after_eval, completions, export, plots, total) and into one
    `debias: timings: ...` line at the end; `train_seconds` is the training alone.
    """

    def __init__(self, export_dir: str | None = "runs/export", overwrite: bool = False, suites: bool = False,
                 completions: int = 4, plots: bool = True, dashboards: bool | None = None,
                 dashboard_tokens: int = DEFAULT_TOKENS):
        """
        Args:
            export_dir: where the export goes (None: no export).
            overwrite: replace a non-empty export directory.
            suites, completions: `EvaluationArgs` (YAML: `evaluate.suites`, `evaluate.completions`).
            plots: write `report.png` beside the export.
            dashboards: with `plots`, also `dashboards.html` (`debias.dashboards`): the chosen latents' and the ten
                most moved latents' dashboards; None: unless the run uses no SAE (`bias_gradient` or `dense` with
                no feature or ablation term).
            dashboard_tokens: corpus tokens the dashboards read (top contexts, histograms).
        """
        self.export_dir = export_dir
        self.overwrite = overwrite
        self.suites, self.n_completions, self.plots = suites, completions, plots
        if dashboard_tokens < 128:
            raise ValueError(f"export.dashboard_tokens must be >= 128 (one corpus window), got {dashboard_tokens}")
        self.dashboards, self.dashboard_tokens = dashboards, dashboard_tokens
        self.before: dict | None = None  # set in advance to skip the evaluation of the original model

    def evaluate_with(self, evaluation: EvaluationArgs) -> None:
        """Take the suites and completions switches from `evaluation` (the CLI's `evaluate:` group)."""
        self.suites, self.n_completions = evaluation.suites, evaluation.completions

    def setup(self, trainer: Trainer, pl_module: Any, stage: str) -> None:
        """Before `fit` trains (and before the module computes its mask), refuse an export directory that would
        fail at the end or delete the run's own files; `validate` and the other commands write no export."""
        if stage != "fit":
            return
        self.timings: dict[str, float] = {}
        self.clock = time.perf_counter()  # the module's own setup (SAE, features, mask) runs after this hook
        from debias.edits.registry import get as method_of

        method = getattr(getattr(pl_module, "edit_args", None), "method", None)  # tests call hooks with no module
        weights: Any = getattr(pl_module, "objective", None)
        no_sae = (method is not None and method_of(method).mask_from in ("bias", "all")
                  and not (weights.feature or weights.ablation))  # neither the mask nor the loss reads the SAE
        if self.dashboards and no_sae:
            raise ValueError(f"export.dashboards is true, but this run uses no SAE (method {method!r}, no feature or "
                             "ablation term): no latents to show; set export.dashboards false")
        self.dashboards = self.plots and (self.dashboards if self.dashboards is not None else not no_sae)
        if self.suites:
            from debias.evaluation.evaluate import suite_domain
            from debias.evaluation.suites import shipped_domains

            domain, shipped = suite_domain(datamodule_of(trainer)), shipped_domains("stereoset")
            if domain not in shipped:
                raise ValueError(f"evaluate.suites is true, but the suites ship no {domain!r} subset (shipped: "
                                 f"{list(shipped)}); set evaluate.suites false for this bias")
        if not self.export_dir:
            return
        from debias.export import check_target

        check_run_dirs(trainer, Path(self.export_dir))
        check_target(Path(self.export_dir), self.overwrite)

    def on_fit_start(self, trainer: Trainer, pl_module: Any) -> None:
        from debias.evaluation.base_cache import evaluate_original

        if not hasattr(self, "clock"):  # `setup` did not run for `fit` (hooks called by hand)
            self.timings, self.clock = {}, time.perf_counter()
        self._lap("prepare")
        self.before_source = "shared"
        if self.before is None:
            self.before, cached = evaluate_original(pl_module, datamodule_of(trainer), suites=self.suites,
                                                    progress="before")
            self.before_source = "cached" if cached else "computed"
        self._lap("before_eval")

    def _lap(self, phase: str) -> float:
        """Seconds since the last lap (or `setup`), recorded as `timings[phase]`."""
        now = time.perf_counter()
        self.timings[phase], self.clock = now - self.clock, now
        return self.timings[phase]

    def on_fit_end(self, trainer: Trainer, pl_module: Any) -> None:
        train_seconds = self._lap("train")
        checkpoint = trainer.checkpoint_callback
        best = getattr(checkpoint, "best_model_path", "") if getattr(checkpoint, "monitor", None) else ""
        if best:
            checkpoint = torch.load(best, map_location=pl_module.device, weights_only=True)
            pl_module.load_edit_state(checkpoint, source=best)
            pl_module.load_state_dict(checkpoint["state_dict"], strict=False)
        from debias.evaluation.evaluate import completions, evaluate_model

        self.after = evaluate_model(pl_module, datamodule_of(trainer), edited=True, suites=self.suites,
                                    progress="after")
        self._lap("after_eval")
        rows = completions(pl_module, datamodule_of(trainer), self.n_completions) if self.n_completions else []
        self._lap("completions")
        before: dict = self.before or {}
        from debias.bias_spec import load_bias_spec

        self.report: dict[str, Any] = {"before": before, "after": self.after, "train_seconds": train_seconds,
                       "bias": load_bias_spec(datamodule_of(trainer).bias).name,  # the axis: the model card's tag
                       "checkpoint": best or "last step", "steps": trainer.global_step, "completions": rows,
                       "before_source": self.before_source, "timings": self.timings}
        if trainer.is_global_zero:
            print(format_table(before, self.after))
            for row in rows:
                print(f"{row['prompt']!r}\n  before: {row['before']!r}\n  after:  {row['after']!r}")
            if self.export_dir:
                from debias.export import export

                path = self.exported = export(pl_module, self.export_dir, self.report, overwrite=self.overwrite)
                print(f"exported to {path}")
                self._lap("export")
                if self.plots:
                    print(f"plots in {self.write_plots(trainer, pl_module, path.parent / 'report.png')}")
                    if self.dashboards:
                        from debias.dashboards import write_for_module

                        texts = list(datamodule_of(trainer).texts["bias_heldout"])
                        print(f"dashboards in {write_for_module(pl_module, texts, path.parent, self.dashboard_tokens)}")
                    self._lap("plots")
        self.timings["total"] = sum(self.timings.values())
        if trainer.is_global_zero:
            if self.export_dir:
                record_timings(self.exported / "debias" / "report.json", self.timings)
            print(f"debias: timings: {format_timings(self.timings, self.before_source)}", flush=True)

    def write_plots(self, trainer: Trainer, pl_module: Any, out: Path) -> Path:
        from debias.plots import heldout_feature_acts, read_metrics_csv, report_figure

        csv_path = None
        if trainer.logger is not None and getattr(trainer.logger, "log_dir", None):
            trainer.logger.save()
            csv_path = Path(str(trainer.logger.log_dir)) / "metrics.csv"
        before, after = heldout_feature_acts(pl_module, datamodule_of(trainer))
        b_dom, a_dom = (r.get("statement_gap_by_domain") or {} for r in (self.report["before"], self.after))
        domains = (b_dom, a_dom, list(self.after.get("unseen_domains", []))) if b_dom and a_dom else None
        return report_figure(out, read_metrics_csv(csv_path), before, after,
                             self.report["before"]["gap_per_profession"], self.after["gap_per_profession"],
                             title=f"{pl_module.model_id}: {pl_module.parameter}, k={pl_module.k}, "
                                   f"features {pl_module.features}", domains=domains)


