"""`debias compare` cells as curves: the edit scaled exactly and restored, the matched-KL point chosen on the
validation split only, "does not reach", finished points not recomputed on resume, and the bad-input errors."""

import csv
import json
import os
from pathlib import Path

import pytest
import torch
from conftest import make_data, make_module
from safetensors.torch import load_file

import debias.commands.compare.cell as cell_module
from debias.commands import main
from debias.commands.compare.cell import Shared, match
from debias.commands.compare.frontier import FrontierSettings, load_snapshots, save_snapshots
from debias.commands.compare.matched import anchored, choose, crossing
from debias.commands.compare.points import PointStore
from debias.commands.compare.rows import pool_matched
from debias.commands.compare.run import compare_command
from debias.edits import registry
from debias.edits.scaling import check_alpha, scaled

TINY = str(Path(__file__).parents[1] / "configs" / "tiny.yaml")
SCALED = ["instability", "dense", "lora", "sae_clamp", "steering_vector"] + [
    m for m in ("feature_projection",) if m in registry.METHODS]


@pytest.fixture(scope="module")
def data():
    return make_data()


def _edited(method: str, data):
    """A prepared tiny module whose edit is not zero (a trained edit's values, LoRA's B, start at 0)."""
    module = make_module(method=method)
    module.prepare(data)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in module.delta.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=gen))
    return module


def _logits(module, texts):
    with torch.no_grad():
        return module.net(**module.tokenize(texts)).logits


@pytest.mark.parametrize("method", SCALED)
def test_scaling_is_exact_at_0_and_1_moves_in_between_and_restores(method, data):
    module = _edited(method, data)
    texts = data.texts["bias_train"][:4]
    built = _logits(module, texts)
    with module.delta.disabled():
        original = _logits(module, texts)
    state = module.delta.trainable_state()
    assert not torch.equal(built, original)  # the edit does something to these texts
    with scaled(module.delta, 0.0):
        assert torch.equal(_logits(module, texts), original)  # α = 0 is the original model, bit for bit
    with scaled(module.delta, 1.0):
        assert torch.equal(_logits(module, texts), built)
    with scaled(module.delta, 0.5):
        half = _logits(module, texts)
    assert not torch.equal(half, built) and not torch.equal(half, original)
    with pytest.raises(RuntimeError, match="inside the block"), scaled(module.delta, 1.5):
        raise RuntimeError("inside the block")
    assert torch.equal(_logits(module, texts), built)  # restored, after an error too
    after = module.delta.trainable_state()
    assert after.keys() == state.keys() and all(torch.equal(after[k], state[k]) for k in state)


@pytest.mark.parametrize("method", [m for m in SCALED if registry.get(m).kind != "inference"])
def test_a_scaled_weight_edit_adds_alpha_times_its_delta(method, data):
    module = _edited(method, data)
    layer = module.net.get_submodule(module.parameter.removesuffix(".weight"))
    x = torch.randn(5, layer.base_layer.weight.shape[1], generator=torch.Generator().manual_seed(1))  # [out, in]
    with torch.no_grad():
        outputs = {}
        for alpha in (0.0, 1.0, 0.3, 1.7):
            with scaled(module.delta, alpha):
                outputs[alpha] = layer(x)
    delta = outputs[1.0] - outputs[0.0]
    assert delta.abs().max() > 0
    for alpha in (0.3, 1.7):
        torch.testing.assert_close(outputs[alpha] - outputs[0.0], alpha * delta, rtol=1e-4, atol=1e-6)
    if method in ("instability", "dense"):  # the trained values themselves, × α exactly
        values = module.delta.values.detach().clone()
        with scaled(module.delta, 0.3):
            assert torch.equal(module.delta.values, values * 0.3)


@pytest.mark.parametrize("method", ["sae_clamp", "steering_vector"])
def test_an_intervention_at_strength_alpha_moves_alpha_of_the_way(method, data):
    module = _edited(method, data)
    intervention = module.delta.intervention
    acts = torch.randn(2, 3, module.sae.cfg.d_in, generator=torch.Generator().manual_seed(2))
    full = intervention.fn(acts)
    with scaled(module.delta, 0.25):
        quarter = intervention.fn(acts)
    torch.testing.assert_close(quarter, acts + 0.25 * (full - acts), rtol=1e-5, atol=1e-6)
    assert torch.equal(intervention.fn(acts), full) and intervention.strength == 1.0


@pytest.mark.parametrize("alpha", [float("nan"), float("inf"), "1", True, None])
def test_a_scale_must_be_a_finite_number(alpha):
    with pytest.raises(ValueError, match="scale α must be a finite number"):
        check_alpha(alpha)


def test_snapshots_round_trip_and_an_unreadable_file_means_train_again(tmp_path):
    states = {0: {}, 20: {"indices": torch.arange(4), "values": torch.tensor([0.5, -1.0, 0.0, 2.0])},
              40: {"indices": torch.arange(4), "values": torch.tensor([1.5, -2.0, 0.25, 3.0])}}
    save_snapshots(tmp_path / "snapshots.safetensors", states)
    loaded = load_snapshots(tmp_path / "snapshots.safetensors")
    assert sorted(loaded) == [0, 20, 40] and loaded[0] == {}
    assert all(torch.equal(loaded[s][k], states[s][k]) for s in (20, 40) for k in states[s])
    (tmp_path / "cut.safetensors").write_bytes((tmp_path / "snapshots.safetensors").read_bytes()[:20])
    assert load_snapshots(tmp_path / "cut.safetensors") is None and load_snapshots(tmp_path / "none") is None
    os.mkfifo(tmp_path / "fifo.safetensors")  # never opened: the open would wait for a writer
    assert load_snapshots(tmp_path / "fifo.safetensors") is None
    assert FrontierSettings(snapshot_every=20).steps(40) == [20, 40] and FrontierSettings().steps(30) == [30]
    assert FrontierSettings().evaluations(40) == 1 * 3 * 2 + 2  # the defaults: 8 per trained cell


# ----- matched KL: interpolation and the choice, on validation only -----
ANCHOR = {"val_kl": 0.0, "val_gap_reduction": 0.0, "val_cue_kept": 1.0}


def _point(alpha, val_kl, val_gap, heldout_gap=0.0):
    return {"alpha": alpha, "val_kl": val_kl, "val_gap_reduction": val_gap, "val_cue_kept": 1 - alpha / 10,
            "kl": val_kl, "gap_reduction": heldout_gap}


def test_crossing_is_piecewise_linear_in_alpha_from_the_anchor():
    curve = anchored([_point(1.0, 0.006, 0.5), _point(0.5, 0.002, 0.2)], ANCHOR)  # any order: sorted by α
    alpha, values = crossing(curve, 0.004)
    assert alpha == pytest.approx(0.75) and values["val_gap_reduction"] == pytest.approx(0.35)
    assert values["val_kl"] == 0.004 and values["val_cue_kept"] == pytest.approx(0.925)
    alpha, values = crossing(curve, 0.001)  # between the original model (α = 0) and the first point
    assert alpha == pytest.approx(0.25) and values["val_gap_reduction"] == pytest.approx(0.1)
    assert crossing(curve, 0.006)[0] == pytest.approx(1.0)
    assert crossing(curve, 0.0061) is None  # beyond the curve: this snapshot does not reach it


def test_the_snapshot_is_chosen_by_validation_even_where_heldout_disagrees():
    # step 10 looks better on the held-out split, step 20 on the validation split
    curves = {10: anchored([_point(1.0, 0.02, 0.3, heldout_gap=0.9)], ANCHOR),
              20: anchored([_point(1.0, 0.02, 0.6, heldout_gap=0.1)], ANCHOR)}
    choice = choose(curves, 0.01)
    assert (choice.step, choice.alpha) == (20, pytest.approx(0.5))
    assert choice.validation["val_gap_reduction"] == pytest.approx(0.3) and "gap_reduction" not in choice.validation
    assert choose(curves, 0.03) is None  # no snapshot reaches it


def test_match_reads_only_validation_numbers_and_reuses_a_saved_choice(tmp_path, monkeypatch):
    original = {"kl": 0.0, "bias_gap": 1.0, "cue_margin": 1.0, "score": 1.0}

    def point(step, val_gap, heldout_gap):
        return {"step": step, "alpha": 1.0, "seconds": 0.0,
                "validation": {"kl": 0.02, "bias_gap": val_gap, "cue_margin": 0.9, "score": val_gap},
                "heldout": {"kl": 0.02, "bias_gap": heldout_gap, "cue_margin": 0.9}}

    points = [point(1, val_gap=0.7, heldout_gap=0.1), point(2, val_gap=0.4, heldout_gap=0.9)]
    evaluated = []
    monkeypatch.setattr(cell_module, "_evaluate_choice", lambda module, data, states, shared, choice, suites:
                        evaluated.append(choice) or {"level": choice.level, "reached": True, "step": choice.step,
                                                     "alpha": choice.alpha, "suites": suites, "seconds": 0.0})
    store = PointStore(tmp_path / "points.json", {"cell": "x"})
    settings = FrontierSettings(alphas=(1.0,), kl_levels=(0.01, 0.05), suite_levels=(0.01,))
    matched = match(None, None, {1: None, 2: None}, store, settings, Shared(validation=original), points)
    assert [(c.step, c.alpha) for c in evaluated] == [(2, pytest.approx(0.5))]  # validation's choice, not held-out's
    assert matched["0.05"] == {"level": 0.05, "reached": False}
    again = match(None, None, {1: None, 2: None}, PointStore(tmp_path / "points.json", {"cell": "x"}), settings,
                  Shared(validation=original), points)
    assert len(evaluated) == 1 and again["0.01"]["step"] == 2  # the saved matched point is not evaluated again


def test_one_seed_gets_the_bootstrap_interval_several_get_students_t():
    def row(cell, seed, gap, lo=None, hi=None, reached=True):
        return {"cell": cell, "method": "m", "k": 5, "rank": None, "objective": "default", "seed": seed,
                "point": "matched", "level": 0.01, "reached": reached, "step": 2, "alpha": 0.5, "gap_reduction": gap,
                "gap_reduction_lo": lo, "gap_reduction_hi": hi, "kl": 0.012}

    (one,) = pool_matched([row("m-k5", None, 0.4, 0.3, 0.5)])
    assert one["gap_reduction"] == {"mean": 0.4, "n": 1, "sd": None, "lo": 0.3, "hi": 0.5, "interval": "bootstrap"}
    (three,) = pool_matched([row("m-k5-seed0", 0, 0.2), row("m-k5-seed1", 1, 0.4), row("m-k5-seed2", 2, None,
                                                                                        reached=False)])
    gap = three["gap_reduction"]
    assert (three["n"], three["reached"], gap["interval"]) == (3, 2, "seeds")  # over the seeds that reach it
    assert gap["mean"] == pytest.approx(0.3) and gap["hi"] - gap["mean"] == pytest.approx(12.706 * 0.1, rel=1e-3)


# ----- bad input: one line, before any model loads -----
@pytest.mark.parametrize("kwargs, message", [
    (dict(alphas=[]), "--alphas is empty; expected one or more finite scales > 0"),
    (dict(alphas=[0.5, float("nan")]), "--alphas holds nan; expected finite scales > 0"),
    (dict(alphas=[float("inf")]), "--alphas holds inf; expected finite scales > 0"),
    (dict(alphas=[1.0, 1e30]), "--alphas holds 1e+30; expected finite scales > 0, at most 10 (a larger α·Δ"),
    (dict(alphas=[10.5]), "--alphas holds 10.5; expected finite scales > 0, at most 10"),
    (dict(alphas=[0.0, 1.0]), "--alphas holds 0.0; expected finite scales > 0 (α = 0, the original model"),
    (dict(kl_levels=[0.0]), "--kl_levels holds 0.0; expected finite KLs > 0"),
    (dict(kl_levels=[0.01, -0.003]), "--kl_levels holds -0.003; expected finite KLs > 0"),
    (dict(kl_levels=[float("nan")]), "--kl_levels holds nan; expected finite KLs > 0"),
    (dict(snapshot_every=0), "--snapshot_every must be a whole number of steps >= 1, got 0"),
])
def test_bad_frontier_arguments_are_refused_before_any_model_loads(kwargs, message, monkeypatch, tmp_path):
    def no_model(*args, **kw):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr("debias.models.load.load_model", no_model)
    with pytest.raises(ValueError) as err:
        compare_command(TINY, out=str(tmp_path / "compare"), **kwargs)
    assert message in str(err.value)


@pytest.mark.parametrize("flag, value, message", [("--alphas", "[]", "--alphas is empty"),
                                                   ("--alphas", "[1e30]", "--alphas holds 1e+30; expected finite"),
                                                   ("--kl_levels", "[0.01, 0]", "--kl_levels holds 0.0")])
def test_the_cli_says_a_bad_frontier_argument_in_one_line(flag, value, message, capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_:
        main(["compare", TINY, "--out", str(tmp_path / "compare"), flag, value])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and len(err) == 1 and message in err[0] and err[0].startswith("debias: error:")


# ----- a tiny grid, interrupted in the middle of a cell's curve and resumed -----
LOW, HIGH = 1e-7, 10.0  # every tiny cell reaches the first on validation; none reaches the second


GRID = dict(methods=["random"], k=[20], seeds=[0, 1], objectives=False, steps=2, snapshot_every=1, alphas=[1.0],
            kl_levels=[LOW, HIGH], suite_levels=[])


def test_a_point_with_a_non_finite_number_is_refused_and_a_stored_one_evaluated_again(tmp_path):
    store = PointStore(tmp_path / "cell" / "points.json", {"k": 1})
    with pytest.raises(ValueError, match=r"^the edit of cell at step 2, α=1e\+30 gives non-finite "
                                         r"validation.bias_gap_ci\[0\], heldout.kl: a blown-up edit"):
        store.add(2, {"alpha": 1e30, "validation": {"kl": 0.1, "bias_gap_ci": [float("nan"), 1.0]},
                      "heldout": {"kl": float("inf")}, "seconds": 1.0})
    assert not (tmp_path / "cell" / "points.json").exists() and store.get(2, 1e30) is None
    store.add(2, {"alpha": 1.0, "validation": {"kl": 0.1}, "heldout": {"kl": 0.2}, "seconds": 1.0})
    saved = json.loads((tmp_path / "cell" / "points.json").read_text())
    saved["points"]["2:1.0"]["heldout"]["kl"] = float("nan")  # damaged on disk: not a finished point
    (tmp_path / "cell" / "points.json").write_text(json.dumps(saved))
    assert PointStore(tmp_path / "cell" / "points.json", {"k": 1}).get(2, 1.0) is None


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    out = tmp_path_factory.mktemp("frontier") / "compare"
    args = dict(GRID, out=str(out))
    real_evaluate, real_train = cell_module.evaluate_point, cell_module._train
    calls: dict[str, list] = {"evaluated": [], "trained": []}

    def evaluate(*a, **kw):
        if len(calls["evaluated"]) == 3:  # the second point of the second cell (the first cell has two)
            raise KeyboardInterrupt
        calls["evaluated"].append(a[-1])
        return real_evaluate(*a, **kw)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cell_module, "_train", lambda cli, cell, *a: calls["trained"].append(cell.name)
                   or real_train(cli, cell, *a))
        mp.setattr(cell_module, "evaluate_point", evaluate)
        with pytest.raises(KeyboardInterrupt):
            compare_command(TINY, **args)
        first = {k: list(v) for k, v in calls.items()}
        for v in calls.values():
            v.clear()
        mp.setattr(cell_module, "evaluate_point", lambda *a, **kw: calls["evaluated"].append(a[-1])
                   or real_evaluate(*a, **kw))
        compare_command(TINY, **args)
    return out, first, calls


def _csv_rows(out: Path) -> list[dict]:
    return list(csv.DictReader((out / "results.csv").read_text().splitlines()))


def test_resume_trains_no_finished_cell_and_evaluates_no_finished_point(grid):
    out, first, second = grid
    assert first == {"trained": ["random-k20-seed0", "random-k20-seed1"], "evaluated": [1.0, 1.0, 1.0]}
    assert second == {"trained": [], "evaluated": [1.0]}  # the interrupted cell: not trained again, one point left
    saved = json.loads((out / "random-k20-seed1" / "points.json").read_text())
    assert sorted(saved["points"]) == ["1:1.0", "2:1.0"]


def test_every_point_is_a_row_and_alpha_1_at_the_last_step_is_the_trained_cell(grid):
    out, _, _ = grid
    rows = _csv_rows(out)
    curve = [r for r in rows if r["point"] == "curve"]
    assert len(curve) == 4 and {(r["step"], r["alpha"]) for r in curve} == {("1", "1.0"), ("2", "1.0")}
    assert all(r["val_kl"] and r["val_gap_reduction"] and r["kl"] and r["gap_reduction"] for r in curve)
    assert len([r for r in rows if r["point"] == "matched"]) == 4
    for name in ("random-k20-seed0", "random-k20-seed1"):
        saved = json.loads((out / "cells" / f"{name}.json").read_text())
        last = next(p for p in saved["points"] if p["step"] == 2 and p["alpha"] == 1.0)["heldout"]
        after = saved["report"]["after"]  # what the fit itself evaluated after its last step
        for key in ("bias_gap", "bias_gap_ci", "kl", "lm_loss", "cue_margin", "feature_act", "statement_gap"):
            assert last[key] == after[key], (name, key)


def test_matched_points_are_pooled_over_seeds_and_a_level_out_of_reach_says_so(grid):
    out, _, _ = grid
    summary = json.loads((out / "results.json").read_text())
    matched = {(e["group"], e["level"]): e for e in summary["matched"]}
    random = matched[("random-k20", LOW)]
    assert (random["n"], random["reached"], random["gap_reduction"]["interval"]) == (2, 2, "seeds")
    assert random["gap_reduction"]["lo"] < random["gap_reduction"]["mean"] < random["gap_reduction"]["hi"]
    assert matched[("random-k20", HIGH)]["reached"] == 0 and matched[("random-k20", HIGH)]["gap_reduction"] is None
    text = (out / "results.md").read_text()
    assert "| random-k20 | 0 of 2 | does not reach |" in text and "| random-k20 | 2 of 2 | " in text
    assert "UNFINISHED" not in text and not summary["unfinished"]
    assert summary["evaluations_per_trained_cell"] == 2 * 2 * 1 + 2
    assert (out / "pareto.png").stat().st_size > 1000
    curve = [r for r in _csv_rows(out) if r["point"] == "curve"]
    has_both = any(r["statement_gap_reduction"] and r["factual_kept"] and float(r["kl"]) <= HIGH for r in curve)
    assert (out / "retention.png").exists() == has_both  # statements against factual kept, where the spec has both
    rows = [r for r in _csv_rows(out) if r["point"] == "matched" and r["reached"] == "True"]
    assert len(rows) == 2 and all(float(r["val_kl"]) == LOW for r in rows)  # chosen on the validation level ...
    assert all(float(r["kl"]) != LOW for r in rows)  # ... and evaluated on held-out text there


def test_the_seed_draws_the_random_mask_and_orders_the_data(grid):
    out, _, _ = grid
    masks = [load_file(str(out / "masks" / f"random-k20-seed{s}.safetensors"))["indices"] for s in (0, 1)]
    assert not torch.equal(masks[0], masks[1])
    for seed in (0, 1):
        overrides = json.loads((out / "cells" / f"random-k20-seed{seed}.json").read_text())["cell"]["overrides"]
        assert f"--data.shuffle_seed={seed}" in overrides and f"--model.edit.mask_seed={seed}" in overrides


@pytest.mark.parametrize("damage", ["{\"a\": 1}", "[1, 2, 3]", "{\"cell\": {\"overrides\": 3}}"])
def test_a_finished_cell_record_of_the_wrong_shape_runs_that_cell_again(grid, monkeypatch, capsys, damage):
    import debias.commands.compare.run as run_module

    out, _, _ = grid
    record = out / "cells" / "random-k20-seed0.json"
    good = json.loads(record.read_text())
    record.write_text(damage)
    real_run_cell, ran = run_module.run_cell, []
    monkeypatch.setattr(run_module, "run_cell", lambda cell, *a, **kw: ran.append(cell.name)
                        or real_run_cell(cell, *a, **kw))
    capsys.readouterr()
    compare_command(TINY, **GRID, out=str(out))
    assert ran == ["random-k20-seed0"]  # trained and evaluated before: read back from its points, nothing redone
    assert f"debias: warning: the finished-cell record {record} is not one debias compare writes" in \
        capsys.readouterr().err
    again = json.loads(record.read_text())
    assert again["points"] == good["points"] and again["cell"] == good["cell"]
