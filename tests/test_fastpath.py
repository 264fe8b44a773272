"""The training fast path (`debias.fastpath`) gives the plain path's losses and gradients, and skips the upstream."""

import json
import logging

import pytest
import torch
from conftest import make_data, make_module, make_trainer

from debias.training.cache import FastPath, stochastic
from debias.training.objective import ObjectiveWeights

ALL_TERMS = ObjectiveWeights(feature=1.0, ablation=1.0, gap=1.0, kl=1.0, cue_kl=1.0)


def _module(base_model, hook, objective=ALL_TERMS, **overrides):
    """A module with its fast path and a non-zero delta, in eval mode, and two training batches.

    The plain path is the same module with `use_fast_path` off (`_plain`): same model, mask and delta.
    """
    data = make_data(max_texts=8)
    module = make_module(base_model=base_model, sae=f"tiny:{hook}", objective=objective, **overrides)
    module.prepare(data)
    module.eval()
    with torch.no_grad():
        module.delta.values.copy_(0.1 * torch.randn(module.k, generator=torch.Generator().manual_seed(1)))
    it = iter(data.train_dataloader())
    return module, [next(it)[0] for _ in range(2)]


def _terms_and_grad(module, texts):
    module.delta.values.grad = None
    terms = module.loss_terms(texts)
    sum(terms.values()).backward()
    return {k: v.item() for k, v in terms.items()}, module.delta.values.grad.clone()


def _plain(module, texts):
    module.use_fast_path = False
    try:
        return _terms_and_grad(module, texts)
    finally:
        module.use_fast_path = True


def _assert_same(module, batches, rounds=2):
    for _ in range(rounds):  # the first round fills the cache, the second reads it
        for texts in batches:
            (t_fast, g_fast), (t_plain, g_plain) = _terms_and_grad(module, texts), _plain(module, texts)
            assert t_fast.keys() == t_plain.keys()
            for name in t_fast:
                assert t_fast[name] == pytest.approx(t_plain[name], rel=1e-5, abs=1e-7), name
            torch.testing.assert_close(g_fast, g_plain, rtol=1e-5, atol=1e-8)


def _sliding_gemma2(tmp_path):
    """A tiny Gemma-2 whose sliding window (3 tokens) is shorter than the texts, so layer types matter."""
    from debias.models.tiny import save_tiny_model

    path = save_tiny_model(tmp_path / "gemma2-sliding", "gemma2")
    config = json.loads((path / "config.json").read_text())
    config["sliding_window"] = 3
    (path / "config.json").write_text(json.dumps(config))
    return str(path)


@pytest.mark.parametrize("family", ["llama", "gemma2", "gpt2", "qwen2", "mistral"])
def test_fast_path_matches_plain_path(family, tmp_path):
    base = _sliding_gemma2(tmp_path) if family == "gemma2" else f"tiny-{family}"
    module, batches = _module(base, "blocks.2.hook_mlp_out")
    fast = module.fastpath
    assert fast is not None and fast.usable()
    calls = {"n": 0}
    layer0 = fast.layers[0]
    layer0.register_forward_hook(lambda *a: calls.__setitem__("n", calls["n"] + 1))
    for texts in batches:
        _terms_and_grad(module, texts)  # fills the cache
    assert calls["n"] > 0 and fast.stats["upstream_misses"] > 0
    calls["n"] = 0
    for texts in batches:
        _terms_and_grad(module, texts)
    assert calls["n"] == 0, "layers below L ran although their output was cached"
    assert fast.layers[0] is layer0  # the stand-ins are gone after each forward
    _assert_same(module, batches, rounds=1)
    stats = fast.stats
    assert stats["upstream_hits"] > 0 and stats["reference_hits"] > 0 and stats["bypassed"] == 0


def test_over_budget_recomputes_with_the_same_result(caplog):
    module, batches = _module("tiny-llama", "blocks.1.hook_mlp_out", cache_budget_mb=0.05)
    with caplog.at_level(logging.WARNING, logger="debias.fastpath"):
        _assert_same(module, batches)
    fast = module
    assert fast.fastpath.stats["over_budget"] > 0 and fast.fastpath.cached_bytes() <= 0.05 * 2**20
    assert "budget" in caplog.text


def test_untested_family_and_dropout_fall_back(caplog):
    fast, batches = _module("tiny-gpt2", "blocks.1.hook_mlp_out", objective=ObjectiveWeights())
    fast.train()
    assert fast.fastpath.usable()  # DebiasModule keeps the frozen network in eval mode
    fast.net.train()  # GPT-2's dropout on by hand: caching would freeze one noise draw
    assert stochastic(fast.net) and not fast.fastpath.usable()
    fast.eval()
    fast.fastpath.model_type = "somethingelse"
    with caplog.at_level(logging.WARNING, logger="debias.fastpath"):
        _assert_same(fast, batches)
    assert "plain path" in caplog.text
    assert fast.fastpath.stats["upstream_hits"] == fast.fastpath.stats["reference_hits"] == 0
    fast.fastpath.model_type = "gpt2"
    assert fast.fastpath.usable()
    layer = fast.fastpath.layers[2]
    layer.__class__ = type("FSDPGPT2Block", (type(layer),), {})  # what FSDP2's fully_shard does to a module
    assert not fast.fastpath.usable()  # ranks must run the same collectives: no skipping under FSDP


def test_layer_zero_caches_references_only():
    fast, batches = _module("tiny-llama", "blocks.0.hook_mlp_out", objective=ObjectiveWeights())
    _assert_same(fast, batches)
    assert fast.fastpath.stats["upstream_misses"] == 0 and fast.fastpath.stats["reference_hits"] > 0


def test_fit_with_and_without_cache_trains_the_same_delta(tmp_path):
    deltas = []
    for cache in (True, False):
        module = make_module(cache_activations=cache, objective=ObjectiveWeights(feature=1.0, kl=1.0, cue_kl=1.0))
        make_trainer(tmp_path, max_steps=8).fit(module, datamodule=make_data(max_texts=12))
        deltas.append(module.delta.values.detach().clone())
        if cache:
            assert module.fastpath.stats["upstream_hits"] > 0
    assert deltas[0].abs().sum() > 0
    torch.testing.assert_close(deltas[0], deltas[1], rtol=1e-5, atol=1e-7)


def test_layer_stack_of_a_peft_wrapped_model():
    module = make_module()
    module.prepare(make_data())
    fast = FastPath(module.net, module.parameter)
    assert fast.layer == 1 and fast.layers is module.net.model.layers


def _other_model(module, *names, scale=0.05):
    """The module's network's weights with `names` perturbed: another model of the same architecture."""
    state = {key: value.clone() for key, value in module.net.state_dict().items()}
    gen = torch.Generator().manual_seed(2)
    for name in names:
        state[name] += scale * torch.randn(state[name].shape, generator=gen) * state[name].abs().mean()
    return state


def _numbers(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if isinstance(v, float)}


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral", "gemma2", "gpt2"])
def test_eval_of_another_model_takes_the_fast_path_with_the_full_paths_numbers(family, capsys):
    """`debias eval` of a model whose W_out at the SAE's layer differs: layers below are cached, same numbers."""
    from debias.edits.state_diff import StateDiffEdit
    from debias.evaluation.evaluate import evaluate_model

    data = make_data(max_texts=8)
    module = make_module(base_model=f"tiny-{family}")
    module.choose_features(data)
    module.attach_edit(StateDiffEdit(module.net, _other_model(module, module.parameter)))
    assert module.delta.changed_names() == [module.parameter]
    assert "debias: evaluation on the fast path (only weights of layers >= 1 differ)" in capsys.readouterr().out
    fast = module.fastpath
    assert fast is not None and fast.usable()
    results = {}
    for path in ("fast", "full"):
        module.use_fast_path = path == "fast"
        results[path] = [_numbers(evaluate_model(module, data, edited=edited, cue_limit=16))
                         for edited in (False, True)]
    assert fast.stats["upstream_hits"] > 0
    for fast_numbers, full_numbers in zip(results["fast"], results["full"], strict=True):
        assert fast_numbers.keys() == full_numbers.keys()
        for name, value in fast_numbers.items():
            assert value == pytest.approx(full_numbers[name], rel=1e-5, abs=1e-6), (family, name)
    assert results["full"][0]["bias_gap"] != results["full"][1]["bias_gap"]  # the edit does change the numbers


@pytest.mark.parametrize("which", ["layer0", "embeddings"])
def test_eval_of_a_model_that_differs_below_the_sae_layer_takes_the_full_path(which, capsys):
    from debias.edits.state_diff import StateDiffEdit

    module = make_module()
    module.choose_features(make_data(max_texts=8))
    name = "model.layers.0.mlp.down_proj.weight" if which == "layer0" else "model.embed_tokens.weight"
    module.attach_edit(StateDiffEdit(module.net, _other_model(module, name, module.parameter)))
    assert module.fastpath is None
    out = capsys.readouterr().out
    assert f"debias: evaluation on the full path ({name} differs; the fast path needs every difference in " \
           "layers >= 1)" in out


def test_use_fast_path_off_takes_the_plain_path_and_keeps_the_cache():
    module, batches = _module("tiny-llama", "blocks.1.hook_mlp_out", objective=ObjectiveWeights())
    fast = module.fastpath
    for texts in batches:
        module.loss(texts)  # fills the cache
    stats = dict(fast.stats)
    module.use_fast_path = False
    with module.fast_path():
        for texts in batches:
            module.loss(texts)
    assert fast.stats == stats and fast.cached_bytes() > 0  # not read, not cleared
    module.use_fast_path = True
    module.loss(batches[0])
    assert fast.stats["upstream_hits"] > stats["upstream_hits"]
