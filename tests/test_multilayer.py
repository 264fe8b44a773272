"""A masked edit spanning the W_out of several layers (`model.edit.layers`): one mask ranked jointly over all of them,
trained, cached, checkpointed and exported like the one-matrix edit."""

import json
from dataclasses import replace

import pytest
import torch
from conftest import assert_export_consistent, make_data, make_trainer, module_args

from debias.edits.gradients import feature_gradients
from debias.edits.joint import compute_joint_mask, joint_top_k
from debias.edits.mask import InstabilityMask, JointMask, load_masks_for
from debias.edits.record import EditRecord, MatrixDelta
from debias.models import hooks
from debias.models.tiny import tiny_model, tiny_sae, tiny_tokenizer
from debias.training.args import EditArgs
from debias.training.objective import ObjectiveWeights

W1, W2 = "model.layers.1.mlp.down_proj.weight", "model.layers.2.mlp.down_proj.weight"
METRICS = {"before": {}, "after": {}}


def _module(layers, **overrides):
    """`make_module` with `model.edit.layers` (the SAE reads layer 2 unless told otherwise)."""
    from debias.training.module import DebiasModule

    args = module_args(**{"sae": "tiny:blocks.2.hook_mlp_out", **overrides})
    args["edit"] = replace(args["edit"], layers=layers)
    return DebiasModule(**args)


def _weights(module) -> dict[str, torch.Tensor]:
    return {n.replace(".base_layer.", "."): p.detach().clone() for n, p in module.net.named_parameters()
            if "supertuning" not in n and not n.endswith(".values")}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """bias_gradient puts entries in both matrices (the feature's gradient, at the SAE's layer 2, favours layer 2's
    own W_out so much that the tiny model's instability mask takes none of layer 1's)."""
    module = _module([1, 2], method="bias_gradient")
    before = _weights(module)
    make_trainer(tmp_path_factory.mktemp("train"), max_steps=6).fit(module, datamodule=make_data())
    return module, before


def test_joint_top_k_is_the_global_top_k_split_per_matrix():
    a = torch.tensor([[0.1, 5.0], [3.0, 0.2]])
    b = torch.tensor([[4.0, 0.0, 3.0]])
    # 5.0 (a[1]), 4.0 (b[0]), then a tie at 3.0: a[2] comes before b[2] (earlier matrix, as a stable sort)
    assert [t.tolist() for t in joint_top_k([a, b], 3)] == [[1, 2], [0]]
    assert [t.tolist() for t in joint_top_k([a, b], 4)] == [[1, 2], [0, 2]]
    assert [t.tolist() for t in joint_top_k([a, b], 1)] == [[1], []]


def test_the_joint_mask_ranks_the_scores_of_both_matrices_together():
    model, tok = tiny_model("llama"), tiny_tokenizer()
    site = hooks.resolve_hook(model, "blocks.1.hook_mlp_out", tok)
    sae = tiny_sae(32, site.hook_name)
    batches = [dict(tok(["The nurse said that", "My brother, a nurse, said that he was tired."], return_tensors="pt",
                        padding=True))]
    params = ["model.layers.0.mlp.down_proj.weight", "model.layers.1.mlp.down_proj.weight", W2]
    grads = feature_gradients(model, sae, site, params, batches, [3], tok.bos_token_id, progress=False)
    assert grads[0].abs().sum() > 0 and grads[1].abs().sum() > 0
    assert torch.equal(grads[2], torch.zeros_like(grads[2]))  # layer 2 sits above the SAE's hook: it never runs
    mask = compute_joint_mask(model, sae, site, params, [0, 1, 2], batches, [3], k=2500,
                              bos_token_id=tok.bos_token_id, progress=False)
    assert isinstance(mask, JointMask) and mask.k == 2500 and mask.parameters == params and mask.layer == 1
    scores = torch.cat([g.abs().flatten() for g in grads])
    chosen = torch.zeros(scores.numel(), dtype=torch.bool)
    for i, part in enumerate(mask.parts):
        chosen[part.indices + i * 2048] = True
    assert scores[chosen].min() >= scores[~chosen].max() > 0
    stats = mask.stats()
    assert stats["k_per_parameter"] == {p.parameter: p.k for p in mask.parts} and stats["k"] == 2500
    assert mask.parts[0].k > 0 and mask.parts[1].k > 0 and mask.parts[2].k == 0  # layer 2's scores are all 0
    assert [p.layer for p in mask.parts] == [0, 1, 2]
    nonzero = int((scores > 0).sum())
    beyond = compute_joint_mask(model, sae, site, params, [0, 1, 2], batches, [3], k=nonzero + 10,
                                bos_token_id=tok.bos_token_id, progress=False, grads=grads)
    assert beyond.parts[2].indices.tolist() == list(range(10))  # zero scores: chosen by ties, lowest index first


@pytest.mark.parametrize("method", ["instability", "random", "bias_gradient"])
def test_every_masked_method_keeps_the_total_k_over_the_matrices(method):
    module = _module([2, 1], method=method, k=None, fraction=0.05)
    assert module.parameters_edited == [W1, W2] and module.layers_edited == [1, 2]  # layer order, as given or not
    assert module.parameter == W2 and module.numel == 4096 and module.k == 204  # floor(0.05 × 2 × 2048)
    module.prepare(make_data(max_texts=8))
    assert isinstance(module.mask, JointMask) and module.mask.k == 204 and module.mask.parameters == [W1, W2]
    assert module.mask.parts[1].k > 0 and (method == "instability" or module.mask.parts[0].k > 0)
    assert sum(p.numel() for p in module.delta.parameters()) >= 204


def test_training_changes_only_the_masked_entries_of_both_matrices(trained):
    module, before = trained
    assert module.changed_entries() > 0 and module.delta.changed_parameters() == module.k == 40
    after = _weights(module)
    assert set(after) == set(before) and all(torch.equal(after[n], before[n]) for n in after)  # base weights frozen
    module.delta.merge()
    merged = {p: module.delta.base_layers()[p].weight.detach().clone() for p in (W1, W2)}
    module.delta.unmerge()
    for part in module.mask.parts:
        changed = (merged[part.parameter] != before[part.parameter]).flatten().nonzero().flatten()
        assert 0 < changed.numel() and set(changed.tolist()) <= set(part.indices.tolist()), part.parameter
        assert torch.equal(module.delta.base_layers()[part.parameter].weight, before[part.parameter])  # bit-exact
    slots = module.delta.parameters()  # peft gives both modules max(k) slots: the smaller k leaves fillers
    assert any(s.numel() > part.k for s, part in zip(slots, module.mask.parts, strict=True))
    for part, values in zip(module.mask.parts, slots, strict=True):
        assert torch.equal(values[part.k:], torch.zeros_like(values[part.k:]))  # the filler slots never train
    batch = module.tokenize(["My sister, a carpenter, said that"])
    with module.delta.disabled():
        original = module(batch)
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(module.model_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(original, base(**batch).logits)


def test_checkpoint_state_covers_every_matrix_and_refuses_other_layers(trained, tmp_path):
    module, _ = trained
    checkpoint = {}
    module.on_save_checkpoint(checkpoint)
    torch.save(checkpoint, tmp_path / "edit.ckpt")
    saved = torch.load(tmp_path / "edit.ckpt", weights_only=True)  # plain values only
    edit = saved["debias_edit"]
    assert edit["parameters"] == [W1, W2] and edit["parameter"] == W2
    assert set(edit["state"]) == {f"{kind}.{p}" for kind in ("indices", "values") for p in (W1, W2)}
    restored = _module([1, 2], method="bias_gradient")
    restored.preset_mask = InstabilityMask.from_record(edit["mask"])
    restored.prepare(make_data(max_texts=8))
    restored.load_edit_state(saved, source="edit.ckpt")
    for p in (W1, W2):
        assert torch.equal(restored.delta.values_of(p), module.delta.values_of(p))
    single = _module(None, method="bias_gradient")
    single.prepare(make_data(max_texts=8))
    own = {}
    single.on_save_checkpoint(own)
    assert own["debias_edit"]["parameters"] == [W2]
    del own["debias_edit"]["parameters"]  # a checkpoint written before `model.edit.layers` existed
    single.load_edit_state(own, source="old.ckpt")
    with pytest.raises(ValueError, match=f"holds a bias_gradient edit of {W1}, {W2}; this run is bias_gradient on {W2}$"):
        single.load_edit_state(saved, source="edit.ckpt")


def test_fast_path_equals_plain_path_for_a_two_layer_mask():
    terms = ObjectiveWeights(feature=1.0, ablation=1.0, gap=1.0, kl=1.0, cue_kl=1.0)
    data = make_data(max_texts=8)
    module = _module([1, 2], method="random", objective=terms)
    module.prepare(data)
    module.eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for part, slots in zip(module.mask.parts, module.delta.parameters(), strict=True):
            slots[: part.k].copy_(0.1 * torch.randn(part.k, generator=gen))
    fast = module.fastpath
    assert fast is not None and fast.usable() and fast.layer == 1  # the input of the lowest edited layer
    it = iter(data.train_dataloader())
    batches = [next(it)[0] for _ in range(2)]

    def run(path, texts):
        module.use_fast_path = path == "fast"
        params = module.delta.parameters()
        for p in params:
            p.grad = None
        values = module.loss_terms(texts)
        sum(values.values()).backward()
        return {k: v.item() for k, v in values.items()}, torch.cat([p.grad.clone() for p in params])

    for _ in range(2):  # the first round fills the cache, the second reads it
        for texts in batches:
            (t_fast, g_fast), (t_plain, g_plain) = run("fast", texts), run("plain", texts)
            assert t_fast.keys() == t_plain.keys()
            for name in t_fast:
                assert t_fast[name] == pytest.approx(t_plain[name], rel=1e-5, abs=1e-7), name
            torch.testing.assert_close(g_fast, g_plain, rtol=1e-5, atol=1e-8)
    assert fast.stats["upstream_hits"] > 0 and fast.stats["bypassed"] == 0


def test_export_holds_every_matrix_and_reloads_with_the_edited_logits(trained, tmp_path):
    from debias.export import export

    module, before = trained
    out = export(module, tmp_path / "export", METRICS)
    forms = assert_export_consistent(out, module.model_path)  # merged == base + adapter == apply_delta(base)
    assert set(forms) == {"merged", "adapter", "delta"}
    tok = module.tokenizer
    with torch.no_grad():
        edited = module.net(**tok(["My sister, a carpenter, said that"], return_tensors="pt")).logits
    torch.testing.assert_close(forms["merged"], edited, rtol=1e-5, atol=1e-5)
    record = EditRecord.load(out / "debias" / "delta.safetensors")
    assert [m.parameter for m in record.matrices] == [W1, W2] and record.features == tuple(module.features)
    for matrix, part in zip(record.matrices, module.mask.parts, strict=True):
        assert torch.equal(matrix.indices, part.indices) and matrix.values.numel() == part.k
    saved = InstabilityMask.load(out / "debias" / "mask.safetensors")
    assert isinstance(saved, JointMask) and [p.indices.tolist() for p in saved.parts] == [
        p.indices.tolist() for p in module.mask.parts]
    report = json.loads((out / "debias" / "report.json").read_text())
    assert report["parameter"] == W2 and report["parameters"] == [W1, W2] and report["layers"] == [1, 2]
    assert report["k_per_parameter"] == {p.parameter: p.k for p in module.mask.parts} and report["k"] == 40
    assert "layers [1, 2]" in (out / "README.md").read_text()


def test_one_matrix_delta_keeps_the_old_layout(tmp_path):
    record = EditRecord((MatrixDelta(W1, (32, 64), torch.tensor([3, 7]), torch.tensor([0.5, -1.0])),), (4,))
    record.save(tmp_path / "one.safetensors")
    from safetensors import safe_open

    with safe_open(str(tmp_path / "one.safetensors"), "pt") as f:
        assert sorted(f.keys()) == ["indices", "values"] and f.metadata()["parameter"] == W1
    loaded = EditRecord.load(tmp_path / "one.safetensors")
    assert torch.equal(loaded.matrices[0].values, record.matrices[0].values) and loaded.matrices[0].shape == (32, 64)
    assert loaded.features == (4,)


def test_a_saved_joint_mask_is_reused_and_must_cover_exactly_the_matrices(trained, tmp_path):
    module, _ = trained
    path = tmp_path / "joint.safetensors"
    module.mask.save(path)
    shapes = {W1: (32, 64), W2: (32, 64)}
    again = load_masks_for(path, shapes)
    assert [p.indices.tolist() for p in again.parts] == [p.indices.tolist() for p in module.mask.parts]
    with pytest.raises(ValueError, match=r"is for \{.*layers.1.*layers.2.*\}; this run edits \{.*layers.0.*"):
        load_masks_for(path, {"model.layers.0.mlp.down_proj.weight": (32, 64), W2: (32, 64)})
    with pytest.raises(ValueError, match=f"is for 2 matrices .*this run edits {W2} \\[32, 64\\] only"):
        load_masks_for(path, {W2: (32, 64)})
    module.mask.parts[1].save(tmp_path / "one.safetensors")
    with pytest.raises(ValueError, match=r"is for \{.*layers.2.*\}; this run edits \{.*layers.1.*layers.2"):
        load_masks_for(tmp_path / "one.safetensors", shapes)
    reused = _module([1, 2], method="bias_gradient", mask_path=str(path), k=None)
    reused.prepare(make_data(max_texts=8))
    assert reused.k == 40 and [p.k for p in reused.mask.parts] == [p.k for p in module.mask.parts]


def test_gpt2_conv1d_fallback_spans_several_matrices(tmp_path):
    from debias.export import export

    module = _module([1, 2], method="random", base_model="tiny-gpt2")
    module.prepare(make_data(max_texts=8))
    assert module.delta.peft_model is None and all(p.numel() == part.k for p, part in
                                                   zip(module.delta.parameters(), module.mask.parts, strict=True))
    with torch.no_grad():
        for p in module.delta.parameters():
            p.normal_(std=0.05)
    out = export(module, tmp_path / "export", METRICS)
    forms = assert_export_consistent(out, module.model_path)
    assert set(forms) == {"merged", "delta"}
    with torch.no_grad():
        edited = module.net(**module.tokenizer(["My sister, a carpenter, said that"], return_tensors="pt")).logits
    torch.testing.assert_close(forms["merged"], edited, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layers, expected", [
    ([], r"model.edit.layers must be a non-empty list of layer indices, got \[\]"),
    ([1, 2, 1], r"model.edit.layers=\[1, 2, 1\] repeats layer 1; expected each layer at most once"),
    ([-1, 2], r"model.edit.layers=\[-1, 2\]: layer -1 is outside the model \(expected 0 <= i < "),
])
def test_bad_layers_are_refused_before_the_model_loads(layers, expected):
    with pytest.raises(ValueError, match=expected):
        EditArgs(layers=layers)


def test_a_layer_past_the_model_is_refused_once_it_is_loaded():
    with pytest.raises(ValueError, match=r"^model.edit.layers=\[1, 3\]: layer 3 is outside the model \(expected "
                                         r"0 <= i < 3, the model's number of layers\)$"):
        _module([1, 3])


@pytest.mark.parametrize("method", ["dense", "lora", "sae_clamp", "steering_vector", "feature_projection"])
def test_methods_without_a_mask_refuse_layers(method):
    with pytest.raises(ValueError, match=rf"model.edit.layers=\[1, 2\] was given, but method '{method}' edits the SAE "
                                         r"layer's W_out only \(layers applies to \['instability', 'random', "
                                         r"'bias_gradient', 'feature_effect', 'random_features'\]\)"):
        EditArgs(method=method, entries=None, layers=[1, 2])


def test_one_layer_other_than_the_saes_is_refused():
    with pytest.raises(ValueError, match=r"^model.edit.layers=\[0\] names one layer other than the SAE's \(2\); "
                                         r"expected null \(the SAE's layer\), or a list with 2 in it$"):
        _module([0])
