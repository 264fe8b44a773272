"""Greedy/sampled completions on a tiny random model, with and without inference-time interventions."""

import contextlib

import pytest
import torch

from debias.commands.generate import generate_command
from debias.edits.interventions import SteeringVector
from debias.evaluation.generate import complete, report_completions
from debias.models import hooks
from debias.models.tiny import tiny_model, tiny_tokenizer
from debias.prompts import default_prompts, heldout_completion_prompts, load_gap_prompts

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: a second thread only adds contention
HOOK = "blocks.1.hook_mlp_out"
PROMPTS = ["The nurse said that", "My brother, a carpenter, told us that he", "The weather"]
TEMPLATE = ("{% for m in messages %}<|endoftext|>User: {{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}Assistant:{% endif %}")


@pytest.fixture(scope="module")
def setup():
    model, tok = tiny_model("llama"), tiny_tokenizer()
    return model, tok, hooks.resolve_hook(model, HOOK, tok)


def _steer(site, alpha):
    v = torch.nn.functional.normalize(torch.randn(32, generator=torch.Generator().manual_seed(3)), dim=0)
    return SteeringVector(site, v, alpha)


def test_greedy_is_deterministic_and_returns_new_text_only(setup):
    model, tok, _ = setup
    first = complete(model, tok, PROMPTS, max_new_tokens=6)
    assert first == complete(model, tok, PROMPTS, max_new_tokens=6)
    enc = tok(PROMPTS[:1], return_tensors="pt")
    ids = model.generate(**enc, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)
    assert first[0] == tok.decode(ids[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    assert tok.padding_side == "right"  # restored


def test_batched_left_padded_equals_one_by_one(setup):
    model, tok, _ = setup
    batched = complete(model, tok, PROMPTS, max_new_tokens=8)
    assert batched == [complete(model, tok, [p], max_new_tokens=8)[0] for p in PROMPTS]
    assert complete(model, tok, PROMPTS, max_new_tokens=8, batch_size=2) == batched


def test_chat_template_used_when_present_raw_otherwise(setup):
    model, _, _ = setup
    raw_tok, chat_tok = tiny_tokenizer(), tiny_tokenizer()
    chat_tok.chat_template = TEMPLATE
    raw = complete(model, raw_tok, PROMPTS, max_new_tokens=6)
    assert raw == complete(model, raw_tok, PROMPTS, max_new_tokens=6, chat=False)
    templated = complete(model, raw_tok, [f"User: {p}\nAssistant:" for p in PROMPTS], max_new_tokens=6)
    assert complete(model, chat_tok, PROMPTS, max_new_tokens=6) == templated
    assert complete(model, chat_tok, PROMPTS, max_new_tokens=6, chat=False) == raw
    assert templated != raw
    with pytest.raises(ValueError, match="chat_template"):
        complete(model, raw_tok, PROMPTS, chat=True)


def test_seeded_sampling_is_reproducible(setup):
    model, tok, _ = setup
    state = torch.get_rng_state()
    a = complete(model, tok, PROMPTS, max_new_tokens=8, sample=True, seed=1)
    assert torch.equal(state, torch.get_rng_state())
    assert a == complete(model, tok, PROMPTS, max_new_tokens=8, sample=True, seed=1)
    assert a != complete(model, tok, PROMPTS, max_new_tokens=8, sample=True, seed=2)


def test_intervention_alpha_zero_is_plain_and_large_alpha_differs(setup):
    model, tok, site = setup
    plain = complete(model, tok, PROMPTS, max_new_tokens=8)
    assert complete(model, tok, PROMPTS, max_new_tokens=8, intervention=_steer(site, 0.0)) == plain
    assert complete(model, tok, PROMPTS, max_new_tokens=8, intervention=_steer(site, 50.0)) != plain


def test_kv_cache_generation_steers_every_new_token(setup):
    """Cached generation (the hook sees one new token at a time) equals a no-cache greedy loop under the hook."""
    model, tok, site = setup
    steer = _steer(site, 20.0)
    ids = tok(PROMPTS[1], return_tensors="pt")["input_ids"]
    with steer.applied(model), torch.no_grad():
        for _ in range(8):
            nxt = model(input_ids=ids, use_cache=False).logits[0, -1].argmax()
            if int(nxt) == tok.eos_token_id:
                break
            ids = torch.cat([ids, nxt.view(1, 1)], dim=1)
    expected = tok.decode(ids[0, len(tok(PROMPTS[1])["input_ids"]):], skip_special_tokens=True)
    assert complete(model, tok, PROMPTS[1:2], max_new_tokens=8, intervention=steer) == [expected]


def test_report_completions_before_and_after(setup):
    model, tok, site = setup
    tok_chat = tiny_tokenizer()
    tok_chat.chat_template = TEMPLATE  # report completions are raw text even so
    rows = report_completions(model, tok_chat, PROMPTS, lambda: _steer(site, 50.0).applied(model),
                              contextlib.nullcontext, max_new_tokens=6)
    assert [r["prompt"] for r in rows] == PROMPTS
    assert [r["after"] for r in rows] == complete(model, tok, PROMPTS, max_new_tokens=6)
    assert [r["before"] for r in rows] != [r["after"] for r in rows]


def test_heldout_and_default_prompts():
    gap = load_gap_prompts("heldout")
    picks = heldout_completion_prompts()
    assert picks == heldout_completion_prompts() and len(picks) == 4
    assert all(p in gap.female for p in picks[:2]) and all(p in gap.male for p in picks[2:])
    labels = [gap.female_labels[gap.female.index(p)] for p in picks[:2]]
    assert len(set(labels)) == 2
    prompts = default_prompts()
    assert prompts[:4] == picks and len(prompts) == 6


def test_command_validates_before_loading():
    with pytest.raises(ValueError) as err:
        generate_command(model="no-such-model", intervention="bogus", alpha=float("nan"), steering="svm")
    message = str(err.value)
    assert "'bogus'" in message and "nan" in message and "'svm'" in message
    with pytest.raises(ValueError, match="features"):
        generate_command(model="no-such-model", intervention="sae_clamp")


@pytest.mark.parametrize("method", ["sae_clamp", "steering_vector"])
def test_command_on_tiny_model(method, capsys):
    kwargs = dict(features=[3], value=5.0) if method == "sae_clamp" else dict(alpha=30.0)
    plain = generate_command(model="tiny-llama", prompt=PROMPTS[:2], max_new_tokens=5)
    steered = generate_command(model="tiny-llama", prompt=PROMPTS[:2], max_new_tokens=5, intervention=method,
                               sae=f"tiny:{HOOK}", **kwargs)
    assert len(steered) == 2 and steered != plain
    out = capsys.readouterr().out
    assert f"'method': '{method}'" in out and PROMPTS[0] in out
