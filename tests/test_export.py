import json
from pathlib import Path

import pytest
import torch
from conftest import make_data, make_module, make_trainer
from transformers import AutoModelForCausalLM, AutoTokenizer

from debias.commands import main
from debias.edits.sparse import apply_delta
from debias.export import export

TINY = str(Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml")

REPORT_KEYS = {"base_model", "hook_name", "layer", "parameter", "features", "k", "before", "after"}
METRIC_KEYS = {"feature_act", "feature_fire_rate", "lm_loss", "kl", "bias_gap", "cue_margin"}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("train")
    module = make_module()
    make_trainer(tmp, max_steps=6).fit(module, datamodule=make_data())
    return module


def _logits(model, tok, text="My sister, a carpenter, said that"):
    with torch.no_grad():
        return model(**tok([text], return_tensors="pt")).logits


def test_export_reloads_both_ways_with_the_trained_logits(trained, tmp_path):
    run = {"before": {k: 1.0 for k in METRIC_KEYS}, "after": {k: 0.5 for k in METRIC_KEYS}}
    out = export(trained, tmp_path / "export", run)
    expected = _logits(trained.net, trained.tokenizer)

    merged = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    torch.testing.assert_close(_logits(merged, tok), expected, rtol=1e-5, atol=1e-5)

    from peft import PeftModel

    base = AutoModelForCausalLM.from_pretrained(trained.model_path)
    with_adapter = PeftModel.from_pretrained(base, out / "adapter")
    torch.testing.assert_close(_logits(with_adapter, tok), expected, rtol=1e-5, atol=1e-5)

    plain = apply_delta(AutoModelForCausalLM.from_pretrained(trained.model_path), out / "debias" / "delta.safetensors")
    torch.testing.assert_close(_logits(plain, tok), expected, rtol=1e-5, atol=1e-5)

    report = json.loads((out / "debias" / "report.json").read_text())
    assert REPORT_KEYS <= set(report) and METRIC_KEYS <= set(report["after"])
    assert report["k"] == trained.k and report["parameter"] == trained.parameter
    assert (out / "debias" / "delta.safetensors").stat().st_size < 4096
    assert (out / "README.md").read_text().startswith("---")


def test_merged_checkpoint_changes_exactly_the_trained_entries(trained, tmp_path):
    out = export(trained, tmp_path / "export", {"before": {}, "after": {}})
    base = AutoModelForCausalLM.from_pretrained(trained.model_path).get_parameter(trained.parameter)
    edited = AutoModelForCausalLM.from_pretrained(out).get_parameter(trained.parameter)
    changed = (base != edited).flatten().nonzero().flatten()
    assert changed.numel() == trained.changed_entries() > 0
    assert set(changed.tolist()) <= set(trained.mask.indices.tolist())


def test_export_refuses_a_non_empty_directory_and_leaves_nothing_half_written(trained, tmp_path, monkeypatch):
    target = tmp_path / "export"
    target.mkdir()
    (target / "keep.txt").write_text("a user's file")
    with pytest.raises(FileExistsError, match="not empty"):
        export(trained, target, {"before": {}, "after": {}})
    assert (target / "keep.txt").read_text() == "a user's file"

    import debias.export as ex

    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(ex, "model_card", broken)
    (target / "debias").mkdir()
    (target / "debias" / "report.json").write_text("{}")  # an earlier export: replaced with overwrite
    with pytest.raises(RuntimeError, match="disk full"):
        export(trained, target, {"before": {}, "after": {}}, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]  # no temporary directory left behind
    assert (target / "keep.txt").exists()  # the old export survives a failed overwrite


@pytest.mark.parametrize("what", ["a source tree", "a model", "a checkpoint's report elsewhere"])
def test_a_directory_that_is_not_an_export_is_never_replaced_even_with_overwrite(trained, tmp_path, capsys, what):
    target = tmp_path / "debias"
    target.mkdir()
    if what == "a source tree":  # the issue's `--export.export_dir debias` from the repository root
        (target / "__init__.py").write_text("# the package\n")
    elif what == "a model":
        (target / "config.json").write_text("{}")
    else:  # report.json, but not at debias/report.json
        (target / "report.json").write_text("{}")
    before = sorted(p.name for p in target.iterdir())
    with pytest.raises(FileExistsError, match=f"export directory {target} is not empty and is not a debias export"):
        export(trained, target, {"before": {}, "after": {}}, overwrite=True)
    with pytest.raises(SystemExit) as exit_:  # refused before the checkpoint or the config is read
        main(["export", TINY, str(tmp_path / "none.ckpt"), str(target), "--overwrite", "true"])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and len(err) == 1 and "even with overwrite" in err[0] and str(target) in err[0]
    assert sorted(p.name for p in target.iterdir()) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["debias"]  # no temporary directory left behind


def test_gpt2_export_has_no_adapter_but_a_delta(tmp_path):
    module = make_module(base_model="tiny-gpt2")
    make_trainer(tmp_path, max_steps=3).fit(module, datamodule=make_data())
    out = export(module, tmp_path / "export", {"before": {}, "after": {}})
    assert not (out / "adapter").exists()
    tok = AutoTokenizer.from_pretrained(out)
    torch.testing.assert_close(_logits(AutoModelForCausalLM.from_pretrained(out), tok),
                               _logits(module.net, module.tokenizer), rtol=1e-5, atol=1e-5)
