"""TL hook names on plain HF models, checked against TransformerBridge itself on tiny random models."""

import copy
import warnings

import pytest
import torch
from transformers.pytorch_utils import Conv1D

from debias.models.hooks import (
    HookSite,
    _placeholder_tokenizer,
    capture,
    forward_until,
    hooked_dim,
    replace,
    resolve_hook,
    w_out_name,
    weight_layout,
)
from debias.models.tiny import FAMILIES, tiny_model, tiny_tokenizer

TEXT = ["The nurse said that she would come back.", "The engineer said that he was late."]
W_OUT = {
    "llama": "model.layers.1.mlp.down_proj.weight",
    "qwen2": "model.layers.1.mlp.down_proj.weight",
    "mistral": "model.layers.1.mlp.down_proj.weight",
    "gemma2": "model.layers.1.mlp.down_proj.weight",
    "gpt2": "transformer.h.1.mlp.c_proj.weight",
}


@pytest.fixture(scope="module")
def inputs():
    return tiny_tokenizer()(TEXT, return_tensors="pt", padding=True)


def _eager_model(family):
    model = tiny_model(family)
    model.set_attn_implementation("eager")
    return model


def _bridge_cache(model, input_ids):
    """The bridge's own activations, booted on a copy (the bridge replaces modules in the model it wraps)."""
    from transformer_lens.model_bridge import TransformerBridge

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bridge = TransformerBridge.boot_transformers(
            "tiny", hf_model=copy.deepcopy(model), tokenizer=_placeholder_tokenizer(), device="cpu"
        )
        return bridge.run_with_cache(input_ids)[1]


def _structure(model):
    return [(name, type(mod).__name__) for name, mod in model.named_modules()], model.config._attn_implementation


@pytest.mark.parametrize("family", FAMILIES)
def test_capture_matches_bridge_and_hidden_states(family, inputs):
    model = _eager_model(family)
    before = _structure(model)
    mlp_out = resolve_hook(model, "blocks.1.hook_mlp_out")
    resid_post = resolve_hook(model, "blocks.1.hook_resid_post")
    assert _structure(model) == before  # resolution leaves the model alone
    assert mlp_out.layer == resid_post.layer == 1 and mlp_out.position == resid_post.position == "output"
    with torch.no_grad(), capture(model, mlp_out) as got_mlp, capture(model, resid_post) as got_resid:
        out = model(input_ids=inputs.input_ids, output_hidden_states=True)
    cache = _bridge_cache(model, inputs.input_ids)
    d_model = model.config.hidden_size
    assert got_mlp.value.shape == got_resid.value.shape == (*inputs.input_ids.shape, d_model)
    torch.testing.assert_close(got_mlp.value, cache["blocks.1.hook_mlp_out"], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(got_resid.value, cache["blocks.1.hook_resid_post"], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(got_resid.value, out.hidden_states[2], atol=0, rtol=0)


def test_gemma2_mlp_out_is_after_post_feedforward_layernorm(inputs):
    model = _eager_model("gemma2")
    site = resolve_hook(model, "blocks.1.hook_mlp_out")
    assert site.module_name == "model.layers.1.post_feedforward_layernorm"
    mlp = HookSite("raw mlp", 1, "model.layers.1.mlp", "output")
    norm = HookSite("post ff norm", 1, "model.layers.1.post_feedforward_layernorm", "output")
    with torch.no_grad(), capture(model, site) as got, capture(model, mlp) as raw, capture(model, norm) as normed:
        model(input_ids=inputs.input_ids)
    assert torch.equal(got.value, normed.value)
    assert not torch.allclose(got.value, raw.value, atol=1e-3)


def test_resid_pre_is_a_layer_input(inputs):
    model = tiny_model("llama")
    site = resolve_hook(model, "blocks.1.hook_resid_pre")
    assert (site.module_name, site.position) == ("model.layers.1", "input")
    with torch.no_grad(), capture(model, site) as got:
        out = model(input_ids=inputs.input_ids, output_hidden_states=True)
    torch.testing.assert_close(got.value, out.hidden_states[1], atol=0, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_w_out_name_and_layout(family):
    model = tiny_model(family)
    name = w_out_name(model, 1)
    assert name == W_OUT[family]
    weight = dict(model.named_parameters())[name]
    module = model.get_submodule(name.removesuffix(".weight"))
    d_model, d_mlp = model.config.hidden_size, 64
    if family == "gpt2":
        assert isinstance(module, Conv1D) and weight_layout(module) == "in_out" and weight.shape == (d_mlp, d_model)
    else:
        assert weight_layout(module) == "out_in" and weight.shape == (d_model, d_mlp)
    with pytest.raises(ValueError, match="layout"):
        weight_layout(torch.nn.Embedding(3, 3))


@pytest.mark.parametrize("family", ["llama", "gemma2", "gpt2"])
def test_forward_until_stops_at_the_site(family, inputs):
    model = tiny_model(family)
    site = resolve_hook(model, "blocks.1.hook_mlp_out")
    with torch.no_grad(), capture(model, site) as full:
        model(**inputs)
    last = model.get_submodule(resolve_hook(model, "blocks.2.hook_resid_post").module_name)
    fired = []
    handle = last.register_forward_hook(lambda *args: fired.append(True))
    try:
        early = forward_until(model, site, **inputs)
    finally:
        handle.remove()
    assert not fired
    assert early.requires_grad
    torch.testing.assert_close(early, full.value, atol=0, rtol=0)
    assert hooked_dim(model, site) == model.config.hidden_size
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())  # all hooks removed


def test_replace_changes_downstream_logits(inputs):
    model = tiny_model("llama")
    with torch.no_grad():
        before = model(**inputs).logits
        for name in ("blocks.1.hook_mlp_out", "blocks.1.hook_resid_pre"):
            site = resolve_hook(model, name)
            with replace(model, site, torch.zeros_like), capture(model, site) as seen:
                ablated = model(**inputs).logits
            assert not torch.allclose(before, ablated, atol=1e-4)
            assert site.position == "input" or torch.count_nonzero(seen.value) == 0
        torch.testing.assert_close(model(**inputs).logits, before, atol=0, rtol=0)  # hooks gone after the block


def test_capture_through_peft_supertuning(inputs):
    from peft import SupertuningConfig, get_peft_model

    model = tiny_model("llama")
    site = resolve_hook(model, "blocks.1.hook_mlp_out")
    down = resolve_hook(model, "blocks.1.mlp.out.hook_out")
    assert down.module_name == "model.layers.1.mlp.down_proj"
    with torch.no_grad(), capture(model, site) as plain:
        model(**inputs)
    plain = plain.value.clone()
    peft_model = get_peft_model(model, SupertuningConfig(target_modules=["down_proj"], sparsity=0.5))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "supertuning_values" in name:
                param.fill_(0.5)
    assert resolve_hook(peft_model, "blocks.1.hook_mlp_out").module_name == "base_model.model.model.layers.1.mlp"
    assert w_out_name(peft_model, 1) == "base_model.model.model.layers.1.mlp.down_proj.base_layer.weight"
    assert w_out_name(model, 1) == "model.layers.1.mlp.down_proj.base_layer.weight"
    assert weight_layout(model.get_submodule("model.layers.1.mlp.down_proj")) == "out_in"
    for target in (model, peft_model):  # sites resolved before wrapping, on the inner or the peft model
        with torch.no_grad(), capture(target, site) as mlp, capture(target, down) as wrapped:
            target(**inputs)
        assert mlp.value is not None and wrapped.value is not None  # the wrapper's hook fired
        torch.testing.assert_close(mlp.value, wrapped.value, atol=0, rtol=0)
        assert not torch.allclose(mlp.value, plain, atol=1e-4)  # the edited weight is live
        torch.testing.assert_close(forward_until(target, down, **inputs), mlp.value, atol=0, rtol=0)


def test_unknown_hook_name_lists_nearby_names():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="blocks.1.hook_mlp_ot") as err:
        resolve_hook(model, "blocks.1.hook_mlp_ot")
    assert "blocks.1.hook_mlp_out" in str(err.value)
    with pytest.raises(ValueError, match="blocks.7.hook_resid_post"):
        resolve_hook(model, "blocks.7.hook_resid_post")  # only 3 layers
    with pytest.raises(ValueError, match="inside a module"):
        resolve_hook(model, "blocks.1.attn.hook_pattern")
