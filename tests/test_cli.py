import json
from pathlib import Path

import pytest

from debias.commands import main
from debias.commands.fit import build_cli

CONFIGS = sorted(Path(__file__).parents[1].glob("configs/*.yaml"))
ROOT = Path(__file__).parents[1]

# Hub models and SAEs cannot download here: stand-ins of the same architecture and depth, SAEs of the same width.
STAND_INS = {
    "google/gemma-2-2b": ("gemma2", 26), "google/gemma-2-2b-it": ("gemma2", 26), "smollm2-135m": ("llama", 30),
}
SAE_STAND_INS = {
    ("gemma-scope-2b-pt-mlp-canonical", "layer_12/width_16k/canonical"): ("blocks.12.hook_mlp_out", 16384, "jumprelu"),
    ("gemma-scope-2b-pt-res", "layer_21/width_65k/average_l0_20"): ("blocks.21.hook_resid_post", 65536, "jumprelu"),
}


@pytest.fixture
def offline_stand_ins(monkeypatch, tmp_path):
    import debias.models.load
    import debias.sae.load
    from debias.models.load import LoadedModel
    from debias.models.tiny import tiny_model, tiny_sae, tiny_tokenizer

    real_load_model, real_load_sae = debias.models.load.load_model, debias.sae.load.load_sae

    def load_model(spec, dtype="float32", device="cpu"):
        if spec not in STAND_INS:
            return real_load_model(spec, dtype, device)
        family, layers = STAND_INS[spec]
        return LoadedModel(tiny_model(family, n_layers=layers), tiny_tokenizer(), spec, None)

    def load_sae(release, sae_id=None, **kwargs):
        if (release, sae_id) not in SAE_STAND_INS:
            return real_load_sae(release, sae_id, **kwargs)
        hook, width, arch = SAE_STAND_INS[(release, sae_id)]
        return tiny_sae(32, hook, d_sae=width, architecture=arch)

    def ensure_sae(model, tokenizer, model_id, settings=None, force=False):
        path = tmp_path_factory_dir / settings.hook_name
        tiny_sae(32, settings.hook_name, d_sae=256, architecture="topk").save_model(path)
        return path

    import debias.sae.build

    tmp_path_factory_dir = tmp_path
    monkeypatch.setattr(debias.sae.build, "ensure_sae", ensure_sae)
    monkeypatch.setattr(debias.models.load, "load_model", load_model)
    monkeypatch.setattr(debias.sae.load, "load_sae", load_sae)


@pytest.mark.parametrize("config", CONFIGS, ids=[c.stem for c in CONFIGS])
def test_every_shipped_config_parses_and_builds(config, offline_stand_ins, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # export dirs in configs are relative: keep them out of the repo
    cli = build_cli(["--config", str(config)], run=False)
    assert cli.model.site.layer >= 0 and cli.model.k >= 1
    assert cli.model.parameter.endswith(("down_proj.weight", "c_proj.weight"))


def test_tiny_config_runs_end_to_end_and_reduces_the_feature(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    main(["fit", "--config", str(ROOT / "configs/tiny.yaml"), "--trainer.max_steps=12", "--trainer.val_check_interval=6",
          "--export.export_dir=out/export"])
    printed = capsys.readouterr().out
    assert "held-out metric" in printed and "exported to" in printed and "before: " in printed
    assert "debias: timings: prepare " in printed and ", total " in printed
    report = json.loads((tmp_path / "out/export/debias/report.json").read_text())
    assert 0 < report["after"]["feature_act"] < report["before"]["feature_act"]
    assert len(report["completions"]) == 4 and all(row["before"] and row["after"] for row in report["completions"])
    assert report["completions"][0]["before"] in (tmp_path / "out/export/README.md").read_text()

    # `debias eval` of the export, against its base, reproduces the report's held-out numbers
    main(["eval", "out/export", "--fit_config", str(ROOT / "configs/tiny.yaml"), "--suites", "false", "--out", "eval.json"])
    printed = capsys.readouterr().out
    assert "debias: evaluation on the fast path (only weights of layers >= 1 differ)" in printed
    evaluated = json.loads((tmp_path / "eval.json").read_text())
    for name in ("bias_gap", "cue_margin", "feature_act", "kl", "lm_loss"):
        assert evaluated["after"][name] == pytest.approx(report["after"][name], rel=1e-4, abs=1e-6), name
        assert evaluated["before"][name] == pytest.approx(report["before"][name], rel=1e-4, abs=1e-6), name
    assert 0 < evaluated["changed_parameters"] <= report["k"]
    metrics = next((tmp_path / "runs/tiny").rglob("metrics.csv")).read_text().splitlines()[0]
    for name in ("val/feature_act", "val/feature_fire_rate", "val/lm_loss", "val/kl", "train/loss"):
        assert name in metrics


def test_eval_refuses_a_model_of_another_architecture(tmp_path, capsys):
    from debias.models.tiny import save_tiny_model

    other = save_tiny_model(tmp_path / "gpt2", "gpt2")
    with pytest.raises(SystemExit) as exit_:
        main(["eval", str(other), "--fit_config", str(ROOT / "configs/tiny.yaml"), "--suites", "false"])
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and "Traceback" not in err
    last = err.splitlines()[-1]
    assert last.startswith("debias: error: ") and "does not fit base model 'tiny-llama'" in last


def test_mask_command_writes_exactly_k(tmp_path, monkeypatch, capsys):
    from debias.edits.mask import InstabilityMask

    monkeypatch.chdir(tmp_path)
    main(["mask", str(ROOT / "configs/tiny.yaml"), "--out", "m.safetensors",
          "--overrides", '["--model.edit.entries=17", "--model.edit.fraction=null"]'])
    assert InstabilityMask.load(tmp_path / "m.safetensors").k == 17
    assert "rows_touched" in capsys.readouterr().out


def test_typo_in_config_is_reported_with_the_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text((ROOT / "configs/tiny.yaml").read_text().replace("fraction:", "fracton:"))
    with pytest.raises(ValueError, match="fracton"):  # ConfigError: jsonargparse's message, no usage dump
        build_cli(["--config", str(bad)], run=False)
