"""`memory`: the peak memory of training steps, fast path on and off, each path in a process of its own.

CPU torch has no resettable peak-memory counter, so each path runs as `python -m benchmarks.memory --path PATH`
and reports its own peak resident set size; `load` is a process that prepares the module and takes no step (the
floor the steps add to). The steps are `benchmarks.step`'s, timed the same way.

    python -m benchmarks.memory --path fast --config configs/tiny.yaml
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

from benchmarks.common import DEFAULT_CONFIG, Bench

MEMORY_PATHS = ("load", "fast", "plain")
ROOT = Path(__file__).resolve().parents[1]


def peak_rss_mb() -> float:
    """This process's peak resident set size, MB: `VmHWM` where /proc exists (Linux's `ru_maxrss` keeps the
    parent's peak across fork + exec), else `ru_maxrss`."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    scale = 2**20 if sys.platform == "darwin" else 2**10  # bytes on macOS, KB elsewhere
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / scale


def bench_args(bench: Bench) -> list[str]:
    """The command-line arguments that rebuild `bench` in another process."""
    args = ["--config", bench.config, "--batches", str(bench.n_batches), "--min-run-time", str(bench.min_run_time)]
    args += [f"--override={o}" for o in bench.overrides]
    return args + (["--threads", str(bench.threads)] if bench.threads else [])


def measure(bench: Bench, paths: tuple[str, ...] = MEMORY_PATHS) -> dict[str, float]:
    """{path: peak RSS in MB} of one process per path."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    peaks = {}
    for path in paths:
        cmd = [sys.executable, "-m", "benchmarks.memory", "--path", path, *bench_args(bench)]
        done = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
        peaks[path] = json.loads(done.stdout.strip().splitlines()[-1])["peak_mb"]
    return peaks


def run_path(bench: Bench, path: str) -> dict:
    """Prepare the module and, unless `path` is "load", take `benchmarks.step`'s timed steps on that path."""
    from benchmarks.step import time_path

    bench.module  # noqa: B018  (prepares it)
    result: dict = {"path": path}
    if path != "load":
        result["step_s"] = time_path(bench, fast=path == "fast").median
    return {**result, "peak_mb": peak_rss_mb()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Peak memory of one path, in this process (see benchmarks.memory).")
    parser.add_argument("--path", choices=MEMORY_PATHS, required=True)
    parser.add_argument("--config", default=DEFAULT_CONFIG)
    parser.add_argument("--override", action="append", default=[], help="a `debias fit` argument (repeatable)")
    parser.add_argument("--batches", type=int, default=2)
    parser.add_argument("--min-run-time", type=float, default=0.5)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    bench = Bench(args.config, args.override, args.batches, args.min_run_time, args.threads)
    print(json.dumps(run_path(bench, args.path)))


if __name__ == "__main__":
    main()
