"""`python -m benchmarks` runs every measurement on the tiny model and reports both paths of each."""

import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "configs" / "tiny.yaml")


def test_every_measurement_runs_on_the_tiny_model(tmp_path, capsys, one_thread):
    from benchmarks.__main__ import main

    out = tmp_path / "results.json"
    main(["--config", CONFIG, "--min-run-time", "0.01", "--batches", "2", "--json", str(out)])
    results = json.loads(out.read_text())
    timed = {label: paths for label, paths in results.items() if label != "memory"}
    assert sorted(label.split(" ")[0] for label in timed) == ["eval", "mask", "train"]
    for label, paths in timed.items():
        assert set(paths) == {"fast path", "plain path"} and all(s > 0 for s in paths.values()), label
    assert set(results["memory"]) == {"load", "fast", "plain"} and all(mb > 0 for mb in results["memory"].values())
    printed = capsys.readouterr().out
    assert "speed-up" in printed and "train step" in printed and "peak RSS" in printed


def test_an_unknown_measurement_is_refused(capsys):
    from benchmarks.__main__ import main

    with pytest.raises(SystemExit):
        main(["masks"])
    assert "unknown measurement(s) masks; expected some of mask, step, eval, memory" in capsys.readouterr().err
