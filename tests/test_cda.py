"""Counterfactual pairs mined from the SAE corpus (`debias.cda`) and the `cda` objective term."""

import pytest
import torch
from conftest import make_data, make_module, make_trainer

from debias.bias_spec import load_bias_spec
from debias.cda import counterfactual_item, load_pairs, mine_pairs
from debias.evaluation.sentence_metrics import statement_logprobs
from debias.training.objective import ObjectiveWeights, counterfactual_term

GENDER, RELIGION = load_bias_spec("gender"), load_bias_spec("religion")


def test_a_sentence_is_cut_after_its_last_group_word_and_swapped_before_it():
    item = counterfactual_item("Later that year she said her sister moved to Paris to study law.", GENDER)
    assert item is not None
    assert item.prefixes == ("Later that year she said her sister", "Later that year he said his brother")
    assert item.attribute == " moved to Paris to study law."
    assert item.group == 0


def test_the_partner_of_a_word_follows_the_whole_sentence_not_the_cut():
    item = counterfactual_item("It belongs to Muslims and its target market is Muslim nations, he said.", RELIGION)
    assert item is not None and item.group == 1
    assert item.prefixes[2] == "It belongs to Jews and its target market is Jewish"  # not "Jew" (end of prefix)
    assert item.attribute == " nations, he said."


@pytest.mark.parametrize("sentence", [
    "She told her brother that the house was finally sold.",  # two groups: no clean counterfactual
    "Her husband's car broke down on the motorway.",  # two groups again
    "The committee met on Tuesday to discuss the budget again.",  # no group word
    "She left.",  # too short
    "He spoke to the minister about his",  # nothing after the last group word
])
def test_sentences_without_a_clean_counterfactual_are_skipped(sentence):
    assert counterfactual_item(sentence, GENDER) is None


def test_a_group_word_without_a_swap_partner_skips_the_sentence():
    assert counterfactual_item("Many Muslims pray to Allah five times every single day of the week.",
                               RELIGION) is None  # "Allah" is a muslim word with no swap row


def test_mining_keeps_corpus_order_deduplicates_and_stops_at_the_limit():
    passages = ["She moved to Rome in the spring of that year. The weather was fine all week long.",
                "She moved to Rome in the spring of that year. He bought a small house near the sea."]
    items = mine_pairs(GENDER, passages, limit=10)
    assert [it.attribute for it in items] == [" moved to Rome in the spring of that year.",
                                              " bought a small house near the sea."]
    assert len(mine_pairs(GENDER, passages, limit=1)) == 1


def test_train_and_validation_pairs_come_from_disjoint_passages():
    train, validation = load_pairs("train", 200), load_pairs("validation", 200)
    assert len(train) == 200 and len(validation) == 200
    assert not {it.prefixes + (it.attribute,) for it in train} & {it.prefixes + (it.attribute,) for it in validation}
    assert {it.group for it in train} == {0, 1}
    with pytest.raises(ValueError, match="data.cda_pairs must be >= 1 when objective.cda > 0, got 0"):
        load_pairs("train", 0)


def test_the_cda_term_is_the_counterfactual_form_on_mined_pairs_and_training_lowers_it(tmp_path):
    data = make_data(cda_pairs=24)
    module = make_module(objective=ObjectiveWeights(feature=0.0, cda=1.0, kl=0.0), k=400, lr=0.05)
    module.prepare(data)
    pairs = data.items["cda"]
    assert len(pairs) == 24 and "statement" in data.items
    with torch.no_grad():
        logprobs = statement_logprobs(module.net, module.tokenizer, pairs)
        before = float(counterfactual_term(module, pairs))
    assert before == pytest.approx(float(((logprobs[:, 0] - logprobs[:, 1]) ** 2).mean()), rel=1e-4)
    make_trainer(tmp_path, max_steps=12).fit(module, datamodule=data)
    with torch.no_grad():
        after = float(counterfactual_term(module, pairs))
    assert after < 0.7 * before, (before, after)


def test_a_bad_pair_count_is_refused_before_any_model_loads():
    with pytest.raises(ValueError, match=r"data.cda_pairs must be >= 1, got 0"):
        make_data(cda_pairs=0)
