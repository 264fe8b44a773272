"""Train, checkpoint, reload and export an edit with a plain `lightning.Trainer`, on `configs/tiny.yaml`'s arguments.

    python examples/own_trainer.py [--config configs/tiny.yaml] [--out runs/own_trainer] [--max-steps N]

`debias fit` does all of this from the YAML; here each step is ordinary Lightning: the module and the data are built
from the config's `model:` and `data:` sections (plain dicts), `ValidationMetrics` logs `val/score` for
`ModelCheckpoint(monitor=...)`, and `DebiasModule.load_from_checkpoint` gives the trained edit back with no data.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import yaml
from lightning.pytorch import Trainer, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger

from debias import DebiasDataModule, DebiasModule, ValidationMetrics
from debias.evaluation.evaluate import evaluate_model
from debias.export import export

PROMPT = "My sister, a carpenter, said that"


def logits(module: DebiasModule, text: str = PROMPT) -> torch.Tensor:
    """[1, seq, vocab] next-token logits of the module's (edited) model."""
    with torch.no_grad():
        return module.eval()(module.tokenize([text]))


def main(config: str = "configs/tiny.yaml", out: str = "runs/own_trainer", max_steps: int | None = None) -> dict:
    """Fit, save `final.ckpt`, reload it, and export the best checkpoint by `val/score`; returns the pieces."""
    cfg = yaml.safe_load(Path(config).read_text())
    seed_everything(cfg.get("seed_everything", 0))
    module = DebiasModule(**cfg["model"])  # the groups as plain dicts, as the YAML holds them
    data = DebiasDataModule(**cfg.get("data", {}))
    settings = {k: v for k, v in cfg.get("trainer", {}).items() if k != "logger"}
    if max_steps is not None:
        settings.update(max_steps=max_steps, val_check_interval=min(max_steps, settings.get("val_check_interval", 1)))
    best = ModelCheckpoint(dirpath=Path(out) / "checkpoints", monitor="val/score", mode="min")
    trainer = Trainer(**settings, logger=CSVLogger(out), callbacks=[ValidationMetrics(), best],
                      default_root_dir=out)
    trainer.fit(module, datamodule=data)

    final = Path(out) / "final.ckpt"
    trainer.save_checkpoint(final)
    reloaded = DebiasModule.load_from_checkpoint(final, weights_only=True)  # no data: the edit comes from the file
    same = torch.equal(logits(reloaded), logits(module))
    print(f"reloaded {final}: logits {'identical' if same else 'DIFFER'}")

    chosen = DebiasModule.load_from_checkpoint(best.best_model_path, weights_only=True)
    report = {"before": evaluate_model(chosen, data, edited=False), "after": evaluate_model(chosen, data),
              "checkpoint": best.best_model_path, "steps": trainer.global_step}
    exported = export(chosen, Path(out) / "export", report, overwrite=True)
    print(f"exported the best checkpoint ({best.best_model_path}, val/score {float(best.best_model_score):.4f}) "
          f"to {exported}")
    return {"trained": module, "reloaded": reloaded, "chosen": chosen, "best": best.best_model_path,
            "score": float(best.best_model_score), "export": exported}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/tiny.yaml")
    parser.add_argument("--out", default="runs/own_trainer")
    parser.add_argument("--max-steps", type=int, default=None)
    args = parser.parse_args()
    main(args.config, args.out, args.max_steps)
