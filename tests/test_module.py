import pytest
import torch
from conftest import make_data, make_module, make_trainer
from lightning.pytorch.callbacks import ModelCheckpoint

from debias.evaluation.heldout import evaluate_heldout
from debias.training.objective import ObjectiveWeights


def _snapshot(module):
    return {name: p.detach().clone() for name, p in module.net.named_parameters() if "supertuning" not in name}


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_fit_changes_only_the_masked_entries(family, tmp_path):
    module = make_module(base_model=f"tiny-{family}")
    before = {n.replace(".base_layer.", "."): p.detach().clone() for n, p in module.net.named_parameters()}
    make_trainer(tmp_path).fit(module, datamodule=make_data())
    assert sum(p.numel() for p in module.parameters() if p.requires_grad) == module.k == 40
    after = {n.replace(".base_layer.", "."): p for n, p in module.net.named_parameters() if "supertuning" not in n
             and not n.endswith((".values",))}
    assert set(after) == set(before)
    for name, value in after.items():
        assert torch.equal(value, before[name]), f"{name} changed; the base weights must stay frozen"
    assert module.changed_entries() > 0  # the delta itself did train
    module.delta.merge()
    changed = (module.delta.base_weight() != before[module.parameter]).flatten().nonzero().flatten()
    assert set(changed.tolist()) <= set(module.mask.indices.tolist())
    module.delta.unmerge()
    assert torch.equal(module.delta.base_weight(), before[module.parameter])


def test_optimizer_state_is_order_k(tmp_path):
    module = make_module()
    trainer = make_trainer(tmp_path, max_steps=2)
    trainer.fit(module, datamodule=make_data())
    state = trainer.optimizers[0].state
    numel = sum(t.numel() for s in state.values() for t in s.values() if torch.is_tensor(t) and t.ndim > 0)
    assert numel == 2 * module.k  # Adam's two moments over the k values, nothing of the 2048-entry matrix


def test_feature_falls_and_was_nonzero_before(tmp_path):
    module, data = make_module(), make_data()
    make_trainer(tmp_path, max_steps=15).fit(module, datamodule=data)
    with module.delta.disabled():
        original = evaluate_heldout(module, data, edited=False)
    edited = evaluate_heldout(module, data, edited=True)
    assert original["feature_act"] > 0
    assert edited["feature_act"] < 0.8 * original["feature_act"]
    assert original["kl"] == pytest.approx(0.0, abs=1e-7) and edited["kl"] > 0


def test_checkpoint_holds_only_trainable_state_and_resumes(tmp_path):
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    module = make_module()
    make_trainer(tmp_path, max_steps=6, callbacks=[ckpt], enable_checkpointing=True).fit(module, datamodule=make_data())
    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)  # plain values only
    assert set(saved["state_dict"]) == {"feature_baseline"}
    edit = saved["debias_edit"]
    assert edit["method"] == "instability" and edit["parameter"] == module.parameter
    assert torch.equal(edit["state"]["indices"], module.mask.indices) and edit["state"]["values"].numel() == module.k

    restored = make_module()  # fit with the checkpoint's own max_steps: restores and trains nothing
    make_trainer(tmp_path, max_steps=6).fit(restored, datamodule=make_data(), ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert torch.equal(restored.delta.values, module.delta.values)
    assert torch.equal(restored.mask.indices, module.mask.indices)

    resumed = make_module()
    trainer = make_trainer(tmp_path, max_steps=9)
    trainer.fit(resumed, datamodule=make_data(), ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert trainer.global_step == 9 and not torch.equal(resumed.delta.values, module.delta.values)
    adam = trainer.optimizers[0].state[resumed.delta.values]
    assert int(adam["step"]) == 9  # the optimizer state came back with the delta


def test_nan_loss_stops_and_keeps_last_good_delta(tmp_path, monkeypatch):
    module = make_module()
    calls = {"n": 0}
    real_terms = module.loss_terms

    def poisoned(texts):
        calls["n"] += 1
        terms = real_terms(texts)
        if calls["n"] >= 3:
            calls["good"] = module.delta.values.detach().clone()
            terms["feature"] = terms["feature"] * float("nan")
        return terms

    monkeypatch.setattr(module, "loss_terms", poisoned)
    trainer = make_trainer(tmp_path, max_steps=10)
    trainer.fit(module, datamodule=make_data())
    assert calls["n"] == 3  # stopped at the first non-finite loss
    assert torch.equal(module.delta.values, calls["good"]) and module.changed_entries() > 0


def test_objective_weights_are_validated():
    with pytest.raises(ValueError, match="finite and >= 0"):
        ObjectiveWeights(kl=-1.0)
    with pytest.raises(ValueError, match="at least one"):
        ObjectiveWeights(feature=0.0)


def test_bad_feature_and_fraction_are_refused():
    with pytest.raises(ValueError, match="99"):
        make_module(features=[99])
    with pytest.raises(ValueError, match="fraction"):
        make_module(k=None, fraction=1.5)


def test_argument_problems_are_reported_together_before_loading():
    with pytest.raises(ValueError) as err:
        make_module(k=0, mask_strategy="magnitude")
    message = str(err.value)
    assert "model.edit.entries must be >= 1, got 0" in message and "'magnitude'" in message
    for lr in (-1.0, float("inf"), float("nan"), 1e30):
        with pytest.raises(ValueError, match="model.train.lr must be a finite number in"):
            make_module(lr=lr)


@pytest.mark.parametrize("lr_decay", [-0.1, 1.0, float("nan")])
def test_a_bad_lr_decay_is_named(lr_decay):
    with pytest.raises(ValueError, match=r"model.train.lr_decay must be a number in \[0, 1\), got"):
        make_module(lr_decay=lr_decay)


def test_lr_decay_holds_the_rate_then_takes_it_linearly_to_zero(tmp_path):
    from lightning.pytorch import Callback

    class Rates(Callback):
        def __init__(self):
            self.seen: list[float] = []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.seen.append(trainer.optimizers[0].param_groups[0]["lr"])

    rates = Rates()
    make_trainer(tmp_path, max_steps=8, callbacks=[rates]).fit(make_module(lr=0.04, lr_decay=0.5), datamodule=make_data())
    assert rates.seen == pytest.approx([0.04] * 5 + [0.03, 0.02, 0.01])  # steps 4..8: 4/4, 3/4, 2/4, 1/4 of it


def test_the_optimiser_is_configured_outside_a_trainer_too():
    module = make_module(lr=0.04)
    module.prepare(make_data())
    optimizer = module.configure_optimizers()  # a hand-written loop (benchmarks/step.py) calls it with no Trainer
    assert isinstance(optimizer, torch.optim.Adam) and optimizer.param_groups[0]["lr"] == 0.04
    decaying = make_module(lr_decay=0.5)
    decaying.prepare(make_data())
    with pytest.raises(ValueError, match="model.train.lr_decay=0.5 needs the run's length from a Trainer's max_steps"):
        decaying.configure_optimizers()


def test_features_chosen_by_rule_when_not_given(tmp_path):
    data = make_data()
    module = make_module(features=None, n_features=2)
    module.prepare(data)
    assert 1 <= len(module.features) <= 2 and module.feature_baseline.shape == (len(module.features),)
    assert module.feature_selection["features"] == module.features
    assert (module.feature_baseline > 0).all()


def test_frozen_network_keeps_dropout_off_in_train_mode():
    module = make_module(base_model="tiny-gpt2")
    module.train()
    assert module.training and not module.net.training and not module.sae.training


def test_construction_never_builds_an_sae(monkeypatch, tmp_path):
    """`sae: train` with no cached build: constructing (as `--print_config` or a test does) starts nothing; the build
    happens in `prepare`, the explicit step `fit` calls."""
    import debias.sae.build
    from debias.models.tiny import tiny_sae

    monkeypatch.setenv("DEBIAS_CACHE", str(tmp_path / "cache"))
    builds = []

    def ensure_sae(model, tokenizer, model_id, settings=None, force=False):
        builds.append(settings.hook_name)
        path = tmp_path / "sae"
        tiny_sae(32, settings.hook_name, d_sae=64, architecture="topk").save_model(path)
        return path

    monkeypatch.setattr(debias.sae.build, "ensure_sae", ensure_sae)
    from debias.sae.build import SAETrainSettings

    module = make_module(sae="train", build=SAETrainSettings(hook_name="blocks.1.hook_mlp_out", bias_prompt_file=None))
    assert builds == [] and module.sae is None and module.site.hook_name == "blocks.1.hook_mlp_out" and module.k == 40
    module.prepare(make_data())
    assert builds == ["blocks.1.hook_mlp_out"] and module.sae is not None and module.mask.k == 40


def _logits(module, text="My sister, a carpenter, said that"):
    with torch.no_grad():
        return module.eval()(module.tokenize([text]))


def test_load_from_checkpoint_rebuilds_the_edit_without_the_data(tmp_path, recwarn):
    """Features chosen at fit time, the mask, groups and targets come back from the checkpoint alone."""
    from debias.training.module import DebiasModule

    module = make_module(features=None, n_features=2)
    trainer = make_trainer(tmp_path, max_steps=4)
    trainer.fit(module, datamodule=make_data())
    trainer.save_checkpoint(tmp_path / "fit.ckpt")
    recwarn.clear()
    reloaded = DebiasModule.load_from_checkpoint(tmp_path / "fit.ckpt", weights_only=True)
    assert not [w for w in recwarn if "not in the checkpoint" in str(w.message)]  # the frozen net is not saved
    assert reloaded.features == module.features and reloaded.feature_selection == module.feature_selection
    assert (reloaded.groups, reloaded.targets, reloaded.bias_spec) == (module.groups, module.targets, "gender")
    assert torch.equal(reloaded.mask.indices, module.mask.indices) and reloaded.k == module.k
    assert torch.equal(reloaded.feature_baseline, module.feature_baseline)
    trained = _logits(module)
    assert torch.equal(_logits(reloaded), trained)
    with reloaded.delta.disabled():
        assert not torch.equal(_logits(reloaded), trained)  # the edit is what made them equal


def test_load_from_checkpoint_refuses_a_record_without_rebuild_fields(tmp_path):
    module = make_module()
    module.prepare(make_data())
    checkpoint: dict = {}
    module.on_save_checkpoint(checkpoint)
    del checkpoint["debias_edit"]["features"]  # written before checkpoints recorded them
    with pytest.raises(ValueError, match="records no features of its edit .*module.prepare"):
        make_module().load_edit_state(checkpoint, source="old.ckpt")


def test_group_arguments_accept_dicts_and_refuse_unknown_keys():
    from dataclasses import asdict

    from debias.sae.build import SAETrainSettings
    from debias.training.args import SAEArgs, as_group
    from debias.training.module import DebiasModule

    typed = make_module()
    plain = DebiasModule(**{k: asdict(v) if k in ("sae", "edit", "train") else v for k, v in
                            __import__("conftest").module_args().items()})
    assert plain.hparams == typed.hparams and plain.edit_args == typed.edit_args and plain.k == 40
    sae = as_group(SAEArgs, {"spec": "train", "build": {"d_sae": 64, "k": 8}}, "model.sae")
    assert sae.build == SAETrainSettings(d_sae=64, k=8)
    with pytest.raises(ValueError, match=r"^model.edit has no key 'methd'; expected some of \['method'"):
        DebiasModule(base_model="tiny-llama", edit={"methd": "random"})
    with pytest.raises(ValueError, match="model.sae.build has no key 'width'"):
        as_group(SAEArgs, {"build": {"width": 64}}, "model.sae")
    with pytest.raises(TypeError, match="model.train must be a TrainArgs or a dict of its fields, got list"):
        DebiasModule(base_model="tiny-llama", train=[0.1])


def test_base_model_is_required():
    from debias.training.module import DebiasModule

    with pytest.raises(TypeError, match="base_model"):
        DebiasModule()  # type: ignore[call-arg]


def test_module_trains_beside_any_datamodule_meeting_the_protocol(tmp_path):
    """A DataModule that is not a DebiasDataModule and has no hyper-parameters: the `DebiasData` members and its
    loaders are all the module and `ValidationMetrics` read."""
    from lightning.pytorch import LightningDataModule

    from debias import ValidationMetrics
    from debias.training.protocol import DebiasData, protocol_members

    class Minimal(LightningDataModule):
        def __init__(self, inner):
            super().__init__()
            self.inner, self.texts, self.items, self.groups = inner, {}, {}, ()
            self.bias, self.prompt_dir, self.eval_batch_size = "gender", None, 16
            self.require_items, self.mask_batches, self.gap_texts = inner.require_items, inner.mask_batches, \
                inner.gap_texts
            self.val_sets, self.train_dataloader, self.val_dataloader = inner.val_sets, inner.train_dataloader, \
                inner.val_dataloader

        def setup(self, stage):
            self.inner.setup(stage)
            self.texts, self.items, self.groups = self.inner.texts, self.inner.items, self.inner.groups

    assert set(protocol_members()) == {"texts", "items", "groups", "bias", "prompt_dir", "eval_batch_size", "setup",
                                       "require_items", "mask_batches", "gap_texts", "val_sets"}
    assert isinstance(make_data(), DebiasData)
    module, data = make_module(), Minimal(make_data())
    assert isinstance(data, DebiasData) and not data.hparams
    best = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="val/score", mode="min")
    make_trainer(tmp_path, max_steps=2, limit_val_batches=1, val_check_interval=2, enable_checkpointing=True,
                 callbacks=[ValidationMetrics(cue_limit=8), best]).fit(module, datamodule=data)
    assert module.changed_entries() > 0 and module.groups == ("female", "male") and module.bias_spec == "gender"
    assert best.best_model_path and torch.isfinite(best.best_model_score)  # val/score was logged and monitored


def test_a_datamodule_missing_protocol_members_is_named():
    from lightning.pytorch import LightningDataModule

    class Partial(LightningDataModule):
        texts: dict = {}
        items: dict = {}
        groups = ()

        def setup(self, stage):
            pass

        def mask_batches(self, statements=False):
            return []

    with pytest.raises(TypeError, match=r"^Partial is not a DebiasData \(debias.training.protocol\): it lacks bias, "
                                        r"prompt_dir, eval_batch_size, require_items, gap_texts, val_sets$"):
        make_module().prepare(Partial())
    from debias.training.protocol import check_data

    with pytest.raises(TypeError, match=r"call Trainer.fit\(module, datamodule=...\)"):
        check_data(None)


def test_validation_metrics_is_exported():
    import debias
    from debias.callbacks import ValidationMetrics

    assert debias.ValidationMetrics is ValidationMetrics and "ValidationMetrics" in debias.__all__


def _prepared_with_delta(**overrides):
    """A prepared tiny module in eval mode with a non-zero delta, its data and one training batch."""
    data = make_data(max_texts=8)
    module = make_module(**overrides)
    module.prepare(data)
    module.eval()
    with torch.no_grad():
        module.delta.values.copy_(0.1 * torch.randn(module.k, generator=torch.Generator().manual_seed(1)))
    return module, data, next(iter(data.train_dataloader()))[0]


def test_loss_is_what_training_step_minimises():
    module, _, texts = _prepared_with_delta(objective=ObjectiveWeights(feature=1.0, kl=2.0, cue_kl=3.0))
    terms = module.loss_terms(texts)
    weighted = terms["feature"] + 2.0 * terms["kl"] + 3.0 * terms["cue_kl"]
    assert float(module.loss(texts)) == pytest.approx(float(weighted), rel=1e-6)
    assert float(module.training_step(texts, 0)) == pytest.approx(float(weighted), rel=1e-6)


@pytest.mark.parametrize("fast", [True, False])
def test_loss_equals_the_objective_on_a_dense_copy_of_the_edited_weight(fast):
    """`DebiasModule.loss` (sparse delta, original = the same network with the delta off, fast path or not) equals
    the objective computed naively on a second copy of the model: the delta merged into W_out, a full forward, the
    reference logits from the original W_out swapped back in."""
    from debias.models import hooks
    from debias.models.load import load_model
    from debias.training.objective import feature_term, mean_kl

    module, _, texts = _prepared_with_delta(objective=ObjectiveWeights(feature=1.0, kl=1.0))
    module.use_fast_path = fast
    loss = float(module.loss(texts))

    net = load_model("tiny-llama").model.eval()
    weight = net.get_parameter(module.parameter)
    original = weight.detach().clone()
    edited = original.clone()
    edited.view(-1)[module.mask.indices] += module.delta.values.detach()
    site = hooks.resolve_hook(net, module.site.hook_name)
    bias, neutral = module.tokenize(texts["bias"]), module.tokenize(texts["neutral"])
    with torch.no_grad():
        ref = net(**neutral, use_cache=False).logits
        weight.copy_(edited)
        with hooks.capture(net, site) as cap:
            net(**bias, use_cache=False)
        latents = module.sae.encode(cap.value)[..., module.features]
        naive = feature_term(latents, module.real(bias), module.feature_baseline) + mean_kl(
            ref, net(**neutral, use_cache=False).logits, neutral["attention_mask"].bool())
    assert not torch.equal(edited, original)
    assert loss == pytest.approx(float(naive), rel=1e-5, abs=1e-7)
