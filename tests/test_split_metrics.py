"""The one evaluation loop over a split (`debias.evaluation.heldout.split_metrics`), which `debias fit`'s final
evaluation and `debias compare`'s points both run."""

import pytest
import torch
from conftest import make_data, make_module

from debias.evaluation.heldout import split_metrics


@pytest.mark.parametrize("split", ["validation", "heldout"])
def test_the_loop_visits_every_batch_of_the_split_and_scores_the_edit_against_the_original(split):
    module, data = make_module(), make_data()
    module.prepare(data)
    with torch.no_grad():
        module.delta.parameters()[0].add_(0.3)
    batches = []
    edited = split_metrics(module, data, split, edited=True, each_batch=lambda: batches.append(1))
    original = split_metrics(module, data, split, edited=False)
    assert len(batches) == sum(len(loader) for _, loader in data.loaders(split)) > 0
    assert original["kl"] == pytest.approx(0.0, abs=1e-7) and edited["kl"] > 1e-6
    neutral = data.texts[f"neutral_{split}"]
    nll, count = 0.0, 0
    with torch.no_grad():  # the LM loss by hand: token-weighted over every neutral text of the split
        for i in range(0, len(neutral), 16):
            batch = module.tokenize(neutral[i:i + 16])
            out = module.evaluate_batch(neutral[i:i + 16], "neutral")
            nll += float((out["nll"] * out["nll_mask"]).sum())
            count += int(batch["attention_mask"][:, 1:].sum())
    assert edited["lm_loss"] == pytest.approx(nll / count, rel=1e-5)
