"""`scripts/seeds.py`: two seeds of the tiny config end to end, summarised as mean ± sd, and resumed."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(out: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    cmd = [sys.executable, str(ROOT / "scripts" / "seeds.py"), str(ROOT / "configs" / "tiny.yaml"), "--out",
           str(out), "--seeds", "0", "1", "--", "--trainer.max_steps=4", "--export.plots=false",
           "--evaluate.completions=0", *extra]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900, cwd=out.parent)


def test_two_seeds_are_summarised_and_a_finished_seed_is_not_rerun(tmp_path, debias_cache):
    out = tmp_path / "sweep"
    done = _run(out)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((out / "summary.json").read_text())
    seeds = result["seeds"]
    assert sorted(seeds) == ["0", "1"]
    gaps = [seeds[s]["bias_gap_reduction"] for s in ("0", "1")]
    summary = result["summary"]["bias_gap_reduction"]
    assert summary["n"] == 2 and abs(summary["mean"] - sum(gaps) / 2) < 1e-12
    assert gaps[0] != gaps[1]  # the data order differs between seeds
    assert "| bias_gap_reduction |" in (out / "summary.md").read_text()
    again = _run(out)
    assert again.returncode == 0 and "seeds: seed" not in again.stdout  # both reports exist: nothing reruns
