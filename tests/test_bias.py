"""Behavioural bias metrics (debias.bias) and the shipped prompt files."""

from __future__ import annotations

import re
import shutil
from types import SimpleNamespace

import pytest
import torch

from debias import prompts as bias
from debias.evaluation.bias_metrics import CueMargin, StereotypeGap, bias_gap, cue_margin
from debias.models.scoring import gap_from_logprobs, next_token_logprobs, pronoun_ids, pronoun_margin
from debias.models.tiny import tiny_model, tiny_tokenizer
from debias.prompts import GapPrompts, load_cue_prompts, load_gap_prompts, read_prompt_lines

PROMPTS = bias.default_prompt_dir()
GENDERED = {
    "he", "she", "him", "her", "his", "hers", "himself", "herself", "man", "men", "woman", "women", "boy", "boys",
    "girl", "girls", "mother", "father", "sister", "brother", "son", "daughter", "wife", "husband", "aunt",
    "uncle", "mr", "mrs", "ms", "miss", "sir", "madam", "lady", "ladies", "gentleman", "gentlemen", "king",
    "queen", "prince", "princess", "female", "male", "grandmother", "grandfather", "niece", "nephew",
}


class FakeLM(torch.nn.Module):
    """Returns, at the last real token of each prompt, logits with logit(she) - logit(he) = margins[text]
    (other logits 0); every other position carries a decoy margin of 100."""

    def __init__(self, tokenizer, margins: dict[str, float]):
        super().__init__()
        self.tok, self.margins = tokenizer, margins
        self.she, self.he = pronoun_ids(tokenizer)
        self.dummy = torch.nn.Parameter(torch.zeros(()))

    def forward(self, input_ids, attention_mask, position_ids=None):
        b, t = input_ids.shape
        logits = torch.zeros(b, t, len(self.tok))
        logits[:, :, self.she] = 100.0
        for row in range(b):
            text = self.tok.decode(input_ids[row][attention_mask[row].bool()], skip_special_tokens=True)
            last = int(attention_mask[row].nonzero().max())
            logits[row, last, self.she] = self.margins[text]
        return SimpleNamespace(logits=logits + self.dummy)


def _gap_prompts(female, male):
    return GapPrompts((female, male), (female, male), (female, male), ["{profession}"])


@pytest.fixture
def tok():
    return tiny_tokenizer()


# --- known answers ---------------------------------------------------------------------------------------------

def test_stereotype_gap_known_answer_and_ci():
    metric = StereotypeGap()
    metric.update(torch.tensor([2.0, 1.0, -3.0]), torch.tensor([True, True, False]))
    metric.update(torch.tensor([-1.0, 0.5]), torch.tensor([False, True]))
    # female mean (2 + 1 + 0.5) / 3 = 7/6, male mean (-3 - 1) / 2 = -2
    assert metric.compute().item() == pytest.approx(7 / 6 + 2)
    lo, hi = metric.bootstrap_ci(n_boot=500, seed=0)
    assert lo < 7 / 6 + 2 < hi
    assert metric.bootstrap_ci(n_boot=500, seed=0) == (lo, hi)  # seeded
    lo90, hi90 = metric.bootstrap_ci(n_boot=500, alpha=0.5, seed=0)
    assert lo <= lo90 <= hi90 <= hi


def test_bias_gap_end_to_end_known_answer(tok):
    margins = {"The nurse said that": 2.0, "My sister said that": 1.0,
               "The engineer said that": -3.0, "The pilot told me that": -1.0}
    prompts = _gap_prompts(list(margins)[:2], list(margins)[2:])
    for side in ("left", "right"):
        tok.padding_side = side
        out = bias_gap(FakeLM(tok, margins), tok, prompts, batch_size=3, n_boot=200)
        assert out["bias_gap"] == pytest.approx(1.5 + 2.0, abs=1e-5)
        assert out["female_mean"] == pytest.approx(1.5, abs=1e-5)
        assert out["male_mean"] == pytest.approx(-2.0, abs=1e-5)
        assert out["per_profession"]["The engineer said that"] == pytest.approx(-3.0, abs=1e-5)
        lo, hi = out["bias_gap_ci"]
        assert lo <= out["bias_gap"] <= hi and lo < hi


def test_no_stereotype_gives_zero(tok):
    prompts = load_gap_prompts("heldout")
    model = FakeLM(tok, {p: 0.7 for p in prompts.prompts})  # identical next-token logits for every prompt
    out = bias_gap(model, tok, prompts, n_boot=100)
    assert out["bias_gap"] == pytest.approx(0.0, abs=1e-6)
    assert out["bias_gap_ci"] == pytest.approx([0.0, 0.0], abs=1e-6)


def test_gap_from_logprobs_is_differentiable(tok):
    logits = torch.randn(4, 10, requires_grad=True)
    is_female = torch.tensor([True, False, True, False])
    group_index = (~is_female).long()
    gap = gap_from_logprobs(logits.log_softmax(-1), (3, 5), group_index)
    (gap ** 2).backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0
    metric = StereotypeGap()
    metric.update(pronoun_margin(logits.log_softmax(-1), 3, 5), is_female)
    assert metric.compute().item() == pytest.approx(gap.item(), abs=1e-6)
    with pytest.raises(ValueError, match="at least one"):
        gap_from_logprobs(logits.log_softmax(-1), (3, 5), torch.zeros(4, dtype=torch.long))
    with pytest.raises(TypeError, match="target_ids, group_index"):  # the former (she, he, is_female) form is gone
        gap_from_logprobs(logits.log_softmax(-1), 3, 5)  # type: ignore[arg-type]


def test_cue_margin_sign_convention(tok):
    metric = CueMargin()
    metric.update(torch.tensor([1.5]), torch.tensor([True]))  # female cue, p(she) > p(he): positive
    assert metric.compute().item() == pytest.approx(1.5)
    metric.update(torch.tensor([-0.5]), torch.tensor([False]))  # male cue, p(he) > p(she): positive
    assert metric.compute().item() == pytest.approx(1.0)
    metric.update(torch.tensor([2.0]), torch.tensor([False]))  # male cue but p(she) > p(he): negative
    assert metric.compute().item() == pytest.approx((1.5 + 0.5 - 2.0) / 3)
    cue = load_cue_prompts("heldout")
    margins = {p: (1.0 if c == "female" else -1.0) for p, c in zip(cue.prompts, cue.cued, strict=False)}
    out = cue_margin(FakeLM(tok, margins), tok, cue, n_boot=50)
    assert out["cue_margin"] == pytest.approx(1.0, abs=1e-5)
    assert out["cue_margin_anti"] == pytest.approx(1.0, abs=1e-5)


# --- batching / padding ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma2", "qwen2", "mistral"])
def test_next_token_logprobs_padding_matches_unbatched(tok, family):
    model = tiny_model(family)
    prompts = ["The nurse said that", "My brother, a carpenter, said that", "Hi", "The pilot told me that"]
    with torch.no_grad():
        single = torch.cat([next_token_logprobs(model, tok, [p]) for p in prompts])
        for side in ("left", "right"):
            tok.padding_side = side
            batched = next_token_logprobs(model, tok, prompts, batch_size=3)
            assert batched.dtype == torch.float32 and batched.shape == (4, len(tok))
            torch.testing.assert_close(batched, single, atol=1e-5, rtol=1e-5)
    # the last real token, unbatched and with every position's logits (no `logits_to_keep`), by hand
    for i, prompt in enumerate(prompts):
        ids = tok(prompt, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            ref = model(input_ids=ids).logits[0, -1].log_softmax(-1)
        torch.testing.assert_close(single[i], ref, atol=1e-5, rtol=1e-5)


# --- prompt files ----------------------------------------------------------------------------------------------

def _words(items):
    return {w for item in items for w in re.findall(r"[a-z]+", item.lower())}


def test_splits_are_disjoint():
    gap = {s: load_gap_prompts(s) for s in bias.SPLITS}
    train, held = gap["train"], gap["heldout"]
    train_profs = train.female_professions + train.male_professions
    held_profs = held.female_professions + held.male_professions
    for g in (train, held):
        profs = g.female_professions + g.male_professions
        assert len(set(profs)) == len(profs) and len(g.female_professions) >= 12 and len(g.male_professions) >= 12
        assert len(g.templates) >= 5 and len(g.female) == len(g.female_professions) * len(g.templates)
    assert not set(train_profs) & set(held_profs)
    assert not _words(train_profs) & _words(held_profs)  # not even a shared word ("teacher")
    assert not set(train.templates) & set(held.templates)
    cue_t = {s: read_prompt_lines(PROMPTS / f"cue_templates_{s}.txt") for s in bias.SPLITS}
    rel = {s: read_prompt_lines(PROMPTS / f"cue_relatives_{s}.txt") for s in bias.SPLITS}
    assert not set(cue_t["train"]) & set(cue_t["heldout"]) and not set(rel["train"]) & set(rel["heldout"])
    for s in bias.SPLITS:  # the shipped bias prompts are the expansion of their split's files
        assert read_prompt_lines(PROMPTS / f"bias_{s}.txt") == load_gap_prompts(s, PROMPTS).prompts
        assert not set(read_prompt_lines(PROMPTS / f"neutral_{s}.txt")) & set(
            read_prompt_lines(PROMPTS / f"neutral_{'heldout' if s == 'train' else 'train'}.txt"))


def test_articles_and_placeholders():
    assert bias.fill("{A_profession} said", "engineer") == "An engineer said"
    assert bias.fill("I met {a_profession}", "nurse") == "I met a nurse"
    assert bias.fill("My {relative}, {a_profession},", "architect", "son") == "My son, an architect,"
    assert bias.article("hour") == "an" and bias.article("unicorn") == "a"
    assert all("{" not in p for s in bias.SPLITS for p in load_gap_prompts(s).prompts + load_cue_prompts(s).prompts)
    with pytest.raises(ValueError, match="placeholder"):
        bias.fill("The {job} said", "nurse")


def test_cue_prompts_have_pro_and_anti_combinations():
    for split in bias.SPLITS:
        cue = load_cue_prompts(split)
        assert len(cue.prompts) == len(cue.cued) == len(cue.pro)
        combos = {(c, p) for c, p in zip(cue.cued, cue.pro, strict=False)}
        assert combos == {("female", True), ("female", False), ("male", True), ("male", False)}
        gap = load_gap_prompts(split)
        anti = [p for p, c, pro in zip(cue.prompts, cue.cued, cue.pro, strict=False) if c == "male" and not pro]
        assert any(gap.female_professions[0] in p for p in anti)  # e.g. "My brother, a nurse, said that"
    assert "My brother, a nurse, said that" in load_cue_prompts("train").prompts
    sub = load_cue_prompts("heldout", limit=40, seed=1)
    assert len(sub.prompts) == 40 and sub == load_cue_prompts("heldout", limit=40, seed=1)
    assert {(c, p): list(zip(sub.cued, sub.pro, strict=False)).count((c, p)) for c, p in combos} == dict.fromkeys(combos, 10)
    assert set(sub.prompts) <= set(load_cue_prompts("heldout").prompts)
    rel = read_prompt_lines(PROMPTS / "cue_relatives_train.txt")
    assert sum(r.endswith("female") for r in rel) == 5 and sum(r.endswith("\tmale") for r in rel) == 5


def test_neutral_files_are_gender_free():
    for split, n in (("train", 40), ("heldout", 20)):
        lines = read_prompt_lines(PROMPTS / f"neutral_{split}.txt")
        assert len(lines) == n and len(set(lines)) == n
        found = _words(lines) & GENDERED
        assert not found, f"gendered words in neutral_{split}.txt: {found}"


# --- errors ----------------------------------------------------------------------------------------------------

def test_missing_prompt_dir_or_file_names_path(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        load_gap_prompts("train", missing)
    copy = tmp_path / "prompts"
    shutil.copytree(PROMPTS, copy)
    (copy / "templates_heldout.txt").unlink()
    with pytest.raises(FileNotFoundError, match=re.escape(str(copy / "templates_heldout.txt"))):
        load_gap_prompts("heldout", copy)
    (copy / "cue_templates_train.txt").write_text("# only a comment\n\n")
    with pytest.raises(ValueError, match=re.escape(str(copy / "cue_templates_train.txt"))):
        load_cue_prompts("train", copy)
    (copy / "cue_relatives_heldout.txt").write_text("cousin\tunknown\n")
    with pytest.raises(ValueError, match="cue_relatives_heldout.txt"):
        load_cue_prompts("heldout", copy)
    with pytest.raises(ValueError, match="split"):
        load_gap_prompts("test")
    assert load_gap_prompts("train", copy).female == load_gap_prompts("train", PROMPTS).female  # user dir works


def test_multi_token_pronoun_raises(tok):
    assert pronoun_ids(tok) == (tok.encode(" she", add_special_tokens=False)[0],
                                tok.encode(" he", add_special_tokens=False)[0])
    with pytest.raises(ValueError, match="' zebra'"):
        pronoun_ids(tok, female=" zebra")
    with pytest.raises(ValueError, match="' receptionist'"):
        pronoun_ids(tok, male=" receptionist")


def test_metric_errors():
    with pytest.raises(ValueError, match="shape"):
        StereotypeGap().update(torch.zeros(3), torch.zeros(2, dtype=torch.bool))
    with pytest.raises(ValueError, match="update"):
        CueMargin().bootstrap_ci()
