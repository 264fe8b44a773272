"""`python -m benchmarks [mask step memory eval] [--config configs/smollm2.yaml]`: run the measurements (all by
default) and print one table: the median time per call on the fast and on the plain path, and the speed-up."""

from __future__ import annotations

import argparse
import importlib
import json
import os

import torch

from benchmarks.common import DEFAULT_CONFIG, PATHS, Bench

MEASUREMENTS = ("mask", "step", "eval", "memory")


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n\n")[0])
    parser.add_argument("measurements", nargs="*", metavar="MEASUREMENT",
                        help=f"some of {', '.join(MEASUREMENTS)} (default: all)")
    parser.add_argument("--config", default=DEFAULT_CONFIG,
                        help="a `debias fit` config (default: %(default)s; the default model: configs/smollm2.yaml)")
    parser.add_argument("--override", action="append", default=[],
                        help="a `debias fit` argument for the config, e.g. --override=--model.train.max_length=32")
    parser.add_argument("--batches", type=int, default=2, help="training batches the timed steps cycle over")
    parser.add_argument("--min-run-time", type=float, default=0.5, help="seconds each timed statement runs at least")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own choice)")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    unknown = [m for m in args.measurements if m not in MEASUREMENTS]
    if unknown:
        parser.error(f"unknown measurement(s) {', '.join(unknown)}; expected some of {', '.join(MEASUREMENTS)}")
    return args


def run(bench: Bench, measurements: list[str]) -> dict:
    """{measurement: {path: median seconds}}, and {"memory": {path: peak RSS MB}}."""
    results: dict = {}
    for name in measurements:
        module = importlib.import_module(f"benchmarks.{name}")
        if name == "memory":
            results[name] = module.measure(bench)
            continue
        for m in module.measure(bench):
            results.setdefault(m.label, {})[m.description] = m.median
    return results


def table(results: dict) -> str:
    lines = [f"{'':<44}{PATHS[0]:>12}{PATHS[1]:>12}{'speed-up':>10}"]
    for label, times in results.items():
        if label == "memory":
            continue
        fast, plain = times.get(PATHS[0]), times.get(PATHS[1])
        cells = [f"{'n/a':>12}" if t is None else f"{t * 1e3:>9.1f} ms" if t < 1 else f"{t:>10.2f} s"
                 for t in (fast, plain)]
        ratio = f"{plain / fast:>9.2f}x" if fast and plain else f"{'':>10}"
        lines.append(f"{label:<44}{''.join(cells)}{ratio}")
    if "memory" in results:
        lines.append(f"{'peak RSS, MB (a process per path)':<44}"
                     + "  ".join(f"{path} {mb:.0f}" for path, mb in results["memory"].items()))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    if args.threads:
        torch.set_num_threads(args.threads)
    bench = Bench(args.config, args.override, args.batches, args.min_run_time, args.threads)
    measurements = [m for m in MEASUREMENTS if m in (args.measurements or MEASUREMENTS)]
    results = run(bench, measurements)
    print(f"\n{args.config}: torch threads {bench.threads or torch.get_num_threads()}, load average "
          f"{os.getloadavg()[0]:.2f}; median time per call")
    print(table(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
