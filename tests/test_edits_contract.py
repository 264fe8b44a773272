"""The one `Edit` contract: every method's edit offers it, `merge` / `unmerge` are guarded by a `merged` state and a
merge is checked to be finite, and what an edit changed is one frozen `EditRecord`."""

import dataclasses
import inspect

import pytest
import torch
from conftest import make_data, make_module

from debias.edits import registry
from debias.edits.base import Edit
from debias.edits.record import EditRecord, MatrixDelta, apply_delta
from debias.edits.state_diff import StateDiffEdit
from debias.models.tiny import tiny_model

WEIGHT_METHODS = ["instability", "dense", "lora", "feature_projection"]
CONTRACT = [name for name, _ in inspect.getmembers(Edit) if not name.startswith("_")] + ["mask", "saves_delta"]


@pytest.fixture(scope="module")
def data():
    return make_data()


def _prepared(method, data, base_model="tiny-llama", **args):
    module = make_module(method=method, base_model=base_model, **args)
    module.prepare(data)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a trained edit's values (and LoRA's B) start at 0: give the edit an effect
        for p in module.delta.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen))
    return module


def _weights(module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.net.state_dict().items()}


def _base_weights(edit) -> dict[str, torch.Tensor]:
    """The plain layers' weights (and biases): what a merge writes."""
    return {f"{name}.{key}": p.detach().clone() for name, layer in edit.base_layers().items()
            for key, p in layer.named_parameters()}


@pytest.mark.parametrize("method", list(registry.METHODS))
def test_every_registered_method_builds_an_edit_with_the_whole_contract(method, data):
    edit = _prepared(method, data).delta
    missing = [name for name in CONTRACT if not hasattr(edit, name)]
    assert not missing, f"{type(edit).__name__} lacks {missing}"
    record = edit.record()
    assert isinstance(record, EditRecord) and dataclasses.is_dataclass(record)
    with pytest.raises(dataclasses.FrozenInstanceError):
        record.matrices = ()  # type: ignore[misc]
    assert edit.saves_delta == (registry.get(method).kind == "mask")  # dense: every entry, no delta file
    assert (edit.mask is None) == (registry.get(method).mask_from is None)


@pytest.mark.parametrize("method", WEIGHT_METHODS)
def test_merging_twice_or_unmerging_unmerged_raises_and_merge_unmerge_is_bit_exact(method, data):
    module = _prepared(method, data)
    edit, original = module.delta, _weights(module)
    with pytest.raises(RuntimeError, match="not merged; merge"):
        edit.unmerge()
    edit.merge()
    assert edit.merged
    merged = _weights(module)
    with pytest.raises(RuntimeError, match="already merged"):
        edit.merge()
    assert all(torch.equal(merged[k], v) for k, v in _weights(module).items())  # the refused merge changed nothing
    edit.unmerge()
    assert not edit.merged and all(torch.equal(original[k], v) for k, v in _weights(module).items())


def test_a_second_sparse_merge_no_longer_overwrites_the_saved_weights(data):
    """The former bug: merge, merge, unmerge left the merged weights in place."""
    module = _prepared("instability", data)
    base = module.delta.base_weight().detach().clone()
    module.delta.merge()
    with pytest.raises(RuntimeError):
        module.delta.merge()
    module.delta.unmerge()
    assert torch.equal(module.delta.base_weight(), base)


@pytest.mark.parametrize(("method", "base_model", "layers"), [
    ("instability", "tiny-llama", None),  # peft Super-Tuning's safe merge
    ("lora", "tiny-llama", None),  # peft LoRA's safe merge
    ("random", "tiny-gpt2", None),  # SparseConv1D: the edit's own check
    ("random", "tiny-llama", [1, 2]),  # two matrices: the first merges, the second is refused, both left untouched
])
def test_a_non_finite_merge_is_refused_and_the_weights_are_left_untouched(method, base_model, layers, data):
    module = _prepared(method, data, base_model=base_model, layers=layers)
    edit = module.delta
    original = _base_weights(edit)
    with torch.no_grad():
        edit.parameters()[-1].view(-1)[0] = float("nan")
    with pytest.raises(ValueError, match="non-finite weights: refused, the weights are left as they were"):
        edit.merge()
    assert not edit.merged
    after = _base_weights(edit)
    assert len(original) == (2 if layers else 1) + (base_model == "tiny-gpt2")  # GPT-2's c_proj has a bias
    assert all(torch.equal(original[k], after[k]) for k in original)
    with torch.no_grad():
        edit.parameters()[-1].view(-1)[0] = 0.0
    edit.merge()  # the state is clean: a finite edit merges afterwards
    edit.unmerge()


@pytest.mark.parametrize("method", ["instability", "lora", "feature_projection"])
def test_the_record_applied_to_the_base_model_is_the_merged_model(method, data):
    module = _prepared(method, data)
    record = module.delta.record()
    base = {name: layer.weight.detach().clone() for name, layer in module.delta.base_layers().items()}
    module.delta.merge()
    merged = {name: layer.weight.detach().clone() for name, layer in module.delta.base_layers().items()}
    module.delta.unmerge()
    plain = torch.nn.Module()
    for i, name in enumerate(base):
        plain.register_parameter(f"w{i}", torch.nn.Parameter(base[name].clone()))
    renamed = EditRecord(tuple(dataclasses.replace(m, parameter=f"w{list(base).index(m.parameter)}")
                               for m in record.matrices if m.parameter in base), record.features)
    renamed.apply(plain)
    for i, name in enumerate(base):
        torch.testing.assert_close(plain.get_parameter(f"w{i}"), merged[name], rtol=0, atol=1e-6)
    assert record.features == tuple(module.features)
    if method == "instability":  # exactly the k trained values at the mask's indices
        (matrix,) = record.matrices
        assert torch.equal(matrix.indices, module.mask.indices) and matrix.values.numel() == module.mask.k


def test_a_record_saves_and_loads_and_an_inference_record_has_no_delta(tmp_path, data):
    net = tiny_model("llama")
    name = "model.layers.1.mlp.down_proj.weight"
    before = net.get_parameter(name).detach().clone()
    record = EditRecord((MatrixDelta(name, tuple(before.shape), torch.tensor([0, 5]), torch.tensor([1.0, -2.0])),),
                        (3, 9))
    record.save(tmp_path / "delta.safetensors")
    assert EditRecord.load(tmp_path / "delta.safetensors").features == (3, 9)
    apply_delta(net, tmp_path / "delta.safetensors")
    assert net.get_parameter(name).view(-1)[5] == before.view(-1)[5] - 2.0
    clamp = _prepared("sae_clamp", data).delta.record()
    assert clamp.matrices == () and clamp.features
    with pytest.raises(ValueError, match="changed no weight"):
        clamp.save(tmp_path / "none.safetensors")


def test_another_model_scales_between_base_and_edited_and_is_restored():
    from debias.edits.scaling import scaled

    base = tiny_model("llama")
    name = "model.layers.0.mlp.down_proj.weight"
    state = {k: v.clone() for k, v in base.state_dict().items()}
    original = state[name].clone()
    state[name].view(-1)[:4] += 2.0
    edit = StateDiffEdit(base, state)
    assert [name for name in CONTRACT if not hasattr(edit, name)] == []
    with scaled(edit, 0.5):
        torch.testing.assert_close(base.get_parameter(name).view(-1)[:4], original.view(-1)[:4] + 1.0)
    assert torch.equal(base.get_parameter(name), state[name])
    (matrix,) = edit.record().matrices
    assert matrix.indices.tolist() == [0, 1, 2, 3] and torch.allclose(matrix.values, torch.full((4,), 2.0))
    with pytest.raises(RuntimeError, match="not merged"):
        edit.unmerge()
    edit.merge()
    with pytest.raises(RuntimeError, match="already merged"):
        edit.merge()
