"""`eval`: the held-out split's metrics of the edited model (`debias.evaluation.heldout.split_metrics`: feature
activation and firing rate, LM loss, KL to the original), on the fast path and on the plain path."""

from __future__ import annotations

from torch.utils.benchmark import Measurement

from benchmarks.common import Bench, with_fast_path

SPLIT = "heldout"


def measure(bench: Bench, split: str = SPLIT) -> list[Measurement]:
    from debias.evaluation.heldout import split_metrics

    module, data = bench.module, bench.data
    module.eval()

    def evaluate():
        with module.fast_path():
            split_metrics(module, data, split)

    results = []
    try:
        for fast in (True, False) if module.fastpath is not None else (False,):
            path = with_fast_path(module, fast)
            evaluate()  # warm-up: fills the cache on the fast path
            results.append(bench.time(evaluate, f"eval ({split} split)", path))
    finally:
        module.use_fast_path = True
        module.train()
    return results
