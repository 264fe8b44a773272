"""Layer-L inputs kept on disk (`debias.training.upstream_store`): a second module of the same model reads them with
the same numbers, and a damaged, foreign or unwritable cache never yields a wrong one."""

import os

import pytest
import torch
from conftest import make_data, make_module
from safetensors import safe_open
from safetensors.torch import save

from debias import json_store
from debias.evaluation.evaluate import evaluate_model
from debias.training import upstream_store


@pytest.fixture
def store_on(monkeypatch, tmp_path):
    monkeypatch.setenv("DEBIAS_ACTIVATION_CACHE", "1")
    monkeypatch.setenv("DEBIAS_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "activations"


def _evaluated(data, perturb: str | None = None):
    """(module, held-out numbers of the original and a non-zero edit) of a fresh tiny module."""
    module = make_module()
    if perturb is not None:
        with torch.no_grad():
            module.net.get_parameter(perturb).mul_(1.5)
    module.prepare(data)
    with torch.no_grad():
        module.delta.values.copy_(0.1 * torch.randn(module.k, generator=torch.Generator().manual_seed(1)))
    numbers = [{k: v for k, v in evaluate_model(module, data, edited=e, cue_limit=16).items()
                if isinstance(v, float)} for e in (False, True)]
    return module, numbers


def _same(a: list[dict], b: list[dict], tol: float = 0.0) -> None:
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        for name in x:
            assert x[name] == pytest.approx(y[name], rel=tol, abs=tol), name


def test_a_second_module_reads_the_stored_inputs_with_the_same_numbers(store_on):
    data = make_data(max_texts=8)
    first, numbers = _evaluated(data)
    assert first.fastpath.store.stats["written"] > 0 and first.fastpath.stats["stored_hits"] == 0
    assert len(list(store_on.glob("*/*.safetensors"))) == first.fastpath.store.stats["written"]
    second, again = _evaluated(data)
    stats = second.fastpath.stats
    assert stats["stored_hits"] > 0 and stats["upstream_misses"] == 0
    assert second.fastpath.store.digest == first.fastpath.store.digest
    _same(numbers, again, tol=1e-6)
    second.fastpath = None  # the full path: every layer runs
    full = [{k: v for k, v in evaluate_model(second, data, edited=e, cue_limit=16).items() if isinstance(v, float)}
            for e in (False, True)]
    _same(again, full, tol=1e-5)


def test_weights_changed_below_the_layer_are_another_identity(store_on):
    data = make_data(max_texts=8)
    first, _ = _evaluated(data)
    other, _ = _evaluated(data, perturb="model.layers.0.mlp.down_proj.weight")
    assert other.fastpath.store.digest != first.fastpath.store.digest
    assert other.fastpath.stats["stored_hits"] == 0 and other.fastpath.stats["upstream_misses"] > 0
    above, _ = _evaluated(data, perturb=first.parameter)  # W_out of layer L: the edit's own matrix
    assert above.fastpath.store.digest == first.fastpath.store.digest


def test_another_code_version_is_another_identity(store_on, monkeypatch):
    data = make_data(max_texts=8)
    first, _ = _evaluated(data)
    monkeypatch.setattr(json_store, "package_versions", lambda names: {n: "0.0-other" for n in names})
    second, _ = _evaluated(data)
    assert second.fastpath.store.digest != first.fastpath.store.digest
    assert second.fastpath.stats["stored_hits"] == 0


@pytest.mark.parametrize("damage", ["torn", "garbage", "foreign", "nan", "inf", "fifo"])
def test_a_damaged_or_foreign_entry_is_recomputed_with_a_warning(store_on, damage, capsys):
    data = make_data(max_texts=8)
    _, numbers = _evaluated(data)
    entries = sorted(store_on.glob("*/*.safetensors"))
    victim = entries[0]
    if damage == "torn":
        victim.write_bytes(victim.read_bytes()[:-100])
    elif damage == "garbage":
        victim.write_bytes(b"\x00" * 64)
    elif damage in ("nan", "inf"):  # its key and identity intact: only the numbers are wrong
        with safe_open(str(victim), "pt") as f:
            metadata, value = f.metadata(), f.get_tensor("value")
        value.view(-1)[::7] = float(damage)
        victim.write_bytes(save({"value": value}, metadata=metadata))
    elif damage == "fifo":  # opening it for reading would wait for a writer forever
        victim.unlink()
        os.mkfifo(victim)
    else:  # another forward's entry under this one's name
        victim.write_bytes(entries[1].read_bytes())
    capsys.readouterr()
    second, again = _evaluated(data)
    err = capsys.readouterr().err
    assert f"the activation cache entry {victim} " in err and "recomputing it" in err
    assert second.fastpath.store.stats["rejected"] >= 1 and second.fastpath.stats["upstream_misses"] >= 1
    _same(numbers, again, tol=1e-6)


def test_an_unwritable_cache_warns_once_and_the_run_goes_on(store_on, monkeypatch, tmp_path, capsys):
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    monkeypatch.setattr(upstream_store, "cache_dir", lambda: blocker)  # mkdir under a file fails, also as root
    data = make_data(max_texts=8)
    module, numbers = _evaluated(data)
    err = capsys.readouterr().err
    assert err.count("cannot write the activation cache") == 1 and str(blocker) in err
    assert module.fastpath.store.stats["written"] == 0 and module.fastpath.stats["upstream_hits"] > 0
    monkeypatch.setenv("DEBIAS_ACTIVATION_CACHE", "0")
    plain, expected = _evaluated(data)
    assert plain.fastpath.store is None
    _same(numbers, expected, tol=1e-6)


def test_the_size_limit_stops_writing_with_one_warning(store_on, monkeypatch, capsys):
    monkeypatch.setenv("DEBIAS_ACTIVATION_CACHE_GB", "0")
    module, _ = _evaluated(make_data(max_texts=8))
    err = capsys.readouterr().err
    assert err.count("new activations are not stored") == 1 and "$DEBIAS_ACTIVATION_CACHE_GB" in err
    assert module.fastpath.store.stats["written"] == 0 and not list(store_on.glob("*/*.safetensors"))


@pytest.mark.parametrize("limit", ["lots", "inf", "nan", "-1"])
def test_a_bad_size_limit_is_one_line(store_on, monkeypatch, limit):
    monkeypatch.setenv("DEBIAS_ACTIVATION_CACHE_GB", limit)
    with pytest.raises(ValueError, match=rf"^\$DEBIAS_ACTIVATION_CACHE_GB='{limit}': expected a finite number of "
                                         "gigabytes >= 0"):
        make_module().prepare(make_data(max_texts=8))


def test_a_non_finite_input_is_never_stored(store_on, monkeypatch):
    store = upstream_store.UpstreamStore(lambda: {"a": 1})
    store.save(("k",), torch.tensor([1.0, float("nan")]), None)
    store.save(("j",), torch.tensor([1.0, float("inf")]), None)
    assert store.stats["written"] == 0 and not list(store_on.glob("*/*.safetensors"))
    store.save(("i",), torch.tensor([1.0, 2.0]), None)
    assert store.stats["written"] == 1
