"""The rule's feature choice (`debias.features.choice_cache`) and the original model's validation metrics
(`base_cache.original_validation`) are computed once: the second run reads them back, the same values exactly; another
setting or source misses; a damaged or foreign entry, or a cache that cannot be written, ends in a fresh computation."""

import dataclasses
import json
import os
import shutil
from types import SimpleNamespace

import pytest
from conftest import copy_sources, make_data, make_module

import debias.features.select
from debias.features import choice_cache

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def chooser():
    return make_module(features=None, n_features=2), make_data(max_texts=8)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A fresh, empty cache directory (the module's model was resolved before, in the session's cache)."""
    monkeypatch.setenv("DEBIAS_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("DEBIAS_EVAL_CACHE", raising=False)
    monkeypatch.delenv("DEBIAS_FEATURE_CACHE", raising=False)
    return tmp_path / "cache"


@pytest.fixture
def selections(monkeypatch):
    """Counts the selections that actually run."""
    calls = []
    real = debias.features.select.select_features

    def select_features(*args, **kwargs):
        calls.append(kwargs["n"])
        return real(*args, **kwargs)

    monkeypatch.setattr(debias.features.select, "select_features", select_features)
    return calls


def _no_selection(monkeypatch):
    def select_features(*args, **kwargs):
        raise RuntimeError("the selection ran")

    monkeypatch.setattr(debias.features.select, "select_features", select_features)


def choose(module, data) -> tuple[list[int], dict]:
    """A fresh choice by `module.choose_features`, as a run with `features: null` makes it."""
    module.features, module.feature_selection = [], {}
    return module.choose_features(data), module.feature_selection


def _path(module, data):
    return choice_cache.STORE.entry_path(choice_cache.choice_key(module, data))


def test_second_choice_comes_from_the_cache(chooser, cache, selections, capsys, monkeypatch):
    module, data = chooser
    features, record = choose(module, data)
    out = capsys.readouterr().out
    assert selections == [2] and 1 <= len(features) <= 2 and record["features"] == features
    assert f"debias: selected features {features} ({record['rule']})" in out and "cached" not in out
    path = _path(module, data)
    entry = json.loads(path.read_text())
    assert entry["choice"] == {"features": features, "record": record}
    assert entry["key"]["model"]["files"]["model.safetensors"] and entry["key"]["sae"]["weights"]

    _no_selection(monkeypatch)
    again, again_record = choose(module, data)
    assert again == features and again_record == record and again_record is module.feature_selection
    assert f"debias: selected features {features} (cached: {path})" in capsys.readouterr().out


@pytest.mark.parametrize("change", ["n_features", "feature_target", "prompt_dir"])
def test_another_selection_setting_misses(chooser, cache, selections, monkeypatch, tmp_path, change):
    from debias.prompts import default_prompt_dir

    module, data = chooser
    choose(module, data)
    key = choice_cache.choice_key(module, data)
    if change == "prompt_dir":
        prompts = shutil.copytree(default_prompt_dir(), tmp_path / "prompts")
        monkeypatch.setitem(data.hparams, "prompt_dir", str(prompts))
    else:
        value = {"n_features": 1, "feature_target": "both"}[change]
        monkeypatch.setattr(module, "sae_args", dataclasses.replace(module.sae_args, **{change: value}))
    assert choice_cache.choice_key(module, data) != key
    _no_selection(monkeypatch)
    with pytest.raises(RuntimeError, match="the selection ran"):
        choose(module, data)


@pytest.mark.parametrize("source", ["features/select.py", "features/attribution.py", "sae/ops.py"])
def test_the_selection_sources_are_in_the_key(chooser, cache, monkeypatch, tmp_path, source):
    module, data = chooser
    copy = copy_sources(choice_cache.PACKAGE, choice_cache.CODE_FILES, tmp_path / "debias")
    monkeypatch.setattr(choice_cache, "PACKAGE", copy)
    before = choice_cache.choice_key(module, data)
    (copy / source).write_text((copy / source).read_text() + "\n# another version\n")
    after = choice_cache.choice_key(module, data)
    assert after["code"]["sources"] != before["code"]["sources"] and after["code"]["versions"]
    assert {k: v for k, v in after.items() if k != "code"} == {k: v for k, v in before.items() if k != "code"}


@pytest.mark.parametrize("damage", ["truncated", "garbage bytes", "not an object", "no choice", "missing field",
                                    "not latents", "repeats", "contradicts its record", "nan in its record",
                                    "another key"])
def test_damaged_entry_warns_and_is_recomputed(chooser, cache, selections, capsys, damage):
    module, data = chooser
    good = choose(module, data)
    path = _path(module, data)
    text = path.read_text()
    entry = json.loads(text)
    if damage == "truncated":
        path.write_text(text[: len(text) // 2])
    elif damage == "garbage bytes":
        path.write_bytes(b"\xff\xfe\x00\x9c" + os.urandom(64))
    elif damage == "not an object":
        path.write_text("[1, 2]")
    elif damage == "no choice":
        del entry["choice"]
        path.write_text(json.dumps(entry))
    elif damage == "missing field":
        del entry["choice"]["record"]
        path.write_text(json.dumps(entry))
    elif damage == "not latents":
        entry["choice"]["features"] = [module.sae.cfg.d_sae]
        path.write_text(json.dumps(entry))
    elif damage == "repeats":  # the issue's [3, 3, 3], its record still naming the rule's latents
        entry["choice"]["features"] = [good[0][0]] * 3
        path.write_text(json.dumps(entry))
    elif damage == "contradicts its record":  # other latents, as many, distinct
        entry["choice"]["features"] = [f for f in range(module.sae.cfg.d_sae) if f not in good[0]][:len(good[0])]
        path.write_text(json.dumps(entry))
    elif damage == "nan in its record":
        entry["choice"]["record"]["train_gap"] = float("nan")
        path.write_text(json.dumps(entry))
    else:
        entry["key"]["selection"]["n_features"] = 3
        path.write_text(json.dumps(entry))
    capsys.readouterr()
    again = choose(module, data)
    warning = capsys.readouterr().err.splitlines()[0]  # then the selection's progress bar
    assert again == good and len(selections) == 2
    assert warning.startswith("debias: warning: ") and warning.endswith("recomputing"), warning
    assert f"feature-choice cache entry {path}" in warning
    assert json.loads(path.read_text())["choice"] == {"features": good[0], "record": good[1]}  # rewritten whole
    choose(module, data)
    assert len(selections) == 2


def test_a_cache_that_cannot_be_written_warns_and_the_run_continues(chooser, tmp_path, selections, capsys,
                                                                    monkeypatch):
    module, data = chooser
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")  # a cache "directory" that is a file: every write under it fails, even as root
    monkeypatch.setenv("DEBIAS_CACHE", str(blocker))
    monkeypatch.delenv("DEBIAS_EVAL_CACHE", raising=False)
    monkeypatch.delenv("DEBIAS_FEATURE_CACHE", raising=False)
    features, record = choose(module, data)
    err = capsys.readouterr().err
    assert 1 <= len(features) <= 2 and record["features"] == features and blocker.is_file()
    assert f"debias: warning: cannot write the feature-choice cache entry {_path(module, data)}" in err
    assert "continuing without caching" in err
    assert choose(module, data)[0] == features and len(selections) == 2


def test_model_without_local_files_or_disabled_is_not_cached(chooser, cache, selections, monkeypatch):
    module, data = chooser
    with monkeypatch.context() as patched:
        patched.setattr(module, "model_path", "no-such-org/no-such-model")
        assert choice_cache.choice_key(module, data) is None
        choose(module, data)
        choose(module, data)
    monkeypatch.setenv("DEBIAS_EVAL_CACHE", "0")  # the model is known again; the evaluation cache's switch is not this
    choose(module, data)                            # cache's: the first choice is stored, the second reuses it
    choose(module, data)
    assert len(selections) == 3 and (cache / "features").exists()
    monkeypatch.setenv("DEBIAS_FEATURE_CACHE", "0")  # its own switch turns it off
    choose(module, data)
    assert len(selections) == 4


# ----- the original model's validation metrics (ValidationMetrics.on_fit_start) -----
@pytest.fixture(scope="module")
def prepared():
    data = make_data(max_texts=8)
    module = make_module()
    module.prepare(data)
    return module, data


def _start(module, data, cue_limit=16):
    """`ValidationMetrics.on_fit_start` of a fit of `module` on `data`; the callback and the behaviours it scored."""
    from debias.callbacks import ValidationMetrics

    callback, scored = ValidationMetrics(cue_limit=cue_limit), []
    behaviour = callback.behaviour

    def counted(trainer, pl_module, edited):
        scored.append(edited)
        return behaviour(trainer, pl_module, edited)

    callback.behaviour = counted  # type: ignore[method-assign]
    trainer = SimpleNamespace(datamodule=data, loggers=[], checkpoint_callbacks=[])
    callback.on_fit_start(trainer, module)
    return callback, scored, trainer


def test_val_original_cached_equals_computed_exactly(prepared, cache, capsys):
    module, data = prepared
    first, scored, trainer = _start(module, data)
    out = capsys.readouterr().out
    assert scored == [False] and "on the validation split" in out and "(cached)" not in out
    entries = list((cache / "eval" / "validation").glob("*.json"))
    assert len(entries) == 1 and json.loads(entries[0].read_text())["key"]["evaluation"] == \
        {"split": "validation", "cue_limit": 16, "n_boot": 1}
    second, scored, _ = _start(module, data)
    assert scored == [] and "on the validation split (cached)" in capsys.readouterr().out
    direct = first.behaviour(trainer, module, edited=False)
    assert second.original == first.original == direct and {"bias_gap", "cue_margin"} <= set(direct)
    assert all(type(v) is float for v in second.original.values())
    _, scored, _ = _start(module, data, cue_limit=17)  # another cue subset: another entry
    assert scored == [False] and len(list((cache / "eval" / "validation").glob("*.json"))) == 2


def test_val_original_damaged_entry_or_unwritable_cache_recomputes(prepared, cache, capsys, tmp_path, monkeypatch):
    module, data = prepared
    good = _start(module, data)[0].original
    (entry,) = (cache / "eval" / "validation").glob("*.json")
    stored = json.loads(entry.read_text())
    stored["metrics"]["bias_gap"] = "0.1"
    entry.write_text(json.dumps(stored))
    capsys.readouterr()
    again, scored, _ = _start(module, data)
    err = capsys.readouterr().err
    assert scored == [False] and again.original == good
    assert f"the validation cache entry {entry} holds non-numbers for ['bias_gap']; recomputing" in err
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    monkeypatch.setenv("DEBIAS_CACHE", str(blocker))
    again, scored, _ = _start(module, data)
    assert scored == [False] and again.original == good
    assert "cannot write the validation cache entry" in capsys.readouterr().err
