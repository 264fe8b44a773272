"""One grid cell, from its config to its curve: train it through `debias fit`'s own path (or attach it, for an
inference-time method), keep its snapshots, evaluate every (snapshot, α) point and the matched-KL points.

What a cell computes is on disk as soon as it exists, in `OUT/<cell>/`: `trained.json` (the fit's report) and
`snapshots.safetensors` once training ends, `points.json` after each point. A cell interrupted after training is
not trained again; a point already in `points.json` is not evaluated again.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from debias.commands.compare.frontier import FrontierSettings, Snapshots, load_snapshots, save_snapshots
from debias.commands.compare.grid import Cell, kind
from debias.commands.compare.matched import anchored, choose
from debias.commands.compare.points import (
    PointStore,
    evaluate_point,
    heldout_metrics,
    validation_metrics,
    validation_summary,
)
from debias.edits.scaling import scaled
from debias.io import atomic_write_json, read_json_object


@dataclass
class Shared:
    """What the cells of one grid share: the original model's held-out numbers (`before`; the suites are added
    once a matched point needs them), its validation numbers, and the activation cache (every method leaves the
    layers below the edit alone)."""

    before: dict | None = None
    validation: dict | None = None
    upstream: dict = field(default_factory=dict)


def fit_args(cell: Cell, config: str, base_args: list[str], out: Path) -> list[str]:
    """`debias fit` arguments of a cell. The config's own callbacks (a `ModelCheckpoint(monitor=val/score)`) are
    dropped: the grid chooses each cell's step and α on the validation split itself (`matched`)."""
    return ["--config", config, "--trainer.callbacks=[]", *base_args, *cell.overrides,
            f"--export.export_dir={out / cell.name / 'export'}", "--export.overwrite=true", "--evaluate.suites=false",
            f"--evaluate.completions={4 if cell.objective == 'default' else 0}", "--export.plots=false",
            "--trainer.logger=false", "--trainer.enable_progress_bar=false", "--trainer.enable_checkpointing=false",
            "--trainer.limit_val_batches=0", "--trainer.enable_model_summary=false",
            f"--trainer.default_root_dir={out / cell.name}"]  # the cell's resolved config.yaml goes there


def _callback(trainer, cls):
    return next(cb for cb in trainer.callbacks if isinstance(cb, cls))


def _train(cli, cell: Cell, out: Path, key: dict, shared: Shared) -> tuple[dict, dict]:
    """Fit the cell (its export and report come from `ReportAndExport`), keeping its snapshots; both are saved."""
    from debias.callbacks import ReportAndExport

    start = time.time()
    callback = _callback(cli.trainer, ReportAndExport)
    callback.before = shared.before  # None: computed by the callback (or read from debias.evaluation.base_cache)
    snapshots = Snapshots(key["steps"])
    cli.trainer.callbacks.append(snapshots)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    report = dict(callback.report, export=str(out / cell.name / "export"), train_phase_seconds=time.time() - start)
    save_snapshots(out / cell.name / "snapshots.safetensors", snapshots.states)
    atomic_write_json(out / cell.name / "trained.json", {"key": key, "report": report})
    return report, snapshots.states


def _attach(module, data, cell: Cell, out: Path, shared: Shared) -> dict:
    """Attach an inference-time method and write its `report.json` (no checkpoint: a forward hook)."""
    from debias.evaluation.base_cache import evaluate_original
    from debias.evaluation.evaluate import completions, evaluate_model
    from debias.export import build_report

    start = time.time()
    module.prepare(data)
    before = shared.before if shared.before is not None else evaluate_original(module, data)[0]
    report = {"before": before, "after": evaluate_model(module, data, edited=True),
              "completions": completions(module, data), "steps": 0,
              "intervention": module.delta.describe(),
              "checkpoint": "none: an inference-time intervention (a forward hook) cannot become a plain "
                            "checkpoint; evaluated in-process"}
    (out / cell.name).mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / cell.name / "report.json", build_report(module, report))
    return dict(report, export=None, train_phase_seconds=time.time() - start)


def run_cell(cell: Cell, config: str, base_args: list[str], out: Path, shared: Shared,
             settings: FrontierSettings | None = None) -> dict:
    """Train (or attach) one cell, evaluate its curve and matched points; returns the cell's record
    (`report`: the fit's report at the last step, α = 1; `points`; `matched`: level -> its point)."""
    from debias.callbacks import ValidationMetrics
    from debias.commands.fit import build_cli

    settings = settings or FrontierSettings()
    cli = build_cli(fit_args(cell, config, base_args, out), run=False)
    module, data = cli.model, cli.datamodule
    module.shared_upstream = shared.upstream
    inference = kind(cell.method) == "inference"
    steps = [0] if inference else settings.steps(int(cli.trainer.max_steps))
    key = {"overrides": cell.overrides, "base_args": base_args, "steps": steps}
    trained = None if inference else read_json_object(out / cell.name / "trained.json")
    states: dict | None = load_snapshots(out / cell.name / "snapshots.safetensors") if trained else None
    if inference:
        report, states = _attach(module, data, cell, out, shared), {0: None}
    elif trained is not None and states is not None and trained.get("key") == key:
        module.prepare(data)  # trained before an interruption: the snapshots hold the edit
        report = trained["report"]
    else:
        report, states = _train(cli, cell, out, key, shared)
    if shared.before is None:
        shared.before = report["before"]
    validation = _callback(cli.trainer, ValidationMetrics)
    if shared.validation is None:  # the original model: every curve's α = 0 anchor
        original = validation_metrics(module, data, validation, edited=False)
        shared.validation = dict(original, score=validation.score(original, original))
    store = PointStore(out / cell.name / "points.json", key)
    points = frontier(module, data, validation, states, store, settings, shared)
    if cell.objective != "default":  # the objective ablation reports the held-out metrics only, as before
        settings = replace(settings, suite_levels=())
    matched = match(module, data, states, store, settings, shared, points)
    report.update(changed_parameters=module.delta.changed_parameters(), features=module.features, k=module.k)
    report["seconds"] = report["train_phase_seconds"] + sum(p["seconds"] for p in points) + sum(
        m.get("seconds", 0.0) for m in matched.values())
    return {"report": report, "points": points, "matched": matched}


def frontier(module, data, validation, states: dict, store: PointStore, settings: FrontierSettings,
             shared: Shared) -> list[dict]:
    """Every (snapshot, α) point of the cell, evaluating those `store` does not hold yet (each saved at once)."""
    for step in sorted(states):
        todo = [a for a in settings.alphas if store.get(step, a) is None]
        if todo and states[step] is not None:
            module.delta.load_trainable_state(states[step])
        for alpha in todo:
            store.add(step, evaluate_point(module, data, validation, shared.validation or {}, alpha))
    return [p for step in sorted(states) for a in settings.alphas if (p := store.get(step, a)) is not None]


def match(module, data, states: dict, store: PointStore, settings: FrontierSettings, shared: Shared,
          points: list[dict]) -> dict[str, dict]:
    """For each KL level: the (step, α) chosen on the validation curves (`matched.choose`) and the held-out numbers
    there, with the suites at `settings.suite_levels`; {"reached": False} where no curve reaches the level."""
    original = shared.validation or {}
    anchor = validation_summary(original, original)
    curves = {step: anchored([dict(p, **validation_summary(p["validation"], original)) for p in points
                              if p["step"] == step], anchor) for step in states}
    matched = {}
    for level in settings.kl_levels:
        choice, suites = choose(curves, level), level in settings.suite_levels
        entry = {"level": level, "reached": False}
        if choice is not None:
            saved = store.get_matched(level)
            entry = saved if saved is not None and (saved.get("step"), saved.get("alpha"), saved.get("suites")) == (
                choice.step, choice.alpha, suites) else _evaluate_choice(module, data, states, shared, choice, suites)
        store.set_matched(level, entry)
        matched[repr(float(level))] = entry
    return matched


def _evaluate_choice(module, data, states: dict, shared: Shared, choice, suites: bool) -> dict:
    from debias.evaluation.base_cache import evaluate_original

    start = time.perf_counter()
    if suites and shared.before is not None and "stereoset" not in shared.before:
        shared.before = dict(shared.before, **evaluate_original(module, data, suites=True)[0])
    if states[choice.step] is not None:
        module.delta.load_trainable_state(states[choice.step])
    with scaled(module.delta, choice.alpha):
        heldout = heldout_metrics(module, data, suites=suites)
    return {"level": choice.level, "reached": True, "step": choice.step, "alpha": choice.alpha, "suites": suites,
            "validation": choice.validation, "heldout": heldout, "seconds": time.perf_counter() - start}
