"""`debias compare`: the grid's cells, its argument checks, and a tiny grid that is interrupted and resumed.
The cells' curves (snapshots × α, matched KL) are tested in tests/test_frontier.py."""

import csv
import json
from pathlib import Path

import pytest
from conftest import assert_export_consistent

import debias.commands.compare.run
import debias.evaluation.evaluate
from debias.commands.compare.grid import check_request, entry_counts, plan
from debias.commands.compare.run import compare_command

TINY = str(Path(__file__).parents[1] / "configs" / "tiny.yaml")


def test_cells_are_named_by_entry_count_seed_rank_and_objective():
    names = [c.name for c in plan(["instability", "random", "dense", "lora", "sae_clamp"], [88, 884], 884,
                                  seeds=[0, 1], lora_ranks=[1, 8], objectives=True, seeded=["random"])]
    assert names[:6] == ["instability-k88", "instability-k884", "random-k88-seed0", "random-k88-seed1",
                         "random-k884-seed0", "random-k884-seed1"]
    assert {"dense", "lora-r1", "lora-r8", "instability-k884-obj-feature", "random-k884-seed0-obj-ablation"} <= set(names)
    assert names[-1] == "sae_clamp"  # inference-time methods last: they need no training
    assert len(names) == len(set(names))


def test_a_cell_gets_the_grid_s_mask_or_its_own_k_and_a_seed_orders_its_data():
    from debias.commands.compare.grid import GRID_METHODS, Cell, cell_overrides, kind, shares_mask

    shared = cell_overrides(Cell("random-k20-seed1", "random", 20, 1), [3], Path("masks/random-k20-seed1.safetensors"))
    assert "--model.edit.mask_path=masks/random-k20-seed1.safetensors" in shared
    assert {"--model.edit.mask_seed=1", "--data.shuffle_seed=1"} <= set(shared)
    assert not any("edit.entries=" in a for a in shared)
    own = [m for m in GRID_METHODS if kind(m) == "mask" and not shares_mask(m)]  # ranked by what the grid lacks
    for method in own:
        args = cell_overrides(Cell(f"{method}-k20", method, 20), [3], None)
        assert "--model.edit.entries=20" in args and not any("mask_path" in a for a in args)


def test_by_default_every_one_matrix_mask_runs_once_per_seed():
    names = [c.name for c in plan(["instability", "bias_gradient", "lora", "sae_clamp"], [88], 88, seeds=[0, 1],
                                  lora_ranks=[8], objectives=False)]
    assert names == ["instability-k88-seed0", "instability-k88-seed1", "bias_gradient-k88-seed0",
                     "bias_gradient-k88-seed1", "lora-r8", "sae_clamp"]


def test_fractions_become_entry_counts():
    assert entry_counts([1e-4, 1e-3, 1e-2], 884_736) == [88, 884, 8847]
    assert entry_counts([20, 0.5], 100) == [20, 50]
    with pytest.raises(ValueError, match=r"k must be in \[1, 100\].*got 500"):
        entry_counts([500], 100)


def test_bad_requests_name_the_value(tmp_path):
    with pytest.raises(ValueError) as err:
        check_request(["instability", "magic"], [1.5], [0], [8])
    assert "unknown method 'magic'" in str(err.value) and "got 1.5" in str(err.value)
    with pytest.raises(ValueError, match=r"--k \[88\] was given, but none of the methods \['dense', 'lora'\] has a mask"):
        check_request(["dense", "lora"], [88], [0], [8])
    with pytest.raises(ValueError, match="ranks >= 1"):
        check_request(["lora"], None, [0], [0])
    with pytest.raises(ValueError, match=r"LoRA rank must be in \[1, 32\].*got 64"):
        compare_command(TINY, methods=["lora"], lora_ranks=[64], out=str(tmp_path / "compare"))
    assert not (tmp_path / "compare").exists()  # refused before anything is written
    with pytest.raises(ValueError, match=r"--seeded names 'lora', which is not among the grid's methods"):
        check_request(["random"], None, [0], [8], seeded=["lora"])


def test_a_repeated_layer_is_refused_before_any_model_loads(monkeypatch, tmp_path):
    def no_model(*args, **kw):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr("debias.models.load.load_model", no_model)
    with pytest.raises(ValueError, match=r"model.edit.layers=\[1, 1\] repeats layer 1; expected each layer at most"):
        compare_command(TINY, methods=["instability"], overrides=["--model.edit.layers=[1,1]"],
                        out=str(tmp_path / "compare"))


@pytest.mark.parametrize("layers, message", [
    ("[1,7]", r"layer 7 is outside the model \(expected 0 <= i < 3, the model's number of layers\)"),
    ("[0,1]", r"model.edit.layers=\[0, 1\]: each mask row .* but \['lora', 'instability_3layers'\] edit one matrix")])
def test_a_layer_list_the_grid_cannot_run_is_refused_before_any_mask(layers, message, tmp_path):
    out = tmp_path / "compare"
    with pytest.raises(ValueError, match=message):
        compare_command(TINY, methods=["instability", "lora", "instability_3layers"],
                        overrides=[f"--model.edit.layers={layers}"], out=str(out))
    assert not out.exists()


def test_under_a_joint_mask_config_the_default_rows_are_the_masks(tmp_path, monkeypatch, capsys):
    def stop(*a, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(debias.commands.compare.run, "run_cell", stop)  # grid.json is written before any cell runs
    with pytest.raises(KeyboardInterrupt):
        compare_command(TINY, k=[20], seeds=[0], overrides=["--model.edit.layers=[0,1]"], out=str(tmp_path))
    cells = json.loads((tmp_path / "grid.json").read_text())["cells"]
    assert cells == ["instability-k20-seed0", "bias_gradient-k20-seed0", "feature_effect-k20-seed0",
                     "random-k20-seed0", "random_features-k20-seed0"]
    assert "the mask rows ['instability', 'bias_gradient'" in capsys.readouterr().err


def test_under_a_joint_mask_config_each_mask_row_ranks_its_own_mask_over_the_config_s_layers(tmp_path):
    out = tmp_path / "compare"
    compare_command(TINY, methods=["bias_gradient"], k=[20], seeds=[0], objectives=False, steps=2,
                    alphas=[1.0], kl_levels=[1e-7], suite_levels=[], overrides=["--model.edit.layers=[0,1]"],
                    out=str(out))
    assert not list(out.glob("masks/*"))  # no shared one-matrix mask: each cell's fit ranks its own
    report = json.loads((out / "bias_gradient-k20-seed0" / "export" / "debias" / "report.json").read_text())
    assert report["k"] == 20 and len(report["parameters"]) == 2, report.get("parameters")


def _rows(out: Path) -> list[dict]:
    lines = [ln for ln in (out / "results.csv").read_text().splitlines() if not ln.startswith("#")]
    return list(csv.DictReader(lines))


def test_tiny_grid_is_atomic_resumable_and_exports_each_weight_edit(tmp_path, monkeypatch):
    out = tmp_path / "compare"
    low, clamp_level = 1e-7, 5e-4  # every tiny cell reaches the first; sae_clamp the second (its KL is ~1e-3)
    args = dict(methods=["instability", "random", "lora", "sae_clamp"], k=[20], seeds=[0], seeded=["random"], lora_ranks=[1],
                objectives=False, steps=2, alphas=[1.0], kl_levels=[low, clamp_level], suite_levels=[clamp_level],
                out=str(out))
    real_run_cell, calls = debias.commands.compare.run.run_cell, []

    def interrupted(cell, *a, **kw):
        if cell.name == "lora-r1":
            raise KeyboardInterrupt
        calls.append(cell.name)
        return real_run_cell(cell, *a, **kw)

    monkeypatch.setattr(debias.commands.compare.run, "run_cell", interrupted)
    with pytest.raises(KeyboardInterrupt):
        compare_command(TINY, **args)
    assert calls == ["instability-k20", "random-k20-seed0"]
    assert (out / "results.md").read_text().startswith("UNFINISHED: 2 of 4 cells")
    assert (out / "results.csv").read_text().startswith("# UNFINISHED")
    assert [r["point"] for r in _rows(out)] == ["curve", "matched", "matched"] * 2  # 1 snapshot × 1 α, 2 levels

    calls.clear()
    monkeypatch.setattr(debias.commands.compare.run, "run_cell", lambda cell, *a, **kw: calls.append(cell.name) or real_run_cell(cell, *a, **kw))
    real_evaluate, originals = debias.evaluation.evaluate.evaluate_model, []
    monkeypatch.setattr(debias.evaluation.evaluate, "evaluate_model", lambda *a, edited=True, suites=False, **kw:
                        originals.append((edited, suites)) or real_evaluate(*a, edited=edited, suites=suites, **kw))
    compare_command(TINY, **args)
    assert calls == ["lora-r1", "sae_clamp"]  # finished cells are not redone
    # the original model's held-out numbers come from the first invocation; it is scored once more, with the suites,
    # when the first matched point that needs them (sae_clamp's) is evaluated
    assert [s for s in originals if not s[0]] == [(False, True)]
    rows = {r["cell"]: r for r in _rows(out) if r["point"] == "matched" and float(r["level"]) == low}
    assert set(rows) == {"instability-k20", "random-k20-seed0", "lora-r1", "sae_clamp"}
    assert all(r["reached"] == "True" and not r["crows_n"] for r in rows.values())  # no suites at this level
    assert int(rows["instability-k20"]["changed_parameters"]) == 20 and int(rows["sae_clamp"]["changed_parameters"]) == 0
    (clamp_row,) = [r for r in _rows(out) if r["cell"] == "sae_clamp" and r["level"] and float(r["level"]) == clamp_level]
    assert float(clamp_row["crows_n"]) == 127 and float(clamp_row["stereoset_n"]) == 497  # suites at the matched point
    assert all(not r["crows_n"] for r in _rows(out) if r["point"] == "curve")  # ... and never along a curve
    assert json.loads((out / "before.json").read_text())["stereoset"]["n"] == 497
    assert "UNFINISHED" not in (out / "results.md").read_text() and (out / "pareto.png").stat().st_size > 1000
    for name in ("instability-k20", "random-k20-seed0"):
        assert (out / name / "export" / "debias" / "mask.safetensors").is_file()
        assert (out / name / "export" / "model.safetensors").is_file()
    assert (out / "lora-r1" / "export" / "adapter" / "adapter_config.json").is_file()
    for name in ("instability-k20", "random-k20-seed0", "lora-r1"):  # merged = base + adapter = apply_delta(base)
        export = out / name / "export"
        forms = assert_export_consistent(export, json.loads((export / "debias" / "report.json").read_text())["base_model"])
        assert set(forms) == ({"merged", "adapter"} if name == "lora-r1" else {"merged", "adapter", "delta"})
    assert "method: lora" in (out / "lora-r1" / "config.yaml").read_text()  # each cell's resolved config
    assert not (Path.cwd() / "config.yaml").exists()
    assert not (out / "lora-r1" / "export" / "debias" / "mask.safetensors").exists()
    clamp = json.loads((out / "sae_clamp" / "report.json").read_text())
    assert "cannot become a plain checkpoint" in clamp["checkpoint"] and not (out / "sae_clamp" / "export").exists()
    before = {r["gap_before"] for r in rows.values()}
    assert len(before) == 1  # one base model, evaluated once, for every cell


def test_the_multilayer_row_spans_the_sae_layer_and_those_below_inside_the_model():
    from debias.commands.compare.grid import Cell, cell_overrides, shares_mask
    from debias.edits.registry import grid_layers

    assert grid_layers("instability_3layers", 24, 30) == [22, 23, 24]
    assert grid_layers("instability_3layers", 1, 3) == [0, 1]  # offsets outside the model are dropped
    assert grid_layers("instability", 24, 30) is None
    with pytest.raises(ValueError, match=r"grid row 'instability_3layers' spans the SAE layer 0 .* leave \[0\]"):
        grid_layers("instability_3layers", 0, 3)
    assert not shares_mask("instability_3layers")  # its cell ranks its own joint mask, with the grid's total k
    args = cell_overrides(Cell("instability_3layers-k20", "instability_3layers", 20), [3], None, [0, 1])
    assert {"--model.edit.method=instability", "--model.edit.layers=[0, 1]", "--model.edit.entries=20"} <= set(args)


def test_a_multilayer_cell_trains_one_joint_mask_of_the_grid_s_k(tmp_path):
    out = tmp_path / "compare"
    compare_command(TINY, methods=["instability_3layers"], k=[20], objectives=False, steps=2, alphas=[1.0],
                    kl_levels=[1e-7], suite_levels=[], out=str(out))
    (row,) = [r for r in _rows(out) if r["point"] == "matched"]
    assert row["cell"] == "instability_3layers-k20" and row["reached"] == "True"
    report = json.loads((out / "instability_3layers-k20" / "export" / "debias" / "report.json").read_text())
    assert report["k"] == 20 and len(report["parameters"]) == 2, report.get("parameters")
