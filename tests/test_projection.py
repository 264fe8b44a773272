"""`feature_projection`: W_out ← (I − α·P) W_out with P the projector onto the features' decoder rows, on tiny random
models: what it removes, what it keeps, merge / unmerge, the hooks it refuses, the PEFT adapter and the fit path."""

import json
import math

import pytest
import torch
from conftest import assert_export_consistent, make_data, make_module, make_trainer

from debias.edits.projection import FeatureProjection, check_sae, check_site
from debias.models import hooks
from debias.models.tiny import tiny_model, tiny_sae

IDS = torch.randint(3, 200, (2, 9), generator=torch.Generator().manual_seed(0))
FEATURES = [3, 7]


def _edit(family="llama", hook="blocks.1.hook_mlp_out", alpha=1.0, features=FEATURES):
    net = tiny_model(family)
    site = hooks.resolve_hook(net, hook)
    parameter = hooks.w_out_name(net, site.layer)
    bias = net.get_submodule(parameter.removesuffix(".weight")).bias
    if bias is not None:  # GPT-2's c_proj: initialised to zero, so give it something along the directions too
        torch.nn.init.normal_(bias, std=1e-3, generator=torch.Generator().manual_seed(1))
    sae = tiny_sae(32, hook)
    check_site(net, site, parameter)
    return net, site, sae, FeatureProjection(net, parameter, sae.W_dec.detach()[features], alpha, features)


def _hooked(net, site) -> torch.Tensor:
    """[batch, seq, d_model] the tensor at `site` (W_out's output) on IDS."""
    with torch.no_grad(), hooks.capture(net, site) as got:
        net(input_ids=IDS)
    assert got.value is not None
    return got.value.detach().clone()


def _along(acts: torch.Tensor, sae, scale: torch.Tensor) -> torch.Tensor:
    """[batch, seq, n_features] the components of `acts` along the features' decoder rows, in units of `scale`
    (a tiny random model writes activations of ~1e-3)."""
    return acts @ sae.W_dec.detach()[FEATURES].T / scale.norm(dim=-1, keepdim=True)


def _logits(net):
    with torch.no_grad():
        return net(input_ids=IDS).logits


@pytest.mark.parametrize("family", ["llama", "gpt2"])  # gpt2: Conv1D storage and a bias on W_out
def test_alpha_one_leaves_no_component_along_the_decoder_rows_and_keeps_the_rest(family):
    net, site, sae, edit = _edit(family)
    with edit.disabled():
        before = _hooked(net, site)
    after = _hooked(net, site)
    assert _along(before, sae, before).abs().max() > 0.05  # there was something to remove
    torch.testing.assert_close(_along(after, sae, before), torch.zeros(2, 9, 2), atol=1e-5, rtol=0)
    q = torch.linalg.qr(sae.W_dec.detach()[FEATURES].T).Q  # [d_model, 2]
    kept = torch.eye(32) - q @ q.T
    torch.testing.assert_close(after @ kept, before @ kept, atol=1e-7, rtol=1e-5)  # the orthogonal part is untouched
    assert edit.basis.shape == (32, 2) and edit.changed_parameters() > 0


def test_alpha_zero_is_the_identity_and_strength_moves_without_a_rebuild():
    net, site, sae, edit = _edit(alpha=0.0)
    with edit.disabled():
        original, before = _logits(net), _hooked(net, site)
    assert torch.equal(_logits(net), original) and edit.changed_parameters() == 0
    edit.merge()
    assert torch.equal(_logits(net), original)
    edit.unmerge()
    edit.set_strength(0.5)
    torch.testing.assert_close(_along(_hooked(net, site), sae, before), 0.5 * _along(before, sae, before),
                               atol=1e-5, rtol=1e-5)
    edit.set_strength(1.0)
    torch.testing.assert_close(_along(_hooked(net, site), sae, before), torch.zeros(2, 9, 2), atol=1e-5, rtol=0)
    edit.merge()
    with pytest.raises(RuntimeError, match=r"unmerge\(\) before set_strength"):
        edit.set_strength(0.5)
    with pytest.raises(ValueError, match="projection alpha must be a finite number.*got nan"):
        FeatureProjection(tiny_model(), "model.layers.1.mlp.down_proj.weight", sae.W_dec[FEATURES], math.nan)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_merge_is_the_adapter_forward_and_unmerge_is_bit_exact(family):
    net, _, _, edit = _edit(family)
    base = edit.base_layers()[edit.parameter]
    original = {name: p.detach().clone() for name, p in base.named_parameters()}
    adapter = _logits(net)
    with edit.disabled():
        assert not torch.allclose(_logits(net), adapter, atol=1e-4)
    edit.merge()
    with pytest.raises(RuntimeError, match="already merged"):  # refused, so unmerge still restores the original
        edit.merge()
    assert not torch.equal(base.weight, original["weight"])
    torch.testing.assert_close(_logits(net), adapter, atol=1e-5, rtol=1e-5)
    edit.unmerge()
    assert all(torch.equal(p, original[name]) for name, p in base.named_parameters())
    torch.testing.assert_close(_logits(net), adapter)


def test_dependent_decoder_rows_give_a_lower_rank_and_zero_rows_are_refused():
    net, _, sae, _ = _edit()
    rows = sae.W_dec.detach()[[3, 7]]
    edit = FeatureProjection(tiny_model(), "model.layers.1.mlp.down_proj.weight", torch.cat([rows, rows.sum(0, True)]))
    assert edit.basis.shape == (32, 2)
    with pytest.raises(ValueError, match="decoder rows to project out are zero"):
        FeatureProjection(tiny_model(), "model.layers.1.mlp.down_proj.weight", torch.zeros(2, 32))
    with pytest.raises(ValueError, match="decoder directions have dimension 16, but .*down_proj.weight writes 32"):
        FeatureProjection(tiny_model(), "model.layers.1.mlp.down_proj.weight", torch.randn(2, 16))


@pytest.mark.parametrize(("family", "hook", "why"), [
    ("gemma2", "blocks.1.hook_mlp_out",
     r"output of model.layers.1.post_feedforward_layernorm \(Gemma2RMSNorm\), a per-token normalisation"),
    ("llama", "blocks.1.hook_resid_post", r"output of model.layers.1 \(LlamaDecoderLayer\): the residual stream"),
    ("llama", "blocks.1.mlp.hook_post", r"input of model.layers.1.mlp.down_proj \(Linear\): W_out's input"),
])
def test_hooks_off_w_outs_output_are_refused_naming_the_hook(family, hook, why):
    net = tiny_model(family)
    site = hooks.resolve_hook(net, hook)
    with pytest.raises(ValueError, match=rf"^feature_projection needs an SAE on the output of .*{hook} is the {why}"):
        check_site(net, site, hooks.w_out_name(net, 1))


def test_gemma2_mlp_output_hook_is_accepted_and_an_mlp_that_does_more_is_refused(monkeypatch):
    net = tiny_model("gemma2")
    site = hooks.resolve_hook(net, "blocks.1.mlp.hook_out")
    check_site(net, site, hooks.w_out_name(net, 1))
    mlp = net.get_submodule("model.layers.1.mlp")
    forward = mlp.forward
    monkeypatch.setattr(mlp, "forward", lambda x: 2 * forward(x))
    with pytest.raises(ValueError, match=r"blocks.1.mlp.hook_out \(model.layers.1.mlp output\) differs from "
                                         r"model.layers.1.mlp.down_proj's output"):
        check_site(net, site, hooks.w_out_name(net, 1))


def test_a_centring_sae_and_a_bad_alpha_are_refused_before_anything_is_built():
    with pytest.raises(ValueError, match=r"normalize_activations='layer_norm' \(expected none"):
        check_sae(tiny_sae(32, "blocks.1.hook_mlp_out", normalize_activations="layer_norm"))
    check_sae(tiny_sae(32, "blocks.1.hook_mlp_out", normalize_activations="constant_norm_rescale"))
    from debias.training.args import EditArgs

    with pytest.raises(ValueError, match=r"model.edit.options.feature_projection.alpha must be a finite number, got inf"):
        EditArgs(method="feature_projection", options={"feature_projection": {"alpha": math.inf}})
    with pytest.raises(ValueError, match=r"^feature_projection needs .*blocks.1.hook_resid_post is the output"):
        make_module(method="feature_projection", sae="tiny:blocks.1.hook_resid_post")


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """`feature_projection` through `Trainer.fit` with the report/export callback, as `debias fit` runs it."""
    from debias.callbacks import ReportAndExport

    tmp = tmp_path_factory.mktemp("projection")
    module, data = make_module(method="feature_projection", features=FEATURES), make_data()
    callback = ReportAndExport(export_dir=str(tmp / "export"), completions=0, plots=False)
    trainer = make_trainer(tmp, max_steps=5, callbacks=[callback])
    trainer.fit(module, datamodule=data)
    return module, data, trainer, tmp / "export"


def test_fit_runs_no_step_evaluates_and_reports_the_projection(fitted):
    module, data, trainer, out = fitted
    assert trainer.global_step == 0 and module.delta.parameters() == [] and module.configure_optimizers() is None
    batch = module.tokenize(data.texts["neutral_heldout"][:2])
    with module.delta.disabled():
        original = module(batch)
    assert not torch.allclose(module(batch), original, atol=1e-4)
    report = json.loads((out / "debias" / "report.json").read_text())
    assert report["method"] == "feature_projection" and report["steps"] == 0 and report["k"] is None
    assert report["features"] == FEATURES and report["changed_parameters"] == 2 * (32 + 64)
    assert report["after"]["feature_act"] < report["before"]["feature_act"]
    assert not (out / "debias" / "mask.safetensors").exists()


def test_the_adapter_loaded_with_peft_is_the_merged_model(fitted):
    module, _, _, out = fitted
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == len(FEATURES) and config["lora_alpha"] == len(FEATURES)
    assert config["target_modules"] == [module.parameter.removesuffix(".weight")]
    forms = assert_export_consistent(out, module.model_path)  # merged, base + adapter: logits within 1e-5
    assert set(forms) == {"merged", "adapter"}
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(module.model_path).get_parameter(module.parameter)
    merged = AutoModelForCausalLM.from_pretrained(out).get_parameter(module.parameter)
    q = module.delta.basis.float()
    torch.testing.assert_close(merged, base - q @ (q.T @ base), atol=1e-6, rtol=1e-5)


def test_a_checkpoints_state_rebuilds_the_edit_and_other_features_are_refused(fitted):
    module, _, _, _ = fitted
    state = module.delta.trainable_state()
    assert float(state["alpha"]) == 1.0 and state["features"].tolist() == FEATURES
    sae = module.sae
    net = tiny_model()
    other = FeatureProjection(net, module.parameter, sae.W_dec.detach()[FEATURES], 0.0, FEATURES)
    other.load_trainable_state(state)
    assert other.alpha == 1.0 and torch.equal(other.basis, module.delta.basis)
    wrong = FeatureProjection(tiny_model(), module.parameter, sae.W_dec.detach()[[3, 5]], 1.0, [3, 5])
    with pytest.raises(ValueError, match=r"the checkpoint projects out features \[3, 7\]; this run's are \[3, 5\]"):
        wrong.load_trainable_state(state)
