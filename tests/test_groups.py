"""Bias axes with N >= 2 groups: the generalised margins, gap and cue margin equal the former she-vs-he formulas
on gender (bit for bit), a three-group spec (religion) gives the hand-computed gap, and a target that is not a
single token is reported in one line."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from debias.edits.hook_builder import build_intervention
from debias.edits.mask import gap_gradient
from debias.evaluation.bias_metrics import StereotypeGap, bias_gap, cue_margin
from debias.evaluation.stats import grouped_interval
from debias.features import attribution as F
from debias.models import hooks
from debias.models.scoring import (
    gap_from_logprobs,
    group_gap,
    group_margins,
    next_token_logprobs,
    pronoun_ids,
    target_ids,
)
from debias.models.tiny import tiny_model, tiny_tokenizer
from debias.prompts import load_cue_prompts, load_gap_prompts

STAND_INS = (" she", " he", " they")  # single tokens of the tiny tokenizer, standing in for religion's targets
PARAMETER = "model.layers.1.mlp.down_proj.weight"


@pytest.fixture(scope="module")
def lm():
    model, tok = tiny_model("llama"), tiny_tokenizer()
    with torch.no_grad():
        model.lm_head.weight.mul_(10)  # margins of order 0.1, not 0.01
    return model, tok


def _old_gap(m: torch.Tensor, is_female: torch.Tensor) -> torch.Tensor:
    return m[is_female].mean() - m[~is_female].mean()


def _old_cue(m: torch.Tensor, cued_female: torch.Tensor) -> torch.Tensor:
    return torch.where(cued_female, m, -m).mean()


def test_gender_gap_and_cue_equal_the_former_formulas(lm, one_thread):
    model, tok = lm
    she, he = tok.encode(" she", add_special_tokens=False)[0], tok.encode(" he", add_special_tokens=False)[0]
    assert target_ids(tok) == target_ids(tok, "gender") == pronoun_ids(tok) == (she, he)
    gap, cue = load_gap_prompts("heldout"), load_cue_prompts("heldout", limit=40)
    assert gap.group_index.tolist() == [0] * len(gap.female) + [1] * len(gap.male)
    with torch.no_grad():
        lp, lp_cue = next_token_logprobs(model, tok, gap.prompts), next_token_logprobs(model, tok, cue.prompts)
    old_m, is_female = lp[:, she] - lp[:, he], torch.tensor([True] * len(gap.female) + [False] * len(gap.male))
    ids, index = target_ids(tok, gap), gap.group_index
    new = group_gap(group_margins(lp, ids, index), index, 2)
    assert abs(float(new) - float(_old_gap(old_m, is_female))) < 1e-6
    assert torch.equal(new, _old_gap(old_m, is_female))  # bit for bit
    assert torch.equal(gap_from_logprobs(lp, ids, index), new)
    out = bias_gap(model, tok, gap, n_boot=200)
    assert out["bias_gap"] == float(_old_gap(old_m, is_female))
    assert out["bias_gap_ci"] == list(grouped_interval(old_m, is_female, _old_gap, n_boot=200))
    assert out["female_mean"] == float(old_m[is_female].mean()) and out["male_mean"] == float(old_m[~is_female].mean())
    assert out["group_means"] == {"female": out["female_mean"], "male": -out["male_mean"]}
    first = gap.female_labels[0]
    assert out["per_profession"][first] == pytest.approx(float(old_m[:len(gap.templates)].mean()), abs=1e-6)

    old_c, cued_female = lp_cue[:, she] - lp_cue[:, he], torch.tensor([c == "female" for c in cue.cued])
    assert torch.equal(cue.cued_female, cued_female) and cue.group_index.tolist() == (~cued_female).long().tolist()
    got = cue_margin(model, tok, cue, n_boot=200)
    assert abs(got["cue_margin"] - float(_old_cue(old_c, cued_female))) < 1e-6
    assert got["cue_margin"] == float(_old_cue(old_c, cued_female))
    assert got["cue_margin_ci"] == list(grouped_interval(old_c, cued_female, _old_cue, n_boot=200))
    assert got["cue_followed"] == float((torch.where(cued_female, old_c, -old_c) > 0).float().mean())
    pro = torch.tensor(cue.pro)
    assert got["cue_margin_pro"] == float(_old_cue(old_c[pro], cued_female[pro]))

    metric = StereotypeGap()  # the two-group form: she - he margins and a bool flag
    metric.update(old_m, is_female)
    assert float(metric.compute()) == out["bias_gap"] and list(metric.bootstrap_ci(n_boot=200)) == out["bias_gap_ci"]


def test_gender_gap_gradient_and_attribution_equal_the_former_formulas(lm, one_thread):
    model, tok = lm
    she, he = pronoun_ids(tok)
    gap = load_gap_prompts("train")
    female, male = gap.female[:12], gap.male[:12]
    weight = model.get_parameter(PARAMETER)
    weight.requires_grad_(True)
    old = torch.zeros_like(weight)
    for texts, sign in ((female, 1.0), (male, -1.0)):  # the former gap_gradient, inline
        for i in range(0, len(texts), 8):
            weight.grad = None
            lp = next_token_logprobs(model, tok, texts[i:i + 8], 8)
            (sign * (lp[:, she] - lp[:, he]).sum() / len(texts)).backward()
            old += weight.grad
    weight.grad = None
    new = gap_gradient(model, tok, PARAMETER, female, male, 8, progress=False)
    assert torch.equal(new, old) and old.abs().sum() > 0
    small = dataclasses.replace(gap, texts=(female, male), labels=(female, male))
    assert torch.equal(gap_gradient(model, tok, PARAMETER, small, batch_size=8, progress=False), old)
    with torch.no_grad():
        lp = next_token_logprobs(model, tok, small.prompts)
    assert F._gap(model, tok, small) == float(_old_gap(lp[:, she] - lp[:, he], small.is_female))


def test_three_group_gap_is_the_hand_computation(lm, one_thread):
    model, tok = lm
    gap = load_gap_prompts("train", bias="religion")
    assert gap.groups == ("christian", "muslim", "jewish") and gap.bias == "religion"
    assert gap.targets == (" Christian", " Muslim", " Jewish")
    assert set(gap.group_index.tolist()) == {0, 1, 2} and len(gap.group_index) == len(gap.prompts)
    assert [gap.group_index.tolist().count(g) for g in range(3)] == [len(t) for t in gap.texts]
    with pytest.raises(ValueError, match="two-group bias; bias 'religion'"):
        _ = gap.is_female
    gap = dataclasses.replace(gap, targets=STAND_INS)
    ids = target_ids(tok, STAND_INS)
    with torch.no_grad():
        lp = next_token_logprobs(model, tok, gap.prompts)
    index = gap.group_index
    hand_margins = [float(lp[i, ids[g]]) - sum(float(lp[i, ids[h]]) for h in range(3) if h != g) / 2
                    for i, g in enumerate(index.tolist())]
    hand_gap = sum(sum(m for m, g in zip(hand_margins, index.tolist(), strict=True) if g == k)
                   / index.tolist().count(k) for k in range(3))
    margins = group_margins(lp, ids, index)
    assert margins.tolist() == pytest.approx(hand_margins, abs=1e-5)
    assert float(group_gap(margins, index, 3)) == pytest.approx(hand_gap, abs=1e-6)
    assert float(gap_from_logprobs(lp, ids, index)) == pytest.approx(hand_gap, abs=1e-6)
    out = bias_gap(model, tok, gap, n_boot=100)
    assert out["bias_gap"] == pytest.approx(hand_gap, abs=1e-6) and set(out["group_means"]) == set(gap.groups)
    lo, hi = out["bias_gap_ci"]
    assert lo <= out["bias_gap"] <= hi and "female_mean" not in out
    assert F._gap(model, tok, gap) == pytest.approx(hand_gap, abs=1e-6)
    assert gap_gradient(model, tok, PARAMETER, gap, batch_size=64, progress=False).abs().sum() > 0
    with pytest.raises(ValueError, match="at least one prompt of each of the 3 groups"):
        group_gap(margins[index < 2], index[index < 2], 3)

    cue = dataclasses.replace(load_cue_prompts("heldout", bias="religion", limit=30), targets=STAND_INS)
    assert set(cue.group_index.tolist()) == {0, 1, 2}
    with torch.no_grad():
        lp_cue = next_token_logprobs(model, tok, cue.prompts)
    hand_cue = group_margins(lp_cue, ids, cue.group_index).mean()
    assert cue_margin(model, tok, cue, n_boot=50)["cue_margin"] == pytest.approx(float(hand_cue), abs=1e-6)


def test_multi_token_target_is_one_clear_line(lm):
    model, tok = lm
    pieces = tok.convert_ids_to_tokens(tok.encode(" Christian", add_special_tokens=False))
    with pytest.raises(ValueError) as err:
        target_ids(tok, "religion")
    message = str(err.value)
    assert "' Christian'" in message and "bias 'religion'" in message and str(pieces) in message
    assert "\n" not in message and "religion.yaml" in message
    with pytest.raises(ValueError, match=r"target ' Muslim' of bias 'religion' is not a single token"):
        target_ids(tok, dataclasses.replace(load_gap_prompts("train", bias="religion"),
                                            targets=(" she", " Muslim", " he")))
    with pytest.raises(ValueError, match="' zebra'"):
        target_ids(tok, (" she", " zebra"))
    site = hooks.resolve_hook(model, "blocks.1.hook_mlp_out", tok)
    with pytest.raises(ValueError, match=r"steering_vector needs a two-group bias; bias 'religion' .*'jewish'\]$"):
        build_intervention("steering_vector", model, tok, site=site, bias="religion")
