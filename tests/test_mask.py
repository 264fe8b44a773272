import pytest
import torch

from debias.edits.mask import InstabilityMask, compute_mask, feature_gradient, resolve_k, top_k_flat
from debias.models import hooks
from debias.models.tiny import tiny_model, tiny_sae, tiny_tokenizer

PROMPTS = ["The nurse said that", "My brother, a nurse, said that he was tired.", "The engineer told us that"]


def _setup(family="llama"):
    model, tok = tiny_model(family), tiny_tokenizer()
    site = hooks.resolve_hook(model, "blocks.1.hook_mlp_out", tok)
    sae = tiny_sae(32, site.hook_name)
    return model, tok, site, sae, hooks.w_out_name(model, 1)


def _batches(tok, prompts=PROMPTS, size=2):
    return [dict(tok(prompts[i:i + size], return_tensors="pt", padding=True)) for i in range(0, len(prompts), size)]


def test_resolve_k_floor_and_bounds():
    assert resolve_k(2048, fraction=0.05) == 102
    assert resolve_k(2048, fraction=1e-9) == 1
    assert resolve_k(2048, k=7) == 7
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="fraction"):
            resolve_k(100, fraction=bad)
    with pytest.raises(ValueError, match="k must be"):
        resolve_k(100, k=101)
    with pytest.raises(ValueError, match="exactly one"):
        resolve_k(100, fraction=0.1, k=3)


def test_top_k_is_exact_on_ties_and_prefers_lower_index():
    scores = torch.tensor([[1.0, 3.0, 3.0], [3.0, 0.5, 3.0]])
    idx = top_k_flat(scores, 2)
    assert idx.tolist() == [1, 2]  # four entries tie at 3.0; a `>= threshold` cut would keep all four
    assert top_k_flat(scores, 5).tolist() == [0, 1, 2, 3, 5]


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_mask_has_exactly_k_entries_and_roundtrips(family, tmp_path):
    model, tok, site, sae, param = _setup(family)
    mask = compute_mask(model, sae, site, param, _batches(tok), [3], k=25, bos_token_id=tok.bos_token_id,
                        progress=False, model_id="tiny", sae_id="tiny")
    assert mask.k == 25 and mask.indices.unique().numel() == 25
    assert mask.dense().sum() == 25 and tuple(mask.dense().shape) == tuple(model.get_parameter(param).shape)
    mask.save(tmp_path / "m.safetensors")
    loaded = InstabilityMask.load(tmp_path / "m.safetensors")
    assert torch.equal(loaded.indices, mask.indices)
    assert (loaded.parameter, loaded.shape, loaded.features, loaded.hook_name) == (
        mask.parameter, mask.shape, mask.features, mask.hook_name)


def test_mask_picks_the_largest_gradient_entries():
    model, tok, site, sae, param = _setup()
    batches = _batches(tok)
    grad = feature_gradient(model, sae, site, param, batches, [3], tok.bos_token_id, progress=False)
    mask = compute_mask(model, sae, site, param, batches, [3], k=10, bos_token_id=tok.bos_token_id, progress=False)
    chosen = grad.abs().flatten()[mask.indices]
    rest = grad.abs().flatten()[~mask.dense().flatten()]
    assert chosen.min() >= rest.max() and chosen.min() > 0


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_gradient_stopping_at_the_hook_equals_a_full_forwards(family):
    """The mask's forward stops at the SAE's hook (no layers above, no logits); a full forward of the whole model,
    the feature read at the same hook, gives the same gradient (the benchmarks' `mask` measurement times both)."""
    from debias.models.scoring import real_token_mask
    from debias.sae.ops import summed_feature_acts

    model, tok, site, sae, param = _setup(family)
    batches = _batches(tok)
    weight = model.get_parameter(param)
    full = torch.zeros(weight.shape)
    weight.requires_grad_(True)
    for batch in batches:
        weight.grad = None
        with hooks.capture(model, site) as cap:
            model(**batch, use_cache=False)
        real = real_token_mask(batch["input_ids"], batch["attention_mask"], tok.bos_token_id)
        summed_feature_acts(sae, cap.value, real, [3]).sum().backward()
        full += weight.grad.float()
    weight.grad = None
    weight.requires_grad_(False)
    early = feature_gradient(model, sae, site, param, batches, [3], tok.bos_token_id, progress=False)
    assert full.abs().sum() > 0
    torch.testing.assert_close(early, full, rtol=1e-5, atol=1e-6 * float(full.abs().max()))


def test_gradient_ignores_padding_and_bos():
    model, tok, site, sae, param = _setup()
    alone = [dict(tok([p], return_tensors="pt")) for p in PROMPTS]
    padded = _batches(tok, size=3)  # padded to the longest prompt
    g1 = feature_gradient(model, sae, site, param, alone, [3], tok.bos_token_id, progress=False)
    g2 = feature_gradient(model, sae, site, param, padded, [3], tok.bos_token_id, progress=False)
    torch.testing.assert_close(g1, g2, rtol=1e-4, atol=1e-6)
    with_bos = feature_gradient(model, sae, site, param, alone, [3], None, progress=False)
    assert not torch.allclose(g1, with_bos)


def test_several_features_are_normalised_by_their_totals():
    model, tok, site, sae, param = _setup()
    with torch.no_grad():
        sae.W_enc[:, 5] *= 50  # feature 5 fires far more strongly than feature 3
    batches = _batches(tok)
    both = feature_gradient(model, sae, site, param, batches, [3, 5], tok.bos_token_id, progress=False)
    g3 = feature_gradient(model, sae, site, param, batches, [3], tok.bos_token_id, progress=False)
    g5 = feature_gradient(model, sae, site, param, batches, [5], tok.bos_token_id, progress=False)
    acts = [sum(_total(model, sae, site, b, f, tok) for b in batches) for f in (3, 5)]
    torch.testing.assert_close(both, g3 / acts[0] + g5 / acts[1], rtol=1e-4, atol=1e-5 * float(both.abs().max()))


def _total(model, sae, site, batch, feature, tok):
    from debias.models.scoring import real_token_mask

    with torch.no_grad():
        acts = hooks.forward_until(model, site, **batch)
        real = real_token_mask(batch["input_ids"], batch["attention_mask"], tok.bos_token_id)
        return float((sae.encode(acts)[..., feature] * real).sum())


def test_silent_feature_refuses_to_write_a_mask():
    model, tok, site, sae, param = _setup()
    with torch.no_grad():
        sae.b_enc[7] = -1e4  # latent 7 can never fire
    with pytest.raises(ValueError, match=r"never fire"):
        compute_mask(model, sae, site, param, _batches(tok), [7], k=5, bos_token_id=tok.bos_token_id, progress=False)


def test_random_strategy_is_seeded_and_exact():
    model, tok, site, sae, param = _setup()
    a = compute_mask(model, sae, site, param, [], [3], k=30, strategy="random", seed=1)
    b = compute_mask(model, sae, site, param, [], [3], k=30, strategy="random", seed=1)
    c = compute_mask(model, sae, site, param, [], [3], k=30, strategy="random", seed=2)
    assert torch.equal(a.indices, b.indices) and not torch.equal(a.indices, c.indices) and a.k == 30
    with pytest.raises(ValueError, match="unknown mask strategy"):
        compute_mask(model, sae, site, param, [], [3], k=3, strategy="magnitude")
