"""Null-space-constrained updates (debias.edits.null_space, model.train.null_space_energy): the fitted basis, the
exact projection of a dense update, and a masked edit kept (nearly) off the preserved prompts' inputs; and a mask
ranked inside that null space (model.edit.rank_null_space_energy)."""

import re

import pytest
import torch
from conftest import make_data, make_module, make_trainer

from debias.edits.null_space import NullSpaceFitter, fit_null_space, project_sparse
from debias.models.tiny import tiny_model, tiny_tokenizer
from debias.training.args import TrainArgs

TEXTS = ["My mother is a woman", "My brother, a nurse, said that he", "The queen is a woman", "Tom said that he"]


def _layer_inputs(net, tok, texts):
    """{W_out input} of layer 1 at every real token: [tokens, d_mlp]."""
    rows = []
    handle = net.model.layers[1].mlp.down_proj.register_forward_pre_hook(lambda m, a: rows.append(a[0][0]))
    try:
        with torch.no_grad():
            for text in texts:
                net(**tok(text, return_tensors="pt"))
    finally:
        handle.remove()
    return torch.cat(rows)


def test_batched_moments_equal_the_whole_set_and_energy_one_preserves_exactly():
    net, tok = tiny_model("llama"), tiny_tokenizer()
    layer = {"w": net.model.layers[1].mlp.down_proj}
    whole, parts = NullSpaceFitter(layer), NullSpaceFitter(layer)
    whole.update(net, tok(TEXTS, return_tensors="pt", padding=True))
    for text in TEXTS:
        parts.update(net, tok([text], return_tensors="pt"))
    assert whole.tokens == parts.tokens and torch.allclose(whole.moments["w"], parts.moments["w"], atol=1e-8)

    null_space = parts.fit(1.0)
    inputs = _layer_inputs(net, tok, TEXTS)
    assert null_space.ranks()["w"] == torch.linalg.matrix_rank(inputs.double()) < inputs.shape[1]
    update = torch.randn(32, 64)
    projected = null_space.project("w", update)
    assert (inputs @ projected.T).abs().max() < 1e-4 * (inputs @ update.T).abs().max()  # preserved: unchanged
    other = _layer_inputs(net, tok, ["The engineer fixed the bridge quickly"])
    assert (other @ projected.T).abs().max() > 0.1 * (other @ update.T).abs().max()  # elsewhere: still an edit
    assert torch.allclose(null_space.project("w", projected), projected, atol=1e-5)  # idempotent


def test_lower_energy_keeps_fewer_directions_and_bad_energy_is_refused():
    net, tok = tiny_model("llama"), tiny_tokenizer()
    batches = [tok(TEXTS, return_tensors="pt", padding=True)]
    layer = {"w": net.model.layers[1].mlp.down_proj}
    ranks = [fit_null_space(net, layer, batches, e).ranks()["w"] for e in (0.5, 0.9, 1.0)]
    assert ranks[0] < ranks[1] <= ranks[2]
    with pytest.raises(ValueError, match=r"energy must be in \(0, 1\], got 1.5"):
        fit_null_space(net, layer, batches, 1.5)
    with pytest.raises(ValueError, match=r"model.train.null_space_energy must be in \(0, 1\] or null, got 0"):
        TrainArgs(null_space_energy=0)


def test_project_sparse_only_touches_masked_entries():
    net, tok = tiny_model("llama"), tiny_tokenizer()
    null_space = fit_null_space(net, {"w": net.model.layers[1].mlp.down_proj},
                                [tok(TEXTS, return_tensors="pt", padding=True)], 0.9)
    indices, values = torch.tensor([0, 5, 70, 2000]), torch.randn(4)
    before = values.clone()
    project_sparse(null_space, "w", (32, 64), indices, values)
    dense = torch.zeros(32, 64)
    dense.view(-1)[indices] = before
    assert torch.allclose(values, null_space.project("w", dense).view(-1)[indices])


def _preserved_component(module) -> float:
    (m,) = module.delta.masks
    dense = torch.zeros(m.shape)
    dense.view(-1)[m.indices] = module.delta.values_of(m.parameter).detach()
    return float((dense @ module.null_space.bases[m.parameter]).norm() / dense.norm())


def test_a_trained_masked_edit_stays_off_the_preserved_inputs(tmp_path):
    runs = {}
    for energy in (None, 0.9):
        torch.manual_seed(0)
        module = make_module(k=600, null_space_energy=energy)
        make_trainer(tmp_path / str(energy), max_steps=4).fit(module, datamodule=make_data())
        runs[energy] = module
    projected, plain = runs[0.9], runs[None]
    plain.null_space = projected.null_space  # the same basis: measure the plain edit's component in it
    assert plain.delta.changed_entries() > 0 and projected.delta.changed_entries() > 0
    assert _preserved_component(projected) < 0.5 * _preserved_component(plain)


def test_a_mask_ranked_in_the_null_space_is_the_top_k_of_the_projected_gradient():
    from debias.edits.gradients import gap_gradients
    from debias.edits.joint import joint_top_k
    from debias.training.preserve import preserved_batches

    data = make_data()
    plain, ranked = make_module(method="bias_gradient", k=200), make_module(method="bias_gradient", k=200,
                                                                             rank_null_space_energy=0.9)
    for module in (plain, ranked):
        module.prepare(data)
    (m,) = ranked.delta.masks
    layer = ranked.net.get_submodule(m.parameter.removesuffix(".weight"))
    space = fit_null_space(ranked.net, {m.parameter: layer}, preserved_batches(ranked, data), 0.9)
    (grad,) = gap_gradients(ranked.net, ranked.tokenizer, [m.parameter], data.gap_texts(), None, data.eval_batch_size,
                            progress=False)
    (expected,) = joint_top_k([space.project(m.parameter, grad).abs()], 200)
    assert torch.equal(m.indices, expected)
    assert not torch.equal(m.indices, plain.delta.masks[0].indices)  # the projection changes the ranking
    assert m.extra["rank_null_space_energy"] == 0.9 and "rank_null_space_energy" not in plain.delta.masks[0].extra


@pytest.mark.parametrize(("edit", "message"), [
    ({"rank_null_space_energy": 1.5}, "model.edit.rank_null_space_energy must be in (0, 1] or null, got 1.5"),
    ({"rank_null_space_energy": 0.9, "method": "random"}, "method 'random' ranks no gradient"),
    ({"rank_null_space_energy": 0.9, "method": "dense", "fraction": None}, "method 'dense' ranks no gradient"),
])
def test_a_bad_null_space_ranking_is_refused_by_name(edit, message):
    from debias.training.args import EditArgs

    with pytest.raises(ValueError, match=re.escape(message)):
        EditArgs(**edit)


def test_a_given_mask_is_not_ranked_again(tmp_path):
    from debias.training.args import EditArgs

    path = tmp_path / "mask.safetensors"
    path.write_bytes(b"")
    with pytest.raises(ValueError, match="a given mask is used as it is"):
        EditArgs(rank_null_space_energy=0.9, mask_path=str(path))
