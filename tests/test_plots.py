"""The fit report's figure."""

import warnings

import torch

from debias.plots import report_figure, retention_figure, retention_frontier


def test_a_run_that_trained_nothing_gets_its_figure_without_a_legend_warning(tmp_path):
    acts = torch.rand(50)
    gaps = {"nurse": 1.0, "engineer": -0.5}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # matplotlib's "No artists with labels found to put in legend"
        out = report_figure(tmp_path / "report.png", {}, acts, acts * 0.5, gaps, gaps, title="steering_vector")
    assert out.stat().st_size > 1000



def _curve(method, kl, kept, removal):
    return {"point": "curve", "objective": "default", "method": method, "kl": kl, "factual_kept": kept,
            "statement_gap_reduction": removal}


def test_the_retention_frontier_drops_every_point_another_beats_on_both():
    points = [(95.0, 10.0), (90.0, 30.0), (92.0, 5.0), (85.0, 25.0), (80.0, 40.0)]
    assert retention_frontier(points) == [(95.0, 10.0), (90.0, 30.0), (80.0, 40.0)]


def test_the_retention_figure_keeps_points_within_the_kl_budget_and_needs_both_numbers():
    over_budget = [_curve("random", 0.02, 0.9, 0.5)]
    assert retention_figure(over_budget, max_kl=0.01) is None
    assert retention_figure([{**_curve("random", 0.001, 0.9, 0.5), "factual_kept": None}]) is None
    png = retention_figure(over_budget + [_curve("random", 0.001, 0.9, 0.2), _curve("bias_gradient", 0.004, 0.85,
                                                                                      0.4)], max_kl=0.01)
    assert png is not None and png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000
