"""The comparison grid's results: one row per cell (`results.csv`), a Markdown table with the random seeds pooled
(`results.md`), and held-out bias-gap reduction against KL (`pareto.png`). Written atomically; an unfinished grid
says so in all three."""

from __future__ import annotations

import csv
import io
import statistics
from pathlib import Path

from debias.evaluation.heldout import gap_reduction
from debias.io import atomic_write

COLUMNS = ("cell", "method", "k", "seed", "rank", "objective", "changed_parameters", "gap_before", "gap_after",
           "gap_after_lo", "gap_after_hi", "gap_reduction", "cue_margin_before", "cue_margin_after", "cue_kept",
           "cue_followed", "kl", "lm_loss_change", "feature_act_change", "crows_stereo_pct", "crows_lo", "crows_hi",
           "crows_margin", "crows_n", "ss", "ss_lo", "ss_hi", "lms", "lms_lo", "lms_hi", "icat", "icat_lo", "icat_hi",
           "stereoset_n", "seconds", "export")


def row(name: str, saved: dict) -> dict:
    """The flat result row of one finished cell."""
    cell, rep = saved["cell"], saved["report"]
    b, a = rep["before"], rep["after"]
    crows, ss = a.get("crows_pairs", {}), a.get("stereoset", {})
    return {
        "cell": name, "method": cell["method"], "k": cell["k"], "seed": cell["seed"], "rank": cell["rank"],
        "objective": cell["objective"], "changed_parameters": rep["changed_parameters"],
        "gap_before": b["bias_gap"], "gap_after": a["bias_gap"], "gap_after_lo": a["bias_gap_ci"][0],
        "gap_after_hi": a["bias_gap_ci"][1], "gap_reduction": gap_reduction(b["bias_gap"], a["bias_gap"]),
        "cue_margin_before": b["cue_margin"], "cue_margin_after": a["cue_margin"],
        "cue_kept": a["cue_margin"] / b["cue_margin"], "cue_followed": a.get("cue_followed"), "kl": a["kl"],
        "lm_loss_change": a["lm_loss"] / b["lm_loss"] - 1,
        "feature_act_change": a["feature_act"] / b["feature_act"] - 1,
        "crows_stereo_pct": crows.get("stereo_pct"), "crows_lo": _ci(crows, "stereo_pct_ci", 0),
        "crows_hi": _ci(crows, "stereo_pct_ci", 1), "crows_margin": crows.get("margin"), "crows_n": crows.get("n"),
        **{f"{m}{suffix}": (ss.get(m) if not suffix else _ci(ss, f"{m}_ci", int(suffix == "_hi")))
           for m in ("ss", "lms", "icat") for suffix in ("", "_lo", "_hi")},
        "stereoset_n": ss.get("n"), "seconds": rep["seconds"], "export": rep.get("export"),
    }


def _ci(d: dict, key: str, i: int):
    return d[key][i] if key in d else None


def _pool(rows: list[dict]) -> list[dict]:
    """Random-mask rows of the same k and objective pooled into one: mean, with the seeds' spread in `*_sd`."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        key = (r["method"], r["k"], r["objective"], r["rank"]) if r["method"] == "random" else (r["cell"],)
        groups.setdefault(key, []).append(r)
    pooled = []
    for members in groups.values():
        if len(members) == 1:
            pooled.append(dict(members[0], n_seeds=1))
            continue
        merged = dict(members[0], cell=members[0]["cell"].rsplit("-seed", 1)[0] + f" ({len(members)} seeds)",
                      seed=None, n_seeds=len(members))
        for col in COLUMNS:
            values = [m[col] for m in members]
            if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
                merged[col] = statistics.fmean(values)
                merged[f"{col}_sd"] = statistics.stdev(values)
        pooled.append(merged)
    return pooled


def _pct(value, sd=None, signed=True) -> str:
    if value is None:
        return "—"
    text = f"{value:+.0%}" if signed else f"{value:.0%}"
    return text + (f" ± {sd:.0%}" if sd is not None else "")


def _interval(r: dict, col: str, lo: str, hi: str, digits: int = 1) -> str:
    if r.get(col) is None:
        return "—"
    if r.get(f"{col}_sd") is not None:
        return f"{r[col]:.{digits}f} ± {r[f'{col}_sd']:.{digits}f}"
    return f"{r[col]:.{digits}f} ({r[lo]:.{digits}f}–{r[hi]:.{digits}f})"


def markdown(rows: list[dict], before: dict | None, header: str) -> str:
    """The main table (default objective) and the objective-ablation table."""
    pooled = _pool(rows)
    lines = [header, ""]
    if before:
        crows, ss = before.get("crows_pairs", {}), before.get("stereoset", {})
        lines += [f"Before (the base model): bias gap {before['bias_gap']:.3f} "
                  f"({before['bias_gap_ci'][0]:.2f}–{before['bias_gap_ci'][1]:.2f}), cue margin "
                  f"{before['cue_margin']:.3f} (cue followed {before.get('cue_followed', float('nan')):.0%}), "
                  f"CrowS {crows.get('stereo_pct', float('nan')):.1f} (n={crows.get('n')}), StereoSet ss "
                  f"{ss.get('ss', float('nan')):.1f} / lms {ss.get('lms', float('nan')):.1f} / icat "
                  f"{ss.get('icat', float('nan')):.1f} (n={ss.get('n')}).", ""]
    lines += ["| cell | changed params | gap reduction | gap after (95% CI) | cue margin kept | cue followed | KL | "
              "LM loss | CrowS % (95% CI) | StereoSet ss | lms | icat | wall s |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in (r for r in pooled if r["objective"] == "default"):
        lines.append(
            f"| {r['cell']} | {r['changed_parameters']:,.0f} | {_pct(r['gap_reduction'], r.get('gap_reduction_sd'))} | "
            f"{_interval(r, 'gap_after', 'gap_after_lo', 'gap_after_hi', 2)} | "
            f"{_pct(r['cue_kept'], r.get('cue_kept_sd'), False)} | {_pct(r['cue_followed'], None, False)} | "
            f"{r['kl']:.4f} | {r['lm_loss_change']:+.2%} | "
            f"{_interval(r, 'crows_stereo_pct', 'crows_lo', 'crows_hi')} | "
            f"{_interval(r, 'ss', 'ss_lo', 'ss_hi')} | {_interval(r, 'lms', 'lms_lo', 'lms_hi')} | "
            f"{_interval(r, 'icat', 'icat_lo', 'icat_hi')} | {r['seconds']:.0f} |")
    ablation = [r for r in pooled if r["objective"] != "default" or any(
        o["objective"] != "default" and o["method"] == r["method"] and o["k"] == r["k"] for o in pooled)]
    if any(r["objective"] != "default" for r in ablation):
        lines += ["", "Objective ablation (each removal term with the neutral KL; `default` = the config's objective):",
                  "", "| cell | objective | gap reduction | cue margin kept | KL | LM loss | feature act |",
                  "|---|---|---|---|---|---|---|"]
        for r in sorted(ablation, key=lambda r: (r["method"], r["objective"])):
            lines.append(f"| {r['cell'].replace('-obj-' + r['objective'], '')} | {r['objective']} | "
                         f"{_pct(r['gap_reduction'])} | "
                         f"{_pct(r['cue_kept'], None, False)} | {r['kl']:.4f} | {r['lm_loss_change']:+.2%} | "
                         f"{_pct(r['feature_act_change'])} |")
    return "\n".join(lines) + "\n"


def completions_markdown(cells: list, results: dict) -> str:
    """Greedy completions of the held-out prompts: a row for the base model, then one per default-objective cell."""
    shown = [(c.name, results[c.name]["report"].get("completions") or []) for c in cells
             if c.name in results and c.objective == "default"]
    shown = [(name, rows) for name, rows in shown if rows]
    if not shown:
        return ""
    prompts = [row["prompt"] for row in shown[0][1]]
    lines = ["", "Greedy completions of four held-out prompts (32 tokens, raw text):", "",
             "| model | " + " | ".join(f"*{p}*" for p in prompts) + " |", "|---" * (len(prompts) + 1) + "|",
             "| base model | " + " | ".join(_cell_text(row["before"]) for row in shown[0][1]) + " |"]
    for name, rows in shown:
        lines.append(f"| {name} | " + " | ".join(_cell_text(row["after"]) for row in rows) + " |")
    return "\n".join(lines) + "\n"


def _cell_text(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def write_results(out: Path, cells: list, results: dict, config: str, prepare_seconds: float = 0.0) -> dict[str, Path]:
    """results.csv, results.md and pareto.png for the finished cells, each marked unfinished until all are done."""
    from debias.plots import pareto_figure

    rows = [row(c.name, results[c.name]) for c in cells if c.name in results]
    done = len(rows) == len(cells)
    status = "" if done else f"UNFINISHED: {len(rows)} of {len(cells)} cells done; rerun the same command to resume. "
    buf = io.StringIO()
    if not done:
        buf.write(f"# {status}\n")
    writer = csv.DictWriter(buf, fieldnames=COLUMNS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    paths = {"csv": out / "results.csv", "md": out / "results.md", "png": out / "pareto.png"}
    atomic_write(paths["csv"], buf.getvalue())
    before = next(iter(results.values()))["report"]["before"] if results else None
    cell_seconds = sum(r["seconds"] for r in rows)
    header = (f"{status}`debias compare {config}`: held-out metrics, one run per cell. Wall time "
              f"{(cell_seconds + prepare_seconds) / 60:.1f} min: {cell_seconds / 60:.1f} min in {len(rows)} cells, "
              f"{prepare_seconds / 60:.1f} min loading, choosing features and computing masks.")
    atomic_write(paths["md"], markdown(rows, before, header) + completions_markdown(cells, results))
    if rows:
        atomic_write(paths["png"], pareto_figure(_pool(rows), title=("UNFINISHED — " if not done else "") + config))
    return paths
