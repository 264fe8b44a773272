"""Bias specs (debias.bias_spec): the shipped axes, the gender spec equal to the prompt files, the counterfactual
swap, and one clear error per kind of bad input."""

from __future__ import annotations

import copy
import re

import pytest
import yaml

from debias.bias_spec import SPLITS, BiasSpecError, bias_spec_path, default_bias_dir, load_bias_spec, swap
from debias.prompts import default_prompt_dir, load_cue_prompts, load_gap_prompts, read_prompt_lines
from debias.training.data import DebiasDataModule

PROMPTS = default_prompt_dir()
FILE_SPLITS = ("train", "heldout")


def _words(items):
    return {w for item in items for w in re.findall(r"[a-z]+", item.lower())}


# --- shipped specs ---------------------------------------------------------------------------------------------

def test_shipped_specs_load_with_every_split():
    assert sorted(p.stem for p in default_bias_dir().glob("*.yaml")) == ["gender", "religion"]
    gender, religion = load_bias_spec("gender"), load_bias_spec("religion")
    assert gender.groups == ("female", "male") and dict(gender.targets) == {"female": " she", "male": " he"}
    assert religion.groups == ("christian", "muslim", "jewish")
    for spec in (gender, religion):
        assert load_bias_spec(spec.path) == spec and load_bias_spec(spec) is spec  # by name, path or spec
        for split in SPLITS:
            assert spec.templates[split] and spec.cue_templates[split] and spec.factual[split]
            for g in spec.groups:
                assert spec.contexts[g][split] and spec.attributes[g][split] and spec.cue_relatives[g][split]
        words = {s: _words(c for g in spec.groups for c in spec.contexts[g][s]) for s in SPLITS}
        assert not words["train"] & words["heldout"]  # no context of one split shares a word with another's
        assert not words["validation"] & (words["train"] | words["heldout"])


#: The sizes that generalisation needs (issue: training data at scale), per split, for the gender spec.
GENDER_SIZES = {"attributes": {"train": 150, "validation": 40, "heldout": 60},
                "factual": {"train": 100, "validation": 30, "heldout": 40}}


def _norm(text: str) -> str:
    return " ".join(re.findall(r"[a-z0-9']+", text.lower()))


def test_gender_spec_is_at_scale_and_no_item_crosses_splits():
    spec = load_bias_spec("gender")
    phrases = {s: [t for g in spec.groups for t in spec.attributes[g][s]] for s in SPLITS}
    for split, least in GENDER_SIZES["attributes"].items():
        assert len(phrases[split]) >= least
        per_group = [len(spec.attributes[g][split]) for g in spec.groups]
        assert max(per_group) - min(per_group) <= 2  # balanced between the groups
    assert sum(map(len, phrases.values())) >= 250
    for split, least in GENDER_SIZES["factual"].items():
        assert len(spec.factual[split]) >= least
        assert {f.kind for f in spec.factual[split]} == {"kinship", "noun", "title", "pronoun"}
        assert abs(sum(f.group == "female" for f in spec.factual[split]) * 2 - len(spec.factual[split])) <= 2
    assert sum(map(len, spec.factual.values())) >= 170
    assert len(spec.domains) >= 12 and set(spec.attribute_domains.values()) == set(spec.domains)
    assert len(spec.domains_only_in("heldout")) >= 2  # the report can say whether the edit crosses domains
    assert sum(len(rows) for rows in spec.subjects.values()) >= 24
    assert any(any(p) for p in spec.subject_plural.values()) and not all(all(p) for p in spec.subject_plural.values())
    assert sum(len(t) for t in spec.statement_templates.values()) >= 16
    lists = {"phrases": phrases, "templates": spec.statement_templates,
             "subjects": {s: [r[g] for r in spec.subjects[s] for g in spec.groups] for s in SPLITS},
             "factual prompts": {s: [f.prompt for f in spec.factual[s]] for s in SPLITS},
             "relatives": {s: [r for g in spec.groups for r in spec.cue_relatives[g][s]] for s in SPLITS},
             "cue templates": spec.cue_templates}
    for name, per_split in lists.items():
        seen: dict[str, str] = {}
        for split in SPLITS:
            for item in per_split[split]:
                assert seen.setdefault(_norm(item), split) == split, f"{name}: {item!r} is in two splits"


def test_gender_professions_share_no_word_across_splits_or_groups():
    spec = load_bias_spec("gender")
    where: dict[str, set] = {}
    for g in spec.groups:
        for split in SPLITS:
            for profession in spec.contexts[g][split]:
                for word in _norm(profession).split():
                    where.setdefault(word, set()).add((split, g))
    crossing = {w: sorted(places) for w, places in where.items() if len(places) > 1}
    # "worker" names one held-out profession of each group (social worker, construction worker): allowed there
    assert crossing == {"worker": [("heldout", "female"), ("heldout", "male")]}


def test_gender_spec_holds_the_prompt_files():
    spec = load_bias_spec("gender")
    for split in FILE_SPLITS:
        for g in spec.groups:
            assert list(spec.contexts[g][split]) == read_prompt_lines(PROMPTS / f"professions_{g}_{split}.txt")
        # the train gap templates grew: the files' lines come first, in order; held-out is the file exactly
        files = read_prompt_lines(PROMPTS / f"templates_{split}.txt")
        assert list(spec.templates[split])[:len(files)] == files
        assert len(spec.templates[split]) > len(files) if split == "train" else list(spec.templates[split]) == files
        # the cue lists grew: the files' lines come first, in order
        files = read_prompt_lines(PROMPTS / f"cue_templates_{split}.txt")
        assert list(spec.cue_templates[split])[:len(files)] == files
        rel = [line.rsplit(None, 1) for line in read_prompt_lines(PROMPTS / f"cue_relatives_{split}.txt")]
        for g in spec.groups:
            ours = [r for r, group in rel if group == g]
            assert list(spec.cue_relatives[g][split])[:len(ours)] == ours


def test_gender_spec_gives_the_files_prompts_and_the_new_templates():
    for split in FILE_SPLITS:
        spec_gap, file_gap = load_gap_prompts(split), load_gap_prompts(split, PROMPTS)
        assert spec_gap == load_gap_prompts(split, bias="gender")
        assert set(file_gap.prompts) <= set(spec_gap.prompts)  # train's templates grew
        assert read_prompt_lines(PROMPTS / f"bias_{split}.txt") == file_gap.prompts
        assert set(load_cue_prompts(split, PROMPTS).prompts) < set(load_cue_prompts(split).prompts)  # cues grew


def test_validation_split_is_new_and_disjoint():
    gap = {s: load_gap_prompts(s) for s in SPLITS}
    profs = {s: gap[s].female_professions + gap[s].male_professions for s in SPLITS}
    assert len(gap["validation"].prompts) == len(profs["validation"]) * len(gap["validation"].templates) > 0
    for other in FILE_SPLITS:
        assert not set(gap["validation"].prompts) & set(gap[other].prompts)
        assert not _words(profs["validation"]) & _words(profs[other])
    cue = load_cue_prompts("validation")
    assert {(c, p) for c, p in zip(cue.cued, cue.pro, strict=True)} == {(g, b) for g in ("female", "male")
                                                                        for b in (True, False)}
    with pytest.raises(ValueError, match="prompt directory"):
        load_gap_prompts("validation", PROMPTS)  # files have no validation split


def test_religion_prompts_compare_any_two_groups():
    gap = load_gap_prompts("train", bias="religion", groups=("christian", "muslim"))
    assert gap.groups == ("christian", "muslim") and gap.is_female.sum() == len(gap.female) > 0
    assert load_gap_prompts("train", bias="religion").groups == ("christian", "muslim", "jewish")  # default: all
    assert "The banker grew up in a devout" in load_gap_prompts("train", bias="religion",
                                                                groups=("jewish", "muslim")).female
    cue = load_cue_prompts("heldout", bias="religion", groups=("muslim", "jewish"))
    assert set(cue.cued) == {"muslim", "jewish"} and cue.cued_female.tolist() == [c == "muslim" for c in cue.cued]
    assert all("{" not in p for p in cue.prompts + gap.prompts)
    with pytest.raises(ValueError, match="two or more different groups"):
        load_gap_prompts("train", bias="religion", groups=("muslim", "hindu"))
    with pytest.raises(ValueError, match="not both"):
        load_gap_prompts("train", PROMPTS, bias="religion")


# --- swap ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    ("She said that", "He said that"),
    ("SHE said", "HE said"),
    ("My mother's sister is my aunt.", "My father's brother is my uncle."),
    ("her mother-in-law", "his father-in-law"),
    ("Her book is on her desk.", "His book is on his desk."),   # her + content word -> his
    ("I told her that I saw her.", "I told him that I saw him."),  # her + function word / punctuation -> him
    ("He gave his book to his son; the book is his.", "She gave her book to her daughter; the book is hers."),
    ("Mary met John and Mr. Smith", "John met Mary and Mrs. Smith"),
    ("The sheriff and the midwife", "The sheriff and the midwife"),  # no match inside longer words
    ("herself and himself", "himself and herself"),
])
def test_gender_swap(text, expected):
    assert swap(text, load_bias_spec("gender")) == expected


def test_swap_is_its_own_inverse_on_one_to_one_words():
    spec = load_bias_spec("gender")
    text = "The woman and her sister told my mother about the queen."
    assert swap(swap(text, spec), spec) == text


def test_religion_swap_needs_a_target_group():
    spec = load_bias_spec("religion")
    assert swap("A Christian family at church", spec, to="muslim") == "A Muslim family at mosque"
    assert swap("He is a Christian.", spec, to="jewish") == "He is a Jew."  # second partner before punctuation
    assert swap("Jews read the Torah.", spec, to="jewish") == "Jews read the Torah."
    with pytest.raises(ValueError, match="to=GROUP"):
        swap("a church", spec)
    with pytest.raises(ValueError, match="unknown group"):
        swap("a church", spec, to="hindu")


def test_factual_statements_swap_to_other_groups_facts():
    spec = load_bias_spec("gender")
    train = spec.factual["train"]
    assert (train[0].prompt, train[0].target, train[0].group) == ("My mother is", " a woman.", "female")
    assert swap(train[0].prompt + train[0].target, spec) == train[1].prompt + train[1].target


# --- bad input -------------------------------------------------------------------------------------------------

def _raw() -> dict:
    return yaml.safe_load(bias_spec_path("gender").read_text(encoding="utf-8"))


def _write(tmp_path, raw, name="bad.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    return path


def _one_group(raw):
    del raw["groups"]["male"]


def _empty_list(raw):
    raw["contexts"]["female"]["train"] = []


def _unknown_key(raw):
    raw["groups"]["female"]["targte"] = " she"


def _unknown_top_key(raw):
    raw["neutral"] = {"train": ["The river rises in the hills."]}


def _unpartnered(raw):
    raw["swaps"].append({"female": "duchess"})


def _empty_validation(raw):
    raw["templates"]["validation"] = []


def _no_heldout(raw):
    del raw["cues"]["relatives"]["male"]["heldout"]


def _no_placeholder(raw):
    raw["templates"]["train"].append("The doctor said that")


def _cue_without_relative(raw):
    raw["cues"]["templates"]["heldout"].append("My friend, {a_profession}, said that")


def _contradicting_fact(raw):
    raw["factual"]["validation"].append({"prompt": "My mother is", "target": " a man.", "group": "female"})


def _phrase_in_two_splits(raw):
    raw["attributes"]["male"]["heldout"].append(raw["attributes"]["female"]["train"][0]["text"].upper())


def _no_domain(raw):
    del raw["attributes"]["female"]["validation"][0]["domain"]


def _unknown_domain(raw):
    raw["attributes"]["male"]["train"][0]["domain"] = "astrology"


def _unpartnered_true_word(raw):
    raw["groups"]["female"]["words"] = ["ballerina"]
    raw["factual"]["heldout"].append({"prompt": "My sister dances; she is a", "target": " ballerina.",
                                      "group": "female"})


def _no_validation_facts(raw):
    raw["factual"]["validation"] = []


def _format_spec(raw):
    raw["templates"]["train"].append("The {profession:>900000000} said that")


def _no_plural_form(raw):
    del raw["attributes"]["female"]["train"][3]["plural"]


BAD = {
    "phrase in two splits": (_phrase_in_two_splits, "attributes.male.heldout[32]",
                             "repeats attributes.female.train[0]; expected each phrase once"),
    "missing domain tag": (_no_domain, "attributes.female.validation[0]", "has no domain tag; expected `domain:`"),
    "unknown domain tag": (_unknown_domain, "attributes.male.train[0].domain",
                           "unknown domain str 'astrology'; expected one of ['appearance'"),
    "true word without swap partner": (_unpartnered_true_word, "factual.heldout[44].target",
                                       "the true word 'ballerina' has no swap partner in ['male']"),
    "no validation facts": (_no_validation_facts, "factual.validation", "expected a non-empty list"),
    "format spec in a template": (_format_spec, "templates.train", "has a format spec or conversion"),
    "phrase without plural form": (_no_plural_form, "attributes.female.train", "has no `plural` form"),
    "one group": (_one_group, "groups", "expected two or more groups, got 1"),
    "empty list": (_empty_list, "contexts.female.train", "expected a non-empty list of strings, got an empty list"),
    "unknown key": (_unknown_key, "groups.female.targte", "unknown key; expected one of ['target', 'words']"),
    "unknown top-level key": (_unknown_top_key, "neutral", "unknown key; expected one of ['description', 'groups'"),
    "swap word without partner": (_unpartnered, "swaps[", "['duchess'] has no partner in group(s) ['male']"),
    "empty validation": (_empty_validation, "templates.validation", "expected a non-empty list"),
    "missing heldout": (_no_heldout, "cues.relatives.male.heldout", "missing"),
    "template without placeholder": (_no_placeholder, "templates.train",
                                     "'The doctor said that' has placeholders []; expected a context placeholder"),
    "cue template without relative": (_cue_without_relative, "cues.templates.heldout",
                                      "expected {relative} and a context placeholder"),
    "fact contradicting the swaps": (_contradicting_fact, "factual.validation[",
                                     "target ' a man.' names {'male': ['man']}"),
}


def test_yaml_aliases_and_huge_specs_are_refused_before_parsing(tmp_path):
    laughs = "a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n" + "".join(
        f"{n}: &{n} [{', '.join([f'*{p}'] * 9)}]\n" for p, n in zip("abcdefgh", "bcdefghi", strict=True)) + "groups: *i\n"
    path = tmp_path / "laughs.yaml"
    path.write_text(laughs)
    with pytest.raises(BiasSpecError, match=r"line 2: YAML alias \*a; expected plain values"):
        load_bias_spec(path)
    big = tmp_path / "big.yaml"
    big.write_text("description: " + "x" * 4_100_000)
    with pytest.raises(BiasSpecError, match="bytes; expected at most 4,000,000"):
        load_bias_spec(big)


def test_a_repeated_key_is_refused_not_silently_replaced(tmp_path):
    path = _write(tmp_path, _raw())
    text = path.read_text()
    path.write_text(text + "description: a second one\n")
    with pytest.raises(BiasSpecError, match=rf"bias spec {re.escape(str(path))}, line \d+: key 'description' "
                                            "appears twice in one mapping; expected each key once"):
        load_bias_spec(path)


def test_swaps_of_the_wrong_type_are_one_problem_not_a_cascade(tmp_path):
    raw = _raw()
    raw["swaps"] = {"female": "she", "male": "he"}
    with pytest.raises(BiasSpecError) as err:
        load_bias_spec(_write(tmp_path, raw))
    assert str(err.value).count("\n") == 0 and "swaps: expected a non-empty list of rows" in str(err.value)


def test_many_contexts_are_checked_in_linear_time(tmp_path):
    raw = _raw()
    raw["contexts"]["female"]["train"] = [f"worker number {i}" for i in range(60_000)]
    load_bias_spec(_write(tmp_path, raw, "many.yaml"))  # quadratic repeat checks took minutes here


@pytest.mark.parametrize("case", list(BAD))
def test_bad_spec_names_file_key_and_expectation(tmp_path, case):
    mutate, key, expected = BAD[case]
    raw = _raw()
    mutate(raw)
    path = _write(tmp_path, raw)
    with pytest.raises(BiasSpecError) as err:
        load_bias_spec(path)
    message = str(err.value)
    assert message.startswith(f"bias spec {path.resolve()}") and key in message and expected in message, message
    with pytest.raises(BiasSpecError):  # the data module refuses it before any model loads
        DebiasDataModule(bias=str(path))


def test_all_problems_are_reported_at_once(tmp_path):
    raw = _raw()
    for mutate, _, _ in BAD.values():
        if mutate is not _one_group:
            mutate(raw)
    with pytest.raises(BiasSpecError, match=r"has \d+ problem") as err:
        load_bias_spec(_write(tmp_path, raw))
    for name, (mutate, _, expected) in BAD.items():
        assert mutate is _one_group or expected in str(err.value), name


def test_bad_names_paths_and_yaml(tmp_path):
    with pytest.raises(ValueError, match=r"unknown bias 'gendr'.*\['gender', 'religion'\]"):
        load_bias_spec("gendr")
    with pytest.raises(FileNotFoundError, match="missing.yaml"):
        load_bias_spec(tmp_path / "missing.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("groups: [female\n", encoding="utf-8")
    with pytest.raises(BiasSpecError, match="broken.yaml: not valid YAML"):
        load_bias_spec(broken)
    with pytest.raises(ValueError, match="data.prompt_dir .* data.bias='religion'"):
        DebiasDataModule(prompt_dir=str(PROMPTS), bias="religion")


def test_a_copy_of_the_spec_loads_from_a_path(tmp_path):
    raw = copy.deepcopy(_raw())
    raw["contexts"]["female"]["train"] = ["nurse", "florist"]
    spec = load_bias_spec(_write(tmp_path, raw, "mine.yaml"))
    assert spec.name == "mine" and load_gap_prompts("train", bias=spec).female_professions == ["nurse", "florist"]


def test_data_module_passes_the_bias_through():
    default = DebiasDataModule()
    assert default.hparams.bias == "gender"
    dm = DebiasDataModule(bias="religion")
    dm.setup()
    gap = load_gap_prompts("train", bias="religion")
    assert dm.groups == ("christian", "muslim", "jewish") and dm.gap_texts() == list(gap.texts)
    assert dm.texts["gap_jewish_train"] == gap.texts[2]
    assert dm.texts["cue_train"] == load_cue_prompts("train", bias="religion").prompts
