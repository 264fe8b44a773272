"""`debias fit` of an inference-time method (`sae_clamp`, `steering_vector`): nothing is trained, the edit is
evaluated as built and exported as lm-evaluation-harness's steer file, with no weights."""

import json

import pytest
import torch
from conftest import make_data, make_module, make_trainer
from huggingface_hub import ModelCard

from debias.commands.eval import eval_command
from debias.edits.steer_file import load_steer_file
from debias.export import export
from debias.models import hooks

RUN = {"before": {"bias_gap": 1.0}, "after": {"bias_gap": 0.5}}


def _fitted(tmp_path, **overrides):
    module, data = make_module(**overrides), make_data()
    make_trainer(tmp_path, max_steps=3).fit(module, datamodule=data)  # stops at once: no parameters
    assert module.global_step == 0
    return module, module.tokenize(data.texts["neutral_heldout"][:2])


def test_a_steering_vector_fit_exports_the_steer_file_of_the_edit_it_evaluated(tmp_path):
    module, batch = _fitted(tmp_path, method="steering_vector", k=None, options={"steering_vector": {"alpha": 4.0}})
    out = export(module, tmp_path / "export", RUN)
    assert not (out / "model.safetensors").exists() and not (out / "adapter").exists()
    report = json.loads((out / "debias" / "report.json").read_text())
    assert report["steer_file"] == {"path": "steer.pt", "hookpoint": "layers.1.mlp", "action": "add", "exact": True}
    entry = load_steer_file(out / "steer.pt")["layers.1.mlp"]
    with torch.no_grad():
        edited = module(batch)
        with module.delta.disabled(), hooks.replace(module.net, module.site, lambda a: a + entry["steering_vector"]):
            from_file = module(batch)
    torch.testing.assert_close(from_file, edited)  # the file is the edit fit evaluated
    card = ModelCard.load(out / "README.md")
    assert "lm_eval --model steered" in card.text and "no model weights" in card.text
    assert "changed nothing" not in card.text and "steering_vector" in card.data.tags


def test_a_clamp_of_several_latents_says_why_it_has_no_steer_file_and_eval_refuses_the_export(tmp_path):
    module, _ = _fitted(tmp_path, method="sae_clamp", features=[1, 2], k=None)
    out = export(module, tmp_path / "export", RUN)
    report = json.loads((out / "debias" / "report.json").read_text())
    assert report["steer_file"]["path"] is None and "2 latents [1, 2]" in report["steer_file"]["why"]
    assert not (out / "steer.pt").exists()
    assert "no `steer.pt` either" in (out / "README.md").read_text()
    with pytest.raises(ValueError, match=r"inference-time edit \(sae_clamp\): it holds no weights"):
        eval_command(model=str(out))


def test_a_one_latent_clamp_exports_the_documented_approximation(tmp_path):
    module, _ = _fitted(tmp_path, method="sae_clamp", features=[3], k=None)
    out = export(module, tmp_path / "export", RUN)
    report = json.loads((out / "debias" / "report.json").read_text())
    assert report["steer_file"]["action"] == "clamp" and report["steer_file"]["exact"] is False
    entry = load_steer_file(out / "steer.pt")[report["steer_file"]["hookpoint"]]
    row = module.sae.W_dec[3].detach().float()
    torch.testing.assert_close(entry["steering_vector"], row / row.norm())
    assert "an approximation" in (out / "README.md").read_text()
