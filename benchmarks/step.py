"""`step`: one training step of the config's `DebiasModule` (its `loss` on a training batch, backward, Adam on the
edit's values), on the fast path (cached layer-L inputs and original-model outputs) and on the plain path."""

from __future__ import annotations

from torch.utils.benchmark import Measurement

from benchmarks.common import Bench, with_fast_path


def train_step(module, optimizer, texts: dict[str, list[str]]) -> None:
    optimizer.zero_grad(set_to_none=True)
    module.loss(texts).backward()
    optimizer.step()


def optimizer_of(module):
    optimizer = module.configure_optimizers()
    if optimizer is None:
        raise ValueError(f"method {module.edit_args.method!r} has nothing to train: no training step to time")
    return optimizer


def time_path(bench: Bench, fast: bool) -> Measurement:
    """Training steps cycling over `bench.n_batches` batches, timed after one pass over them (which fills the fast
    path's cache: the state of every epoch after the first)."""
    module = bench.module
    optimizer, batches = optimizer_of(module), bench.cycle()
    path = with_fast_path(module, fast)
    try:
        for _ in range(bench.n_batches):
            train_step(module, optimizer, next(batches))
        return bench.time(lambda: train_step(module, optimizer, next(batches)), "train step", path)
    finally:
        module.use_fast_path = True


def measure(bench: Bench) -> list[Measurement]:
    paths = (True, False) if bench.module.fastpath is not None else (False,)
    return [time_path(bench, fast) for fast in paths]
