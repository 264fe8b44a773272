"""The original model's evaluation is computed once (`debias.evaluation.base_cache`), and never a wrong number:
another key, a damaged entry or a cache that cannot be written all end in a fresh evaluation."""

import json

import pytest
from conftest import make_data, make_module, make_trainer

import debias.evaluation.base_cache as base_cache
import debias.evaluation.evaluate
from debias.evaluation.base_cache import entry_path, evaluate_original

CUES = 16  # a small cue subset keeps each evaluation of the tiny model quick


@pytest.fixture(scope="module")
def prepared():
    data = make_data(max_texts=8)
    module = make_module()
    module.prepare(data)
    return module, data


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A fresh, empty cache directory (the module's model was resolved before, in the session's cache)."""
    monkeypatch.setenv("DEBIAS_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("DEBIAS_EVAL_CACHE", raising=False)
    return tmp_path / "cache" / "eval"


@pytest.fixture
def counted(monkeypatch):
    """Counts the evaluations of the original model that actually run."""
    calls = []
    real = debias.evaluation.evaluate.evaluate_model

    def evaluate_model(module, datamodule, edited=True, **kwargs):
        calls.append(edited)
        return real(module, datamodule, edited=edited, **kwargs)

    monkeypatch.setattr(debias.evaluation.evaluate, "evaluate_model", evaluate_model)
    return calls


def _entries(cache) -> list:
    return sorted(p for p in cache.glob("*.json") if p.name != "file-hashes.json")


def test_second_evaluation_comes_from_the_cache_with_the_same_numbers(prepared, cache, counted):
    module, data = prepared
    first, hit = evaluate_original(module, data, cue_limit=CUES)
    assert not hit and counted == [False] and len(_entries(cache)) == 1
    second, hit = evaluate_original(module, data, cue_limit=CUES)
    assert hit and counted == [False] and second == first
    direct = debias.evaluation.evaluate.evaluate_model(module, data, edited=False, cue_limit=CUES)
    for name in ("feature_act", "lm_loss", "kl", "bias_gap", "cue_margin"):
        assert first[name] == direct[name], name
    entry = json.loads(_entries(cache)[0].read_text())
    assert entry["key"]["model"]["id"] == "tiny-llama" and entry["key"]["features"] == [3]
    assert entry["key"]["model"]["files"]["model.safetensors"]  # the weights' sha256


def test_another_code_version_or_setting_is_a_new_entry(prepared, cache, counted, monkeypatch):
    module, data = prepared
    evaluate_original(module, data, cue_limit=CUES)
    version = dict(base_cache.code_version(), sources="another version of the sources")
    monkeypatch.setattr(base_cache, "code_version", lambda: version)
    _, hit = evaluate_original(module, data, cue_limit=CUES)
    assert not hit and len(counted) == 2
    _, hit = evaluate_original(module, data, cue_limit=CUES + 1)
    assert not hit and len(counted) == 3 and len(_entries(cache)) == 3


def test_an_edited_bias_spec_is_a_new_entry(prepared, cache, counted, tmp_path):
    """The held-out gap and cue prompts come from the spec, not from the DataModule's texts: its file is in the key."""
    import shutil

    from debias.bias_spec import default_bias_dir

    module, data = prepared
    spec = tmp_path / "gender.yaml"
    shutil.copy(default_bias_dir() / "gender.yaml", spec)
    data.hparams["bias"] = str(spec)
    try:
        key = base_cache.cache_key(module, data, False, CUES)
        spec.write_text(spec.read_text() + "\n# an edit of the spec\n")
        assert base_cache.cache_key(module, data, False, CUES) != key
    finally:
        data.hparams["bias"] = "gender"


@pytest.mark.parametrize("damage", ["truncated", "not an object", "missing field", "another key"])
def test_damaged_entry_warns_and_is_recomputed(prepared, cache, counted, capsys, damage):
    module, data = prepared
    good, _ = evaluate_original(module, data, cue_limit=CUES)
    path = entry_path(base_cache.cache_key(module, data, False, CUES))
    text = path.read_text()
    entry = json.loads(text)
    if damage == "truncated":  # a writer killed mid-file (atomic writes make this rare, not impossible)
        path.write_text(text[: len(text) // 2])
    elif damage == "not an object":
        path.write_text("[1, 2]")
    elif damage == "missing field":
        del entry["metrics"]["bias_gap"]
        path.write_text(json.dumps(entry))
    else:
        entry["key"]["features"] = [4]
        path.write_text(json.dumps(entry))
    capsys.readouterr()
    again, hit = evaluate_original(module, data, cue_limit=CUES)
    err = capsys.readouterr().err
    assert not hit and len(counted) == 2 and again == good
    assert err.startswith("debias: warning: ") and err.strip().endswith("recomputing"), err
    assert json.loads(path.read_text())["metrics"] == good  # rewritten whole
    assert evaluate_original(module, data, cue_limit=CUES)[1]


def test_full_cache_warns_and_the_run_continues_without_caching(prepared, cache, counted, capsys, monkeypatch):
    module, data = prepared

    def full(path, data):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(base_cache, "atomic_write", full)
    first, hit = evaluate_original(module, data, cue_limit=CUES)
    err = capsys.readouterr().err
    assert not hit and "debias: warning: cannot write the evaluation cache" in err
    assert "No space left on device" in err and "continuing without caching" in err
    assert not _entries(cache)
    second, hit = evaluate_original(module, data, cue_limit=CUES)
    assert not hit and second == first and len(counted) == 2


def test_read_only_cache_directory_warns_and_the_run_continues(prepared, tmp_path, counted, capsys, monkeypatch):
    module, data = prepared
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")  # a cache "directory" that is a file: every write under it fails, even as root
    monkeypatch.setenv("DEBIAS_CACHE", str(blocker))
    metrics, hit = evaluate_original(module, data, cue_limit=CUES)
    assert not hit and counted == [False] and isinstance(metrics["bias_gap"], float)
    assert "continuing without caching" in capsys.readouterr().err


def test_disabled_by_the_environment(prepared, cache, counted, monkeypatch):
    module, data = prepared
    monkeypatch.setenv("DEBIAS_EVAL_CACHE", "0")
    assert not evaluate_original(module, data, cue_limit=CUES)[1]
    assert not evaluate_original(module, data, cue_limit=CUES)[1]
    assert len(counted) == 2 and not cache.exists()


def test_model_without_local_files_is_not_cached(prepared, cache, counted, monkeypatch):
    module, data = prepared
    monkeypatch.setattr(module, "model_path", "no-such-org/no-such-model")
    assert not evaluate_original(module, data, cue_limit=CUES)[1]
    assert not evaluate_original(module, data, cue_limit=CUES)[1]
    assert len(counted) == 2


def test_fit_reuses_the_before_numbers_caches_no_edited_ones_and_reports_timings(cache, tmp_path, capsys):
    from debias.callbacks import ReportAndExport

    def fit(name):
        callback = ReportAndExport(export_dir=str(tmp_path / name), completions=1, plots=False)
        make_trainer(tmp_path, max_steps=3, callbacks=[callback]).fit(make_module(), datamodule=make_data(max_texts=8))
        return callback

    first = fit("first")
    line = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("debias: timings: ")]
    assert len(line) == 1 and "before " in line[0] and "(cached)" not in line[0] and "total " in line[0]
    timings = first.report["timings"]
    assert set(timings) == {"prepare", "before_eval", "train", "after_eval", "completions", "export", "total"}
    assert first.report["train_seconds"] == timings["train"]
    assert timings["total"] == pytest.approx(sum(v for k, v in timings.items() if k != "total"))
    on_disk = json.loads((tmp_path / "first" / "debias" / "report.json").read_text())
    assert on_disk["timings"] == timings and on_disk["before_source"] == "computed"

    second = fit("second")
    assert "(cached)" in capsys.readouterr().out and second.before_source == "cached"
    assert second.report["before"] == first.report["before"]
    entries = [json.loads(p.read_text())["metrics"] for p in _entries(cache)]
    assert entries == [first.report["before"]]  # the original model's numbers only, never an edited model's
    assert first.report["after"]["feature_act"] != first.report["before"]["feature_act"]


def test_durations_read_naturally():
    from debias.callbacks import format_duration, format_timings

    assert format_duration(12.34) == "12.3 s" and format_duration(182.4) == "3 min 2 s"
    assert format_duration(3900) == "1 h 5 min"
    assert format_timings({"before_eval": 12.3, "train": 48.1, "total": 182}, "cached") == \
        "before 12.3 s (cached), train 48.1 s, total 3 min 2 s"
