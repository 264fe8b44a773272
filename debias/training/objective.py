"""Objective terms: what the edit removes (feature, ablation, gap, counterfactual, cda) and what it keeps (KL to the
original on neutral text, after explicit cues and at the group word of factual statements).

Every term is a scalar, differentiable with respect to the delta. Shapes: logits `[batch, seq, vocab]`,
`real` `[batch, seq]` bool (attended, non-BOS tokens), latents `[batch, seq, n_features]`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal, get_args

import torch
import torch.nn.functional as F

from debias.models import hooks
from debias.models.continuation import continuation_batch, picked_logits, summed_logprobs
from debias.models.scoring import gap_from_logprobs, next_token_logprobs, own_group_margins
from debias.sae.ops import ablate
from debias.statements import item_groups, statement_texts
from debias.training.cache import original_output
from debias.training.identity_term import identity_term

CounterfactualForm = Literal["loglik", "gap", "kl"]


@dataclass
class ObjectiveWeights:
    """Weights of the loss terms; a term with weight 0 is not computed."""

    feature: float = 1.0
    """Mean activation of the feature(s) on bias prompts, divided by its value before training."""
    ablation: float = 0.0
    """KL(model with the feature(s) ablated through the SAE, error term kept || edited model) on bias prompts."""
    gap: float = 0.0
    """(train bias gap)², the next-token gap of the bias's targets on train stereotyped-context prompts (gender:
    she vs he after professions)."""
    counterfactual: float = 0.0
    """Sentence level: mean over train statements and pairs of groups of (log p(attribute | group g's subject) −
    log p(attribute | group h's subject))², "My sister" / "My brother" + " is bad at math." (`debias.statements`)."""
    cda: float = 0.0
    """Sentence level, real text: the `counterfactual_form` term on counterfactual pairs mined from the SAE's
    offline corpus and swapped by the spec's list ("Later that year she" / "... he" + " moved to Paris.",
    `debias.cda`); `data.cda_pairs` of them."""
    kl: float = 1.0
    """KL(original || edited) next-token distributions on neutral text (token-averaged)."""
    cue_kl: float = 0.0
    """KL(original || edited) at the pronoun position of explicit-cue prompts (keeps real gender information)."""
    factual_kl: float = 0.0
    """KL(original || edited) at the group word of train factual statements ("My mother is a" → " woman")."""
    identity: float = 0.0
    """Mean squared change, over their original scale, of the SAE latents that carry group identity (attribution to
    the train factual margin) on the train factual statements (`debias.training.identity_term`)."""
    counterfactual_form: CounterfactualForm = "loglik"
    """What `counterfactual` makes indifferent to the group swap: "loglik", each statement's attribute
    log-likelihood (mean over statements and pairs of groups of the squared difference); "gap", only the
    stereotype's direction (the batch's statement gap, squared); "kl", the next-token distribution right after the
    swapped subject (symmetrised KL between each pair of groups' prefixes, attribute ignored)."""

    def __post_init__(self):
        if self.counterfactual_form not in get_args(CounterfactualForm):
            raise ValueError(f"objective.counterfactual_form must be one of {list(get_args(CounterfactualForm))}, "
                             f"got {self.counterfactual_form!r}")
        bad = {k: v for k, v in self.weights().items() if not (v >= 0 and v < float("inf"))}
        if bad:
            raise ValueError(f"objective weights must be finite and >= 0, got {bad}")
        if self.feature == self.ablation == self.gap == self.counterfactual == self.cda == 0:
            raise ValueError("at least one of objective.feature, objective.ablation, objective.gap, "
                             "objective.counterfactual, objective.cda must be > 0")

    def weights(self) -> dict[str, float]:
        """Every term's weight, by name."""
        return {k: v for k, v in asdict(self).items() if k != "counterfactual_form"}

    def active(self) -> dict[str, float]:
        """The weights of the terms that are computed (> 0)."""
        return {k: v for k, v in self.weights().items() if v > 0}


def feature_term(latents: torch.Tensor, real: torch.Tensor, baseline: torch.Tensor) -> torch.Tensor:
    """Mean over real tokens and features of activation / baseline (its mean before training) [n_features]."""
    per_feature = (latents * real.unsqueeze(-1)).sum(dim=(0, 1)) / real.sum().clamp_min(1)
    return (per_feature / baseline.clamp_min(1e-8)).mean()


def token_kl(ref_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """[batch, seq] KL(p_ref || p) per position, in nats, computed in float32."""
    ref = F.log_softmax(ref_logits.float(), dim=-1)
    cur = F.log_softmax(logits.float(), dim=-1)
    return (ref.exp() * (ref - cur)).sum(-1)


def mean_kl(ref_logits: torch.Tensor, logits: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """KL(p_ref || p) averaged over the positions where `positions` [batch, seq] is true."""
    kl = token_kl(ref_logits, logits)
    return (kl * positions).sum() / positions.sum().clamp_min(1)


def loss_terms(module, texts: dict[str, list[str]]) -> dict[str, torch.Tensor]:
    """Unweighted value of every active term on one training batch of `module` (a prepared `DebiasModule`)."""
    w, terms, net = module.objective, {}, module.net
    bias = module.tokenize(texts["bias"])
    real = module.real(bias)
    if w.ablation:
        def ablated_logits():
            with hooks.replace(net, module.site, lambda a: ablate(module.sae, a, module.features)):
                return module(bias)

        ablated = original_output(module, "ablation", texts["bias"], ablated_logits)
        with hooks.capture(net, module.site) as cap:
            logits = module(bias)
        terms["ablation"] = mean_kl(ablated, logits, bias["attention_mask"].bool())
        if w.feature:
            terms["feature"] = feature_term(module.latents(bias, cap.value), real, module.feature_baseline)
    elif w.feature:
        terms["feature"] = feature_term(module.latents(bias), real, module.feature_baseline)
    if w.gap:
        terms["gap"] = train_gap(module, [texts[f"gap_{g}"] for g in module.groups]) ** 2
    if w.cue_kl:
        cue = texts["cue"]
        ref = original_output(module, "cue", cue, lambda: next_token_logprobs(net, module.tokenizer, cue, len(cue)))
        cur = next_token_logprobs(net, module.tokenizer, cue, len(cue))
        terms["cue_kl"] = (ref.exp() * (ref - cur)).sum(-1).mean()
    if w.counterfactual:
        terms["counterfactual"] = counterfactual_term(module, texts["statement"], w.counterfactual_form)
    if w.cda:
        terms["cda"] = counterfactual_term(module, texts["cda"], w.counterfactual_form)
    if w.factual_kl:
        terms["factual_kl"] = factual_kl_term(module, texts["factual"])
    if w.identity:
        terms["identity"] = identity_term(module, texts["factual"])
    if w.kl:
        neutral = module.tokenize(texts["neutral"])
        ref = original_output(module, "kl", texts["neutral"], lambda: module(neutral))
        terms["kl"] = mean_kl(ref, module(neutral), neutral["attention_mask"].bool())
    return terms


def train_gap(module, texts_by_group: list[list[str]]) -> torch.Tensor:
    """Differentiable gap: Σ over groups of the mean margin of that group's target on its stereotyped prompts
    (gender: mean she−he margin on female prompts − mean on male prompts)."""
    prompts = [t for texts in texts_by_group for t in texts]
    logprobs = next_token_logprobs(module.net, module.tokenizer, prompts, len(prompts))
    groups = torch.tensor([g for g, texts in enumerate(texts_by_group) for _ in texts], device=logprobs.device)
    return gap_from_logprobs(logprobs, module.targets, groups)


def counterfactual_term(module, items, form: str = "loglik") -> torch.Tensor:
    """The group-swap term of `ObjectiveWeights.counterfactual_form` on a batch of statements or mined pairs."""
    n_groups = len(items[0].prefixes)
    pairs = [(g, h) for g in range(n_groups) for h in range(g + 1, n_groups)]
    if form == "kl":
        prefixes = statement_texts(items)[0]
        logprobs = next_token_logprobs(module.net, module.tokenizer, prefixes, len(prefixes))
        logprobs = logprobs.view(len(items), n_groups, -1)
        sym = [(logprobs[:, g].exp() - logprobs[:, h].exp()) * (logprobs[:, g] - logprobs[:, h]) for g, h in pairs]
        return torch.stack([s.sum(-1) for s in sym]).mean()  # KL(g||h) + KL(h||g), averaged
    batch = continuation_batch(module.tokenizer, *statement_texts(items), module.device)
    logprobs = summed_logprobs(picked_logits(module(batch.model_inputs()), batch), batch).view(len(items), n_groups)
    if form == "gap":
        group = item_groups(items).to(logprobs.device)
        margins = own_group_margins(logprobs, group)  # a shuffled batch may lack a group: sum over those present
        return torch.stack([margins[group == g].mean() for g in group.unique()]).sum() ** 2
    return torch.stack([(logprobs[:, g] - logprobs[:, h]) ** 2 for g, h in pairs]).mean()


def factual_kl_term(module, items) -> torch.Tensor:
    """KL(original || edited) at the positions predicting each factual statement's group word."""
    batch = continuation_batch(module.tokenizer, [it.context for it in items],
                               [it.words[it.group] for it in items], module.device)
    ref = original_output(module, "factual", [it.context for it in items],
                          lambda: picked_logits(module(batch.model_inputs()), batch))
    return token_kl(ref, picked_logits(module(batch.model_inputs()), batch)).mean()
