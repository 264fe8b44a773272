"""The methods' edits: LoRA, dense, inference-time interventions and model-vs-model, behind one interface."""

import math

import pytest
import torch
from conftest import make_data, make_module, make_trainer

from debias.edits.lora import LoraDelta
from debias.edits.state_diff import StateDiffEdit
from debias.models.tiny import tiny_model


def _logits(net, ids):
    with torch.no_grad():
        return net(input_ids=ids).logits


IDS = torch.randint(3, 200, (2, 9), generator=torch.Generator().manual_seed(0))


def test_lora_merge_is_the_adapter_forward_and_unmerge_is_bit_exact():
    net = tiny_model("llama")
    name = "model.layers.1.mlp.down_proj.weight"
    original = net.get_parameter(name).detach().clone()
    edit = LoraDelta(net, name, rank=2)
    assert edit.changed_parameters() == 2 * sum(original.shape)
    torch.nn.init.normal_(edit.parameters()[1], std=0.5)  # B starts at zero: give the adapter an effect
    adapter = _logits(net, IDS)
    with edit.disabled():
        assert not torch.allclose(_logits(net, IDS), adapter)
    edit.merge()
    torch.testing.assert_close(_logits(net, IDS), adapter, atol=1e-5, rtol=1e-5)
    edit.unmerge()
    assert torch.equal(edit.layer.base_layer.weight, original)
    torch.testing.assert_close(_logits(net, IDS), adapter)


def test_lora_rank_larger_than_the_matrix_is_refused():
    with pytest.raises(ValueError, match=r"LoRA rank must be in \[1, 32\].*got 33"):
        LoraDelta(tiny_model("llama"), "model.layers.1.mlp.down_proj.weight", rank=33)
    with pytest.raises(ValueError, match="LoRA rank"):
        make_module(method="lora", k=None, options={"lora": {"rank": 10_000}})


def test_state_diff_edit_swaps_only_the_changed_weights():
    base, other = tiny_model("llama"), tiny_model("llama")
    state = {k: v.clone() for k, v in other.state_dict().items()}
    name = "model.layers.0.mlp.down_proj.weight"
    state = {k: v.clone() for k, v in base.state_dict().items()}
    state[name].view(-1)[:5] += 1.0
    before = _logits(base, IDS)
    edit = StateDiffEdit(base, state)
    assert list(edit.changed) == [name] and edit.changed_parameters() == 5
    after = _logits(base, IDS)
    assert not torch.allclose(after, before)
    with edit.disabled():
        assert torch.equal(_logits(base, IDS), before)
    assert torch.equal(_logits(base, IDS), after)


@pytest.mark.parametrize("method", ["dense", "lora"])
def test_weight_methods_train_and_keep_the_original_reachable(method, tmp_path):
    module, data = make_module(method=method, k=None), make_data()
    module.prepare(data)
    numel = module.numel
    expected = numel if method == "dense" else 8 * sum(module.mask.shape if module.mask else (32, 64))
    assert module.delta.changed_parameters() == expected
    batch = module.tokenize(data.texts["neutral_heldout"][:2])
    start = module(batch).detach()
    make_trainer(tmp_path, max_steps=3).fit(module, datamodule=data)
    assert not torch.allclose(module(batch), start)
    with module.delta.disabled():
        torch.testing.assert_close(module(batch), start)


@pytest.mark.parametrize("method", ["sae_clamp", "steering_vector"])
def test_inference_methods_hook_the_network_and_have_nothing_to_train(method):
    module, data = make_module(method=method, k=None, options={"steering_vector": {"alpha": 4.0}}), make_data()
    module.prepare(data)
    batch = module.tokenize(data.texts["neutral_heldout"][:2])
    edited = module(batch)
    with module.delta.disabled():
        original = module(batch)
    assert not torch.allclose(edited, original)
    assert module.delta.changed_parameters() == 0
    assert module.configure_optimizers() is None  # fit evaluates and exports it as built
    with pytest.raises(TypeError, match="cannot become a plain checkpoint"):
        module.delta.merge()


def test_method_arguments_are_checked_together():
    with pytest.raises(ValueError) as err:
        make_module(method="dense", k=5, options={"steering_vector": {"alpha": math.nan, "kind": "pca"}})
    message = str(err.value)
    assert "model.edit.entries=5 was given, but method 'dense' has no mask" in message
    assert "model.edit.options.steering_vector.alpha must be a finite number or null, got nan" in message
    assert "'pca'" in message
    with pytest.raises(ValueError, match=r"model.edit.method must be one of .*'instability'.*got 'sparse'"):
        make_module(method="sparse")
    with pytest.raises(ValueError, match="a random mask is method: random"):
        make_module(mask_strategy="random")


def test_clamping_a_latent_outside_the_sae_is_refused():
    with pytest.raises(ValueError, match=r"SAE feature index 64 out of range: the SAE has d_sae=64"):
        make_module(method="sae_clamp", k=None, features=[3, 64])


def test_the_registry_is_the_one_list_of_methods():
    from debias.commands.compare.grid import GRID_METHODS
    from debias.edits import registry
    from debias.training.args import EditArgs

    assert registry.check_name("instability") is None and registry.check_name("sparse") is not None
    assert set(GRID_METHODS) == set(registry.METHODS) | set(registry.GRID_VARIANTS)
    assert all(v.method in registry.METHODS for v in registry.GRID_VARIANTS.values())
    with pytest.raises(ValueError, match="unknown method 'sparse'; expected one of"):
        registry.get("sparse")
    with pytest.raises(ValueError, match=r"model.edit.method must be one of the registered methods \[.*'lora'.*\], "
                                         r"got 'sparse'"):
        EditArgs(method="sparse")


def test_a_new_method_is_one_registry_call(monkeypatch, tmp_path):
    """A method is its builder and one `register` call, under a new name: no entry is overwritten, and the name is
    a valid `model.edit.method` from then on (the config check reads the live table)."""
    from debias.edits import registry
    from debias.edits.mask import InstabilityMask
    from debias.edits.sparse import SparseDelta

    monkeypatch.setattr(registry, "METHODS", dict(registry.METHODS))  # the test's entry leaves with the test
    shipped = dict(registry.METHODS)
    built = []

    def first_rows(ctx):  # a toy method: the first k entries of W_out
        mask = InstabilityMask(shape=tuple(ctx.net.get_parameter(ctx.parameter).shape), indices=torch.arange(ctx.k),
                               **ctx.mask_meta(strategy="first"))
        built.append(mask)
        return SparseDelta(ctx.net, mask)

    registry.register(registry.Method("first_rows", "mask", first_rows, "first k entries"))
    assert {n: m for n, m in registry.METHODS.items() if n != "first_rows"} == shipped
    with pytest.raises(ValueError, match="'random' is already registered"):
        registry.register(registry.Method("random", "mask", first_rows, "first k entries"))
    module, data = make_module(method="first_rows", k=7), make_data()
    make_trainer(tmp_path, max_steps=2).fit(module, datamodule=data)
    assert built and module.mask is built[0] and module.mask.indices.tolist() == list(range(7))
    assert module.changed_entries() > 0


def test_a_method_refuses_a_network_through_its_own_entry(monkeypatch):
    """`Method.check` runs before any SAE build or mask: no method name is tested anywhere."""
    from debias.edits import registry

    monkeypatch.setattr(registry, "METHODS", dict(registry.METHODS))

    def refuse(net, site, parameter, args):
        raise ValueError(f"toy refuses {parameter}")

    registry.register(registry.Method("picky", "weight", registry.METHODS["dense"].build, "dense, but picky",
                                      check=refuse))
    with pytest.raises(ValueError, match=r"toy refuses model\.layers\.1\.mlp\.down_proj\.weight"):
        make_module(method="picky", k=None)
