"""`debias compare CONFIG`: plan the grid, compute its masks once, run each cell through `debias fit`'s own path
and write the results after every cell (an interrupted grid resumes).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

from tqdm.auto import tqdm

from debias.commands.compare.grid import (
    GRID_METHODS,
    Cell,
    cell_overrides,
    check_request,
    entry_counts,
    grid_masks,
    kind,
    mask_name,
    plan,
)
from debias.edits.lora import check_lora_rank
from debias.io import atomic_write_json


def _callback(trainer):
    from debias.callbacks import ReportAndExport

    return next(cb for cb in trainer.callbacks if isinstance(cb, ReportAndExport))


def _has_suites(before: dict | None) -> bool:
    return before is not None and "crows_pairs" in before


def run_cell(cell: Cell, config: str, base_args: list[str], out: Path, before: dict | None,
             upstream: dict | None = None) -> dict:
    """Train (weight methods) or attach (inference methods) one cell and evaluate it; returns its report.

    `upstream` is the activation cache the cells share: every method leaves the layers below the edit alone.
    CrowS-Pairs and StereoSet are scored for the default objective's cells (the objective ablation reports the
    held-out metrics only).
    """
    from debias.commands.fit import build_cli
    from debias.evaluation.base_cache import evaluate_original
    from debias.evaluation.evaluate import completions, evaluate_model

    start = time.time()
    export_dir = out / cell.name / "export"
    args = ["--config", config, *base_args, *cell.overrides, f"--export.export_dir={export_dir}",
            "--export.overwrite=true", f"--export.suites={str(cell.objective == 'default').lower()}",
            f"--export.completions={4 if cell.objective == 'default' else 0}", "--export.plots=false",
            "--trainer.logger=false", "--trainer.enable_progress_bar=false", "--trainer.enable_checkpointing=false",
            "--trainer.limit_val_batches=0", "--trainer.enable_model_summary=false",
            f"--trainer.default_root_dir={out / cell.name}"]  # the cell's resolved config.yaml goes there
    cli = build_cli(args, run=False)
    module, data = cli.model, cli.datamodule
    module.shared_upstream = upstream
    if kind(cell.method) == "inference":
        module.prepare(data)
        before = before if _has_suites(before) else evaluate_original(module, data, suites=True)[0]
        report = {"before": before, "after": evaluate_model(module, data, edited=True, suites=True),
                  "completions": completions(module, data), "steps": 0,
                  "intervention": module.delta.intervention.describe(),
                  "checkpoint": "none: an inference-time intervention (a forward hook) cannot become a plain "
                                "checkpoint; evaluated in-process"}
        from debias.export import build_report

        (out / cell.name).mkdir(parents=True, exist_ok=True)
        atomic_write_json(out / cell.name / "report.json", build_report(module, report))
        report["export"] = None
    else:
        callback = _callback(cli.trainer)
        callback.before = before if _has_suites(before) or not callback.suites else None  # else: the cache's
        cli.trainer.fit(module, datamodule=data)
        report = dict(callback.report, export=str(export_dir))
    report.update(changed_parameters=module.delta.changed_parameters(), features=module.features,
                  seconds=time.time() - start, k=module.k)
    return report


def _prepare_grid(config: str, base_args: list[str], out: Path, methods, k, seeds, lora_ranks, objectives):
    """Features (the config's, or the rule's choice, kept across resumes), cells and their masks."""
    from debias.commands.fit import build_cli
    from debias.edits.mask import resolve_k

    cli = build_cli(["--config", config, *base_args], run=False)
    module, data = cli.model, cli.datamodule
    shape = tuple(module.net.get_parameter(module.parameter).shape)
    numel, edit = math.prod(shape), module.edit_args
    if "lora" in methods:
        for rank in lora_ranks:
            check_lora_rank(rank, shape)
    default_k = resolve_k(numel, None if edit.k is not None else edit.fraction, edit.k)
    counts = entry_counts(k or [1e-4, 1e-3, 1e-2], numel)
    state_path = out / "grid.json"
    state = json.loads(state_path.read_text()) if state_path.is_file() else {}
    if state.get("config") == config and state.get("base_args") == base_args and state.get("features"):
        module.features = state["features"]
    features = module.choose_features(data)
    cells = plan(methods, counts, default_k, seeds, lora_ranks, objectives)
    finished = {c.name for c in cells if (out / "cells" / f"{c.name}.json").is_file()}
    masks = grid_masks(module, data, [c for c in cells if c.name not in finished], out)
    for cell in cells:
        mask = masks.get(mask_name(cell), out / "masks" / f"{mask_name(cell)}.safetensors")  # finished: on disk
        cell.overrides = cell_overrides(cell, features, mask if kind(cell.method) == "mask" else None)
    selection = module.feature_selection
    del module, cli
    return cells, features, selection


def compare_command(fit_config: str, methods: list[str] | None = None,
                    k: list[float] | None = None, seeds: Sequence[int] = (0, 1, 2), lora_ranks: Sequence[int] = (1, 8),
                    objectives: bool = True, out: str = "runs/compare", steps: int | None = None,
                    overrides: list[str] | None = None) -> Path:
    """Run the comparison grid: methods × k on one config, each cell evaluated the same way; resumable.

    Args:
        fit_config: a `debias fit` YAML config (model, SAE, features, objective, steps, data).
        methods: some of instability, instability_gxw (|grad × weight| mask), random, bias_gradient, dense, lora,
            sae_clamp, steering_vector (default: all).
        k: mask sizes for the masked methods, as fractions of W_out (< 1) or entry counts (default: 0.01%, 0.1%, 1%).
        seeds: seeds of the random mask (reported as mean and spread).
        lora_ranks: ranks of the `lora` cells.
        objectives: also run the objective ablation (each removal term alone + KL) for instability, random and
            bias_gradient at the config's k.
        out: output directory (results.csv, results.md, pareto.png, one directory per cell).
        steps: training steps per cell (default: the config's trainer.max_steps).
        overrides: extra `debias fit` arguments applied to every cell, e.g. ["--model.train.lr=0.005"].
    """
    from debias.commands.compare.report import write_results

    methods = list(methods or GRID_METHODS)
    seeds, lora_ranks = list(seeds), list(lora_ranks)
    check_request(methods, k, seeds, lora_ranks)
    out_dir = Path(out)
    (out_dir / "cells").mkdir(parents=True, exist_ok=True)
    base_args = list(overrides or []) + ([f"--trainer.max_steps={steps}"] if steps else [])
    started = time.time()
    previous = json.loads((out_dir / "grid.json").read_text()) if (out_dir / "grid.json").is_file() else {}
    cells, features, selection = _prepare_grid(fit_config, base_args, out_dir, methods, k, seeds, lora_ranks,
                                               objectives)
    prepare_seconds = time.time() - started + previous.get("prepare_seconds", 0.0)  # summed over invocations
    atomic_write_json(out_dir / "grid.json", {"config": fit_config, "base_args": base_args, "features": features,
                                              "feature_selection": selection, "cells": [c.name for c in cells],
                                              "prepare_seconds": prepare_seconds})
    before = None  # the first cell's, shared with the rest; across invocations `debias.evaluation.base_cache`
    results: dict[str, dict] = {}
    upstream: dict = {}  # the activation cache the cells share (see `run_cell`)
    bar = tqdm(cells, desc="compare", unit="cell")
    for cell in bar:
        bar.set_postfix_str(cell.name)
        done = out_dir / "cells" / f"{cell.name}.json"
        if done.is_file():
            saved = json.loads(done.read_text())
            if saved["cell"]["overrides"] == cell.overrides and saved.get("base_args") == base_args:
                results[cell.name] = saved
                continue
        report = run_cell(cell, fit_config, base_args, out_dir, before, upstream)
        if before is None or _has_suites(report["before"]) and not _has_suites(before):
            before = report["before"]
            atomic_write_json(out_dir / "before.json", before)
        results[cell.name] = {"cell": asdict(cell), "base_args": base_args, "report": report}
        atomic_write_json(done, results[cell.name])
        write_results(out_dir, cells, results, fit_config, prepare_seconds)
    paths = write_results(out_dir, cells, results, fit_config, prepare_seconds)
    print(paths["md"].read_text())
    return out_dir
