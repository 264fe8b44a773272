"""The SAE-guided mask variants: `feature_effect` (the train gap's gradient taken only through the features) and the
`random_features` control (instability with the features replaced by as many live latents drawn at random)."""

import pytest
import torch
from conftest import make_data, make_module

from debias.edits.feature_effect import feature_effect_gradient, feature_effect_gradients
from debias.edits.gradients import STRATEGIES, gap_gradients
from debias.edits.joint import joint_top_k
from debias.edits.mask import InstabilityMask, JointMask, compute_mask, top_k_flat
from debias.features import attribution
from debias.features.select import live_latents, random_live_features
from debias.models import hooks
from debias.models.scoring import next_token_logprobs, real_token_mask
from debias.models.tiny import tiny_model, tiny_sae, tiny_tokenizer
from debias.prompts import GapPrompts

FEMALE = ["The nurse said that", "My sister, a secretary, told us that", "The receptionist thinks"]
MALE = ["The engineer said that", "The mechanic told us that", "My brother, a pilot, thinks"]
W = [f"model.layers.{i}.mlp.down_proj.weight" for i in range(3)]


@pytest.fixture(scope="module")
def tiny():
    """A tiny llama, its tokenizer, the hook `blocks.1.hook_mlp_out` and a random SAE there."""
    model, tok = tiny_model(), tiny_tokenizer()
    site = hooks.resolve_hook(model, "blocks.1.hook_mlp_out", tok)
    return model, tok, site, tiny_sae(32, site.hook_name)


def _effect(tiny, features, params=W, sae=None):
    model, tok, site, own = tiny
    return feature_effect_gradients(model, tok, sae or own, site, params, [FEMALE, MALE], features, progress=False)


def _close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6 * float(b.abs().max()))


def _chain_rule(tiny, features):
    """Σ_f (∂gap/∂a_f) · ∂a_f/∂W by two separate steps: ∂gap/∂z per position from the attribution's splice (SAE
    with its error term), then those fixed weights times the features' activations, differentiated by autograd."""
    model, tok, site, sae = tiny
    prompts = GapPrompts((FEMALE, MALE), (FEMALE, MALE), (FEMALE, MALE), ["{profession}"])
    ((_, [(_, d_gap_dz, _), _]),) = list(attribution._attribute_sites(model, tok, prompts, {
        site: attribution.sae_splice(sae)}, batch_size=16))  # one batch: both groups
    weights = [model.get_parameter(p) for p in W]
    with torch.enable_grad(), hooks.capture(model, site) as captured:
        next_token_logprobs(model, tok, prompts.prompts, 16)  # the same padded batch as the attribution's
        acts = sae.encode(captured.value)[..., features]
        grads = torch.autograd.grad((d_gap_dz[..., features] * acts).sum(), weights, allow_unused=True)
    return [torch.zeros_like(w) if g is None else g for w, g in zip(weights, grads, strict=True)]


def test_the_gradient_is_the_chain_rule_through_the_features(tiny):
    features = [3, 5, 11]
    ours, reference = _effect(tiny, features), _chain_rule(tiny, features)
    assert ours[0].abs().sum() > 0 and ours[1].abs().sum() > 0
    for g, ref in zip(ours[:2], reference[:2], strict=True):
        _close(g, ref)
    assert torch.equal(ours[2], torch.zeros_like(ours[2]))  # above the hook: it cannot move the features


def _lossless(sae):
    """The SAE x -> relu(x) · I + relu(−x) · (−I) = x: zero error, and its Jacobian is the identity."""
    eye = torch.eye(32)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye], dim=1))
        sae.W_dec.copy_(torch.cat([eye, -eye], dim=0))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae


def test_every_latent_of_a_lossless_sae_gives_the_plain_gap_gradient_of_the_saes_layer(tiny):
    model, tok, site, _ = tiny
    sae = _lossless(tiny_sae(32, site.hook_name))
    x = torch.randn(2, 5, 32)
    torch.testing.assert_close(sae.decode(sae.encode(x)), x)
    ours = _effect(tiny, list(range(64)), sae=sae)
    plain = gap_gradients(model, tok, W, [FEMALE, MALE], progress=False)
    _close(ours[1], plain[1])  # layer 1's W_out reaches the gap only through its MLP output, the hooked tensor
    # layer 0's also reaches it by the residual stream past the hook: that path is not the features' and is left out
    assert ours[0].abs().sum() > 0 and not torch.allclose(ours[0], plain[0], rtol=1e-2, atol=1e-6)
    half = _effect(tiny, list(range(32)), sae=sae)  # the relu(x) half only
    assert not torch.allclose(half[1], plain[1], rtol=1e-2, atol=1e-6)


def test_the_gradient_is_a_sum_over_the_features_and_changes_with_them(tiny):
    both, three, five = _effect(tiny, [3, 5]), _effect(tiny, [3]), _effect(tiny, [5])
    for b, t, f in zip(both[:2], three[:2], five[:2], strict=True):
        _close(b, t + f)
    assert not torch.allclose(three[1], five[1], rtol=1e-2, atol=0)
    assert torch.equal(_effect(tiny, [3])[1], three[1])  # deterministic


def test_a_silent_feature_or_a_matrix_above_the_hook_is_refused(tiny):
    model, tok, site, _ = tiny
    sae = tiny_sae(32, site.hook_name)
    with torch.no_grad():
        sae.b_enc[7] = -1e4
    with pytest.raises(ValueError, match=r"gradient through feature\(s\) \[7\] is zero for "):
        _effect(tiny, [7], sae=sae)
    with pytest.raises(ValueError, match=r"is zero for model.layers.2.mlp.down_proj.weight: "):
        _effect(tiny, [3], params=W[2:])
    with pytest.raises(ValueError, match="feature_effect needs at least one feature"):
        _effect(tiny, [])


@pytest.mark.parametrize("strategy", ["gradient", "grad_x_weight"])
def test_the_feature_effect_mask_is_the_exact_top_k_of_its_strategy(strategy):
    module, data = make_module(method="feature_effect", k=25, features=[3, 5], mask_strategy=strategy), make_data()
    data.setup("fit")
    weight = module.net.get_parameter(module.parameter).detach().clone()
    grad = feature_effect_gradient(module.net, module.tokenizer, module.sae, module.site, module.parameter,
                                   data.gap_texts(), [3, 5], data.hparams.eval_batch_size, progress=False)
    module.prepare(data)
    mask = module.mask
    assert isinstance(mask, InstabilityMask) and mask.k == 25 == module.k and mask.indices.unique().numel() == 25
    assert torch.equal(mask.indices, top_k_flat(STRATEGIES[strategy](grad.flatten(), weight.flatten(), 0), 25))
    assert mask.strategy == strategy and mask.extra["mask_from"] == "feature_effect" and mask.features == (3, 5)
    assert module.features == [3, 5]  # the objective keeps the run's features


def test_the_feature_effect_mask_spans_several_layers_jointly():
    module, data = make_module(method="feature_effect", k=2500, layers=[0, 1, 2]), make_data(max_texts=8)
    data.setup("fit")  # the SAE reads layer 1; layer 1's W_out has 2048 entries, so layer 0 must take some
    grads = feature_effect_gradients(module.net, module.tokenizer, module.sae, module.site, W, data.gap_texts(), [3],
                                     data.hparams.eval_batch_size, progress=False)
    module.prepare(data)
    mask = module.mask
    assert isinstance(mask, JointMask) and mask.k == 2500 and mask.parameters == W
    expected = joint_top_k([g.abs() for g in grads], 2500)
    assert [p.indices.tolist() for p in mask.parts] == [e.tolist() for e in expected]
    assert mask.parts[0].k > 0 and mask.parts[1].k > 0 and mask.parts[2].k == 0  # layer 2 sits above the hook


def _batches(tok, size=3):
    texts = FEMALE + MALE + ["A woman and a man walked into the room.", "The weather was warm."]
    return [dict(tok(texts[i:i + size], return_tensors="pt", padding=True)) for i in range(0, len(texts), size)]


def _fires(model, tok, site, sae, batches):
    """The latents that fire on a real token, by hand."""
    fired = set()
    for b in batches:
        with torch.no_grad():
            z = sae.encode(hooks.forward_until(model, site, **b))
        real = real_token_mask(b["input_ids"], b["attention_mask"], tok.bos_token_id)
        fired |= set(torch.nonzero((z * real[..., None]) > 0)[:, 2].tolist())
    return fired


def test_the_draw_is_seeded_of_the_right_count_and_only_of_live_latents(tiny):
    model, tok, site, _ = tiny
    sae = tiny_sae(32, site.hook_name)
    with torch.no_grad():
        sae.b_enc[::2] = -1e4  # the even latents never fire
    batches = _batches(tok)
    live = set(live_latents(model, sae, site, batches, tok.bos_token_id).nonzero().flatten().tolist())
    assert live == _fires(model, tok, site, sae, batches) and live and not any(i % 2 == 0 for i in live)
    rule = sorted(live)[:3]
    draws = {}
    for seed in range(6):
        record = {}
        drawn = random_live_features(model, sae, site, batches, 3, seed, tok.bos_token_id, exclude=rule,
                                     record=record)
        assert len(drawn) == 3 == len(set(drawn)) and drawn == sorted(drawn)
        assert set(drawn) <= live and not set(drawn) & set(rule)
        assert record["drawn_features"] == drawn and record["replaced_features"] == rule and record["seed"] == seed
        assert record["n_live"] == len(live)
        draws[seed] = drawn
    assert random_live_features(model, sae, site, batches, 3, 2, tok.bos_token_id, exclude=rule) == draws[2]
    assert len({tuple(d) for d in draws.values()}) > 1
    with pytest.raises(ValueError, match=rf"needs {len(live)} live latents other than features \[1\], but "
                                         rf"{len(live) - 1} of the SAE's 64 fire on the train mask prompts"):
        random_live_features(model, sae, site, batches, len(live), 0, tok.bos_token_id, exclude=[1])


@pytest.fixture(scope="module")
def drawn_run():
    module = make_module(method="random_features", k=25, features=[3, 5], seed=4)
    with torch.no_grad():
        module.sae.b_enc[:32] = -1e4  # only latents 32..63 can be drawn
    data = make_data(max_texts=8)
    data.setup("fit")
    batches = [module.tokenize(b) for b in data.mask_batches()]
    module.prepare(data)
    return module, data, batches


def test_random_features_trains_the_instability_mask_of_the_drawn_latents(drawn_run):
    module, _, batches = drawn_run
    drawn = module.features
    assert len(drawn) == 2 and set(drawn).isdisjoint({3, 5}) and all(f >= 32 for f in drawn)
    with module.delta.disabled():
        assert set(drawn) <= _fires(module.net, module.tokenizer, module.site, module.sae, batches)
    mask = module.mask
    assert mask.features == tuple(drawn) and mask.k == 25 and mask.extra["mask_from"] == "random_features"
    assert mask.extra["drawn_features"] == drawn and mask.extra["replaced_features"] == [3, 5]
    assert mask.stats()["features"] == drawn  # what `debias mask` and the report show
    assert module.feature_baseline.numel() == 2 and (module.feature_baseline > 0).all()
    with module.delta.disabled():
        assert module.latents(batches[0]).shape[-1] == 2  # the objective reads the drawn latents
    again = make_module(method="random_features", k=25, features=[3, 5], seed=4)
    with torch.no_grad():
        again.sae.b_enc[:32] = -1e4
    reference = compute_mask(again.net, again.sae, again.site, again.parameter, batches, drawn, 25,
                             bos_token_id=again.tokenizer.bos_token_id, progress=False)
    assert torch.equal(mask.indices, reference.indices)


def test_random_features_is_seeded_and_reuses_only_its_own_masks(drawn_run, tmp_path):
    module, data, _ = drawn_run

    def run(**overrides):
        other = make_module(method="random_features", k=25, features=[3, 5], **overrides)
        with torch.no_grad():
            other.sae.b_enc[:32] = -1e4
        other.prepare(data)
        return other

    assert run(seed=4).features == module.features
    others = {tuple(run(seed=s).features) for s in (0, 1, 2)}
    assert len(others | {tuple(module.features)}) > 1
    path = tmp_path / "drawn.safetensors"
    module.mask.save(path)
    assert InstabilityMask.load(path).extra["drawn_features"] == module.features
    reused = run(seed=0, mask_path=str(path))
    assert reused.features == module.features and torch.equal(reused.mask.indices, module.mask.indices)
    rule = tmp_path / "rule.safetensors"
    instability = make_module(k=25, features=[3, 5])
    instability.prepare(data)
    instability.mask.save(rule)
    with pytest.raises(ValueError, match="random_features was given a mask ranked by 'feature'; it needs one whose "
                                         "features it drew itself"):
        run(mask_path=str(rule))
