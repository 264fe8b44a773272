"""Exports are safe and consistent: no code from a checkpoint runs, a checkpoint that does not match is refused, every
form of an export gives the same model, nothing blown-up or empty passes for a success, and a killed export leaves
nothing behind for long."""

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import assert_export_consistent, make_data, make_module, make_trainer

from debias.commands import main
from debias.io import PID_MARKER, atomic_dir

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.yaml")


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """A tiny `debias fit` run with a last checkpoint and its export."""
    tmp = tmp_path_factory.mktemp("fit")
    cwd = os.getcwd()
    os.chdir(tmp)
    try:
        main(["fit", "--config", TINY, "--trainer.max_steps=6", "--trainer.val_check_interval=6",
              "--export.export_dir=export", "--export.plots=false", "--evaluate.completions=0",
              "--trainer.callbacks+=ModelCheckpoint", "--trainer.callbacks.dirpath=ckpt",
              "--trainer.callbacks.save_last=true"])
    finally:
        os.chdir(cwd)
    return tmp


class _RunsCode:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_checkpoint_that_carries_code_is_refused_and_nothing_runs(tmp_path, capsys):
    marker = tmp_path / "ran"
    bad = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "debias_edit": {"payload": _RunsCode(str(marker))}}, bad)
    with pytest.raises(SystemExit) as exit_:
        main(["export", TINY, str(bad), str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and not marker.exists(), "the checkpoint's code ran"
    assert "is not a checkpoint that loads as weights only (Trying to load unsupported GLOBAL" in err
    assert "weights_only=False" not in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_a_checkpoint_without_a_trained_edit_is_refused(tmp_path, capsys):
    empty = tmp_path / "empty.ckpt"
    torch.save({"state_dict": {}}, empty)
    with pytest.raises(SystemExit):
        main(["export", TINY, str(empty), str(tmp_path / "out")])
    assert "holds no trained debias edit" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_export_of_another_method_is_refused_naming_both(fitted, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["export", TINY, str(fitted / "ckpt" / "last.ckpt"), str(tmp_path / "out"),
              "--overrides", '["--model.edit.method=random"]'])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "was trained with model.edit.method='instability'; this run has 'random'" in err
    assert not (tmp_path / "out").exists()


def test_export_for_another_base_model_or_features_is_refused_naming_every_key(fitted, tmp_path, capsys):
    ckpt = fitted / "ckpt" / "last.ckpt"
    with pytest.raises(SystemExit) as exit_:  # the issue's case: an edit for feature [3] put onto another model
        main(["export", TINY, str(ckpt), str(tmp_path / "out"),
              "--overrides", '["--model.base_model=tiny-mistral","--model.sae.features=[32]"]'])
    # after the progress bars of building tiny-mistral; exit 2: `main` caught a user error (no traceback)
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and sum(line.startswith("debias: error:") for line in err) == 1
    assert err[-1].startswith(f"debias: error: checkpoint {ckpt} was trained with model.base_model='tiny-llama' and "
                             "model.sae.features=[3]; this run has 'tiny-mistral' and [32] (export it with the config")
    assert not (tmp_path / "out").exists()
    unrecorded = tmp_path / "bare.ckpt"
    checkpoint = torch.load(ckpt, weights_only=True)
    del checkpoint["hyper_parameters"]
    torch.save(checkpoint, unrecorded)
    with pytest.raises(SystemExit):
        main(["export", TINY, str(unrecorded), str(tmp_path / "out")])
    assert "records no model arguments" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_fit_and_export_write_one_consistent_edit(fitted, tmp_path):
    fit_out = fitted / "export"
    fit_forms = assert_export_consistent(fit_out, json.loads((fit_out / "debias/report.json").read_text())["base_model"])
    main(["export", TINY, str(fitted / "ckpt" / "last.ckpt"), str(tmp_path / "out")])
    out = tmp_path / "out"
    forms = assert_export_consistent(out, json.loads((out / "debias/report.json").read_text())["base_model"])
    assert set(forms) == {"merged", "adapter", "delta"}
    torch.testing.assert_close(forms["merged"], fit_forms["merged"], rtol=1e-5, atol=1e-5)
    from huggingface_hub import ModelCard

    assert "gender" in ModelCard.load(out / "README.md").data.tags  # the bias axis, as fit's card has it
    from safetensors.torch import load_file

    for name in ("mask.safetensors", "delta.safetensors"):
        assert torch.equal(load_file(out / "debias" / name)["indices"], load_file(fit_out / "debias" / name)["indices"])


def test_export_takes_the_module_from_load_from_checkpoint_not_a_prepared_rebuild(fitted, tmp_path, monkeypatch):
    """`debias export` is `DebiasModule.load_from_checkpoint(ckpt, weights_only=True)`: no mask, features or edit are
    computed again from the config's data (`prepare`), and the exported delta is the checkpoint's."""
    from safetensors.torch import load_file

    from debias.training.module import DebiasModule

    def refuse(self, datamodule):
        raise AssertionError("export prepared the module from the config instead of loading the checkpoint")

    monkeypatch.setattr(DebiasModule, "prepare", refuse)
    ckpt = fitted / "ckpt" / "last.ckpt"
    main(["export", TINY, str(ckpt), str(tmp_path / "out")])
    state = torch.load(ckpt, weights_only=True)["debias_edit"]["state"]
    (values,) = [v for k, v in state.items() if k.endswith("values")]
    delta = load_file(tmp_path / "out" / "debias" / "delta.safetensors")
    assert torch.equal(delta["indices"], load_file(fitted / "export" / "debias" / "delta.safetensors")["indices"])
    assert torch.equal(delta["values"].sort().values, values[values != 0].float().sort().values)


def test_saved_adapter_reloads_the_masks_indices_not_magnitude_chosen_ones(fitted):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    out = fitted / "export"
    base = AutoModelForCausalLM.from_pretrained(json.loads((out / "debias/report.json").read_text())["base_model"])
    layer = next(m for m in PeftModel.from_pretrained(base, out / "adapter").modules()
                 if hasattr(m, "supertuning_indices") and "default" in m.supertuning_indices)
    mask = load_file(out / "debias" / "mask.safetensors")["indices"]
    weight = layer.base_layer.weight.detach().abs().flatten()
    by_magnitude = weight.topk(mask.numel()).indices.sort().values
    assert torch.equal(layer.supertuning_indices["default"].to(torch.int64).sort().values, mask)
    assert not torch.equal(by_magnitude, mask)  # what peft would choose on its own differs: the test can fail


def test_lr_that_is_not_finite_is_refused_on_every_path(tmp_path, capsys):
    from debias.training.args import TrainArgs

    yaml = tmp_path / "inf.yaml"
    yaml.write_text(Path(TINY).read_text().replace("lr: 0.05", "lr: .inf"))
    for args in (["--config", str(yaml)], *(["--config", TINY, f"--model.train.lr={lr}"] for lr in
                                             ("inf", "1e30", "nan", "-1"))):
        with pytest.raises(SystemExit) as exit_:
            main(["fit", *args, "--export.export_dir=null", f"--trainer.default_root_dir={tmp_path}"])
        lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("debias: error: ")]
        assert exit_.value.code == 2 and len(lines) == 1 and "lr" in lines[0], (args, lines)
    for lr in (float("inf"), 1e30, float("nan"), -1.0):
        with pytest.raises(ValueError, match="model.train.lr must be a finite number in"):
            TrainArgs(lr=lr)


def test_blown_up_values_are_never_exported(tmp_path):
    from debias.export import export

    module = make_module()
    make_trainer(tmp_path, max_steps=2).fit(module, datamodule=make_data())
    with torch.no_grad():
        module.delta.values[0] = float("inf")
    with pytest.raises(ValueError, match="non-finite"):
        export(module, tmp_path / "inf", {"before": {}, "after": {}})
    with torch.no_grad():
        module.delta.values[0] = 1e30
    with pytest.raises(ValueError, match="over 1000× the largest weight"):
        export(module, tmp_path / "huge", {"before": {}, "after": {}})
    assert not (tmp_path / "inf").exists() and not (tmp_path / "huge").exists()


def test_a_run_that_changed_nothing_says_so(tmp_path, capsys):
    from debias.export import export

    module = make_module()
    make_trainer(tmp_path, max_steps=0).fit(module, datamodule=make_data())
    out = export(module, tmp_path / "export", {"before": {}, "after": {}, "steps": 0})
    assert "changed nothing" in capsys.readouterr().out
    assert "This edit changed nothing" in (out / "README.md").read_text()
    assert json.loads((out / "debias/report.json").read_text())["changed_entries"] == 0


def test_a_killed_export_is_cleaned_by_the_next_one(tmp_path):
    dest = tmp_path / "export"
    script = textwrap.dedent(f"""
        import os, signal
        from debias.io import atomic_dir
        with atomic_dir({str(dest)!r}) as tmp:
            (tmp / "model.safetensors").write_bytes(b"x" * 1000)
            os.kill(os.getpid(), signal.SIGKILL)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == -signal.SIGKILL
    left = [p for p in tmp_path.iterdir() if p.name.startswith(".export.")]
    assert len(left) == 1 and (left[0] / PID_MARKER).is_file()  # the kill left its half-written directory
    with atomic_dir(dest) as tmp:
        (tmp / "ok").write_text("done")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]
    assert (dest / "ok").read_text() == "done" and not (dest / PID_MARKER).exists()


def test_a_live_writers_directory_is_left_alone(tmp_path):
    live = tmp_path / ".export.live"
    live.mkdir()
    (live / PID_MARKER).write_text(str(os.getpid()))
    with atomic_dir(tmp_path / "export") as tmp:
        (tmp / "ok").write_text("done")
    assert live.is_dir()


def _mask_case(tmp_path, name, tensors=None, metadata=None, raw=None):
    from safetensors.torch import save_file

    path = tmp_path / f"{name}.safetensors"
    if raw is not None:
        path.write_bytes(raw)
    else:
        save_file(tensors, str(path), metadata=metadata)
    return path


@pytest.mark.parametrize("case, expected", [
    ("no_metadata", "is not a mask written by `debias mask`"),
    ("garbage", "is not a mask written by `debias mask`"),
    ("other_shape", "this run edits model.layers.1.mlp.down_proj.weight [32, 64]"),
    ("out_of_range", "indices must be in [0, 2048)"),
    ("negative", "indices must be in [0, 2048)"),
    ("duplicates", "2 duplicate indices"),
    ("missing", "no such file"),
])
def test_a_bad_mask_file_is_refused_naming_the_file_and_option(tmp_path, case, expected):
    from debias.edits.mask import load_mask_for

    parameter, shape = "model.layers.1.mlp.down_proj.weight", (32, 64)
    meta = {"parameter": parameter, "shape": json.dumps(list(shape)), "layer": "1",
            "hook_name": "blocks.1.hook_mlp_out", "features": "[3]"}
    paths = {
        "no_metadata": lambda: _mask_case(tmp_path, case, {"indices": torch.arange(5)}),
        "garbage": lambda: _mask_case(tmp_path, case, raw=b"\x00not a safetensors file at all"),
        "other_shape": lambda: _mask_case(tmp_path, case, {"indices": torch.arange(5)},
                                          {**meta, "shape": "[16, 64]"}),
        "out_of_range": lambda: _mask_case(tmp_path, case, {"indices": torch.tensor([1, 2048])}, meta),
        "negative": lambda: _mask_case(tmp_path, case, {"indices": torch.tensor([-1, 4])}, meta),
        "duplicates": lambda: _mask_case(tmp_path, case, {"indices": torch.tensor([1, 1, 2, 2, 3])}, meta),
        "missing": lambda: tmp_path / "nowhere.safetensors",
    }
    path = paths[case]()
    with pytest.raises((ValueError, FileNotFoundError)) as err:
        load_mask_for(path, parameter, shape)
    message = str(err.value)
    assert expected in message and f"model.edit.mask_path={str(path)!r}" in message and "\n" not in message


def test_a_bad_mask_path_fails_before_training(tmp_path, capsys):
    bad = _mask_case(tmp_path, "garbage", raw=b"garbage")
    with pytest.raises(SystemExit):
        main(["fit", "--config", TINY, f"--model.edit.mask_path={bad}", "--export.export_dir=null",
              f"--trainer.default_root_dir={tmp_path}"])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("debias: error: ")]
    assert len(lines) == 1 and "model.edit.mask_path" in lines[0]


def test_help_is_fast_because_it_imports_no_lightning():
    code = ("import sys; from debias.commands import main; main(['--help']); "
            "assert not any(m.startswith(('lightning', 'torch', 'transformers')) for m in sys.modules), "
            "sorted(m for m in sys.modules if m.startswith(('lightning', 'torch', 'transformers')))[:5]")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "fit" in done.stdout and "compare" in done.stdout
    assert " test " not in done.stdout and "predict" not in done.stdout
