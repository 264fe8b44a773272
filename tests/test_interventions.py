"""Inference-time interventions on a tiny random model: SAE clamp (error term kept) and steering vectors."""

import json
import math

import pytest
import torch

from debias.edits.hook_builder import build_intervention
from debias.edits.interventions import (
    SAEClamp,
    SteeringVector,
    fit_steering,
    fit_steering_vector,
    mean_activations,
)
from debias.models import hooks
from debias.models.tiny import tiny_model, tiny_sae, tiny_sae_from_spec, tiny_tokenizer
from debias.sae.load import load_sae_spec
from debias.sae.ops import ablate

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: a second thread only adds contention
HOOK = "blocks.1.hook_mlp_out"
FEMALE = ["The nurse said that she would come back.", "My sister said that she was tired.",
          "The secretary told us that she was late."]
MALE = ["The weather was warm and the children played in the park.", "Once upon a time there was a small town.",
        "The pilot, the librarian and the plumber met."]


@pytest.fixture(scope="module")
def setup():
    model, tok = tiny_model("llama"), tiny_tokenizer()
    site = hooks.resolve_hook(model, HOOK, tok)
    return model, tok, site, tiny_sae_from_spec(f"tiny:{HOOK}", model)


@pytest.fixture(scope="module")
def acts():
    return torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(1))


def _logits(model, tok, texts=FEMALE):
    enc = tok(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        return model(**enc).logits


def test_clamp_zero_is_ablate(setup, acts):
    _, _, site, sae = setup
    assert torch.equal(SAEClamp(sae, site, [3, 7]).fn(acts), ablate(sae, acts, [3, 7]))


def test_clamp_to_own_value_is_identity(setup, acts):
    _, _, site, sae = setup
    one = acts[:1, :1]  # one token: its latent has one value to clamp to
    z = sae.encode(one)[0, 0]
    feature = int(z.argmax())
    assert z[feature] > 0
    clamp = SAEClamp(sae, site, [feature], float(z[feature]))
    torch.testing.assert_close(clamp.fn(one), one, atol=1e-6, rtol=0)
    assert not torch.allclose(SAEClamp(sae, site, [feature], 0.0).fn(one), one, atol=1e-3)


@pytest.mark.parametrize("arch", ["standard", "topk", "jumprelu"])
def test_clamp_moves_only_along_the_chosen_decoder_rows(arch, acts):
    sae = tiny_sae(32, HOOK, architecture=arch)
    site = hooks.HookSite(HOOK, 1, "model.layers.1.mlp", "output")
    z = sae.encode(acts)
    out = SAEClamp(sae, site, [2, 9], value=4.0).fn(acts)
    expected = (4.0 - z[..., 2:3]) * sae.W_dec[2] + (4.0 - z[..., 9:10]) * sae.W_dec[9]
    torch.testing.assert_close(out - acts, expected, atol=1e-5, rtol=1e-5)


def test_clamp_applied_on_the_model_equals_ablation_hook(setup):
    model, tok, site, sae = setup
    with hooks.replace(model, site, lambda x: ablate(sae, x, [3])):
        ablated = _logits(model, tok)
    with SAEClamp(sae, site, [3]).applied(model):
        clamped = _logits(model, tok)
    assert torch.equal(clamped, ablated)
    assert not torch.allclose(clamped, _logits(model, tok))


def test_steering_shift_is_alpha_v_on_the_model(setup):
    model, tok, site, _ = setup
    v = torch.nn.functional.normalize(torch.randn(32, generator=torch.Generator().manual_seed(2)), dim=0)
    enc = tok(FEMALE, return_tensors="pt", padding=True)
    with torch.no_grad(), hooks.capture(model, site) as plain:
        model(**enc)
    with torch.no_grad(), SteeringVector(site, v, 3.0).applied(model), hooks.capture(model, site) as steered:
        model(**enc)
    torch.testing.assert_close(steered.value - plain.value, (3.0 * v).expand_as(plain.value), atol=1e-6, rtol=0)
    with SteeringVector(site, v, 0.0).applied(model):
        assert torch.equal(_logits(model, tok), _logits(model, tok))
        zero = _logits(model, tok)
    assert torch.equal(zero, _logits(model, tok))


def test_mean_activations_average_real_tokens_only(setup):
    model, tok, site, _ = setup
    batched = mean_activations(model, tok, site, FEMALE + MALE, batch_size=4)
    enc = tok(FEMALE[:1], return_tensors="pt")
    with torch.no_grad():
        acts = hooks.forward_until(model, site, **enc)
    torch.testing.assert_close(batched[0], acts[0, 1:].mean(0), atol=1e-5, rtol=1e-5)  # BOS excluded
    one_by_one = torch.cat([mean_activations(model, tok, site, [t]) for t in FEMALE + MALE])
    torch.testing.assert_close(batched, one_by_one, atol=1e-5, rtol=1e-5)  # padding excluded


@pytest.mark.parametrize("kind", ["mean_diff", "probe"])
def test_fitted_vector_is_unit_and_points_female(setup, kind):
    model, tok, site, _ = setup
    v = fit_steering_vector(model, tok, site, FEMALE, MALE, kind=kind)
    assert v.shape == (32,)
    assert math.isclose(float(v.norm()), 1.0, rel_tol=1e-5)
    female, male = (mean_activations(model, tok, site, t) for t in (FEMALE, MALE))
    assert float((female @ v).min()) > float((male @ v).max())  # separates the two groups, female on the + side
    if kind == "mean_diff":
        torch.testing.assert_close(v, torch.nn.functional.normalize(female.mean(0) - male.mean(0), dim=0))


@pytest.mark.parametrize("kind", ["mean_diff", "probe"])
def test_the_calibrated_strength_moves_the_female_average_onto_the_male_one_along_v(setup, kind):
    """No constant of one model: α = −(μ_female − μ_male)·v is measured on the model and hook at hand."""
    model, tok, site, _ = setup
    v, alpha = fit_steering(model, tok, site, FEMALE, MALE, kind=kind)
    female, male = (mean_activations(model, tok, site, t).mean(0) for t in (FEMALE, MALE))
    assert alpha < 0 and math.isclose(alpha, -float((female - male) @ v), rel_tol=1e-5)
    if kind == "mean_diff":
        assert math.isclose(alpha, -float((female - male).norm()), rel_tol=1e-5)
    with torch.no_grad(), SteeringVector(site, v, alpha).applied(model):
        steered = mean_activations(model, tok, site, FEMALE).mean(0)
    assert abs(float((steered - male) @ v)) < 1e-4 * float(female.norm())
    given = build_intervention("steering_vector", model, tok, site=site, options={"alpha": 2.0, "kind": kind},
                               gap_texts=[FEMALE, MALE])
    calibrated = build_intervention("steering_vector", model, tok, site=site, options={"kind": kind},
                                    gap_texts=[FEMALE, MALE])
    assert given.alpha == 2.0 and math.isclose(calibrated.alpha, alpha, rel_tol=1e-6)
    assert calibrated.describe()["alpha_from"].startswith("calibrated")


def test_identical_groups_have_no_direction(setup):
    model, tok, site, _ = setup
    with pytest.raises(ValueError, match="zero"):
        fit_steering_vector(model, tok, site, FEMALE, list(FEMALE), kind="mean_diff")


def test_bad_inputs_raise_naming_the_value(setup):
    model, tok, site, sae = setup
    with pytest.raises(ValueError, match=r"64.*d_sae=64"):
        SAEClamp(sae, site, [64])
    with pytest.raises(ValueError, match="-1"):
        SAEClamp(sae, site, [-1])
    with pytest.raises(ValueError, match="inf"):
        SAEClamp(sae, site, [1], value=float("inf"))
    with pytest.raises(ValueError, match="nan"):
        SteeringVector(site, torch.ones(32), float("nan"))
    with pytest.raises(ValueError, match=r"31.*32"):
        with SteeringVector(site, torch.ones(31), 1.0).applied(model):
            pass
    with pytest.raises(ValueError, match=r"'svm'.*mean_diff"):
        fit_steering_vector(model, tok, site, FEMALE, MALE, kind="svm")
    with pytest.raises(ValueError, match=r"'steer'.*sae_clamp.*steering_vector"):
        build_intervention("steer", model, tok, sae, site)
    with pytest.raises(ValueError, match=r"method 'lora' is not an inference-time intervention.*'sae_clamp'"):
        build_intervention("lora", model, tok, sae, site)
    with pytest.raises(ValueError, match="feature"):
        build_intervention("sae_clamp", model, tok, sae, site, features=None)
    with pytest.raises(ValueError, match="model.edit.options.sae_clamp.value must be a finite number, got nan"):
        build_intervention("sae_clamp", model, tok, sae, site, features=[1], options={"value": math.nan})


def test_build_intervention_and_describe(setup):
    model, tok, site, sae = setup
    clamp = build_intervention("sae_clamp", model, tok, sae, None, features=[1, 2], options={"value": 0.5})
    assert clamp.site == site
    steer = build_intervention("steering_vector", model, tok, sae, site, options={"alpha": 2.0, "kind": "probe"},
                               gap_texts=[FEMALE, MALE])
    for intervention in (clamp, steer):
        record = json.loads(json.dumps(intervention.describe()))
        assert record["hook_name"] == HOOK
    assert clamp.describe()["features"] == [1, 2] and clamp.describe()["value"] == 0.5
    assert steer.describe()["alpha"] == 2.0 and steer.describe()["kind"] == "probe"


def test_load_sae_spec_checks_the_hook(setup):
    model, tok, _, _ = setup
    assert load_sae_spec(model, tok, "tiny-llama", f"tiny:{HOOK}:topk").cfg.metadata.hook_name == HOOK
    with pytest.raises(ValueError, match="blocks.0.hook_mlp_out"):
        load_sae_spec(model, tok, "tiny-llama", f"tiny:{HOOK}", hook_name="blocks.0.hook_mlp_out")
