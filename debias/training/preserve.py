"""The prompts an edit must preserve, as a null space for its update (`model.train.null_space_energy`)."""

from __future__ import annotations

import random

from lightning.pytorch.utilities import rank_zero_info

from debias.edits.null_space import NullSpace, fit_null_space, project_sparse

#: Cue prompts in the null space's fit: a seeded sample (the train split has thousands; a few hundred span it).
CUE_PROMPTS = 256


def preserved_texts(datamodule, seed: int = 0) -> list[str]:
    """Train-split texts whose outputs the edit must keep: every factual statement up to and including its true
    word ("My mother is a woman"), and a seeded sample of the explicit-cue prompts."""
    factual = [item.context + item.words[item.group] for item in datamodule.items.get("factual", [])]
    cues = list(datamodule.texts.get("cue_train", []))
    if len(cues) > CUE_PROMPTS:
        cues = random.Random(seed).sample(cues, CUE_PROMPTS)
    return factual + cues


def preserved_batches(module, datamodule) -> list[dict]:
    """`preserved_texts`, tokenised by `module` in batches of the data's eval batch size."""
    texts, size = preserved_texts(datamodule), datamodule.eval_batch_size
    return [module.tokenize(texts[i:i + size]) for i in range(0, len(texts), size)]


def null_space_for(module, datamodule, energy: float) -> NullSpace:
    """Fit the null space of `module`'s edited matrices on the preserved train texts, on the original model."""
    delta = module.delta
    if not hasattr(delta, "masks"):
        raise ValueError(f"model.train.null_space_energy applies to masked and dense methods; method "
                         f"{module.edit_args.method!r} has no masked delta")
    batches = preserved_batches(module, datamodule)
    if not batches:
        raise ValueError("model.train.null_space_energy needs preserved prompts (the bias spec's factual statements "
                         "or cue prompts); the train split has none")
    with delta.disabled():
        fitted = fit_null_space(module.net, dict(zip([m.parameter for m in delta.masks], delta.layers, strict=True)),
                                batches, energy)
    rank_zero_info(f"debias: null space of the preserved prompts: rank {fitted.ranks()} (energy {energy})")
    return fitted


def project_delta(null_space: NullSpace, delta) -> None:
    """Project every matrix of a masked delta off the preserved inputs and re-mask it (after an optimiser step)."""
    for m in delta.masks:
        project_sparse(null_space, m.parameter, m.shape, m.indices, delta.values_of(m.parameter))
