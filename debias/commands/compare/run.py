"""`debias compare CONFIG`: plan the grid, compute its masks once, run each cell (`cell.run_cell`: train, snapshots,
curve, matched-KL points) and write the results after every cell (an interrupted grid resumes).
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

from tqdm.auto import tqdm

from debias.commands.compare.cell import Shared, run_cell
from debias.commands.compare.frontier import (
    DEFAULT_ALPHAS,
    DEFAULT_KL_LEVELS,
    DEFAULT_SNAPSHOT_EVERY,
    FrontierSettings,
)
from debias.commands.compare.grid import (
    DEFAULT_METHODS,
    any_ranked,
    cell_overrides,
    check_joint_rows,
    check_request,
    entry_counts,
    grid_masks,
    kind,
    mask_name,
    one_matrix_rows,
    plan,
    shares_mask,
)
from debias.edits.lora import check_lora_rank
from debias.io import atomic_write_json, read_json_object

#: What a finished cell's record (`cells/<name>.json`) holds, and of which type.
CELL_RECORD = {"cell": dict, "base_args": list, "frontier": dict, "report": dict, "points": list, "matched": dict}


def finished_cell(path: Path, warn: bool = False) -> dict | None:
    """The record of a finished cell, or None: missing, or not the shape `compare_command` writes (a damaged or
    foreign file: with `warn`, a warning naming it; the cell runs again)."""
    saved = read_json_object(path)
    if saved is not None and all(isinstance(saved.get(k), t) for k, t in CELL_RECORD.items()) \
            and isinstance(saved["cell"].get("overrides"), list):
        return saved
    if warn and path.exists():
        _say(f"warning: the finished-cell record {path} is not one debias compare writes (an object with "
             f"{', '.join(CELL_RECORD)}); running that cell again")
    return None


def _prepare_grid(config: str, base_args: list[str], out: Path, methods, k, seeds, lora_ranks, objectives, seeded,
                  settings: FrontierSettings, state: dict, methods_given: bool = True):
    """Features (the config's, or the rule's choice, kept across resumes: `state` is the last `grid.json`), cells and
    their masks."""
    from debias.commands.fit import build_cli
    from debias.edits import registry
    from debias.edits.joint import n_layers
    from debias.edits.mask import resolve_k

    cli = build_cli(["--config", config, *base_args], run=False)
    module, data = cli.model, cli.datamodule
    joint = list(module.layers_edited) if len(module.parameters_edited) > 1 else None  # the config's joint mask
    if joint is not None and not methods_given:
        methods = [m for m in methods if m not in one_matrix_rows(methods)]
        _say(f"compare: model.edit.layers={joint}: the mask rows {methods}, each ranked over these layers' W_out")
    if joint is not None:
        check_joint_rows(methods, joint)
    if settings.kl_levels and data.hparams.prompt_dir is not None:
        raise ValueError("data.prompt_dir has no validation split, and debias compare chooses each cell's matched-KL "
                         "point on it; use the bias spec's prompts (data.prompt_dir: null), or --kl_levels []")
    shape = tuple(module.net.get_parameter(module.parameter).shape)
    numel, edit = (math.prod(shape) if joint is None else module.numel), module.edit_args
    if any_ranked(methods):
        for rank in lora_ranks:
            check_lora_rank(rank, shape)
    default_k = resolve_k(numel, None if edit.entries is not None else edit.fraction, edit.entries)
    counts = entry_counts(k or [default_k], numel)
    if state.get("config") == config and state.get("base_args") == base_args and state.get("features"):
        module.features = state["features"]
    features = module.choose_features(data)
    cells = plan(methods, counts, default_k, seeds, lora_ranks, objectives, seeded)
    total = n_layers(module.net)
    layers = {c.name: registry.grid_layers(c.method, module.site.layer, total) for c in cells}  # refused before masks
    finished = {c.name for c in cells if finished_cell(out / "cells" / f"{c.name}.json") is not None}
    shared = joint is None  # a joint mask is ranked by each cell's own fit, over the config's layers
    masks = grid_masks(module, data, [c for c in cells if c.name not in finished and shared], out)
    for cell in cells:
        mask = masks.get(mask_name(cell), out / "masks" / f"{mask_name(cell)}.safetensors")  # finished: on disk
        cell.overrides = cell_overrides(cell, features, mask if shared and shares_mask(cell.method) else None,
                                        joint or layers[cell.name])
    selection, max_steps = module.feature_selection, int(cli.trainer.max_steps)
    del module, cli
    return cells, features, selection, max_steps


def _say(message: str) -> None:
    print(f"debias: {message}", file=sys.stderr, flush=True)


def compare_command(fit_config: str, methods: list[str] | None = None,
                    k: list[float] | None = None, seeds: Sequence[int] = (0, 1, 2), seeded: list[str] | None = None,
                    lora_ranks: Sequence[int] = (8,), objectives: bool = False, out: str = "runs/compare",
                    steps: int | None = None, alphas: Sequence[float] = DEFAULT_ALPHAS,
                    snapshot_every: int = DEFAULT_SNAPSHOT_EVERY, kl_levels: Sequence[float] = DEFAULT_KL_LEVELS,
                    suite_levels: Sequence[float] | None = None,
                    overrides: list[str] | None = None) -> Path:
    """Run the comparison grid: methods × k on one config, each cell a curve evaluated the same way; resumable.

    Each trained cell keeps its edit every `snapshot_every` steps and at the last step; each snapshot is evaluated
    at every scale α of `alphas` (α·Δ; the strength of an intervention) on the validation and held-out splits. At
    each KL of `kl_levels` the cell's (step, α) is chosen on the validation split and the held-out split is
    evaluated exactly there (with CrowS-Pairs and StereoSet at `suite_levels`).

    Args:
        fit_config: a `debias fit` YAML config (model, SAE, features, objective, steps, data).
        methods: rows of the grid: the methods of `debias.edits.registry` and its grid variants (default:
            `grid.DEFAULT_METHODS`, every method but `dense`, with the multi-layer variant). Under a config whose
            mask spans several layers (`model.edit.layers`), each mask row ranks its own mask over those layers'
            W_out, and the rows that edit one matrix are refused (default: the mask rows alone).
        k: mask sizes for the masked methods, as fractions of the edited W_out (< 1) or entry counts (default: the
            config's).
        seeds: the seeds of the `seeded` methods: the random mask's draw and the order of the training data.
        seeded: methods run once per seed (default: the masks, `grid.SEEDED`); the report gives
            mean ± sd over seeds.
        lora_ranks: ranks of the `lora` cells.
        objectives: also run the objective ablation (each removal term alone + KL) for instability, random and
            bias_gradient at the config's k (off by default).
        out: output directory (results.csv, results.md, results.json, pareto.png, retention.png, one directory per
            cell).
        steps: training steps per cell (default: the config's trainer.max_steps).
        alphas: scales of each snapshot's edit evaluated (0 < α <= 10; α = 0, the original model, is every curve's
            anchor).
        snapshot_every: a snapshot every this many steps (and one at the last step).
        kl_levels: validation KLs (nats/token) at which each cell's (step, α) is chosen.
        suite_levels: the levels of `kl_levels` whose matched point also gets the suites (default: the largest,
            0.01 with the default levels; [] for none).
        overrides: extra `debias fit` arguments applied to every cell, e.g. ["--model.train.lr=0.005"].
    """
    from debias.commands.compare.report import write_results

    methods_given, methods = methods is not None, list(methods or DEFAULT_METHODS)
    seeds, lora_ranks = list(seeds), list(lora_ranks)
    if suite_levels is None:
        suite_levels = [max(kl_levels)] if kl_levels and all(isinstance(v, (int, float)) for v in kl_levels) else []
    settings = FrontierSettings(tuple(alphas), snapshot_every, tuple(kl_levels), tuple(suite_levels))
    check_request(methods, k, seeds, lora_ranks, seeded, settings.problems())
    out_dir = Path(out)
    base_args = list(overrides or []) + ([f"--trainer.max_steps={steps}"] if steps else [])
    started = time.time()
    previous = read_json_object(out_dir / "grid.json") or {}
    cells, features, selection, max_steps = _prepare_grid(fit_config, base_args, out_dir, methods, k, seeds,
                                                          lora_ranks, objectives, seeded, settings, previous,
                                                          methods_given)
    if max_steps < 1:
        raise ValueError(f"trainer.max_steps={max_steps}: expected a run of >= 1 steps (--steps)")
    (out_dir / "cells").mkdir(parents=True, exist_ok=True)  # only now: a refused grid leaves no directory
    prepare_seconds = time.time() - started + previous.get("prepare_seconds", 0.0)  # summed over invocations
    same_grid = previous.get("config") == fit_config and previous.get("base_args") == base_args
    atomic_write_json(out_dir / "grid.json", {"config": fit_config, "base_args": base_args, "features": features,
                                              "feature_selection": selection, "cells": [c.name for c in cells],
                                              "frontier": settings.to_dict(), "max_steps": max_steps,
                                              "prepare_seconds": prepare_seconds})
    trained = sum(kind(c.method) != "inference" for c in cells)
    _say(f"compare: {len(cells)} cells ({trained} trained); {settings.evaluations(max_steps)} evaluations per trained "
         f"cell ({len(settings.steps(max_steps))} snapshots × {len(settings.alphas)} α × validation + held-out, "
         f"{len(settings.kl_levels)} matched), suites at KL {list(settings.suite_levels)}")
    shared = Shared(before=read_json_object(out_dir / "before.json") if same_grid else None,
                    validation=read_json_object(out_dir / "validation_before.json") if same_grid else None)
    results: dict[str, dict] = {}
    bar = tqdm(cells, desc="compare", unit="cell")
    for cell in bar:
        bar.set_postfix_str(cell.name)
        done = out_dir / "cells" / f"{cell.name}.json"
        saved = finished_cell(done, warn=True)
        if saved and saved["cell"]["overrides"] == cell.overrides and saved.get("base_args") == base_args \
                and saved.get("frontier") == settings.to_dict():
            results[cell.name] = saved
            continue
        record = run_cell(cell, fit_config, base_args, out_dir, shared, settings)
        results[cell.name] = {"cell": asdict(cell), "base_args": base_args, "frontier": settings.to_dict(), **record}
        atomic_write_json(done, results[cell.name])
        for name, value in (("before", shared.before), ("validation_before", shared.validation)):
            atomic_write_json(out_dir / f"{name}.json", value)
        write_results(out_dir, cells, results, fit_config, prepare_seconds, shared, settings)
    paths = write_results(out_dir, cells, results, fit_config, prepare_seconds, shared, settings)
    print(paths["md"].read_text())
    return out_dir
