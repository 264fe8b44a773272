"""Sentence-level data (statements, factual items), their scoring, the counterfactual and factual_kl terms, the
validation split and `val/score`."""

import pytest
import torch
import yaml
from conftest import make_data, make_module, make_trainer

from debias.bias_spec import BiasSpecError, default_bias_dir, load_bias_spec, swap
from debias.callbacks import ValidationMetrics
from debias.evaluation.sentence_metrics import statement_logprobs
from debias.models.continuation import continuation_batch, continuation_logits, continuation_logprobs, picked_logits
from debias.models.scoring import group_gap, next_token_logprobs, own_group_margins
from debias.models.tiny import tiny_model, tiny_tokenizer
from debias.statements import PAIRINGS, load_factual, load_statements
from debias.training.objective import ObjectiveWeights, counterfactual_term


def _spec_with(tmp_path, edit) -> str:
    raw = yaml.safe_load((default_bias_dir() / "gender.yaml").read_text())
    edit(raw)
    path = tmp_path / "mine.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


@pytest.mark.parametrize("edit, message", [
    (lambda r: r["statements"]["templates"]["train"].append("No placeholder here"),
     "statements.templates.train: 'No placeholder here' has placeholders []; expected one subject placeholder"),
    (lambda r: r["statements"]["subjects"]["train"].append({"female": "my aunt"}),
     "statements.subjects.train[14].male: missing"),
    (lambda r: r["statements"]["subjects"]["validation"].append({"female": "my uncle", "male": "my brother"}),
     "statements.subjects.validation[6].female: 'my uncle' names {'male': ['uncle']}; expected word(s) of 'female'"),
    (lambda r: r["statements"]["subjects"]["heldout"].append({"female": "my sister", "male": "my stepbrother"}),
     "'my sister' is also a subject of the heldout split; expected disjoint splits"),
    (lambda r: r["statements"]["subjects"]["train"][0].update(plural="yes"),
     "statements.subjects.train[0].plural: expected true or false, got str 'yes'"),
    (lambda r: r["statements"].pop("subjects"), "statements.subjects: missing"),
])
def test_bad_statements_are_named(tmp_path, edit, message):
    with pytest.raises(BiasSpecError) as err:
        load_bias_spec(_spec_with(tmp_path, edit))
    assert message in str(err.value)


def test_statements_cross_templates_subjects_and_attributes_and_swap_into_each_other():
    spec = load_bias_spec("gender")
    for split in ("train", "validation", "heldout"):
        everything = load_statements(split, pairings=None)
        n_attributes = sum(len(spec.attributes[g][split]) for g in spec.groups)
        assert len(everything) == len(spec.statement_templates[split]) * len(spec.subjects[split]) * n_attributes
        items = load_statements(split)  # each phrase paired with PAIRINGS[split] (template, row) combinations
        assert len(items) == n_attributes * PAIRINGS[split] and set(items) <= set(everything)
        assert load_statements(split) == items and load_statements(split, seed=1) != items  # seeded
        assert {i.attribute for i in items if i.domain} and all(i.domain in spec.domains for i in items)
        for item in items:
            assert swap(item.prefixes[0], spec) == item.prefixes[1]
    plural = [i for i in load_statements("train", pairings=None) if i.prefixes[0].endswith("women")]
    assert plural and all(i.attribute in spec.attribute_plurals.values() for i in plural)
    assert any(i.attribute == " are bad at math." for i in plural)  # the plural form follows a plural subject
    religion = load_statements("heldout", "religion")
    assert {len(item.prefixes) for item in religion} == {3} and {item.group for item in religion} == {0, 1, 2}


def test_factual_items_are_cut_at_the_group_word():
    items = load_factual("train")
    assert items[0].context == "My mother is a" and items[0].words == (" woman", " man") and items[0].group == 0
    assert load_factual("train", "religion")[0].words == (" Christianity", " Islam", " Judaism")


def test_a_spec_without_statements_says_so(tmp_path):
    path = _spec_with(tmp_path, lambda r: r.pop("statements"))
    with pytest.raises(ValueError, match="has no `statements`"):
        load_statements("train", path)


def test_continuation_scores_do_not_depend_on_the_batch():
    model, tok = tiny_model("llama"), tiny_tokenizer()
    contexts, continuations = ["My sister", "In my experience, my brother"], [" is bad at math.", " never cries."]
    with torch.no_grad():
        batched = continuation_logprobs(model, tok, contexts, continuations)
        alone = torch.cat([continuation_logprobs(model, tok, [c], [x]) for c, x in zip(contexts, continuations, strict=True)])
        ids = tok(contexts[0])["input_ids"] + tok(continuations[0], add_special_tokens=False)["input_ids"]
        head = len(tok(contexts[0])["input_ids"])
        logp = model(input_ids=torch.tensor([ids])).logits[0].log_softmax(-1)
        by_hand = sum(float(logp[i - 1, ids[i]]) for i in range(head, len(ids)))
    assert torch.allclose(batched, alone, atol=1e-5) and batched[0].item() == pytest.approx(by_hand, abs=1e-4)


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma2", "qwen2", "mistral"])
def test_continuation_logits_unembed_only_the_picked_positions_with_the_full_forwards_values(family):
    model, tok = tiny_model(family), tiny_tokenizer()
    batch = continuation_batch(tok, ["My sister", "In my experience, my brother", "Hi"],
                               [" is bad at math.", " never cries.", " there"])
    calls = []
    handle = model.get_output_embeddings().register_forward_hook(lambda m, i, o: calls.append(i[0].shape))
    with torch.no_grad():
        picked = continuation_logits(model, batch)
        full = picked_logits(model(**batch.model_inputs()).logits, batch)
    handle.remove()
    assert calls[0][:-1] == (len(batch.targets),)  # only the positions that predict a continuation token
    assert calls[1][:-1] == batch.input_ids.shape
    torch.testing.assert_close(picked, full, atol=1e-5, rtol=1e-5)


def test_group_margins_and_gap_by_hand():
    logprobs = torch.tensor([[-1.0, -3.0, -2.0], [-4.0, -1.0, -1.0]])
    margins = own_group_margins(logprobs, torch.tensor([0, 2]))
    assert margins.tolist() == [1.5, 1.5]
    values, groups = torch.tensor([1.0, 3.0, -2.0]), torch.tensor([0, 0, 1])
    assert float(group_gap(values, groups, 2)) == pytest.approx(0.0)


def test_counterfactual_term_is_the_squared_statement_difference_and_training_lowers_it(tmp_path):
    data = make_data()
    module = make_module(objective=ObjectiveWeights(feature=0.0, counterfactual=1.0, kl=0.0), k=400, lr=0.05)
    module.prepare(data)
    items = load_statements("train")[:6]
    with torch.no_grad():
        term = float(counterfactual_term(module, items))
        logprobs = statement_logprobs(module.net, module.tokenizer, items)
    assert term == pytest.approx(float(((logprobs[:, 0] - logprobs[:, 1]) ** 2).mean()), rel=1e-4)
    all_items = data.items["statement"]  # what it trains on (a tiny random model does not generalise)
    with torch.no_grad():
        before = float(counterfactual_term(module, all_items))
    make_trainer(tmp_path, max_steps=12).fit(module, datamodule=data)
    with torch.no_grad():
        after = float(counterfactual_term(module, all_items))
    assert after < 0.7 * before, (before, after)


def test_factual_kl_is_zero_for_the_original_and_positive_after_an_edit():
    data = make_data()
    module = make_module(objective=ObjectiveWeights(feature=1.0, kl=0.0, factual_kl=1.0))
    module.prepare(data)
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    batch = batch[0] if isinstance(batch, tuple) else batch
    with torch.no_grad():
        assert float(module.loss_terms(batch)["factual_kl"]) == pytest.approx(0.0, abs=1e-6)
        module.delta.values.normal_()
        assert float(module.loss_terms(batch)["factual_kl"]) > 0


def test_validation_uses_its_own_split_never_the_heldout_one():
    data = make_data()
    data.setup("fit")
    texts = data.texts
    assert not set(texts["neutral_validation"]) & set(texts["neutral_train"])
    assert not set(texts["neutral_validation"]) & set(texts["neutral_heldout"])
    assert set(texts["bias_validation"]).isdisjoint(texts["bias_heldout"])
    assert data.val_sets() == ("bias", "neutral")
    assert [len(loader.dataset) for _, loader in data.loaders("heldout")] == [len(texts["bias_heldout"]),
                                                                             len(texts["neutral_heldout"])]


def test_validation_score_charges_missed_floors_and_budgets():
    metrics = ValidationMetrics(kl_budget=0.01, cue_floor=0.75, factual_floor=0.9, penalty=10.0)
    original = {"bias_gap": 2.0, "statement_gap": 1.0, "cue_margin": 2.0, "factual_margin": 1.0, "kl": 0.0}
    within = {"bias_gap": 1.0, "statement_gap": 0.5, "cue_margin": 1.8, "factual_margin": 0.95, "kl": 0.005}
    assert metrics.score(original, within) == pytest.approx(0.5)
    over = {**within, "kl": 0.02, "cue_margin": 1.0}  # KL twice the budget, cue kept 50%
    assert metrics.score(original, over) == pytest.approx(0.5 + 10 * (1.0 + 0.25))
    with pytest.raises(ValueError, match="metrics.kl_budget must be a finite number > 0, got 0"):
        ValidationMetrics(kl_budget=0)


def test_the_gap_and_kl_forms_by_hand():
    data = make_data()
    module = make_module(objective=ObjectiveWeights(feature=0.0, counterfactual=1.0, kl=0.0))
    module.prepare(data)
    items = load_statements("train")[:6]
    with torch.no_grad():
        logprobs = statement_logprobs(module.net, module.tokenizer, items)
        group = torch.tensor([it.group for it in items])
        assert set(group.tolist()) == {0, 1}
        gap = float(group_gap(own_group_margins(logprobs, group), group, 2))
        assert float(counterfactual_term(module, items, "gap")) == pytest.approx(gap ** 2, rel=1e-4)

        female = next_token_logprobs(module.net, module.tokenizer, [it.prefixes[0] for it in items])
        male = next_token_logprobs(module.net, module.tokenizer, [it.prefixes[1] for it in items])
        sym = ((female.exp() * (female - male)).sum(-1) + (male.exp() * (male - female)).sum(-1)).mean()
        assert float(counterfactual_term(module, items, "kl")) == pytest.approx(float(sym), rel=1e-4)
    with pytest.raises(ValueError, match="objective.counterfactual_form must be one of"):
        ObjectiveWeights(counterfactual_form="squared")


def test_sentence_terms_without_statements_are_refused_before_training():
    from debias.prompts import default_prompt_dir

    data = make_data(prompt_dir=str(default_prompt_dir()))
    module = make_module(objective=ObjectiveWeights(feature=1.0, counterfactual=1.0, factual_kl=1.0))
    with pytest.raises(ValueError, match=r"^objective.counterfactual > 0 needs the bias spec's `statements` and "
                                         r"factual statements, but data.prompt_dir gives none; set "
                                         r"objective.counterfactual/factual_kl to 0$"):
        module.prepare(data)


def test_val_score_checkpoint_without_a_validation_split_is_refused(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    from debias.prompts import default_prompt_dir

    data = make_data(prompt_dir=str(default_prompt_dir()))
    trainer = make_trainer(tmp_path, callbacks=[ValidationMetrics(), ModelCheckpoint(monitor="val/score")],
                           enable_checkpointing=True)
    with pytest.raises(ValueError, match="a ModelCheckpoint monitors val/score, which needs the bias spec's "
                                         "validation split; data.prompt_dir has none"):
        trainer.fit(make_module(), datamodule=data)


def test_statement_gap_per_domain_and_over_the_unseen_domains():
    from debias.evaluation.heldout import format_table
    from debias.evaluation.sentence_metrics import statement_gap

    model, tok = tiny_model("llama"), tiny_tokenizer()
    spec = load_bias_spec("gender")
    unseen = spec.domains_only_in("heldout")
    assert set(unseen) == {"appearance", "morals"} and not spec.domains_only_in("train")
    items = load_statements("heldout", pairings=1)
    out = statement_gap(model, tok, items, n_boot=20, unseen=unseen)
    assert set(out["statement_gap_by_domain"]) == {i.domain for i in items} and out["unseen_domains"] == list(unseen)
    math = [i for i in items if i.domain == "mathematics"]
    alone = statement_gap(model, tok, math, n_boot=1)["statement_gap"]
    assert out["statement_gap_by_domain"]["mathematics"]["statement_gap"] == pytest.approx(alone, abs=1e-5)
    assert out["statement_gap_by_domain"]["mathematics"]["items"] == len(math)
    both = statement_gap(model, tok, [i for i in items if i.domain in unseen], n_boot=1)["statement_gap"]
    assert out["statement_gap_unseen"] == pytest.approx(both, abs=1e-5)
    table = format_table(out, out)
    assert "statement gap by domain" in table and "morals" in table and "(unseen in train)" in table
