"""One point of a cell's curve: the edit at (snapshot step, α), evaluated on the validation split (the numbers
`ValidationMetrics` logs as `val/*`) and on the held-out split (`debias.evaluation.evaluate_model`); its flat
summary against the original model; and `PointStore`, the cell's points on disk, rewritten atomically after each.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from debias.edits.scaling import scaled
from debias.evaluation.heldout import behaviour_metrics, gap_reduction, split_metrics
from debias.io import atomic_write_json, non_finite, read_json_object


def validation_metrics(module, datamodule, callback, edited: bool = True, original: dict | None = None) -> dict:
    """The validation split's metrics of the current (or original) model, as `ValidationMetrics` (`callback`, for
    its `cue_limit` and `score`) logs them during `fit` (without the `val/` prefix): feature act and firing rate,
    LM loss, KL on the validation neutral text and, with the bias spec's validation prompts, the bias gap, the cue
    margin (and the statement gap and factual margin); `score` when the `original` model's metrics are given."""
    with module.fast_path():
        metrics = split_metrics(module, datamodule, "validation", edited)
        if datamodule.hparams.prompt_dir is None:
            behaviour = behaviour_metrics(module, datamodule, edited, callback.cue_limit, "validation", n_boot=1)
            metrics.update({k: v for k, v in behaviour.items() if isinstance(v, float)})
    if original is not None:
        metrics["score"] = callback.score(original, metrics)
    return metrics


def heldout_metrics(module, datamodule, suites: bool = False) -> dict:
    """The held-out metrics of the current model (`evaluate_model`, on the fast path), without the per-profession
    gaps (the cell's export report keeps those)."""
    from debias.evaluation.evaluate import evaluate_model

    metrics = evaluate_model(module, datamodule, edited=True, suites=suites)
    metrics.pop("gap_per_profession", None)
    return metrics


def evaluate_point(module, datamodule, callback, original_val: dict, alpha: float) -> dict:
    """The current edit at α: {"alpha", "validation", "heldout", "seconds"}."""
    start = time.perf_counter()
    with torch.no_grad(), scaled(module.delta, alpha):
        validation = validation_metrics(module, datamodule, callback, original=original_val)
        heldout = heldout_metrics(module, datamodule)
    return {"alpha": alpha, "validation": validation, "heldout": heldout, "seconds": time.perf_counter() - start}


def _ratio(after: dict, before: dict, key: str):
    return after[key] / before[key] if before.get(key) and after.get(key) is not None else None


def _change(after: dict, before: dict, key: str):
    ratio = _ratio(after, before, key)
    return None if ratio is None else ratio - 1


def _reduction(after: dict, before: dict, key: str):
    return gap_reduction(before[key], after[key]) if before.get(key) and after.get(key) is not None else None


def _reduction_interval(after: dict, before: dict) -> tuple:
    """The held-out gap reduction's interval from the bootstrap interval of the gap after (the gap before taken as
    exact): |gap| ranges over the interval's absolute values (from 0 when it holds 0)."""
    if "bias_gap_ci" not in after or not before.get("bias_gap"):
        return None, None
    lo, hi = after["bias_gap_ci"]
    smallest = 0.0 if lo <= 0 <= hi else min(abs(lo), abs(hi))
    return 1 - max(abs(lo), abs(hi)) / abs(before["bias_gap"]), 1 - smallest / abs(before["bias_gap"])


def heldout_summary(heldout: dict, before: dict) -> dict:
    """The flat held-out numbers of a point against the original model's (`before`)."""
    lo, hi = _reduction_interval(heldout, before)
    out = {"kl": heldout.get("kl"), "gap_after": heldout.get("bias_gap"),
           "gap_after_lo": (heldout.get("bias_gap_ci") or [None, None])[0],
           "gap_after_hi": (heldout.get("bias_gap_ci") or [None, None])[1],
           "gap_reduction": _reduction(heldout, before, "bias_gap"), "gap_reduction_lo": lo, "gap_reduction_hi": hi,
           "cue_kept": _ratio(heldout, before, "cue_margin"), "cue_followed": heldout.get("cue_followed"),
           "lm_loss_change": _change(heldout, before, "lm_loss"),
           "feature_act_change": _change(heldout, before, "feature_act"),
           "statement_gap_reduction": _reduction(heldout, before, "statement_gap"),
           "factual_kept": _ratio(heldout, before, "factual_margin")}
    crows, ss = heldout.get("crows_pairs", {}), heldout.get("stereoset", {})
    out.update({"crows_stereo_pct": crows.get("stereo_pct"), "crows_lo": (crows.get("stereo_pct_ci") or [None])[0],
                "crows_hi": (crows.get("stereo_pct_ci") or [None, None])[1], "crows_n": crows.get("n")})
    for name in ("ss", "lms", "icat"):
        interval = ss.get(f"{name}_ci") or [None, None]
        out.update({name: ss.get(name), f"{name}_lo": interval[0], f"{name}_hi": interval[1]})
    out["abs_ss_minus_50"] = abs(ss["ss"] - 50) if "ss" in ss else None
    out["stereoset_n"] = ss.get("n")
    return out


def validation_summary(validation: dict, original: dict) -> dict:
    """The flat validation numbers of a point (`val_` columns) against the original model's on the same split."""
    return {"val_kl": validation.get("kl"), "val_gap_reduction": _reduction(validation, original, "bias_gap"),
            "val_cue_kept": _ratio(validation, original, "cue_margin"),
            "val_statement_gap_reduction": _reduction(validation, original, "statement_gap"),
            "val_factual_kept": _ratio(validation, original, "factual_margin"),
            "val_lm_loss_change": _change(validation, original, "lm_loss"), "val_score": validation.get("score")}


def point_key(step: int, alpha: float) -> str:
    return f"{step}:{float(alpha)!r}"


class PointStore:
    """A cell's evaluated points and matched points, in one JSON file rewritten atomically after each addition.

    `key` says what the points belong to (the cell's overrides and the grid's arguments); a file written for
    another key is ignored, and replaced at the first addition.
    """

    def __init__(self, path: Path, key: dict):
        self.path, self.key = Path(path), key
        saved = read_json_object(self.path) or {}
        fits = saved.get("key") == json.loads(json.dumps(key, default=float))
        self.points: dict[str, dict] = saved.get("points", {}) if fits else {}
        self.matched: dict[str, dict] = saved.get("matched", {}) if fits else {}

    def get(self, step: int, alpha: float) -> dict | None:
        """The stored point, or None (also for one holding a non-finite number: it is evaluated again)."""
        point = self.points.get(point_key(step, alpha))
        return point if isinstance(point, dict) and not non_finite(point) else None

    def add(self, step: int, point: dict) -> dict:
        """Store `point` (evaluated at `step`); one holding a NaN or an infinity is refused, and nothing stored."""
        bad = non_finite({"validation": point.get("validation"), "heldout": point.get("heldout")})
        if bad:
            raise ValueError(f"the edit of {self.path.parent.name} at step {step}, α={point['alpha']!r} gives "
                             f"non-finite {', '.join(bad[:3])}: a blown-up edit, whose numbers mean nothing (lower "
                             "model.train.lr, or the scales in --alphas)")
        self.points[point_key(step, point["alpha"])] = dict(point, step=step)
        self._write()
        return self.points[point_key(step, point["alpha"])]

    def set_matched(self, level: float, matched: dict) -> None:
        self.matched[repr(float(level))] = matched
        self._write()

    def get_matched(self, level: float) -> dict | None:
        return self.matched.get(repr(float(level)))

    def _write(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.path, {"key": self.key, "points": self.points, "matched": self.matched})
