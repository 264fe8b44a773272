"""Bad input fails at once, with one line naming the option, the value and what is accepted (tracker cases 4-12a)."""

import json
from pathlib import Path

import pytest
import torch
import yaml
from conftest import make_data, make_module, make_trainer

from debias.commands import main
from debias.commands.fit import DebiasCLI, build_cli

ROOT = Path(__file__).parents[1]
TINY = str(ROOT / "configs/tiny.yaml")


def error_lines(capsys) -> list[str]:
    """What the user sees on stderr, without Python warnings."""
    lines = capsys.readouterr().err.strip().splitlines()
    return [ln for ln in lines if "Warning" not in ln and not ln.startswith("  warnings.warn")]


# ----- 5: empty data -----
def test_max_texts_zero_is_refused_naming_the_option():
    from debias.training.data import DebiasDataModule

    with pytest.raises(ValueError, match=r"^data\.max_texts must be >= 1 or null, got 0$"):
        DebiasDataModule(max_texts=0)


def test_a_set_left_empty_by_filtering_names_the_set_and_source(monkeypatch):
    import debias.prompts
    from debias.prompts import CuePrompts

    monkeypatch.setattr(debias.prompts, "load_cue_prompts", lambda *args, **kwargs: CuePrompts([], [], []))
    with pytest.raises(ValueError, match=r"the cue_train set is empty after filtering \(source: the shipped prompt "
                                         r"files, data.max_texts=4\)"):
        make_data(max_texts=4).setup("fit")


# ----- 8b: a JSONL line that is not JSON -----
def test_jsonl_line_that_is_not_json_names_file_and_line(tmp_path):
    from debias.prompts import read_texts

    path = tmp_path / "prompts.jsonl"
    path.write_text('{"text": "The nurse said that"}\n{text: "unquoted key"}\n')
    with pytest.raises(ValueError, match=rf"^{path}:2: not valid JSON \(Expecting property name"):
        read_texts(str(path))


# ----- 7: a missing local model path is not a hub id -----
@pytest.mark.parametrize("spec", ["./missing-model", "../missing-model", "runs/tiny/missing-export",
                                  "existing/missing-model", "ABSOLUTE"])
def test_missing_model_path_fails_at_once(spec, tmp_path, monkeypatch):
    from debias.models.load import resolve_model_path

    monkeypatch.chdir(tmp_path)
    (tmp_path / "existing").mkdir()
    spec = str(tmp_path / "gone" / "model") if spec == "ABSOLUTE" else spec
    with pytest.raises(FileNotFoundError, match=rf"^no such directory: {spec}$"):
        resolve_model_path(spec)


def test_hub_id_fails_fast_when_the_hub_is_offline(monkeypatch):
    from debias.models.load import resolve_model_path

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match=r"'debias-tests/no-such-model' is not a local directory, and the "
                                                r"hub is offline \(HF_HUB_OFFLINE=1\)"):
        resolve_model_path("debias-tests/no-such-model")


def test_generate_with_a_missing_model_directory_says_so(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        main(["generate", "--model", "./no-model-here"])
    assert exit_.value.code == 2
    assert error_lines(capsys) == ["debias: error: no such directory: ./no-model-here"]


# ----- 9, 10: the export directory is checked by `fit` only, and never over the run's own files -----
def test_export_directory_is_checked_when_fitting_only(tmp_path):
    from debias.callbacks import ReportAndExport

    export = tmp_path / "export"
    export.mkdir()
    (export / "model.safetensors").write_text("an earlier export")
    callback = ReportAndExport(export_dir=str(export), overwrite=False)  # validate, mask, export build this too
    trainer = make_trainer(tmp_path / "root")
    callback.setup(trainer, None, "validate")
    with pytest.raises(FileExistsError, match="is not empty"):
        callback.setup(trainer, None, "fit")


@pytest.mark.parametrize("where", ["log_dir", "save_dir", "name"])
def test_export_dir_over_the_logger_directory_is_refused(where, tmp_path):
    from lightning.pytorch.loggers import CSVLogger

    from debias.callbacks import ReportAndExport

    logger = CSVLogger(save_dir=str(tmp_path / "logs"))
    trainer = make_trainer(tmp_path / "root", logger=logger)
    export = {"log_dir": Path(logger.log_dir), "save_dir": tmp_path / "logs", "name": Path(logger.root_dir)}[where]
    callback = ReportAndExport(export_dir=str(export), overwrite=True)
    with pytest.raises(ValueError) as err:
        callback.setup(trainer, None, "fit")
    message = str(err.value)
    assert "\n" not in message and repr(str(export)) in message and repr(str(logger.log_dir)) in message


def test_export_dir_equal_to_the_root_dir_is_refused_before_training(tmp_path):
    from debias.callbacks import ReportAndExport

    module = make_module()
    trainer = make_trainer(tmp_path, callbacks=[ReportAndExport(export_dir=str(tmp_path), overwrite=True)])
    with pytest.raises(ValueError, match=r"is or contains trainer\.default_root_dir"):
        trainer.fit(module, datamodule=make_data())
    assert module.delta is None and trainer.global_step == 0  # nothing prepared, nothing trained


# ----- 12a: parser errors are two lines, not the usage -----
@pytest.mark.parametrize("args, shown", [
    (["fit", "--config", TINY, "--model.edit.fracton=0.1"], "model.edit: Option 'fracton' is not accepted"),
    (["validate", "--config", TINY, "--trainer.max_steps=many"], "trainer.max_steps: Expected a <class 'int'>"),
    (["generate", "--max_new_tokens", "many"], "max_new_tokens: Expected a <class 'int'>"),
    (["mask", TINY, "--outt", "m.safetensors"], "unrecognized arguments: --outt m.safetensors"),
])
def test_parser_errors_show_the_message_and_a_hint_only(args, shown, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(args)
    lines = error_lines(capsys)
    assert exit_.value.code == 2 and len(lines) == 2, lines
    assert lines[0].startswith(f"debias: error: {shown}") and lines[1] == f"see: debias {args[0]} --help"


def test_typo_in_a_config_file_is_two_lines(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(Path(TINY).read_text().replace("fraction:", "fracton:"))
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(bad)])
    assert error_lines(capsys) == ["debias: error: model.edit: Option 'fracton' is not accepted",
                                   "see: debias fit --help"]


def test_a_value_its_group_refuses_is_one_line(capsys):
    with pytest.raises(SystemExit):
        main(["fit", "--config", TINY, "--model.edit.fraction=2"])
    assert error_lines(capsys) == ["debias: error: invalid model.edit arguments: "
                                   "model.edit.fraction must be in (0, 1], got 2.0"]


def test_an_unknown_method_is_one_line_listing_the_registered_ones(capsys):
    """`model.edit.method` is checked against the live registry (`registry.check_name`), not a closed Literal."""
    from debias.edits import registry

    with pytest.raises(SystemExit):
        main(["fit", "--config", TINY, "--model.edit.method=sparse"])
    assert error_lines(capsys) == ["debias: error: invalid model.edit arguments: model.edit.method must be one of "
                                   f"the registered methods {list(registry.METHODS)}, got 'sparse'"]


# ----- 6: model.edit.mask_seed alone -----
def test_edit_seed_alone_builds():
    cli = build_cli(["--config", TINY, "--model.edit.mask_seed=1"], run=False)
    model, data = dict(cli.model.hparams), dict(cli.datamodule.hparams)
    assert cli.model.edit_args.mask_seed == 1 and data["shuffle_seed"] == 0
    # Lightning's check before logging: a key in both hparams must have one value (flat hparams had `seed` twice)
    assert all(model[key] == data[key] for key in set(model) & set(data))


# ----- one real fit (logger on, edit seed 1, export kept), then what may run after it -----
@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """A tiny fit with `--model.edit.mask_seed=1`, a CSV logger and a non-empty export with overwrite false."""
    out = tmp_path_factory.mktemp("fitted")
    config = yaml.safe_load(Path(TINY).read_text())
    config["trainer"].update(max_steps=2, val_check_interval=1.0, check_val_every_n_epoch=1, limit_val_batches=0,
                             enable_progress_bar=False)  # no validation: the checkpoint is saved at the end
    config["trainer"]["logger"]["init_args"]["save_dir"] = str(out / "runs")
    config["data"].update(max_texts=16, batch_size=4)
    config["export"] = {"export_dir": str(out / "export"), "overwrite": False, "plots": False}
    config["evaluate"] = {"completions": 0}
    path = out / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    main(["fit", "--config", str(path), "--model.edit.mask_seed=1"])
    (ckpt,) = (out / "runs").rglob("*.ckpt")
    return path, ckpt, out


def test_fit_with_edit_seed_alone_runs_and_records_it(fitted):
    _, ckpt, out = fitted
    saved = torch.load(ckpt, weights_only=True)
    assert saved["hyper_parameters"]["edit"]["mask_seed"] == 1
    assert saved["datamodule_hyper_parameters"]["shuffle_seed"] == 0
    assert (out / "export" / "debias" / "report.json").is_file()


def test_mask_runs_after_a_fit_that_kept_its_export(fitted, tmp_path, capsys):
    config, _, _ = fitted
    main(["mask", str(config), "--out", str(tmp_path / "mask.safetensors")])
    assert (tmp_path / "mask.safetensors").is_file() and "saved to" in capsys.readouterr().out


# ----- 4: --ckpt_path with other model arguments -----
def test_ckpt_path_with_another_method_is_refused(fitted, capsys):
    config, ckpt, _ = fitted
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--config", str(config), "--ckpt_path", str(ckpt), "--model.edit.method=random",
              "--model.edit.mask_seed=1"])
    lines = error_lines(capsys)
    assert exit_.value.code == 2 and len(lines) == 1
    assert lines[0].startswith(f"debias: error: --ckpt_path {ckpt} was trained with model.edit.method='instability'; "
                               "this run has 'random' (")


def test_ckpt_path_with_the_same_arguments_proceeds_with_a_note(fitted, monkeypatch, capsys):
    config, ckpt, _ = fitted

    class Parsed(Exception):
        pass

    def stop(self):
        raise Parsed(self.config.fit.model.edit.as_dict())

    monkeypatch.setattr(DebiasCLI, "instantiate_classes", stop)
    with pytest.raises(Parsed) as parsed:
        build_cli(["fit", "--config", str(config), "--ckpt_path", str(ckpt), "--model.edit.mask_seed=1"])
    assert parsed.value.args[0]["mask_seed"] == 1 and parsed.value.args[0]["method"] == "instability"
    assert "mid-epoch checkpoint does not repeat an uninterrupted run exactly" in capsys.readouterr().err


def test_checkpoint_differences_list_every_key_with_both_values(tmp_path):
    from debias.commands.fit import check_checkpoint_hparams
    from debias.training.args import EditArgs

    ckpt = tmp_path / "x.ckpt"
    saved = {"base_model": "tiny-llama", "edit": {"method": "instability", "mask_seed": 0, "entries": None},
             "sae": {"build": None}}
    torch.save({"hyper_parameters": saved}, ckpt)
    current = {"base_model": "tiny-llama", "edit": {"method": "random", "mask_seed": 2, "entries": None},
               "sae": {"build": {"hook_name": "blocks.1.hook_mlp_out"}}}
    with pytest.raises(ValueError) as err:
        check_checkpoint_hparams(str(ckpt), current)
    assert str(err.value).startswith(
        f"--ckpt_path {ckpt} was trained with model.edit.method='instability' and model.edit.mask_seed=0 and "
        "model.sae.build=None; this run has 'random' and 2 and {'hook_name': 'blocks.1.hook_mlp_out'} (")
    check_checkpoint_hparams(str(ckpt), json.loads(json.dumps(saved)))  # equal: proceeds
    current["edit"].update(method="instability", mask_seed=0, fraction=0.5)  # a field the checkpoint predates ...
    with pytest.raises(ValueError, match=r"trained with no model.edit.fraction and model.sae.build=None; this run has "
                                         r"0.5 and"):
        check_checkpoint_hparams(str(ckpt), current)  # ... refused at another value than its default
    current["edit"]["fraction"], current["sae"]["build"] = EditArgs().fraction, None
    check_checkpoint_hparams(str(ckpt), current)  # ... accepted at its default: the checkpoint's code ran as that
    (tmp_path / "text.ckpt").write_text("not a checkpoint")
    with pytest.raises(ValueError, match=r"text.ckpt is not a --ckpt_path checkpoint that loads as weights only \("):
        check_checkpoint_hparams(str(tmp_path / "text.ckpt"), current)
