"""Each method's options are a dataclass beside its builder, registered with it (`model.edit.options`), and every
renamed or moved key is refused with one line naming its new place (issue #24)."""

from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import make_data, make_module

from debias.commands.fit import ConfigError, build_cli
from debias.config import MOVED
from debias.edits import registry
from debias.training.args import EditArgs

TINY = str(Path(__file__).parents[1] / "configs" / "tiny.yaml")


@dataclass
class ToyOptions:
    """A new method's own options, as a method module would hold them beside its builder."""

    scale: float = 1.0

    def __post_init__(self):
        from debias.edits import options

        options.refuse(options.finite("scale", self.scale), "scale must be > 0" if self.scale <= 0 else None)


def test_a_new_method_brings_its_own_options_with_one_register_call(monkeypatch):
    monkeypatch.setattr(registry, "METHODS", dict(registry.METHODS))  # the test's entry leaves with the test
    shipped = dict(registry.METHODS)
    seen = []

    def build(ctx):  # a dense edit that records the options it was built with
        seen.append(ctx.options)
        return shipped["dense"].build(ctx)

    registry.register(registry.Method("toy", "weight", build, "dense, with a toy option", options=ToyOptions))
    assert {n: m for n, m in registry.METHODS.items() if n != "toy"} == shipped  # no entry overwritten
    module = make_module(method="toy", options={"toy": {"scale": 0.5}, "lora": {"rank": 2}})
    module.prepare(make_data())
    assert seen == [ToyOptions(scale=0.5)] and module.edit_args.method_options == ToyOptions(0.5)
    assert make_module(method="toy").edit_args.method_options == ToyOptions()  # no entry: the defaults
    with pytest.raises(ValueError, match=r"model.edit.options.toy.scal was given, but method 'toy' has no option "
                                         r"'scal' \(its options are \['scale'\]\)"):
        EditArgs(method="toy", options={"toy": {"scal": 2.0}})
    with pytest.raises(ValueError, match=r"model.edit.options.toy.scale must be > 0"):
        EditArgs(method="toy", options={"toy": {"scale": -1.0}})


def test_the_option_dataclasses_sit_beside_their_builders():
    with_options = {name: m for name, m in registry.METHODS.items() if m.options is not None}
    assert set(with_options) == {"lora", "sae_clamp", "steering_vector", "feature_projection"}
    for method in with_options.values():
        assert method.options.__module__ == method.build.__module__, method.name
        method.options()  # the defaults are valid


def test_options_of_a_method_that_lacks_them_are_refused_naming_both():
    with pytest.raises(ValueError, match=r"model.edit.options.instability.rank was given, but method 'instability' "
                                         r"has no option 'rank' \(it takes no options; 'rank' is an option of "
                                         r"\['lora'\]\)"):
        EditArgs(method="instability", options={"instability": {"rank": 8}})
    with pytest.raises(ValueError, match=r"model.edit.options.lora.alpha was given, but method 'lora' has no option "
                                         r"'alpha' \(its options are \['rank'\]; 'alpha' is an option of "
                                         r"\['steering_vector', 'feature_projection'\]\)"):
        EditArgs(method="lora", options={"lora": {"alpha": 1.0}})
    with pytest.raises(ValueError, match=r"model.edit.options.rank: options are given per method, e.g. "
                                         r"model.edit.options: \{lora: \{rank: 8\}\}"):
        EditArgs(method="lora", options={"rank": 8})
    with pytest.raises(ValueError, match=r"model.edit.options.lorra: no registered method is called 'lorra'"):
        EditArgs(method="lora", options={"lorra": {"rank": 8}})


def test_the_options_of_the_other_methods_are_kept_for_compare_and_checked():
    args = EditArgs(method="lora", options={"lora": {"rank": 4}, "steering_vector": {"alpha": -9.55}})
    assert args.method_options == registry.METHODS["lora"].options(rank=4)
    with pytest.raises(ValueError, match=r"model.edit.options.steering_vector.kind must be one of "
                                         r"\['mean_diff', 'probe'\], got 'pca'"):
        EditArgs(method="lora", options={"steering_vector": {"kind": "pca"}})


@pytest.mark.parametrize(("flag", "message"), [
    ("--model.edit.k=5", "model.edit.k moved: use model.edit.entries"),
    ("--model.edit.seed=1", "model.edit.seed moved: use model.edit.mask_seed"),
    ("--model.edit.lora_rank=4", "model.edit.lora_rank moved: use model.edit.options: {lora: {rank: 4}}"),
    ("--model.edit.steering_alpha=-2", "model.edit.steering_alpha moved: use model.edit.options: "
                                       "{steering_vector: {alpha: -2}}"),
    ("--model.objective.bias=1", "model.objective.bias moved: use model.objective.gap"),
    ("--model.sae.build.seed=1", "model.sae.build.seed moved: use model.sae.build.sae_seed"),
    ("--data.seed=1", "data.seed moved: use data.shuffle_seed"),
    ("--export.suites=true", "export.suites moved: use evaluate.suites"),
    ("--export.completions=0", "export.completions moved: use evaluate.completions"),
])
def test_an_old_flag_is_refused_with_its_new_name(flag, message):
    with pytest.raises(ConfigError) as err:
        build_cli(["--config", TINY, flag], run=False)
    assert str(err.value) == message


@pytest.mark.parametrize(("old", "new", "message"), [
    ("  batch_size: 8\n", "  batch_size: 8\n  seed: 3\n", "data.seed moved: use data.shuffle_seed"),
    ("  overwrite: true", "  overwrite: true\n  suites: true", "export.suites moved: use evaluate.suites"),
    ("    mask_strategy: gradient", "    mask_strategy: gradient\n    clamp_value: 0.5",
     "model.edit.clamp_value moved: use model.edit.options: {sae_clamp: {value: 0.5}}"),
])
def test_an_old_key_in_a_config_is_refused_with_its_new_name(old, new, message, tmp_path):
    text = Path(TINY).read_text()
    assert old in text
    config = tmp_path / "old.yaml"
    config.write_text(text.replace(old, new, 1))
    with pytest.raises(ConfigError) as err:
        build_cli(["--config", str(config)], run=False)
    assert str(err.value) == message


def test_an_old_key_in_saved_arguments_is_refused_before_any_model_loads(monkeypatch):
    import debias.models.load
    from debias.training.module import DebiasModule

    monkeypatch.setattr(debias.models.load, "load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    with pytest.raises(ValueError, match=r"^model.edit.projection_alpha moved: use model.edit.options: "
                                         r"\{feature_projection: \{alpha: 0.5\}\}$"):
        DebiasModule("tiny-llama", edit={"method": "feature_projection", "projection_alpha": 0.5})
    with pytest.raises(ValueError, match=r"^model.objective.bias moved: use model.objective.gap$"):
        DebiasModule("tiny-llama", objective={"bias": 1.0})
    assert set(MOVED) >= {"model.edit.k", "model.edit.seed", "data.seed", "model.sae.build.seed"}


def test_the_evaluate_group_reaches_the_export_callback():
    from debias.callbacks import ReportAndExport

    cli = build_cli(["--config", TINY, "--evaluate.completions=2", "--evaluate.suites=true",
                     "--model.edit.options.lora.rank=3"], run=False)
    callback = next(c for c in cli.trainer.callbacks if isinstance(c, ReportAndExport))
    assert (callback.suites, callback.n_completions) == (True, 2)
    assert cli.model.edit_args.options == {"lora": {"rank": 3}}  # an int, as in YAML


def test_the_sae_build_key_keeps_the_old_spelling_of_its_seed():
    """`model.sae.build.sae_seed` was `seed`: the build cache key hashes the old name, so cached SAEs are reused."""
    from debias.sae.build import SAETrainSettings

    # keys computed with the settings as they were before the rename (`seed`)
    assert SAETrainSettings(compute_dtype="float32", bias_prompt_file=None).key() == "fc1a99aa7d2c"
    assert SAETrainSettings(sae_seed=3, bias_prompt_file=None).key() == "72115f0463f1"


def test_an_old_key_under_the_fit_subcommand_is_refused_with_its_new_name(tmp_path):
    config = tmp_path / "old.yaml"
    config.write_text(Path(TINY).read_text().replace("  overwrite: true", "  overwrite: true\n  completions: 0", 1))
    with pytest.raises(ConfigError) as err:
        build_cli(["fit", "--config", str(config)])  # refused while parsing: nothing is fitted
    assert str(err.value) == "export.completions moved: use evaluate.completions"
