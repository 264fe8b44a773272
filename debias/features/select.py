"""The fit-time rule that picks the latents a run edits: attribution to the train gap, confirmed by joint ablation."""

from __future__ import annotations

from tqdm.auto import tqdm

from debias.features.attribution import Attribution, ablated_gap, attribute
from debias.features.rank import activation_stats
from debias.prompts import load_gap_prompts


def select_features(model, tokenizer, sae, site, n: int = 9, split: str = "train", min_fire_rate: float = 0.01,
                    n_candidates: int | None = None, prompt_dir: str | None = None, batch_size: int = 16,
                    record: dict | None = None, precomputed: Attribution | None = None,
                    bias: str = "gender") -> list[int]:
    """The fit-time rule: latents in order of attribution toward the train gap's sign, among those firing on at least
    `min_fire_rate` of the train prompts' real tokens; each of the first `n_candidates` (default 3n) is kept if adding
    it to the kept set lowers |gap| under joint ablation, until `n` are kept. Deterministic; `record` gets the details;
    `precomputed`: `attribute(...)` on the same train prompts, to skip recomputing it; `bias`: the spec whose train
    prompts and groups define the gap (`prompt_dir`: gender prompt files instead)."""
    if split != "train":
        raise ValueError(f"feature selection uses the train split only, got split={split!r}")
    if n < 1 or not 0 <= min_fire_rate <= 1:
        raise ValueError(f"need n >= 1 and 0 <= min_fire_rate <= 1, got n={n}, min_fire_rate={min_fire_rate}")
    prompts = load_gap_prompts(split, prompt_dir, bias=bias)
    att = precomputed or attribute(model, tokenizer, sae, site, prompts, batch_size)
    fire = activation_stats(model, tokenizer, sae, site, prompts.prompts, batch_size=batch_size)["fire_rate"]
    score = att.latents * (1.0 if att.gap >= 0 else -1.0)
    order = sorted((i for i in range(len(score)) if score[i] > 0 and fire[i] >= min_fire_rate),
                   key=lambda i: (-float(score[i]), i))
    chosen: list[int] = []
    current = att.gap
    tried: list[dict] = []
    candidates = order[: n_candidates or 3 * n]
    bar = tqdm(candidates, desc=f"features: confirming up to {len(candidates)} candidates by ablation", unit="latent")
    for f in bar:
        g = ablated_gap(model, tokenizer, sae, site, prompts, chosen + [f], batch_size)
        tried.append({"index": f, "attribution": float(att.latents[f]), "joint_gap": g, "kept": abs(g) < abs(current)})
        if abs(g) < abs(current):
            chosen, current = chosen + [f], g
            bar.set_postfix(kept=len(chosen))
        if len(chosen) == n:
            break
    bar.close()
    if not chosen:
        raise RuntimeError(f"no latent among {len(order)} eligible (attribution toward the gap, fire rate >= "
                           f"{min_fire_rate}) lowers the train gap {att.gap:.4g} when ablated")
    if record is not None:
        record.update(rule=f"top-{n} by train-gap attribution, confirmed by joint ablation", features=chosen,
                      min_fire_rate=min_fire_rate, train_gap=att.gap, ablated_gap=current,
                      relative_change=(current - att.gap) / att.gap, candidates=tried)
    return chosen
