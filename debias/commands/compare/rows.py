"""The grid's results as flat rows: one per point of every cell's curve and one per matched-KL point
(`results.csv`), the as-trained row of each cell (last step, α = 1), and the matched points pooled over seeds."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence

from debias.commands.compare.points import heldout_summary, validation_summary

ID_COLUMNS = ("cell", "method", "k", "seed", "rank", "objective", "point", "level", "reached", "step", "alpha")
HELDOUT_COLUMNS = ("kl", "gap_after", "gap_after_lo", "gap_after_hi", "gap_reduction", "gap_reduction_lo",
                   "gap_reduction_hi", "cue_kept", "cue_followed", "lm_loss_change", "feature_act_change",
                   "statement_gap_reduction", "factual_kept", "crows_stereo_pct", "crows_lo", "crows_hi", "crows_n",
                   "ss", "ss_lo", "ss_hi", "abs_ss_minus_50", "lms", "lms_lo", "lms_hi", "icat", "icat_lo", "icat_hi",
                   "stereoset_n")
VALIDATION_COLUMNS = ("val_kl", "val_gap_reduction", "val_cue_kept", "val_statement_gap_reduction",
                      "val_factual_kept", "val_lm_loss_change", "val_score")
COLUMNS = (*ID_COLUMNS, *HELDOUT_COLUMNS, *VALIDATION_COLUMNS, "gap_before", "changed_parameters", "seconds",
           "export")


def _identity(name: str, saved: dict) -> dict:
    cell, rep = saved["cell"], saved["report"]
    return {"cell": name, "method": cell["method"], "k": cell["k"], "seed": cell["seed"], "rank": cell["rank"],
            "objective": cell["objective"], "gap_before": rep["before"]["bias_gap"],
            "changed_parameters": rep["changed_parameters"], "export": rep.get("export")}


def cell_rows(name: str, saved: dict, validation_before: dict | None) -> list[dict]:
    """Every point of a finished cell: its curve (`point` = curve) and its matched-KL points (`point` = matched;
    their `val_*` numbers are the interpolated ones the choice was made on)."""
    base, before, original = _identity(name, saved), saved["report"]["before"], validation_before or {}
    rows = []
    for p in saved["points"]:
        rows.append({**base, "point": "curve", "step": p["step"], "alpha": p["alpha"], "seconds": p["seconds"],
                     **heldout_summary(p["heldout"], before), **validation_summary(p["validation"], original)})
    for m in saved.get("matched", {}).values():
        row = {**base, "point": "matched", "level": m["level"], "reached": m["reached"]}
        if m["reached"]:
            row.update(step=m["step"], alpha=m["alpha"], seconds=m["seconds"], **heldout_summary(m["heldout"], before),
                       **{k: v for k, v in m["validation"].items() if k in VALIDATION_COLUMNS})
        rows.append(row)
    return rows


def as_trained_row(name: str, saved: dict) -> dict:
    """The cell as `debias fit` leaves it (last step, α = 1): the fit's own held-out evaluation."""
    rep = saved["report"]
    return {**_identity(name, saved), **heldout_summary(rep["after"], rep["before"]), "seconds": rep["seconds"]}


def group_key(row: dict) -> tuple:
    """Cells that differ only in their seed pool into one group."""
    return row["method"], row["k"], row["rank"], row["objective"]


def group_label(row: dict) -> str:
    name = row["method"] + (f"-k{row['k']}" if row["k"] is not None else "")
    name += f"-r{row['rank']}" if row["rank"] is not None else ""
    return name + (f"-obj-{row['objective']}" if row["objective"] != "default" else "")


def seed_stats(values: Sequence[float | None]) -> dict | None:
    """Mean, sd and a 95% interval of `values` (one per seed): Student's t over the seeds when there are two or
    more (`interval: "seeds"`); None when there are none."""
    kept = [float(v) for v in values if v is not None and math.isfinite(v)]
    if not kept:
        return None
    mean = statistics.fmean(kept)
    out: dict = {"mean": mean, "n": len(kept), "sd": None, "lo": None, "hi": None, "interval": None}
    if len(kept) >= 2:
        from scipy.stats import t

        sd = statistics.stdev(kept)
        half = float(t.ppf(0.975, len(kept) - 1)) * sd / math.sqrt(len(kept))
        out.update(sd=sd, lo=mean - half, hi=mean + half, interval="seeds")
    return out


POOLED = ("gap_reduction", "cue_kept", "lm_loss_change", "kl", "factual_kept", "statement_gap_reduction",
          "abs_ss_minus_50", "lms", "crows_stereo_pct", "val_gap_reduction")


def pool_matched(rows: list[dict]) -> list[dict]:
    """One entry per (group, level) of the matched rows: how many seeds reach the level and, over those that do,
    each `POOLED` metric's `seed_stats`. With one seed the gap reduction's interval is the held-out bootstrap one
    (`interval: "bootstrap"`)."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if r["point"] == "matched":
            groups.setdefault((*group_key(r), r["level"]), []).append(r)
    pooled = []
    for (method, k, rank, objective, level), members in groups.items():
        reached = [m for m in members if m["reached"]]
        entry = {"group": group_label(members[0]), "method": method, "k": k, "rank": rank, "objective": objective,
                 "level": level, "seeds": [m["seed"] for m in members], "n": len(members), "reached": len(reached),
                 "choices": [{"cell": m["cell"], "seed": m["seed"], "step": m["step"], "alpha": m["alpha"]}
                             for m in reached]}
        for col in POOLED:
            entry[col] = seed_stats([m.get(col) for m in reached])
        gap = entry["gap_reduction"]
        if gap is not None and gap["n"] == 1 and reached[0].get("gap_reduction_lo") is not None:
            gap.update(lo=reached[0]["gap_reduction_lo"], hi=reached[0]["gap_reduction_hi"], interval="bootstrap")
        pooled.append(entry)
    return pooled


def pool_trained(rows: list[dict]) -> list[dict]:
    """As-trained rows of the same group pooled: the mean, with the seeds' sd in `*_sd`."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault(group_key(r), []).append(r)
    pooled = []
    for members in groups.values():
        merged = dict(members[0], cell=group_label(members[0]) + (f" ({len(members)} seeds)" if len(members) > 1
                                                                   else ""), n_seeds=len(members))
        if len(members) == 1:
            merged["cell"] = members[0]["cell"]
        for col in (*HELDOUT_COLUMNS, "seconds"):
            values = [m.get(col) for m in members]
            numbers = [float(v) for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
            if len(members) > 1 and len(numbers) == len(values):
                merged[col] = statistics.fmean(numbers)
                merged[f"{col}_sd"] = statistics.stdev(numbers)
        pooled.append(merged)
    return pooled
