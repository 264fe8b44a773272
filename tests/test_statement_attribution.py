"""Attribution of SAE latents to the statement gap, and the feature-selection targets that use it."""

import dataclasses

import pytest
import torch
from conftest import make_data, module_args, spec_without_statements

from debias.evaluation.sentence_metrics import statement_gap, statement_logprobs
from debias.features import attribution as F
from debias.features.select import STATEMENT_CHECK_ITEMS, select_features
from debias.models import hooks
from debias.models.scoring import gap_from_logprobs, group_gap, next_token_logprobs, own_group_margins, target_ids
from debias.models.tiny import tiny_model, tiny_sae, tiny_tokenizer
from debias.prompts import load_gap_prompts
from debias.statements import load_statements
from debias.training.args import SAEArgs

BS = 64
pytestmark = pytest.mark.usefixtures("one_thread")
P, Q = 7, 11  # planted latents: P carries the statement gap, Q the next-token gap


@pytest.fixture(scope="module")
def setup():
    """Tiny llama (margins of order 0.1) and its layer-1 MLP output; 39 train statements of both groups."""
    model, tok = tiny_model(), tiny_tokenizer()
    for p in model.parameters():
        p.requires_grad_(False)
    model.lm_head.weight.mul_(10)
    site = hooks.resolve_hook(model, "blocks.1.hook_mlp_out", tok)
    items = load_statements("train")[::5]
    assert {item.group for item in items} == {0, 1}
    return model, tok, site, items


def _small_sae(model, site):
    """A random SAE whose decoded contributions are small: first order is close to the truth."""
    sae = tiny_sae(model.config.hidden_size, site.hook_name)
    with torch.no_grad():
        sae.W_dec.mul_(0.1)
    return sae


def _gap(model, tok, site, items, fn):
    return F.statement_gap_value(model, tok, items, site, fn, BS)


def test_statement_gap_is_the_metric_and_does_not_depend_on_the_batch(setup):
    model, tok, site, items = setup
    sae = _small_sae(model, site)
    att = F.attribute_statements(model, tok, sae, site, items, BS)
    assert att.gap == pytest.approx(statement_gap(model, tok, items, BS, n_boot=10)["statement_gap"], abs=1e-5)
    small = F.attribute_statements(model, tok, sae, site, items, batch_size=4)
    assert small.gap == pytest.approx(att.gap, abs=1e-5) and small.error == pytest.approx(att.error, abs=1e-5)
    torch.testing.assert_close(small.latents, att.latents, rtol=1e-4, atol=1e-6)
    religion = load_statements("train", "religion")  # three groups: the margins' means over the other two
    three = F.attribute_statements(model, tok, sae, site, religion, BS)
    assert three.gap == pytest.approx(statement_gap(model, tok, religion, BS, n_boot=10)["statement_gap"], abs=1e-5)


def test_attributions_are_derivatives_of_the_statement_gap(setup):
    """Latents + error = d gap / d alpha for x -> b_dec + alpha (x - b_dec) at alpha = 1; each latent's attribution =
    d gap / d(scale of its decoded contribution), at every token of prefixes and attributes."""
    model, tok, site, items = setup
    sae = _small_sae(model, site)
    att = F.attribute_statements(model, tok, sae, site, items, BS)
    eps = 0.1  # central differences; a smaller step drowns in float32 noise of the summed log-likelihoods

    def scaled(a):
        return lambda x: sae.b_dec + a * (x - sae.b_dec)

    fd = (_gap(model, tok, site, items, scaled(1 + eps)) - _gap(model, tok, site, items, scaled(1 - eps))) / (2 * eps)
    assert float(att.latents.sum()) + att.error == pytest.approx(fd, rel=2e-2, abs=1e-4)
    assert att.error != 0
    for f in [int(i) for i in att.latents.abs().argsort()[-3:]] + [0]:
        def bump(a, f=f):
            return lambda x: x + a * sae.encode(x)[..., f:f + 1] * sae.W_dec[f]
        fd = (_gap(model, tok, site, items, bump(eps)) - _gap(model, tok, site, items, bump(-eps))) / (2 * eps)
        assert float(att.latents[f]) == pytest.approx(fd, rel=2e-2, abs=1e-5)


def test_attribution_predicts_the_gap_change_of_zeroing_each_latent(setup):
    """Brute force: for every latent, gap - (gap with that latent ablated) is close to its attribution."""
    model, tok, site, items = setup
    sae = _small_sae(model, site)
    att = F.attribute_statements(model, tok, sae, site, items, BS)
    base = _gap(model, tok, site, items, None)
    drop = torch.tensor([base - F.ablated_statement_gap(model, tok, sae, site, items, [f], BS)
                         for f in range(sae.cfg.d_sae)])
    latents = att.latents.double()
    scale = float(latents.abs().max())
    assert scale > 1e-3  # the latents do move the gap
    assert float((latents - drop).abs().max()) < 0.3 * scale
    assert float(torch.corrcoef(torch.stack([latents, drop]))[0, 1]) > 0.97
    big = latents.abs() > 0.3 * scale
    assert big.sum() >= 3 and (latents[big].sign() == drop[big].sign()).all()


def _shift_gradient(model, site, score) -> torch.Tensor:
    """d score / d (one vector added to the hooked tensor at every position)."""
    shift = torch.zeros(model.config.hidden_size, requires_grad=True)
    with hooks.replace(model, site, lambda x: x + shift):
        value = score()
    (grad,) = torch.autograd.grad(value, [shift])
    return grad, float(value.detach())


@pytest.fixture(scope="module")
def planted(setup):
    """An SAE (error term kept, so the model is unchanged) where latent P fires everywhere and writes a direction
    carrying half the statement gap and none of the next-token gap, and latent Q the other way round."""
    model, tok, site, _ = setup
    items, prompts = load_statements("train"), load_gap_prompts("train")
    group, ids = torch.tensor([item.group for item in items]), target_ids(tok, prompts)
    g_s, s = _shift_gradient(model, site, lambda: group_gap(
        own_group_margins(statement_logprobs(model, tok, items, BS), group), group, 2))
    g_t, t = _shift_gradient(model, site, lambda: gap_from_logprobs(
        next_token_logprobs(model, tok, prompts.prompts, BS), ids, prompts.group_index))
    sae = _small_sae(model, site)
    b = 0.1
    with torch.no_grad():
        for latent, grad, other, gap in ((P, g_s, g_t, s), (Q, g_t, g_s, t)):
            own = grad - (grad @ other) / (other @ other) * other  # orthogonal to the other gap's gradient
            sae.W_enc[:, latent], sae.b_enc[latent] = 0.0, b
            sae.W_dec[latent] = (0.5 * gap / (b * float(own @ grad))) * own  # attribution: half of its gap
    return model, tok, sae, site, items, s, t


def test_planted_latents_are_attributed_their_gaps(planted):
    model, tok, sae, site, items, s, _ = planted
    att = F.attribute_statements(model, tok, sae, site, items, BS)
    assert att.gap == pytest.approx(s, abs=1e-5)
    assert float(att.latents[P]) == pytest.approx(0.5 * s, rel=1e-3)
    assert abs(float(att.latents[Q])) < 1e-3 * abs(s)
    others = att.latents.abs().clone()
    others[P] = 0
    assert abs(float(att.latents[P])) > 5 * float(others.max())
    ablated = F.ablated_statement_gap(model, tok, sae, site, items, [P], BS)
    assert abs(ablated) < 0.8 * abs(s)  # ablation confirms what first order says


@pytest.mark.parametrize("target, first", [("gap", Q), ("statements", P), ("both", None)])
def test_each_target_selects_the_latent_of_its_gap(planted, target, first):
    model, tok, sae, site, _, s, t = planted
    record: dict = {}
    chosen = select_features(model, tok, sae, site, n=2, min_fire_rate=0.0, batch_size=BS, record=record,
                             target=target)
    assert record["target"] == target and record["features"] == chosen
    if first is not None:
        assert chosen[0] == first
    else:
        assert set(chosen) == {P, Q}
    if target != "statements":
        assert record["train_gap"] == pytest.approx(t, abs=1e-5) and abs(record["ablated_gap"]) < abs(t)
    if target != "gap":  # the ablation check runs on a balanced prefix of the train statements: its own gap
        assert record["train_statement_gap"] == pytest.approx(s, abs=1e-5)
        checked = record["checked_statement_gap"]
        assert record["statement_check_items"] == STATEMENT_CHECK_ITEMS < len(load_statements("train"))
        assert checked == pytest.approx(_gap(model, tok, site, load_statements("train")[:STATEMENT_CHECK_ITEMS],
                                             None), abs=1e-5)
        assert abs(record["ablated_statement_gap"]) < abs(checked) and "statement" in record["rule"]
    if target == "both":
        objective = abs(record["ablated_gap"] / t) + abs(record["ablated_statement_gap"] / checked)
        assert record["objective"] == pytest.approx(objective) and objective < 2
        assert all(r["kept"] for r in record["candidates"][:2])


def test_both_ranks_by_the_sum_of_normalised_attributions(planted):
    model, tok, sae, site, items, _, _ = planted
    prompts = load_gap_prompts("train")
    att = F.attribute(model, tok, sae, site, prompts, BS)
    satt = F.attribute_statements(model, tok, sae, site, items, BS)
    score = att.latents / att.gap + satt.latents / satt.gap
    order = sorted((i for i in range(len(score)) if score[i] > 0), key=lambda i: (-float(score[i]), i))
    record: dict = {}
    select_features(model, tok, sae, site, n=6, n_candidates=6, min_fire_rate=0.0, batch_size=BS, record=record,
                    target="both", precomputed=att, precomputed_statements=satt)
    assert [r["index"] for r in record["candidates"]] == order[:6]
    best = 2.0
    for row in record["candidates"]:
        assert row["attribution"] == pytest.approx(float(score[row["index"]]))
        assert row["kept"] == (row["objective"] < best)
        best = min(best, row["objective"]) if row["kept"] else best


def test_targets_other_than_gap_need_statements(setup, tmp_path):
    model, tok, site, _ = setup
    sae = _small_sae(model, site)
    spec = spec_without_statements(tmp_path)
    for target in ("statements", "both"):
        with pytest.raises(ValueError, match=rf"model\.sae\.feature_target='{target}'.*'nostatements'"):
            select_features(model, tok, sae, site, bias=spec, target=target)
    with pytest.raises(ValueError, match="target must be one of"):
        select_features(model, tok, sae, site, target="words")
    with pytest.raises(ValueError, match=r"model\.sae\.feature_target must be one of"):
        SAEArgs(feature_target="words")


def test_module_passes_the_configured_target(tmp_path):
    from debias.training.module import DebiasModule

    args = module_args(features=None, n_features=1)
    args["sae"] = dataclasses.replace(args["sae"], feature_target="statements")
    module = DebiasModule(**args)
    module.choose_features(make_data(max_texts=8))
    assert module.feature_selection["target"] == "statements" and len(module.features) == 1
    assert "train_statement_gap" in module.feature_selection
    args["sae"] = dataclasses.replace(args["sae"], feature_target="both")
    with pytest.raises(ValueError, match=r"model\.sae\.feature_target='both'"):
        DebiasModule(**args).choose_features(make_data(max_texts=8, bias=spec_without_statements(tmp_path)))
