"""Run one config over several seeds and report each held-out result as mean ± sd.

    python scripts/seeds.py configs/smollm2.yaml --out runs/seeds/instability
    python scripts/seeds.py configs/smollm2.yaml --out runs/seeds/random --seeds 0 1 2 -- --model.edit.method random

Each seed is one `debias fit` in its own process, with `seed_everything`, `data.shuffle_seed` (the order of the
training data) and `model.edit.mask_seed` (the random mask, where there is one) set to it; the exported step is the
one the config's `ModelCheckpoint` chooses on the validation split. Runs go to OUT/seedN (logs, checkpoints, export); a
seed whose export already holds a report is not rerun, so an interrupted sweep resumes. OUT/summary.json holds
every seed's numbers and their mean and sd, OUT/summary.md the table.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
from pathlib import Path

#: (row, how to read it from a report's before/after): reductions and kept shares as in `debias.evaluation.heldout`.
ROWS = ("bias_gap_reduction", "statement_gap_reduction", "statement_gap_unseen_reduction", "cue_kept", "factual_kept",
        "kl", "lm_loss_change",
        "stereoset.abs_ss_minus_50", "stereoset.lms", "crows_pairs.abs_pct_minus_50", "step")


def numbers(report: dict) -> dict[str, float]:
    """The rows of one seed's `report.json`."""
    from debias.evaluation.heldout import outcome

    before, after = report["before"], report["after"]
    out: dict[str, float] = dict(outcome(before, after))
    out["kl"], out["lm_loss_change"] = after["kl"], after["lm_loss"] - before["lm_loss"]
    for suite, name in (("stereoset", "abs_ss_minus_50"), ("stereoset", "lms"), ("crows_pairs", "abs_pct_minus_50")):
        if suite in after and name in after[suite]:
            out[f"{suite}.{name}"] = after[suite][name]
            out[f"{suite}.{name}.before"] = before[suite][name]
    checkpoint = str(report.get("checkpoint", ""))
    if "step=" in checkpoint:
        out["step"] = float(checkpoint.split("step=")[1].split(".")[0])
    return out


def summarise(per_seed: dict[int, dict[str, float]]) -> dict[str, dict[str, float]]:
    """Mean and sd (n − 1; 0 for one seed) of each row over the seeds that have it."""
    rows = sorted({key for values in per_seed.values() for key in values})
    out = {}
    for key in rows:
        values = [v[key] for v in per_seed.values() if key in v and math.isfinite(v[key])]
        if values:
            out[key] = {"mean": statistics.fmean(values), "sd": statistics.stdev(values) if len(values) > 1 else 0.0,
                        "n": len(values)}
    return out


def table(summary: dict[str, dict[str, float]], title: str) -> str:
    lines = [f"### {title}", "", "| metric | mean ± sd | seeds |", "|---|---|---|"]
    for key in ROWS:
        if key in summary:
            s = summary[key]
            percent = key.endswith(("reduction", "kept"))
            fmt = (lambda x: f"{x:+.1%}") if key.endswith("reduction") else (
                (lambda x: f"{x:.1%}") if percent else (lambda x: f"{x:.4f}"))
            before = summary.get(f"{key}.before")
            note = f" (before {before['mean']:.2f})" if before else ""
            lines.append(f"| {key} | {fmt(s['mean'])} ± {fmt(s['sd']).lstrip('+')}{note} | {s['n']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("config")
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args(argv)
    if not Path(args.config).is_file():
        parser.error(f"config not found: {args.config}")
    if len(set(args.seeds)) != len(args.seeds):
        parser.error(f"--seeds must be distinct, got {args.seeds}")
    per_seed = {}
    for seed in args.seeds:
        run = args.out / f"seed{seed}"
        report_path = run / "export" / "debias" / "report.json"
        if not report_path.is_file():
            print(f"seeds: seed {seed} -> {run}", flush=True)
            command = [sys.executable, "-m", "debias", "fit", "--config", args.config, f"--seed_everything={seed}",
                       f"--data.shuffle_seed={seed}", f"--model.edit.mask_seed={seed}",
                       f"--trainer.logger.init_args.save_dir={run}", f"--export.export_dir={run / 'export'}",
                       "--export.overwrite=true", *extra]
            if subprocess.call(command) != 0:
                print(f"seeds: seed {seed} failed; the finished seeds are summarised", file=sys.stderr)
                break
        per_seed[seed] = numbers(json.loads(report_path.read_text()))
    summary = summarise(per_seed)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "summary.json").write_text(json.dumps({"config": args.config, "overrides": extra,
                                                      "seeds": per_seed, "summary": summary}, indent=2))
    text = table(summary, f"{args.config} {' '.join(extra)} (seeds {sorted(per_seed)})")
    (args.out / "summary.md").write_text(text + "\n")
    print(text)
    return 0 if len(per_seed) == len(args.seeds) else 1


if __name__ == "__main__":
    sys.exit(main())
