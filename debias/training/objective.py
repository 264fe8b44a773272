"""Objective terms: what the edit removes (feature, ablation, bias, counterfactual) and what it keeps (KL to the
original on neutral text, after explicit cues and at the group word of factual statements).

Every term is a scalar, differentiable with respect to the delta. Shapes: logits `[batch, seq, vocab]`,
`real` `[batch, seq]` bool (attended, non-BOS tokens), latents `[batch, seq, n_features]`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from debias.models import hooks
from debias.models.continuation import continuation_batch, picked_logits, summed_logprobs
from debias.models.scoring import gap_from_logprobs, next_token_logprobs
from debias.sae.ops import ablate
from debias.training.cache import original_output


@dataclass
class ObjectiveWeights:
    """Weights of the loss terms; a term with weight 0 is not computed."""

    feature: float = 1.0
    """Mean activation of the feature(s) on bias prompts, divided by its value before training."""
    ablation: float = 0.0
    """KL(model with the feature(s) ablated through the SAE, error term kept || edited model) on bias prompts."""
    bias: float = 0.0
    """(train bias gap)², the she-vs-he log-probability gap on train profession prompts."""
    counterfactual: float = 0.0
    """Sentence level: mean over train statements and pairs of groups of (log p(attribute | group g's subject) −
    log p(attribute | group h's subject))², "My sister" / "My brother" + " is bad at math." (`debias.statements`)."""
    kl: float = 1.0
    """KL(original || edited) next-token distributions on neutral text (token-averaged)."""
    cue_kl: float = 0.0
    """KL(original || edited) at the pronoun position of explicit-cue prompts (keeps real gender information)."""
    factual_kl: float = 0.0
    """KL(original || edited) at the group word of train factual statements ("My mother is a" → " woman")."""

    def __post_init__(self):
        bad = {k: v for k, v in asdict(self).items() if not (v >= 0 and v < float("inf"))}
        if bad:
            raise ValueError(f"objective weights must be finite and >= 0, got {bad}")
        if self.feature == self.ablation == self.bias == self.counterfactual == 0:
            raise ValueError("at least one of objective.feature, objective.ablation, objective.bias, "
                             "objective.counterfactual must be > 0")

    def active(self) -> dict[str, float]:
        return {k: v for k, v in asdict(self).items() if v > 0}


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
    if w.bias:
        terms["bias"] = train_gap(module, texts["gap_female"], texts["gap_male"]) ** 2
    if w.cue_kl:
        cue = texts["cue"]
        ref = original_output(module, "cue", cue, lambda: next_token_logprobs(net, module.tokenizer, cue, len(cue)))
        cur = next_token_logprobs(net, module.tokenizer, cue, len(cue))
        terms["cue_kl"] = (ref.exp() * (ref - cur)).sum(-1).mean()
    if w.counterfactual:
        terms["counterfactual"] = counterfactual_term(module, texts["statement"])
    if w.factual_kl:
        terms["factual_kl"] = factual_kl_term(module, texts["factual"])
    if w.kl:
        neutral = module.tokenize(texts["neutral"])
        ref = original_output(module, "kl", texts["neutral"], lambda: module(neutral))
        terms["kl"] = mean_kl(ref, module(neutral), neutral["attention_mask"].bool())
    return terms


def train_gap(module, female: list[str], male: list[str]) -> torch.Tensor:
    """Differentiable she-vs-he gap: mean margin on `female` prompts − mean on `male` prompts."""
    logprobs = next_token_logprobs(module.net, module.tokenizer, female + male, len(female) + len(male))
    is_female = torch.tensor([True] * len(female) + [False] * len(male), device=logprobs.device)
    she_id, he_id = module.pronouns
    return gap_from_logprobs(logprobs, she_id, he_id, is_female)


def counterfactual_term(module, items) -> torch.Tensor:
    """Mean over statements and pairs of groups of the squared log-likelihood difference of the attribute."""
    n_groups = len(items[0].prefixes)
    batch = continuation_batch(module.tokenizer, [p for it in items for p in it.prefixes],
                               [it.attribute for it in items for _ in it.prefixes], module.device)
    logprobs = summed_logprobs(picked_logits(module(batch.model_inputs()), batch), batch).view(len(items), n_groups)
    pairs = [(g, h) for g in range(n_groups) for h in range(g + 1, n_groups)]
    return torch.stack([(logprobs[:, g] - logprobs[:, h]) ** 2 for g, h in pairs]).mean()


def factual_kl_term(module, items) -> torch.Tensor:
    """KL(original || edited) at the positions predicting each factual statement's group word."""
    batch = continuation_batch(module.tokenizer, [it.context for it in items],
                               [it.words[it.group] for it in items], module.device)
    ref = original_output(module, "factual", [it.context for it in items],
                          lambda: picked_logits(module(batch.model_inputs()), batch))
    return token_kl(ref, picked_logits(module(batch.model_inputs()), batch)).mean()
