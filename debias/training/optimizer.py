"""The edit's optimiser: Adam at `model.train.lr`, and with `model.train.lr_decay` a rate that holds, then falls
linearly to 0 over the run's last share of steps."""

from __future__ import annotations

from typing import Any

import torch

from debias.training.args import TrainArgs


def configure(params: list[torch.nn.Parameter], args: TrainArgs, trainer: Any) -> Any:
    """What `LightningModule.configure_optimizers` returns for the edit's trainable `params` under `trainer` (None:
    called outside a Trainer, e.g. by a hand-written loop; only `lr_decay` needs one, for the run's length)."""
    optimizer = torch.optim.Adam(params, lr=args.lr)
    if not args.lr_decay:
        return optimizer
    if trainer is None:
        raise ValueError(f"model.train.lr_decay={args.lr_decay} needs the run's length from a Trainer's max_steps; "
                         "outside a Trainer, set it to 0 and schedule the rate yourself")
    total = trainer.max_steps if trainer.max_steps > 0 else int(trainer.estimated_stepping_batches)
    start = int(total * (1 - args.lr_decay))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, max(0.0, (total - step) / max(total - start, 1))))
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}
