"""`debias eval` names the base model it compares against, and never trusts an export's `report.json` blindly: a
report that is not a JSON object, a base directory holding another model than the one the export was made from, or
other files than the report recorded, are refused in one line naming the file."""

import json
import shutil
from pathlib import Path

import pytest

from debias.commands import main
from debias.models.load import resolve_model_path
from debias.models.tiny import save_tiny_model

TINY = str(Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml")
EDITED = "model.layers.1.mlp.down_proj.weight"  # tiny.yaml's W_out at the SAE's layer


@pytest.fixture
def export(tmp_path):
    """(an export-like directory: a copy of a base with two entries of W_out[1] changed and a report naming the
    base; the base directory)."""
    from safetensors.torch import load_file, save_file

    base = Path(shutil.copytree(resolve_model_path("tiny-llama"), tmp_path / "base"))
    out = Path(shutil.copytree(base, tmp_path / "export"))
    weights = load_file(out / "model.safetensors")
    weights[EDITED].view(-1)[:2] += 0.5
    save_file(weights, out / "model.safetensors", metadata={"format": "pt"})
    (out / "debias").mkdir()
    report = {"base_model": str(base), "base_model_spec": str(base), "features": [3], "parameters": [EDITED]}
    (out / "debias" / "report.json").write_text(json.dumps(report))
    return out, base


def _eval(model, capsys, *extra) -> list[str]:
    """The error lines of a refused `debias eval` of `model` (exit 2: `main` caught a user error, no traceback)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        main(["eval", str(model), "--fit_config", TINY, "--suites", "false", *extra])
    err = capsys.readouterr().err
    assert exit_.value.code == 2
    return [line for line in err.splitlines() if line.startswith("debias: error:")]


@pytest.mark.parametrize("content, says", [("[1, 2, 3]", "holds a JSON list, not an object"),
                                           ('"a string"', "holds a JSON str, not an object"),
                                           ('{"base_model_spec": ', "is not valid JSON")])
def test_a_report_that_is_not_an_object_is_refused_naming_the_file(export, capsys, content, says):
    out, _ = export
    (out / "debias" / "report.json").write_text(content)
    (line,) = _eval(out, capsys)
    assert f"the export report {out / 'debias' / 'report.json'} {says}" in line


def test_a_base_directory_holding_another_model_is_refused(export, capsys):
    out, base = export
    save_tiny_model(base, seed=1)  # the case: other weights of the same shape where the base was
    (line,) = _eval(out, capsys)
    assert f"{out} differs from base model {str(base)!r} (named in {out / 'debias' / 'report.json'})" in line
    assert "weights its edit never touched" in line and "pass --base_model" in line


def test_recorded_base_files_that_changed_are_refused_before_loading(export, capsys, monkeypatch):
    from debias.json_store import dir_hashes

    out, base = export
    report = json.loads((out / "debias" / "report.json").read_text())
    report["base_model_files"] = dict(dir_hashes(base), **{"model.safetensors": "0" * 64})
    (out / "debias" / "report.json").write_text(json.dumps(report))
    monkeypatch.setattr("debias.commands.fit.build_cli", None)  # refused before any config or model is loaded
    (line,) = _eval(out, capsys)
    assert f"{out / 'debias' / 'report.json'} records base model {str(base)!r} with other files than {base}" in line
    assert "model.safetensors differ" in line


def test_eval_names_the_base_it_compares_against(export, capsys):
    out, base = export
    main(["eval", str(out), "--fit_config", TINY, "--suites", "false"])
    printed = capsys.readouterr().out
    assert (f"debias: eval: {out} against base model {str(base)!r} ({base}; named in "
            f"{out / 'debias' / 'report.json'})") in printed
    other = save_tiny_model(base.parent / "other", seed=1)
    # an explicit --base_model is the user's choice: named, not checked against the report
    main(["eval", str(out), "--fit_config", TINY, "--suites", "false", "--base_model", str(other)])
    assert f"debias: eval: {out} against base model {str(other)!r} ({other}; --base_model)" in capsys.readouterr().out


def test_an_out_that_is_a_directory_is_refused_before_evaluating(export, capsys, monkeypatch):
    out, _ = export
    monkeypatch.setattr("debias.commands.fit.build_cli", None)  # refused before any config or model is loaded
    (line,) = _eval(out, capsys, "--out", str(out.parent))
    assert line == f"debias: error: --out {out.parent} is a directory; expected the path of a JSON file to write"
