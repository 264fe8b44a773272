"""The fit report's figure."""

import warnings

import torch

from debias.plots import report_figure


def test_a_run_that_trained_nothing_gets_its_figure_without_a_legend_warning(tmp_path):
    acts = torch.rand(50)
    gaps = {"nurse": 1.0, "engineer": -0.5}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # matplotlib's "No artists with labels found to put in legend"
        out = report_figure(tmp_path / "report.png", {}, acts, acts * 0.5, gaps, gaps, title="steering_vector")
    assert out.stat().st_size > 1000

