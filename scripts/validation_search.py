"""Choose the default on the validation split only: train each variant of a config and record its validation metrics
at every validation, and the step `val/score` picks. Held-out prompts and the suites are never read here.

    python scripts/validation_search.py configs/smollm2.yaml --variants base,layers4 --out runs/validation

Each variant is a list of `debias fit` overrides (`VARIANTS` below, or `--extra NAME='["--a=1", ...]'`); of the
trainer's, only `--trainer.max_steps=N` applies (40 by default; a validation every 10 steps). Results
are appended to `OUT/results.jsonl` as they finish, so a stopped search resumes where it was; `--seeds 0,1,2` reruns
each variant with other data orders (`seed_everything` and `data.shuffle_seed`).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

#: Named variants of the main job (overrides of `debias fit`); the first round of the generalisation issue.
LAYERS4 = "--model.edit.layers=[18,21,24,27]"
VARIANTS: dict[str, list[str]] = {
    "base": [],
    "layers4": [LAYERS4],
    "layers4_k8847": [LAYERS4, "--model.edit.entries=8847"],
    "base_nullspace": ["--model.train.null_space_energy=0.99"],
    "layers4_nullspace": [LAYERS4, "--model.train.null_space_energy=0.99"],
    "layers4_bias_gradient": [LAYERS4, "--model.edit.method=bias_gradient"],
}
METRICS = ("score", "bias_gap", "statement_gap", "cue_margin", "factual_margin", "kl", "lm_loss")


def run_variant(config: str, overrides: list[str], seed: int, out: Path) -> dict:
    """Train one variant; its validation metrics at each validation, the step val/score picks, and its time."""
    from lightning.pytorch import Trainer, seed_everything
    from lightning.pytorch.callbacks import Callback

    from debias.callbacks import ValidationMetrics
    from debias.commands.fit import configured

    steps = [int(o.split("=", 1)[1]) for o in overrides if o.startswith("--trainer.max_steps=")] or [40]
    overrides = [o for o in overrides if not o.startswith("--trainer.max_steps=")]  # this script's own Trainer
    seeded = [*overrides, f"--seed_everything={seed}", f"--data.shuffle_seed={seed}"]
    module, data = configured(config, seeded)
    seed_everything(seed)
    history: list[dict] = []

    class Record(Callback):
        def on_validation_epoch_end(self, trainer, pl_module) -> None:
            if not trainer.sanity_checking:
                logged = trainer.callback_metrics
                history.append({"step": trainer.global_step,
                                **{k: float(logged[f"val/{k}"]) for k in METRICS if f"val/{k}" in logged}})

    metrics = ValidationMetrics()
    start = time.perf_counter()
    trainer = Trainer(max_steps=steps[-1], val_check_interval=10, check_val_every_n_epoch=None, num_sanity_val_steps=0,
                      accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                      enable_model_summary=False, callbacks=[metrics, Record()], default_root_dir=str(out / "tmp"))
    trainer.fit(module, datamodule=data)
    original = metrics.original or {}
    best = min(history, key=lambda h: h["score"])
    return {"original": {k: original[k] for k in METRICS if k in original}, "history": history, "best": best,
            "seconds": round(time.perf_counter() - start, 1)}


def summary_line(name: str, seed: int, result: dict) -> str:
    best, original = result["best"], result["original"]

    def kept(key: str) -> float:
        return best[key] / original[key] if original.get(key) else float("nan")

    def reduction(key: str) -> float:
        return 1 - abs(best[key]) / abs(original[key]) if original.get(key) else float("nan")

    return (f"{name:<24} seed {seed}  step {best['step']:>3}  score {best['score']:.3f}  "
            f"gap -{reduction('bias_gap'):.0%}  statements -{reduction('statement_gap'):.0%}  "
            f"cue {kept('cue_margin'):.0%}  factual {kept('factual_margin'):.0%}  kl {best['kl']:.4f}  "
            f"({result['seconds']:.0f} s)")


def markdown_table(results: Path) -> str:
    """Every recorded variant's step chosen by val/score, as a markdown table (validation split only)."""
    lines = ["| variant | seed | step | val/score | profession gap | statement gap | cue kept | factual kept | KL |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row in map(json.loads, results.read_text().splitlines()):
        best, original = row["best"], row["original"]
        lines.append(f"| {row['name']} | {row['seed']} | {best['step']} | {best['score']:.3f} | "
                     f"{1 - abs(best['bias_gap']) / abs(original['bias_gap']):+.0%} | "
                     f"{1 - abs(best['statement_gap']) / abs(original['statement_gap']):+.0%} | "
                     f"{best['cue_margin'] / original['cue_margin']:.0%} | "
                     f"{best['factual_margin'] / original['factual_margin']:.0%} | {best['kl']:.4f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated names of VARIANTS / --extra")
    parser.add_argument("--extra", action="append", default=[], help="NAME='[\"--override=value\", ...]'")
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--out", default="runs/validation")
    parser.add_argument("--table", action="store_true", help="print OUT/results.jsonl as a markdown table and stop")
    args = parser.parse_args()
    if args.table:
        print(markdown_table(Path(args.out) / "results.jsonl"))
        return
    table = dict(VARIANTS)
    for item in args.extra:
        name, _, overrides = item.partition("=")
        table[name] = json.loads(overrides)
    names = [n for n in args.variants.split(",") if n]
    unknown = [n for n in names if n not in table]
    if unknown:
        parser.error(f"unknown variant(s) {unknown}; expected names of {sorted(table)} or --extra NAME=[...]")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = out / "results.jsonl"
    done = set()
    if results.exists():
        done = {(r["name"], r["seed"]) for r in map(json.loads, results.read_text().splitlines())}
    for seed in (int(s) for s in args.seeds.split(",")):
        for name in names:
            if (name, seed) in done:
                continue
            result = run_variant(args.config, table[name], seed, out)
            with results.open("a") as f:
                f.write(json.dumps({"name": name, "seed": seed, "overrides": table[name], **result}) + "\n")
            print(summary_line(name, seed, result), flush=True)


if __name__ == "__main__":
    main()
