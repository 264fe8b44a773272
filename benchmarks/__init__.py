"""Benchmarks of debias's fast paths, one module per measurement, each on `torch.utils.benchmark.Timer`:

- `mask`: building the instability mask at the SAE's layer (the forward stops at the hook) against the same mask
  from a full forward;
- `step`: one training step (`DebiasModule.loss`, backward, Adam on the edit's values), fast path on and off;
- `memory`: the peak memory of a process that takes training steps, fast path on and off, each in its own process;
- `eval`: the metrics of a split (`debias.evaluation.heldout.split_metrics`), fast path on and off.

    python -m benchmarks                                   # all four, configs/tiny.yaml: seconds on a CPU
    python -m benchmarks step eval --config configs/smollm2.yaml --min-run-time 5

They call the package's public functions only; that both paths give the same result is tested in tests/
(test_fastpath.py, test_mask.py, test_module.py), not here.
"""
