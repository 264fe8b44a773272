"""Objective ablation on one config: which objective moves behaviour without erasing gender?

One model, SAE, feature selection and mask (the config's), then for each objective a fresh zero delta trained for
the config's steps, evaluated on the held-out splits. Prints a Markdown table and writes it with a CSV.

    python scripts/objectives.py --config configs/smollm2.yaml --out runs/objectives
"""

from __future__ import annotations

import argparse
import csv
import json
import time
from pathlib import Path

from lightning.pytorch import Trainer

from debias.commands.fit import build_cli
from debias.evaluation.heldout import evaluate_heldout
from debias.training.objective import ObjectiveWeights

OBJECTIVES = {
    "feature + kl": dict(feature=1.0, kl=1.0),
    "ablation + kl": dict(feature=0.0, ablation=1.0, kl=1.0),
    "bias + kl": dict(feature=0.0, bias=1.0, kl=1.0),
    "feature + bias + kl + 10 cue_kl (default)": dict(feature=1.0, bias=1.0, kl=1.0, cue_kl=10.0),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/smollm2.yaml")
    parser.add_argument("--out", default="runs/objectives")
    parser.add_argument("--steps", type=int, default=None, help="training steps per objective (default: the config's)")
    args = parser.parse_args()

    cli = build_cli(["--config", args.config], run=False)
    module, data = cli.model, cli.datamodule
    module.prepare(data)
    steps = args.steps or cli.trainer.max_steps
    before = evaluate_heldout(module, data, edited=False)
    rows = []
    for name, weights in OBJECTIVES.items():
        start = time.time()
        module.delta.values.data.zero_()
        module.objective = ObjectiveWeights(**weights)
        Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                num_sanity_val_steps=0).fit(module, datamodule=data)
        after = evaluate_heldout(module, data, edited=True)
        rows.append({
            "objective": name, "steps": steps, "k": module.k,
            "gap_change": after["bias_gap"] / before["bias_gap"] - 1,
            "cue_margin_kept": after["cue_margin"] / before["cue_margin"],
            "kl": after["kl"], "lm_loss_change": after["lm_loss"] / before["lm_loss"] - 1,
            "feature_act_change": after["feature_act"] / before["feature_act"] - 1,
            "seconds": time.time() - start,
        })
        print(json.dumps(rows[-1]), flush=True)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "objectives.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    header = (f"held-out, {module.model_id}, {module.parameter}, k={module.k}, features {module.features}, "
              f"{steps} steps; before: gap {before['bias_gap']:.3f}, cue margin {before['cue_margin']:.3f}\n\n")
    table = ["| objective | gap change | cue margin kept | KL (nats/token) | LM loss change | feature act change |",
             "|---|---|---|---|---|---|"]
    table += [f"| {r['objective']} | {r['gap_change']:+.0%} | {r['cue_margin_kept']:.0%} | {r['kl']:.4f} | "
              f"{r['lm_loss_change']:+.2%} | {r['feature_act_change']:+.0%} |" for r in rows]
    (out / "objectives.md").write_text(header + "\n".join(table) + "\n")
    print(header + "\n".join(table))


if __name__ == "__main__":
    main()
