"""`examples/own_trainer.py`: a plain `lightning.Trainer` fit on `configs/tiny.yaml`'s arguments, a checkpoint,
`DebiasModule.load_from_checkpoint` and an export, all outside `debias fit`."""

import importlib.util
import math
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def _example():
    spec = importlib.util.spec_from_file_location("own_trainer", ROOT / "examples" / "own_trainer.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_plain_trainer_fit_reload_and_export(tmp_path):
    from transformers import AutoModelForCausalLM

    example = _example()
    run = example.main(str(ROOT / "configs" / "tiny.yaml"), str(tmp_path / "run"), max_steps=6)
    trained, reloaded, chosen = run["trained"], run["reloaded"], run["chosen"]
    assert trained.changed_entries() > 0
    assert torch.equal(example.logits(reloaded), example.logits(trained))  # the checkpoint alone gives the edit back
    with reloaded.delta.disabled():
        assert not torch.equal(example.logits(reloaded), example.logits(trained))
    assert Path(run["best"]).is_file() and math.isfinite(run["score"])  # val/score was logged and monitored
    merged = AutoModelForCausalLM.from_pretrained(run["export"]).eval()
    with torch.no_grad():
        exported = merged(**chosen.tokenize([example.PROMPT])).logits
    torch.testing.assert_close(exported, example.logits(chosen), rtol=1e-5, atol=1e-5)
