"""`scripts/bench.py` runs end to end on a tiny model and ends with its JSON summary."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_bench_smoke_tiny_llama(debias_cache):
    batches = 2
    cmd = [sys.executable, str(ROOT / "scripts" / "bench.py"), "--model", "tiny-llama", "--steps", "2",
           "--repeats", "1", "--batches", str(batches), "--d-sae", "256", "--threads", "1", "--memory",
           "train_debias", "--eval-export", "heldout"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    for key in ("train_step_speedup", "mask_speedup", "state_bytes_ratio", "train_step_vs_floor"):
        assert result[key] > 0, key
    assert result["same_result"] is True  # the floor's loss at step 0 is the naive and debias steps' loss too
    assert 1.0 <= result["state_bytes_ratio"] < 2.0  # Adam's two moments and the values: O(k)
    assert result["peak_rss_mb"]["train_debias"] > 0 and result["peak_rss_mb"]["load"] is None
    assert "train step" in done.stdout and "peak RSS" in done.stdout and "train step floor" in done.stdout

    steps = result["train_step_s"]
    assert all(steps[path] > 0 for path in ("naive", "debias", "plain", "floor", "debias_first_pass"))
    assert result["train_step_vs_floor"] == pytest.approx(steps["debias"] / steps["floor"])
    floor = result["floor_cache_stats"]  # layers 0..L-1 ran once per text batch (bias, neutral), then never again
    assert floor["upstream_misses"] == 2 * batches and floor["upstream_hits"] > 0 and floor["over_budget"] == 0
    assert floor["reference_misses"] == batches and floor["reference_hits"] > 0

    assert set(result["eval_s"]) == {"fast", "full"} and all(s > 0 for s in result["eval_s"].values())
    assert result["eval_fast_path_speedup"] == pytest.approx(result["eval_s"]["full"] / result["eval_s"]["fast"])
    assert result["eval_same_result"] is True  # fast and full path give the same held-out numbers
    assert "debias eval, whole command" in done.stdout

