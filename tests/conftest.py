import os

import pytest
import torch

torch.set_num_threads(2)
# Activations persisted by one test would turn another's cache misses into hits; tests/test_upstream_store.py turns
# the store on where it is the subject.
os.environ.setdefault("DEBIAS_ACTIVATION_CACHE", "0")


@pytest.fixture(scope="session", autouse=True)
def debias_cache(tmp_path_factory):
    """Keep tiny models and SAEs built by tests out of the user's cache (slow tests set their own)."""
    if "DEBIAS_CACHE" not in os.environ:
        os.environ["DEBIAS_CACHE"] = str(tmp_path_factory.mktemp("debias-cache"))
    return os.environ["DEBIAS_CACHE"]


@pytest.fixture
def one_thread():
    """Tiny tensors: a second thread only adds synchronisation (slow on a shared 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


GROUPS = {"sae": ("sae_id", "build", "features", "n_features", "feature_target"),
          "edit": ("method", "fraction", "entries", "mask_strategy", "mask_path", "mask_seed", "layers", "options",
                   "rank_null_space_energy"),
          "train": ("lr", "max_length", "cache_activations", "cache_budget_mb", "null_space_energy", "lr_decay")}
#: The tests' shorthand for two `model.edit` fields: `k=` (the mask's entry count), `seed=` (its seed).
SHORTHAND = {"k": "entries", "seed": "mask_seed"}


def module_args(**overrides) -> dict:
    """`DebiasModule` keyword arguments from flat test overrides (`k=5`, `sae="tiny:..."`, `lr=0.1`,
    `options={"lora": {"rank": 2}}`)."""
    from debias.training.args import EditArgs, SAEArgs, TrainArgs

    flat = dict(sae="tiny:blocks.1.hook_mlp_out", features=[3], k=40, lr=0.05, max_length=32)
    flat.update(overrides)
    flat = {SHORTHAND.get(key, key): value for key, value in flat.items()}
    masked = (None, "instability", "random", "bias_gradient", "feature_effect", "random_features")
    if flat.get("method") not in masked and "k" not in overrides and "entries" not in overrides:
        flat["entries"] = None
    grouped = {name: {key: flat.pop(key) for key in keys if key in flat} for name, keys in GROUPS.items()}
    grouped["sae"]["spec"] = flat.pop("sae")
    return {"sae": SAEArgs(**grouped["sae"]), "edit": EditArgs(**grouped["edit"]),
            "train": TrainArgs(**grouped["train"]), "base_model": "tiny-llama", **flat}


def make_module(**overrides):
    from debias.training.module import DebiasModule

    return DebiasModule(**module_args(**overrides))


def make_data(**overrides):
    from debias.training.data import DebiasDataModule

    kwargs = dict(batch_size=4, eval_batch_size=16, max_texts=24)
    kwargs.update(overrides)
    return DebiasDataModule(**kwargs)


def make_trainer(tmp_path, max_steps=6, callbacks=(), **overrides):
    from lightning.pytorch import Trainer

    kwargs = dict(max_steps=max_steps, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                  enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
                  default_root_dir=str(tmp_path), enable_checkpointing=False)
    kwargs.update(overrides)
    return Trainer(callbacks=list(callbacks), **kwargs)


def export_logits(out, base_path, text="My sister, a carpenter, said that") -> dict:
    """Logits of an export's three forms: the merged checkpoint, base + `adapter/` and `apply_delta(base)` (the
    last two where the export has them)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from debias.edits.sparse import apply_delta

    tok = AutoTokenizer.from_pretrained(out)
    inputs = tok([text], return_tensors="pt")

    def logits(model):
        with torch.no_grad():
            return model.eval()(**inputs).logits

    forms = {"merged": logits(AutoModelForCausalLM.from_pretrained(out))}
    if (out / "adapter").is_dir():
        from peft import PeftModel

        forms["adapter"] = logits(PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_path),
                                                            out / "adapter"))
    if (out / "debias" / "delta.safetensors").is_file():
        forms["delta"] = logits(apply_delta(AutoModelForCausalLM.from_pretrained(base_path),
                                            out / "debias" / "delta.safetensors"))
    return forms


def assert_export_consistent(out, base_path) -> dict:
    """Every form of an export gives the same logits; returns them."""
    import torch

    forms = export_logits(out, base_path)
    for name, value in forms.items():
        torch.testing.assert_close(value, forms["merged"], rtol=1e-5, atol=1e-5, msg=f"{name} != merged in {out}")
    return forms


def copy_sources(package, patterns, dest):
    """A copy of `package`'s files matching `patterns` under `dest`, to edit without touching the real sources."""
    import shutil

    for pattern in patterns:
        for path in package.glob(pattern):
            (dest / path.relative_to(package)).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(path, dest / path.relative_to(package))
    return dest


def spec_without_statements(tmp_path) -> str:
    """The shipped gender spec with its `statements` removed, written under `tmp_path`."""
    import yaml

    from debias.bias_spec import default_bias_dir

    raw = yaml.safe_load((default_bias_dir() / "gender.yaml").read_text())
    raw.pop("statements")
    path = tmp_path / "nostatements.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)
