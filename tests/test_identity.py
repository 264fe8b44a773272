"""The identity half of the feature-level split: latents chosen by attribution to the train factual margin, and
`objective.identity`, the penalty on their change (`debias.training.identity_term`)."""

import dataclasses

import pytest
import torch
from conftest import make_data, module_args, spec_without_statements

from debias.evaluation.sentence_metrics import factual_margin
from debias.features import attribution as F
from debias.features.select import select_features
from debias.models import hooks
from debias.models.continuation import continuation_logprobs
from debias.models.scoring import own_group_margins
from debias.models.tiny import tiny_model, tiny_sae, tiny_tokenizer
from debias.statements import item_groups, load_factual
from debias.training.args import SAEArgs
from debias.training.objective import ObjectiveWeights

BS = 64
pytestmark = pytest.mark.usefixtures("one_thread")
P, Z = 5, 9  # planted latents: P carries half the factual margin, Z fires everywhere and carries nothing


@pytest.fixture(scope="module")
def planted():
    """Tiny llama and an SAE (error term kept, so the model is unchanged) whose only latents with a decoder are P
    (fires everywhere, writes along the factual margin's gradient: attribution half the margin); Z fires more
    strongly everywhere but writes nothing (attribution exactly 0)."""
    model, tok = tiny_model(), tiny_tokenizer()
    for p in model.parameters():
        p.requires_grad_(False)
    model.lm_head.weight.mul_(10)
    site = hooks.resolve_hook(model, "blocks.1.hook_mlp_out", tok)
    items = load_factual("train")
    shift = torch.zeros(model.config.hidden_size, requires_grad=True)
    contexts = [it.context for it in items for _ in it.words]
    words = [w for it in items for w in it.words]
    with hooks.replace(model, site, lambda x: x + shift):
        logprobs = continuation_logprobs(model, tok, contexts, words, BS).view(len(items), -1)
        margin = own_group_margins(logprobs, item_groups(items)).mean()
    (grad,) = torch.autograd.grad(margin, [shift])
    margin = float(margin.detach())
    sae = tiny_sae(model.config.hidden_size, site.hook_name)
    b = 0.1
    with torch.no_grad():
        sae.W_dec.zero_()
        sae.W_enc[:, P], sae.b_enc[P] = 0.0, b
        sae.W_dec[P] = (0.5 * margin / (b * float(grad @ grad))) * grad
        sae.W_enc[:, Z], sae.b_enc[Z] = 0.0, 10 * b  # its decoder row stays 0
    return model, tok, sae, site, items, margin


def test_factual_attribution_is_the_metric_and_finds_the_planted_latent(planted):
    model, tok, sae, site, items, margin = planted
    att = F.attribute_factual(model, tok, sae, site, items, BS)
    assert att.gap == pytest.approx(factual_margin(model, tok, items, n_boot=10)["factual_margin"], abs=1e-5)
    assert att.gap == pytest.approx(margin, abs=1e-5) and margin > 0
    assert float(att.latents[P]) == pytest.approx(0.5 * margin, rel=1e-3)
    assert float(att.latents[Z]) == 0.0
    small = F.attribute_factual(model, tok, sae, site, items, batch_size=3)  # batching does not change it
    torch.testing.assert_close(small.latents, att.latents, rtol=1e-4, atol=1e-6)
    assert abs(F.ablated_factual_margin(model, tok, sae, site, items, [P], BS)) < 0.8 * margin


def test_identity_selection_picks_by_factual_attribution(planted):
    """Z fires on every token, more strongly than P, but its attribution is 0: it is never a candidate."""
    model, tok, sae, site, _, margin = planted
    record: dict = {}
    chosen = select_features(model, tok, sae, site, n=3, min_fire_rate=0.0, batch_size=BS, record=record,
                             target="factual")
    assert chosen == [P]
    assert Z not in [row["index"] for row in record["candidates"]]
    assert record["target"] == "factual" and "factual-margin" in record["rule"]
    assert record["train_factual_margin"] == pytest.approx(margin, abs=1e-5)
    assert abs(record["ablated_factual_margin"]) < abs(margin) and record["factual_relative_change"] < 0


def test_factual_is_no_edit_target():
    with pytest.raises(ValueError, match=r"model\.sae\.feature_target must be one of"):
        SAEArgs(feature_target="factual")
    with pytest.raises(ValueError, match=r"model\.sae\.n_identity_features must be >= 1"):
        SAEArgs(n_identity_features=0)


def _module(identity=1.0, features=(3,), n_identity=3, **overrides):
    from debias.training.module import DebiasModule

    args = module_args(features=list(features), **overrides)
    args["sae"] = dataclasses.replace(args["sae"], n_identity_features=n_identity)
    args["objective"] = ObjectiveWeights(identity=identity)
    return DebiasModule(**args)


@pytest.fixture(scope="module")
def prepared():
    module, data = _module(), make_data(max_texts=16)
    module.prepare(data)
    return module, data


def _set_delta(module, scale: float) -> None:
    (values,) = module.delta.parameters()
    with torch.no_grad():
        values.copy_(scale * torch.randn(values.shape, generator=torch.Generator().manual_seed(1)))


def _term(module, items, fast: bool) -> torch.Tensor:
    module.use_fast_path = fast
    try:
        return module.loss_terms({**_texts(module, items)})["identity"]
    finally:
        module.use_fast_path = True


def _texts(module, items) -> dict:
    data = make_data(max_texts=4)
    data.setup("fit")
    texts = {name: data.texts[f"{name}_train"] for name in ("bias", "neutral", "cue")}
    texts.update({f"gap_{g}": data.texts[f"gap_{g}_train"] for g in data.groups})
    return {**texts, "factual": items}


def test_identity_latents_leave_out_the_edit_features_and_are_reported(prepared):
    from debias.export import build_report

    module, _ = prepared
    identity = module.identity
    assert identity.latents and not set(identity.latents) & set(module.features)
    assert identity.scale.shape == (len(identity.latents),) and (identity.scale > 0).all()
    record = identity.record
    assert record["identity_features"] == identity.latents and record["target"] == "factual"
    assert set(record["chosen"]) == set(identity.latents) | set(record["dropped_stereotype_features"])
    assert build_report(module, {})["identity_selection"]["identity_features"] == identity.latents


def test_a_latent_in_both_sets_is_dropped_from_the_identity_set(prepared):
    first = prepared[0].identity.record["chosen"][0]
    module = _module(features=(first,))
    module.prepare(make_data(max_texts=16))
    assert first not in module.identity.latents
    assert module.identity.record["dropped_stereotype_features"] == [first]


def test_term_is_zero_before_training_and_grows_when_the_latents_move(prepared):
    module, data = prepared
    items = data.items["factual"][:6]
    _set_delta(module, 0.0)
    for fast in (True, False):
        assert float(_term(module, items, fast)) == pytest.approx(0.0, abs=1e-10)
    _set_delta(module, 0.5)  # W_out of layer 1 writes the SAE's hook directly: the identity latents move
    try:
        fast, plain = _term(module, items, True), _term(module, items, False)
        assert float(plain) > 1e-5
        torch.testing.assert_close(fast, plain, rtol=1e-4, atol=1e-7)  # the fast path gives the same term
        (values,) = module.delta.parameters()
        (grad,) = torch.autograd.grad(fast, [values])
        assert grad.abs().sum() > 0  # it trains the edit
    finally:
        _set_delta(module, 0.0)


def test_training_logs_the_term(tmp_path):
    from conftest import make_trainer
    from lightning.pytorch.callbacks import Callback

    module, data, seen = _module(identity=10.0, lr=0.2), make_data(max_texts=16), []

    class Record(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen.append(float(trainer.callback_metrics["train/identity"]))

    make_trainer(tmp_path, max_steps=3, callbacks=[Record()]).fit(module, datamodule=data)
    assert seen[0] == pytest.approx(0.0, abs=1e-10) and seen[-1] > 0


def test_weight_zero_computes_nothing(monkeypatch):
    import debias.training.module as module_mod
    import debias.training.objective as objective_mod

    def refuse(*args, **kwargs):
        raise AssertionError("computed with objective.identity = 0")

    monkeypatch.setattr(module_mod, "fit_identity", refuse)
    monkeypatch.setattr(objective_mod, "identity_term", refuse)
    module, data = _module(identity=0.0), make_data(max_texts=8)
    module.prepare(data)
    assert module.identity is None
    terms = module.loss_terms(_texts(module, data.items["factual"][:4]))
    assert "identity" not in terms and ObjectiveWeights().identity == 0.0


@pytest.mark.parametrize("data_arg", ["bias", "prompt_dir"])
def test_no_train_factual_items_is_one_line_before_the_model_loads(tmp_path, monkeypatch, data_arg):
    import debias.models.load as load
    from debias.commands.fit import configured

    def no_model(*args, **kwargs):
        raise AssertionError("the model loaded")

    monkeypatch.setattr(load, "load_model", no_model)
    value = spec_without_statements(tmp_path) if data_arg == "bias" else str(tmp_path)
    with pytest.raises(ValueError, match=r"^objective\.identity=1\.0 needs .*factual statements[^\n]*$"):
        configured("configs/tiny.yaml", ["--model.objective.identity=1.0", f"--data.{data_arg}={value}"])
    configured_ok = configured  # weight 0 with the same data passes the check (and would load the model)
    with pytest.raises(AssertionError, match="the model loaded"):
        configured_ok("configs/tiny.yaml", ["--model.objective.identity=0.0", f"--data.{data_arg}={value}"])


def test_the_module_refuses_data_without_factual_items(tmp_path):
    module = _module()
    with pytest.raises(ValueError, match=r"objective\.identity > 0 needs"):
        module.prepare(make_data(max_texts=8, bias=spec_without_statements(tmp_path)))
