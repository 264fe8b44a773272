"""Neutral text at scale for the preservation KL: `data.neutral_train: corpus:N` (`debias.neutral_corpus`)."""

import pytest
from conftest import make_data

from debias.bias_checks import group_words_in
from debias.bias_spec import load_bias_spec
from debias.neutral_corpus import MAX_WORDS, MIN_WORDS, corpus_count, neutral_sentences


def test_corpus_sources_are_parsed_and_others_pass_through():
    assert corpus_count("corpus:400") == 400
    assert corpus_count("package:neutral_train.txt") is None


@pytest.mark.parametrize("source", ["corpus:", "corpus:1", "corpus:ten", "corpus:-5", "corpus:4.0"])
def test_a_bad_corpus_count_is_named_before_any_model_loads(source):
    with pytest.raises(ValueError, match=f"data.neutral_train '{source}': expected corpus:N with N an integer >= 2"):
        make_data(neutral_train=source)


@pytest.mark.parametrize("bias", ["gender", "religion"])
def test_corpus_sentences_name_no_group_and_are_a_fixed_draw(bias):
    spec = load_bias_spec(bias)
    texts = neutral_sentences(bias, 60)
    assert len(texts) == len(set(texts)) == 60
    assert all(MIN_WORDS <= len(t.split()) <= MAX_WORDS for t in texts)
    assert not [t for t in texts if group_words_in(spec.words, t)]
    assert neutral_sentences(spec, 20) == texts[:20]  # a fixed function of the corpus and the spec


def test_the_data_module_trains_on_corpus_sentences_and_validates_on_every_fifth():
    data = make_data(neutral_train="corpus:40", max_texts=None)
    data.setup("fit")
    drawn = neutral_sentences("gender", 40)
    assert data.texts["neutral_validation"] == drawn[4::5]
    assert data.texts["neutral_train"] == [t for i, t in enumerate(drawn) if i % 5 != 4]


def test_asking_for_more_sentences_than_the_corpus_has_names_the_count():
    with pytest.raises(ValueError, match=r"'corpus:10000000': the corpus has only \d+ passages"):
        neutral_sentences("gender", 10_000_000)


@pytest.mark.parametrize("key", ["neutral_heldout", "neutral_validation"])
def test_only_the_train_neutral_text_may_come_from_the_corpus(key):
    with pytest.raises(ValueError, match=f"data.{key} 'corpus:40': corpus:N is for data.neutral_train only"):
        make_data(**{key: "corpus:40"})
