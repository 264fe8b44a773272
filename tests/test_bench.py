"""`scripts/bench.py` runs end to end on a tiny model and ends with its JSON summary."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_smoke_tiny_llama(debias_cache):
    cmd = [sys.executable, str(ROOT / "scripts" / "bench.py"), "--model", "tiny-llama", "--steps", "2",
           "--repeats", "1", "--batches", "2", "--d-sae", "256", "--threads", "1", "--memory", "train_debias"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    for key in ("train_step_speedup", "mask_speedup", "state_bytes_ratio"):
        assert result[key] > 0, key
    assert result["same_result"] is True
    assert 1.0 <= result["state_bytes_ratio"] < 2.0  # Adam's two moments and the values: O(k)
    assert result["peak_rss_mb"]["train_debias"] > 0 and result["peak_rss_mb"]["load"] is None
    assert "train step" in done.stdout and "peak RSS" in done.stdout
