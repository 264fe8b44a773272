"""The held-out evaluation of an edited (or the original) model: feature activation and firing rate, LM loss, KL to
the original, the bias gap and the explicit-cue margin, aggregated with torchmetrics; and the before/after table."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torchmetrics import MeanMetric, Metric
from tqdm.auto import tqdm

from debias.evaluation.bias_metrics import bias_gap, cue_margin
from debias.prompts import load_cue_prompts, load_gap_prompts

if TYPE_CHECKING:
    from debias.training.module import DebiasModule


class FeatureActivation(Metric):
    """Mean activation of the feature(s) over real tokens, and the fraction of those tokens where it is > 0.

    `update(latents [batch, seq, n_features], real [batch, seq] bool)`; `compute()` returns
    `{"feature_act": mean over features, "feature_fire_rate": mean over features}`.
    """

    full_state_update = False
    act_sum: torch.Tensor  # states registered by add_state below
    fired: torch.Tensor
    tokens: torch.Tensor

    def __init__(self, n_features: int, **kwargs):
        super().__init__(**kwargs)
        self.add_state("act_sum", torch.zeros(n_features, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("fired", torch.zeros(n_features, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("tokens", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, latents: torch.Tensor, real: torch.Tensor) -> None:
        weights = real.unsqueeze(-1).to(torch.float64)
        self.act_sum += (latents.double() * weights).sum(dim=(0, 1))
        self.fired += ((latents > 0).double() * weights).sum(dim=(0, 1))
        self.tokens += real.sum()

    def compute(self) -> dict[str, torch.Tensor]:
        tokens = self.tokens.clamp_min(1)
        return {"feature_act": (self.act_sum / tokens).mean().float(),
                "feature_fire_rate": (self.fired / tokens).mean().float()}


class HeldOutAggregate:
    """Aggregates `DebiasModule.evaluate_batch` outputs into the held-out metrics."""

    def __init__(self, n_features: int, device):
        self.feature = FeatureActivation(n_features).to(device)
        self.lm_loss = MeanMetric().to(device)
        self.kl = MeanMetric().to(device)

    def update(self, kind: str, out: dict[str, torch.Tensor]) -> None:
        if kind == "bias":
            self.feature.update(out["latents"], out["real"])
        else:
            self.lm_loss.update(out["nll"], out["nll_mask"].float())
            self.kl.update(out["kl"], out["kl_mask"].float())

    def compute(self) -> dict[str, float]:
        feature = {k: float(v) for k, v in self.feature.compute().items()}
        lm_loss = float(self.lm_loss.compute())
        return {**feature, "lm_loss": lm_loss, "perplexity": float(torch.tensor(lm_loss).exp()),
                "kl": float(self.kl.compute())}


def split_metrics(module, datamodule, split: str, edited: bool = True,
                  each_batch: Callable[[], object] = lambda: None) -> dict[str, float]:
    """Feature act and firing rate, LM loss, perplexity and KL of the edited (or original) model over `split`'s bias
    and neutral loaders (`datamodule.loaders(split)`): the one loop `debias fit`'s final evaluation and `debias
    compare`'s points run (during `fit`, Lightning's validation loop feeds the same `HeldOutAggregate`)."""
    agg = HeldOutAggregate(len(module.features), module.device)
    for kind, loader in datamodule.loaders(split):
        for texts in loader:
            with edit_context(module, edited):
                agg.update(kind, module.evaluate_batch(texts, kind))
            each_batch()
    return agg.compute()


def evaluate_heldout(module: DebiasModule, datamodule, edited: bool = True, cue_limit: int | None = 256,
                     progress: str | None = None) -> dict:
    """Held-out metrics of the edited model (or, with `edited=False`, of the original one).

    The explicit-cue margin uses a seeded subset of `cue_limit` held-out cue prompts, balanced over cue gender
    and pro/anti-stereotypical profession (None: all of them). `progress`: a label for a progress bar.
    """
    was_training = module.training
    module.eval()
    bar = tqdm(total=sum(len(loader) for _, loader in datamodule.loaders("heldout")) + 1,
               desc=f"{progress}: held-out", disable=progress is None, unit="batch")
    try:
        metrics = split_metrics(module, datamodule, "heldout", edited, each_batch=bar.update)
        bar.set_description(f"{progress}: bias gap and cues")
        metrics.update(behaviour_metrics(module, datamodule, edited, cue_limit))
        bar.update()
    finally:
        bar.close()
        module.train(was_training)
    return metrics


def edit_context(module, edited: bool):
    """Context in which `module.net` is the edited model, or the original one (edit disabled)."""
    return contextlib.nullcontext() if edited else module.delta.disabled()


def behaviour_metrics(module, datamodule, edited: bool, cue_limit: int | None, split: str = "heldout",
                      n_boot: int = 1000) -> dict:
    """Bias gap and explicit-cue margin on `split`'s prompts, and (when the bias spec has statements) the
    statement gap and the factual margin."""
    from debias.bias_spec import load_bias_spec
    from debias.evaluation.sentence_metrics import factual_margin, statement_gap
    from debias.statements import load_factual, load_statements

    prompt_dir, bias = datamodule.prompt_dir, datamodule.bias
    gap_prompts = load_gap_prompts(split, prompt_dir, bias=bias)
    cue_prompts = load_cue_prompts(split, prompt_dir, limit=cue_limit, bias=bias)
    spec = load_bias_spec(bias) if prompt_dir is None else None
    spec = spec if spec is not None and spec.subjects else None  # the sentence-level rows need statements
    with torch.no_grad(), edit_context(module, edited):
        gap = bias_gap(module.net, module.tokenizer, gap_prompts, n_boot=n_boot)
        cue = cue_margin(module.net, module.tokenizer, cue_prompts, n_boot=n_boot)
        if spec is not None:
            statements = statement_gap(module.net, module.tokenizer, load_statements(split, spec), n_boot=n_boot,
                                       unseen=spec.domains_only_in(split) if split == "heldout" else ())
            factual = factual_margin(module.net, module.tokenizer, load_factual(split, bias), n_boot=n_boot)
    out = {"bias_gap": gap["bias_gap"], "bias_gap_ci": gap["bias_gap_ci"],
           "cue_margin": cue["cue_margin"], "cue_margin_ci": cue["cue_margin_ci"], "cue_followed": cue["cue_followed"],
           "gap_per_profession": gap.get("per_profession", {})}
    if spec is not None:
        out.update(statements, **factual)
    return out


BASE_ROWS = ("feature_act", "feature_fire_rate", "lm_loss", "perplexity", "kl", "bias_gap", "cue_margin",
             "cue_followed")
#: Rows of a spec with statements.
SENTENCE_ROWS = ("statement_gap", "statement_gap_unseen", "statement_stereotyped", "factual_margin",
                 "factual_kept_true")
ROWS = BASE_ROWS + SENTENCE_ROWS


SUITE_ROWS = {"crows_pairs": ("stereo_pct", "abs_pct_minus_50", "margin"),
              "stereoset": ("ss", "abs_ss_minus_50", "lms", "icat")}


def format_table(before: dict, after: dict) -> str:
    """A plain before/after table of the held-out metrics."""
    lines = [f"{'held-out metric':<20}{'before':>12}{'after':>12}{'change':>10}"]
    for name in ROWS:
        if name in before and name in after:
            b, a = before[name], after[name]
            change = f"{(a - b) / abs(b):+.1%}" if b and name != "kl" else ""
            lines.append(f"{name:<20}{b:>12.4f}{a:>12.4f}{change:>10}")
    for suite, names in SUITE_ROWS.items():
        if suite in before and suite in after:
            for name in (n for n in names if n in before[suite] and n in after[suite]):
                b, a = before[suite][name], after[suite][name]
                lines.append(f"{suite + '.' + name:<20}{b:>12.4f}{a:>12.4f}{a - b:>+10.2f}")
    summary = outcome(before, after)
    if "bias_gap_reduction" in summary:
        lines.append(f"bias gap reduction: {summary['bias_gap_reduction']:+.1%} "
                     "(1 - gap after / gap before: positive is better)")
    if "statement_gap_reduction" in summary:
        kept = "; ".join(f"{name} kept {summary[key]:.0%}" for key, name in
                         (("cue_kept", "cue margin"), ("factual_kept", "factual margin")) if key in summary)
        lines.append(f"statement gap reduction: {summary['statement_gap_reduction']:+.1%}; {kept}")
    lines += domain_lines(before, after)
    return "\n".join(lines)


def domain_lines(before: dict, after: dict) -> list[str]:
    """The statement gap per attribute domain, before and after, with the after-interval; domains that the train
    split never saw are marked."""
    b_dom, a_dom = before.get("statement_gap_by_domain", {}), after.get("statement_gap_by_domain", {})
    shared = [d for d in b_dom if d in a_dom]
    if not shared:
        return []
    unseen = set(after.get("unseen_domains", []))
    lines = [f"{'statement gap by domain':<24}{'before':>9}{'after':>9}{'reduction':>11}  after 95% interval"]
    for d in shared:
        b, a = b_dom[d]["statement_gap"], a_dom[d]["statement_gap"]
        low, high = a_dom[d]["statement_gap_ci"]
        mark = " (unseen in train)" if d in unseen else ""
        reduction = f"{gap_reduction(b, a):+.0%}" if b else ""
        lines.append(f"{d:<24}{b:>9.3f}{a:>9.3f}{reduction:>11}  [{low:.3f}, {high:.3f}]{mark}")
    return lines


def outcome(before: dict, after: dict) -> dict[str, float]:
    """Gap reductions (`gap_reduction`) and the share of the cue and factual margins kept (after / before)."""
    out = {}
    for name in ("bias_gap", "statement_gap", "statement_gap_unseen"):
        if before.get(name) and name in after:
            out[f"{name}_reduction"] = gap_reduction(before[name], after[name])
    for name, key in (("cue_margin", "cue_kept"), ("factual_margin", "factual_kept")):
        if before.get(name) and name in after:
            out[key] = after[name] / before[name]
    return out


def gap_reduction(before: float, after: float) -> float:
    """1 - |gap after| / |gap before|: the sign convention of every report (positive: the gap shrank)."""
    return 1 - abs(after) / abs(before)
