"""`debias compare`: every method on one config, trained on the same data with the same objective and steps, and
evaluated through the same path (`debias.evaluation`), in one grid.

    debias compare configs/smollm2.yaml                   # the full grid, runs/compare/
    debias compare configs/tiny.yaml --methods [instability,random] --k [20,100] --objectives false
    debias compare configs/smollm2.yaml --alphas [0.25,0.5,1,1.5] --snapshot_every 20 --kl_levels [0.003,0.01]

Each cell runs `debias fit`'s own path (the config, with the method's overrides) and leaves its export at
`OUT/<method>-k<count>[-seed<n>][-obj-<term>]/export`; inference-time methods leave only `report.json`. Each cell is
then a curve: its snapshots along training, each at every scale α (`frontier`, `points`), and its points at matched
validation KLs (`matched`). A finished cell is recorded in `OUT/cells/<name>.json`; rerunning the same command skips
finished cells, and a cell interrupted half-way keeps its training and its finished points (`cell`), so an
interrupted grid resumes where it stopped. `results.csv`, `results.md`, `results.json`, `pareto.png` and `retention.png`
are rewritten atomically after every cell, and say "unfinished" until the last one is done.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from debias.edits import registry

#: Rows of the grid: every registered method, with the variants (e.g. the |grad × weight| mask) as their own rows.
GRID_METHODS = (*registry.METHODS, *registry.GRID_VARIANTS)


def kind(name: str) -> str:
    """The kind (`mask`, `weight`, `inference`) of a grid row."""
    return registry.grid_entry(name)[0].kind


def any_ranked(methods: list[str]) -> bool:
    """Whether a grid row is a `ranked` method (a cell per `--lora_ranks` rank); unknown names are not."""
    return any(m in GRID_METHODS and registry.grid_entry(m)[0].ranked for m in methods)


def cell_name(method: str, k: int | None = None, seed: int | None = None, rank: int | None = None,
              objective: str = "default") -> str:
    """`instability-k88`, `random-k88-seed0`, `lora-r8`, `bias_gradient-k8847-obj-gap`: the one naming rule."""
    name = method + (f"-k{k}" if k is not None else "") + (f"-seed{seed}" if seed is not None else "")
    name += f"-r{rank}" if rank is not None else ""
    return name + (f"-obj-{objective}" if objective != "default" else "")
#: The objective ablation: each removal term alone with the neutral KL (the default combination is the main cell).
OBJECTIVES = {"feature": dict(feature=1.0, ablation=0.0, gap=0.0, kl=1.0, cue_kl=0.0),
              "ablation": dict(feature=0.0, ablation=1.0, gap=0.0, kl=1.0, cue_kl=0.0),
              "gap": dict(feature=0.0, ablation=0.0, gap=1.0, kl=1.0, cue_kl=0.0)}
ABLATED = ("instability", "random", "bias_gradient")


@dataclass
class Cell:
    """One grid cell: a method with its k / seed / rank / objective, and the `debias fit` overrides that make it."""

    name: str
    method: str
    k: int | None = None
    seed: int | None = None
    rank: int | None = None
    objective: str = "default"
    overrides: list[str] = field(default_factory=list)


#: The grid's rows when `--methods` is not given: the questions of docs/compare-results.md (SAE-guided masks against
#: the bias's own gradient and against random controls), a LoRA, a multi-layer mask, the training-free projection and
#: the inference-time interventions. The others (`dense`, `instability_gxw`) are a `--methods` away.
DEFAULT_METHODS = ("instability", "bias_gradient", "feature_effect", "random", "random_features", "lora",
                   "instability_3layers", "feature_projection", "sae_clamp", "steering_vector")
#: Methods run once per seed by default: the masks, compared with seed spread (a seed orders the training
#: data, and draws the mask of `random` and the latents of `random_features`).
SEEDED = ("instability", "bias_gradient", "feature_effect", "random", "random_features")
#: Where a grid computes a mask itself, from one shared gradient; a method ranked by anything else computes its own.
SHARED_MASK_SOURCES = ("feature", "bias", "random")


def check_request(methods: list[str], k: list[float] | None, seeds: list[int], lora_ranks: list[int],
                  seeded: list[str] | None = None, frontier_problems: list[str] | None = None) -> None:
    """Every problem of the grid's arguments at once, before a model is loaded."""
    problems = [f"unknown method {m!r}; expected some of {list(GRID_METHODS)}"
                for m in methods if m not in GRID_METHODS]
    problems += [f"--seeded names {m!r}, which is not among the grid's methods {methods}"
                 for m in (seeded or []) if m not in methods]
    problems += list(frontier_problems or [])
    masked = [m for m in GRID_METHODS if kind(m) == "mask"]
    if k and not any(m in masked for m in methods):
        problems.append(f"--k {k} was given, but none of the methods {methods} has a mask (k applies to {masked})")
    for value in k or []:
        if not (0 < value < 1 or value >= 1 and float(value).is_integer()):
            problems.append(f"k must be a fraction in (0, 1) or a whole entry count >= 1, got {value}")
    if any(m in methods for m in (*(seeded or []), *SEEDED)) and not seeds:
        problems.append("--seeds must name at least one seed for the seeded methods (the random mask's)")
    if len(set(seeds)) != len(seeds):
        problems.append(f"--seeds {seeds} repeats a seed; expected each seed once")
    if any_ranked(methods) and (not lora_ranks or any(r < 1 for r in lora_ranks)):
        problems.append(f"--lora_ranks must be ranks >= 1, got {lora_ranks}")
    if problems:
        raise ValueError("invalid compare arguments:\n  - " + "\n  - ".join(problems))


def entry_counts(k: list[float], numel: int) -> list[int]:
    """Fractions become entry counts (max(1, floor(fraction × numel))); counts are checked against the matrix."""
    from debias.edits.mask import resolve_k

    return sorted({resolve_k(numel, fraction=v) if v < 1 else resolve_k(numel, k=int(v)) for v in k})


def plan(methods: list[str], counts: list[int], default_k: int, seeds: list[int], lora_ranks: list[int],
         objectives: bool, seeded: list[str] | None = None) -> list[Cell]:
    """The cells of the grid, weight edits first (the inference-time methods need no training). A `seeded` method
    (default `SEEDED`) has a cell per seed; the others run once."""
    seeded = list(SEEDED if seeded is None else seeded)
    cells = []
    for method in methods:
        runs = seeds if method in seeded and kind(method) != "inference" else [None]
        if kind(method) == "mask":
            for k in counts:
                for seed in runs:
                    cells.append(Cell(cell_name(method, k, seed), method, k, seed))
        elif registry.grid_entry(method)[0].ranked:
            cells += [Cell(cell_name(method, seed=s, rank=r), method, seed=s, rank=r) for r in lora_ranks for s in runs]
        elif kind(method) != "inference":
            cells += [Cell(cell_name(method, seed=s), method, seed=s) for s in runs]
    if objectives:
        for method in (m for m in ABLATED if m in methods):
            for term in OBJECTIVES:
                seed = seeds[0] if method in seeded else None
                cells.append(Cell(cell_name(method, default_k, seed, objective=term), method, default_k, seed,
                                  objective=term))
    cells += [Cell(m, m) for m in methods if kind(m) == "inference"]
    return cells


def cell_overrides(cell: Cell, features: list[int], mask_path: Path | None,
                   layers: list[int] | None = None) -> list[str]:
    """`debias fit` arguments that turn the config into this cell (`layers`: its mask's, `registry.grid_layers`)."""
    method, fixed = registry.grid_entry(cell.method)
    args = [f"--model.edit.method={method.name}", f"--model.sae.features={json.dumps(features)}"]
    args += [f"--model.edit.{key}={value}" for key, value in fixed.items()]
    if layers is not None:
        args.append(f"--model.edit.layers={json.dumps(layers)}")
    if mask_path is not None:
        args.append(f"--model.edit.mask_path={mask_path}")
    elif kind(cell.method) == "mask" and cell.k is not None:  # a method that computes its own mask (`shares_mask`)
        args.append(f"--model.edit.entries={cell.k}")
    if cell.rank is not None:  # a `ranked` method's options have a rank
        args.append(f"--model.edit.options.{method.name}.rank={cell.rank}")
    if cell.seed is not None:  # the random mask's draw, and the order of every method's training data
        args += [f"--model.edit.mask_seed={cell.seed}", f"--data.shuffle_seed={cell.seed}"]
    for term, weight in OBJECTIVES.get(cell.objective, {}).items():
        args.append(f"--model.objective.{term}={weight}")
    return args


def grid_masks(module, datamodule, cells: list[Cell], out: Path) -> dict[str, Path]:
    """Every mask the grid needs, from one feature gradient and one gap gradient (the expensive passes)."""
    from debias.edits.mask import compute_mask, feature_gradient, gap_gradient

    needed = {(c.method, c.k, c.seed) for c in cells if shares_mask(c.method)}
    if needed and module.edit_args.rank_null_space_energy is not None:  # the shared one-matrix masks rank raw grads
        raise ValueError(f"model.edit.rank_null_space_energy={module.edit_args.rank_null_space_energy} applies to "
                         "`debias compare` under model.edit.layers only (each cell then ranks its own mask)")
    batches = [module.tokenize(b) for b in datamodule.mask_batches()]
    net = module.net
    grads, source = {}, {m: registry.grid_entry(m)[0].mask_from for m, _, _ in needed}
    if "feature" in source.values():
        grads["feature"] = feature_gradient(net, module.sae, module.site, module.parameter, batches, module.features,
                                            module.tokenizer.bos_token_id).cpu()
    if "bias" in source.values():
        grads["bias"] = gap_gradient(net, module.tokenizer, module.parameter, datamodule.gap_texts(), None,
                                     datamodule.hparams.eval_batch_size, targets=datamodule.hparams.bias).cpu()
    paths = {}
    (out / "masks").mkdir(parents=True, exist_ok=True)
    for method, k, seed in sorted(needed, key=str):
        name = cell_name(method, k, seed)
        mask_from = source[method]
        if k is None:  # `plan` gives every mask cell a k
            raise ValueError(f"grid cell {name}: a mask method needs an entry count k")
        if mask_from == "random" and seed is None:  # `plan` gives every random cell a seed
            raise ValueError(f"grid cell {name}: the random mask needs a seed")
        if mask_from is None or mask_from not in ("random", *grads):
            raise ValueError(f"grid cell {name}: method {method!r} ranks by {mask_from!r}, not a gradient the grid "
                             "shares")
        fixed = registry.grid_entry(method)[1]
        strategy = "random" if mask_from == "random" else fixed.get("mask_strategy", "gradient")
        # the one mask builder `debias fit` uses too (`debias.edits.sparse.build_masked`), on the shared gradient
        mask = compute_mask(net, module.sae, module.site, module.parameter, batches, module.features, k,
                            strategy=strategy, seed=seed or 0, grad=grads.get(mask_from), progress=False,
                            extra={"method": method, "mask_from": mask_from}, model_id=module.model_id)
        paths[name] = out / "masks" / f"{name}.safetensors"
        mask.save(paths[name])
    return paths


def one_matrix_rows(methods: list[str]) -> list[str]:
    """The rows that edit one matrix (or layers of their own): every row but the masks a cell ranks over the
    config's layers."""
    return [m for m in methods if kind(m) != "mask" or (m in registry.GRID_VARIANTS
                                                        and registry.GRID_VARIANTS[m].layer_offsets is not None)]


def check_joint_rows(methods: list[str], layers: list[int]) -> None:
    """Refuse, under a config whose mask spans several layers, the rows that cannot rank a mask over them."""
    one = one_matrix_rows(methods)
    if one:
        raise ValueError(f"model.edit.layers={layers}: each mask row of the grid is ranked jointly over these layers' "
                         f"W_out, but {one} edit one matrix or layers of their own; drop them from --methods, or "
                         "compare on one matrix with --overrides '[\"--model.edit.layers=null\"]'")


def shares_mask(method: str) -> bool:
    """Whether the grid computes this row's mask (`grid_masks`, one matrix); otherwise its cell computes its own."""
    multilayer = method in registry.GRID_VARIANTS and registry.GRID_VARIANTS[method].layer_offsets is not None
    return kind(method) == "mask" and not multilayer and registry.grid_entry(method)[0].mask_from in SHARED_MASK_SOURCES


def mask_name(cell: Cell) -> str:
    return cell_name(cell.method, cell.k, cell.seed)


