"""The export's model card: `huggingface_hub.ModelCard` metadata that loads back, from a report and from a fit."""

import json

import pytest
from conftest import make_data, make_module, make_trainer
from huggingface_hub import ModelCard

from debias.model_card import model_card

HELD = {"feature_act": 2.0, "lm_loss": 3.0, "kl": 0.0, "bias_gap": 1.5, "cue_margin": 2.5}


def _report(**overrides) -> dict:
    report = {"base_model": "/nowhere/smollm2-135m", "base_model_spec": "smollm2-135m", "bias": "religion",
              "method": "instability", "hook_name": "blocks.24.hook_mlp_out", "layer": 24,
              "parameter": "model.layers.24.mlp.down_proj.weight", "parameters": None, "k": 88, "numel": 884736,
              "mask_strategy": "gradient", "features": [3, 7], "changed_entries": 80, "changed_parameters": 88,
              "before": {**HELD, "stereoset": {"ss": 61.0, "abs_ss_minus_50": 11.0, "lms": 90.0, "n": 157}},
              "after": {**HELD, "kl": 0.01, "bias_gap": 0.5, "nan_metric": float("nan"),
                        "stereoset": {"ss": 55.0, "abs_ss_minus_50": 5.0, "lms": 89.0, "n": 157},
                        "crows_pairs": {"stereo_pct": 52.0, "abs_pct_minus_50": 2.0, "n": 92}}}
    report.update(overrides)
    return report


def _load(report: dict, tmp_path) -> ModelCard:
    model_card(report).save(tmp_path / "README.md")
    return ModelCard.load(tmp_path / "README.md")


def test_metadata_round_trips_with_the_axis_the_method_and_the_after_results(tmp_path):
    data = _load(_report(), tmp_path).data
    assert data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct" and data.license == "apache-2.0"
    assert data.tags[:3] == ["debias", "religion", "instability"]
    results = {(r.dataset_type, r.metric_type): r for r in data.eval_results}
    assert results[("debias-heldout", "bias_gap")].metric_value == 0.5  # after, not before (1.5)
    assert results[("debias-heldout", "kl")].metric_value == 0.01
    assert results[("McGill-NLP/stereoset", "ss")].metric_value == 55.0
    assert results[("McGill-NLP/stereoset", "ss")].dataset_config == "religion"
    assert results[("nyu-mll/crows_pairs", "stereo_pct")].metric_value == 52.0
    assert ("debias-heldout", "nan_metric") not in results and ("debias-heldout", "feature_fire_rate") not in results
    assert data.model_name == "debiased-smollm2-135m"


def test_body_keeps_the_before_after_table(tmp_path):
    text = _load(_report(), tmp_path).text
    assert "| bias_gap | 1.5000 | 0.5000 |" in text and "| stereoset.ss | 61.0000 | 55.0000 |" in text
    assert "bias axis `religion`" in text and "(apache-2.0)" in text


def test_a_local_base_gives_its_cards_licence_and_no_hub_id(tmp_path):
    base = tmp_path / "base"
    base.mkdir()
    (base / "README.md").write_text("---\nlicense: mit\nbase_model: someone/else\n---\n# a model\n")
    data = _load(_report(base_model=str(base), base_model_spec=str(base), before={}, after={}), tmp_path).data
    assert data.license == "mit" and data.base_model is None  # the directory's own base is not this model's base
    assert data.eval_results is None


@pytest.mark.parametrize("spec, hub_id", [("HuggingFaceTB/SmolLM2-360M", "HuggingFaceTB/SmolLM2-360M"),
                                          ("./runs/export", None)])
def test_a_hub_id_is_the_base_model_and_a_path_is_not(tmp_path, spec, hub_id):
    data = _load(_report(base_model=spec, base_model_spec=spec, bias=None), tmp_path).data
    assert data.base_model == hub_id and data.license is None
    assert data.tags[:2] == ["debias", "instability"]  # no axis in the report: no axis tag


@pytest.mark.usefixtures("one_thread")
def test_a_fit_export_card_carries_the_bias_axis(tmp_path):
    from debias.callbacks import ReportAndExport

    callback = ReportAndExport(export_dir=str(tmp_path / "export"), completions=0, plots=False)
    make_trainer(tmp_path, max_steps=2, callbacks=[callback]).fit(make_module(), datamodule=make_data())
    report = json.loads((tmp_path / "export" / "debias" / "report.json").read_text())
    assert report["bias"] == "gender"
    data = ModelCard.load(tmp_path / "export" / "README.md").data
    assert data.tags[:3] == ["debias", "gender", report["method"]]
    assert {r.metric_type for r in data.eval_results} >= {"bias_gap", "kl", "lm_loss"}
