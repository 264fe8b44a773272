"""The fit-time rule that picks the latents a run edits: attribution to a train gap, confirmed by joint ablation; and
the `random_features` control's draw of as many live latents at random.

The target says which gap: `gap` (the next-token gap of the profession prompts), `statements` (the statement gap of
the spec's sentence-level statements) or `both` (each latent's attribution to each, divided by that gap; a set is
kept when ablating it lowers |gap| / |train gap| + |statement gap| / |train statement gap|). A fourth target,
`factual` (the factual margin of the spec's factual statements), picks the latents that carry group identity, the
ones an edit must keep (`debias.training.identity_term`); it is no choice of `model.sae.feature_target`.

The statement gap's ablation check runs on the first `STATEMENT_CHECK_ITEMS` train statements (a balanced prefix,
`load_statements`): over all of them (1,280 for gender) it took about 49 s per candidate on SmolLM2. The attribution
that ranks the candidates uses every train statement.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Literal, get_args

import torch
from tqdm.auto import tqdm

from debias.bias_spec import load_bias_spec
from debias.features.attribution import (
    Attribution,
    ablated_factual_margin,
    ablated_gap,
    ablated_statement_gap,
    attribute,
    attribute_factual,
    attribute_statements,
    statement_gap_value,
)
from debias.features.rank import activation_stats
from debias.models import hooks
from debias.models.scoring import real_token_mask
from debias.prompts import load_gap_prompts
from debias.statements import FactualItem, StatementItem, load_factual, load_statements

FeatureTarget = Literal["gap", "statements", "both"]
SelectTarget = Literal["gap", "statements", "both", "factual"]  # factual: the identity latents, not an edit's target
_RULES = {"gap": "train-gap attribution", "statements": "train statement-gap attribution",
          "both": "attribution to the train gap plus to the train statement gap, each over its |gap|",
          "factual": "train factual-margin attribution"}
#: How many train statements (a balanced prefix) the ablation check of a statement-gap candidate runs on.
STATEMENT_CHECK_ITEMS = 256
_PREFIX = {"gap": "", "statement_gap": "statement_", "factual_margin": "factual_"}  # of `relative_change`


@dataclass
class _Measure:
    """One gap the rule lowers: `key` names it in the record, `ablated(features)` measures it."""

    key: str  # "gap" | "statement_gap" | "factual_margin"
    att: Attribution
    ablated: Callable[[list[int]], float]
    texts: list[str]  # the texts its fire rate is counted on
    base: float | None = None  # the value `ablated` starts from (the ablation check's sample); None: att.gap


def _train_statements(bias, target: str) -> list[StatementItem]:
    spec = load_bias_spec(bias)
    items = load_statements("train", spec) if spec.subjects else []
    if not items:
        raise ValueError(f"model.sae.feature_target={target!r} needs train statements, but bias spec {spec.name!r} "
                         f"({spec.path}) has none; use feature_target 'gap' or add `statements` to the spec")
    return items


def _train_factual(bias) -> list[FactualItem]:
    spec = load_bias_spec(bias)
    items = load_factual("train", spec)
    if not items:
        raise ValueError(f"the identity latents (factual-margin attribution) need train factual statements, but bias "
                         f"spec {spec.name!r} ({spec.path}) has none; set objective.identity to 0 or add `factual`")
    return items


def _measures(model, tokenizer, sae, site, target: str, split: str, prompt_dir, bias, batch_size: int,
              precomputed: Attribution | None, precomputed_statements: Attribution | None) -> list[_Measure]:
    if target == "factual":
        facts = _train_factual(bias)
        return [_Measure("factual_margin", attribute_factual(model, tokenizer, sae, site, facts, batch_size),
                         lambda fs: ablated_factual_margin(model, tokenizer, sae, site, facts, fs, batch_size),
                         [item.context + item.words[item.group] for item in facts])]
    measures = []
    items = _train_statements(bias, target) if target != "gap" else []  # fails before any forward
    if target in ("gap", "both"):
        prompts = load_gap_prompts(split, prompt_dir, bias=bias)
        att = precomputed or attribute(model, tokenizer, sae, site, prompts, batch_size)
        measures.append(_Measure("gap", att, lambda fs: ablated_gap(model, tokenizer, sae, site, prompts, fs,
                                                                    batch_size), prompts.prompts))
    if target in ("statements", "both"):
        satt = precomputed_statements or attribute_statements(model, tokenizer, sae, site, items, batch_size)
        texts = list(dict.fromkeys(p + item.attribute for item in items for p in item.prefixes))
        check = items[:STATEMENT_CHECK_ITEMS]
        base = statement_gap_value(model, tokenizer, check, batch_size=batch_size) if len(check) < len(items) else None
        measures.append(_Measure("statement_gap", satt, lambda fs: ablated_statement_gap(
            model, tokenizer, sae, site, check, fs, batch_size), texts, base))
    if len(measures) > 1 and any(m.att.gap == 0 for m in measures):
        raise ValueError(f"feature_target 'both' divides by each train gap, got {[m.att.gap for m in measures]}")
    return measures


def _score(measures: list[_Measure]) -> torch.Tensor:
    """[d_sae] attribution toward the gap's sign (one gap), or the sum of attribution / gap (several)."""
    if len(measures) == 1:
        att = measures[0].att
        return att.latents * (1.0 if att.gap >= 0 else -1.0)
    return sum((m.att.latents / m.att.gap for m in measures), torch.zeros_like(measures[0].att.latents))


def _objective(measures: list[_Measure], gaps: list[float]) -> float:
    """|gap| (one gap), or the sum of |gap| / |train gap| (several): what a kept latent must lower."""
    if len(measures) == 1:
        return abs(gaps[0])
    return sum(abs(g) / abs(m.att.gap if m.base is None else m.base) for m, g in zip(measures, gaps, strict=True))


def select_features(model, tokenizer, sae, site, n: int = 9, split: str = "train", min_fire_rate: float = 0.01,
                    n_candidates: int | None = None, prompt_dir: str | None = None, batch_size: int = 16,
                    record: dict | None = None, precomputed: Attribution | None = None,
                    bias: str = "gender", target: SelectTarget = "gap",
                    precomputed_statements: Attribution | None = None) -> list[int]:
    """The fit-time rule: latents in order of attribution toward the train gap's sign, among those firing on at least
    `min_fire_rate` of the train prompts' real tokens; each of the first `n_candidates` (default 3n) is kept if adding
    it to the kept set lowers |gap| under joint ablation, until `n` are kept. Deterministic; `record` gets the details;
    `precomputed`: `attribute(...)` on the same train prompts, to skip recomputing it; `bias`: the spec whose train
    prompts and groups define the gap (`prompt_dir`: gender prompt files instead). `target`: which gap (module
    docstring; `statements` and `both` need the spec's train statements, `precomputed_statements`:
    `attribute_statements(...)` on them; `factual` its train factual statements); the fire rate is counted on the
    texts of the gaps it uses."""
    if split != "train":
        raise ValueError(f"feature selection uses the train split only, got split={split!r}")
    if n < 1 or not 0 <= min_fire_rate <= 1:
        raise ValueError(f"need n >= 1 and 0 <= min_fire_rate <= 1, got n={n}, min_fire_rate={min_fire_rate}")
    if target not in get_args(SelectTarget):
        raise ValueError(f"target must be one of {list(get_args(SelectTarget))}, got {target!r}")
    measures = _measures(model, tokenizer, sae, site, target, split, prompt_dir, bias, batch_size, precomputed,
                         precomputed_statements)
    texts = [t for m in measures for t in m.texts]
    fire = activation_stats(model, tokenizer, sae, site, texts, batch_size=batch_size)["fire_rate"]
    score = _score(measures)
    order = sorted((i for i in range(len(score)) if score[i] > 0 and fire[i] >= min_fire_rate),
                   key=lambda i: (-float(score[i]), i))
    chosen: list[int] = []
    current = [m.att.gap if m.base is None else m.base for m in measures]
    tried: list[dict] = []
    candidates = order[: n_candidates or 3 * n]
    bar = tqdm(candidates, desc=f"features: confirming up to {len(candidates)} candidates by ablation", unit="latent")
    for f in bar:
        gaps = [m.ablated(chosen + [f]) for m in measures]
        kept = _objective(measures, gaps) < _objective(measures, current)
        row: dict = {"index": f, "attribution": float(score[f] if len(measures) > 1 else measures[0].att.latents[f])}
        if len(measures) > 1:
            row.update({f"{m.key}_attribution": float(m.att.latents[f]) for m in measures})
        row.update({f"joint_{m.key}": g for m, g in zip(measures, gaps, strict=True)})
        if len(measures) > 1:
            row["objective"] = _objective(measures, gaps)
        tried.append({**row, "kept": kept})
        if kept:
            chosen, current = chosen + [f], gaps
            bar.set_postfix(kept=len(chosen))
        if len(chosen) == n:
            break
    bar.close()
    if not chosen:
        trains = ", ".join(f"{m.key} {m.att.gap:.4g}" for m in measures)
        raise RuntimeError(f"no latent among {len(order)} eligible ({_RULES[target]} toward the gap, fire rate >= "
                           f"{min_fire_rate}) lowers the train {trains} when ablated")
    if record is not None:
        record.update(rule=f"top-{n} by {_RULES[target]}, confirmed by joint ablation", target=target,
                      features=chosen, min_fire_rate=min_fire_rate)
        for m, g in zip(measures, current, strict=True):
            base = m.att.gap if m.base is None else m.base
            record.update({f"train_{m.key}": m.att.gap, f"ablated_{m.key}": g,
                           f"{_PREFIX[m.key]}relative_change": (g - base) / base})
            if m.base is not None:
                record.update({f"checked_{m.key}": m.base, "statement_check_items": STATEMENT_CHECK_ITEMS})
        if len(measures) > 1:
            record["objective"] = _objective(measures, current)
        record["candidates"] = tried
    return chosen


def live_latents(model, sae, site, batches: Iterable[dict], bos_token_id: int | None) -> torch.Tensor:
    """[d_sae] bool: the latents that fire (> 0) on at least one real token (attended, not BOS) of `batches`
    (tokenised `input_ids` / `attention_mask` [batch, seq]: a run's mask batches, the train bias prompts)."""
    fired = torch.zeros(sae.cfg.d_sae, dtype=torch.bool)
    with torch.no_grad():
        for batch in batches:
            ids, attention = batch["input_ids"], batch["attention_mask"]
            acts = hooks.forward_until(model, site, input_ids=ids, attention_mask=attention)
            real = real_token_mask(ids, attention, bos_token_id)
            fired |= (sae.encode(acts.to(sae.W_enc.dtype))[real] > 0).any(0).cpu()
    return fired


def random_live_features(model, sae, site, batches: Iterable[dict], n: int, seed: int, bos_token_id: int | None,
                         exclude: Sequence[int] = (), record: dict | None = None) -> list[int]:
    """`n` latents drawn uniformly at random (seeded by `seed`) among the live ones (`live_latents` of `batches`)
    other than `exclude`, ascending: the `random_features` control's stand-ins for a rule's `n` features. `record`
    gets the draw's details (what was drawn, what it replaced, how many latents were live)."""
    live = live_latents(model, sae, site, batches, bos_token_id)
    excluded = set(exclude)
    pool = [i for i in live.nonzero().flatten().tolist() if i not in excluded]
    if n < 1 or len(pool) < n:
        raise ValueError(f"random_features needs {n} live latents other than features {list(exclude)}, but "
                         f"{len(pool)} of the SAE's {sae.cfg.d_sae} fire on the train mask prompts")
    order = torch.randperm(len(pool), generator=torch.Generator().manual_seed(seed))
    drawn = sorted(pool[i] for i in order[:n].tolist())
    if record is not None:
        record.update(feature_source="random", drawn_features=drawn, replaced_features=list(exclude), seed=seed,
                      n_live=int(live.sum()), live="fires (> 0) on a real token of the train mask prompts")
    return drawn
