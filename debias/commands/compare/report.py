"""The comparison grid's results: every point of every cell's curve (`results.csv`), the matched-KL summary per
method with the seeds pooled (`results.md`, `results.json`), the curves with their frontier (`pareto.png`) and
statement removal against factual retention (`retention.png`). Written atomically; an unfinished grid says so in
all of them."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from debias.commands.compare.rows import COLUMNS, as_trained_row, cell_rows, pool_matched, pool_trained
from debias.io import atomic_write


def _pct(value, sd=None, signed=True) -> str:
    if value is None:
        return "—"
    text = f"{value:+.0%}" if signed else f"{value:.0%}"
    return text + (f" ± {sd:.0%}" if sd is not None else "")


def _stat(stat: dict | None, fmt: str = "pct", signed: bool = True) -> str:
    """`mean ± sd` of a `seed_stats` entry (the mean alone for one seed)."""
    if stat is None:
        return "—"
    if fmt == "pct":
        return _pct(stat["mean"], stat["sd"], signed)
    sd = f" ± {stat['sd']:{fmt.lstrip('+')}}" if stat["sd"] is not None else ""
    return f"{stat['mean']:{fmt}}{sd}"


def _interval(stat: dict | None) -> str:
    if stat is None or stat.get("lo") is None:
        return "—"
    return f"{stat['lo']:+.0%} to {stat['hi']:+.0%} ({stat['interval']})"


def _choices(entry: dict) -> str:
    return "; ".join(f"{c['step']} @ α {c['alpha']:.2f}" for c in entry["choices"]) or "—"


def matched_markdown(pooled: list[dict], levels: list[float], suite_levels: list[float]) -> list[str]:
    """One table per KL level: gap reduction (mean ± sd over seeds, 95% interval), cue kept, LM-loss change,
    held-out KL and the chosen (step, α); StereoSet and CrowS at the suite levels."""
    lines = []
    for level in levels:
        entries = [e for e in pooled if e["level"] == level and e["objective"] == "default"]
        if not entries:
            continue
        suites = level in suite_levels
        lines += ["", f"### Matched validation KL {level:g}", "",
                  "| method | seeds reaching | gap reduction | 95% interval | cue margin kept | LM loss | "
                  "held-out KL | step @ α (validation choice) |"
                  + (" StereoSet \\|ss − 50\\| | lms | CrowS % |" if suites else ""),
                  "|---" * (8 + 3 * suites) + "|"]
        for e in entries:
            cells = [e["group"], f"{e['reached']} of {e['n']}"]
            if not e["reached"]:
                cells += ["does not reach"] + [""] * (5 + 3 * suites)
            else:
                cells += [_stat(e["gap_reduction"]), _interval(e["gap_reduction"]),
                          _stat(e["cue_kept"], signed=False), _stat(e["lm_loss_change"], "+.2%"),
                          _stat(e["kl"], ".4f"), _choices(e)]
                if suites:
                    cells += [_stat(e["abs_ss_minus_50"], ".1f"), _stat(e["lms"], ".1f"),
                              _stat(e["crows_stereo_pct"], ".1f")]
            lines.append("| " + " | ".join(cells) + " |")
    return lines


def trained_markdown(rows: list[dict]) -> list[str]:
    """The cells as trained (last step, α = 1), and the objective ablation."""
    pooled = pool_trained(rows)
    lines = ["", "### As trained (last step, α = 1; held-out)", "",
             "| cell | changed params | gap reduction | gap after (95% CI) | cue margin kept | cue followed | KL | "
             "LM loss | wall s |", "|---|---|---|---|---|---|---|---|---|"]
    for r in (r for r in pooled if r["objective"] == "default"):
        gap = (f"{r['gap_after']:.2f} ± {r['gap_after_sd']:.2f}" if r.get("gap_after_sd") is not None
               else f"{r['gap_after']:.2f} ({r['gap_after_lo']:.2f}–{r['gap_after_hi']:.2f})")
        lines.append(f"| {r['cell']} | {r['changed_parameters']:,.0f} | "
                     f"{_pct(r['gap_reduction'], r.get('gap_reduction_sd'))} | {gap} | "
                     f"{_pct(r['cue_kept'], r.get('cue_kept_sd'), False)} | {_pct(r['cue_followed'], None, False)} | "
                     f"{r['kl']:.4f} | {r['lm_loss_change']:+.2%} | {r['seconds']:.0f} |")
    ablation = [r for r in pooled if r["objective"] != "default" or any(
        o["objective"] != "default" and o["method"] == r["method"] and o["k"] == r["k"] for o in pooled)]
    if any(r["objective"] != "default" for r in ablation):
        lines += ["", "Objective ablation (each removal term with the neutral KL; `default` = the config's "
                  "objective; as trained):", "",
                  "| cell | objective | gap reduction | cue margin kept | KL | LM loss | feature act |",
                  "|---|---|---|---|---|---|---|"]
        for r in sorted(ablation, key=lambda r: (r["method"], r["objective"])):
            lines.append(f"| {r['cell'].replace('-obj-' + r['objective'], '')} | {r['objective']} | "
                         f"{_pct(r['gap_reduction'])} | {_pct(r['cue_kept'], None, False)} | {r['kl']:.4f} | "
                         f"{r['lm_loss_change']:+.2%} | {_pct(r['feature_act_change'])} |")
    return lines


def completions_markdown(cells: list, results: dict) -> str:
    """Greedy completions of the held-out prompts: a row for the base model, then one per default-objective cell."""
    shown = [(c.name, results[c.name]["report"].get("completions") or []) for c in cells
             if c.name in results and c.objective == "default"]
    shown = [(name, rows) for name, rows in shown if rows]
    if not shown:
        return ""
    prompts = [row["prompt"] for row in shown[0][1]]
    lines = ["", "Greedy completions of four held-out prompts (32 tokens, raw text; as trained):", "",
             "| model | " + " | ".join(f"*{p}*" for p in prompts) + " |", "|---" * (len(prompts) + 1) + "|",
             "| base model | " + " | ".join(_cell_text(row["before"]) for row in shown[0][1]) + " |"]
    for name, rows in shown:
        lines.append(f"| {name} | " + " | ".join(_cell_text(row["after"]) for row in rows) + " |")
    return "\n".join(lines) + "\n"


def _cell_text(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def _before_line(before: dict | None) -> list[str]:
    if not before:
        return []
    line = (f"Before (the base model, held-out): bias gap {before['bias_gap']:.3f} "
            f"({before['bias_gap_ci'][0]:.2f}–{before['bias_gap_ci'][1]:.2f}), cue margin {before['cue_margin']:.3f}")
    if "stereoset" in before:
        ss, crows = before["stereoset"], before.get("crows_pairs", {})
        line += (f", StereoSet ss {ss['ss']:.1f} (|ss − 50| {abs(ss['ss'] - 50):.1f}) / lms {ss['lms']:.1f} "
                 f"(n={ss.get('n')}), CrowS {crows.get('stereo_pct', float('nan')):.1f} (n={crows.get('n')})")
    return ["", line + "."]


def _header(status: str, config: str, settings, seconds: tuple[float, float], n_cells: int, evaluations: int) -> str:
    cells, prepare = seconds
    return (f"{status}`debias compare {config}`: each cell a curve (snapshots every {settings.snapshot_every} steps × "
            f"α {list(settings.alphas)}, validation and held-out), and its point at each matched validation KL "
            f"{list(settings.kl_levels)}, chosen on the validation split only and evaluated on the held-out split "
            f"there (suites at {list(settings.suite_levels)}). Wall time {(cells + prepare) / 60:.1f} min: "
            f"{cells / 60:.1f} min in {n_cells} cells, {prepare / 60:.1f} min loading, choosing features and computing "
            f"masks. Evaluations per trained cell: {evaluations}. Intervals: Student's t over the seeds (2 or more), "
            "else the held-out bootstrap interval of the gap at the matched point (the gap before taken as exact).")


def _csv(rows: list[dict], status: str) -> str:
    buf = io.StringIO()
    if status:
        buf.write(f"# {status}\n")
    writer = csv.DictWriter(buf, fieldnames=COLUMNS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def write_results(out: Path, cells: list, results: dict, config: str, prepare_seconds: float = 0.0,
                  shared=None, settings=None) -> dict[str, Path]:
    """results.csv, results.md, results.json, pareto.png and (where the spec has statements and factual items)
    retention.png for the finished cells, each marked unfinished until all are done."""
    from debias.commands.compare.frontier import FrontierSettings
    from debias.plots import pareto_figure, retention_figure

    settings = settings or FrontierSettings()
    finished = [c for c in cells if c.name in results]
    validation_before = getattr(shared, "validation", None)
    rows = [r for c in finished for r in cell_rows(c.name, results[c.name], validation_before)]
    trained = [as_trained_row(c.name, results[c.name]) for c in finished]
    pooled = pool_matched(rows)
    done = len(finished) == len(cells)
    status = "" if done else (f"UNFINISHED: {len(finished)} of {len(cells)} cells done; rerun the same command to "
                              "resume.")
    paths = {"csv": out / "results.csv", "md": out / "results.md", "json": out / "results.json",
             "png": out / "pareto.png", "retention": out / "retention.png"}
    atomic_write(paths["csv"], _csv(rows, status))
    before = getattr(shared, "before", None) or (next(iter(results.values()))["report"]["before"] if results else None)
    cell_seconds = sum(r["seconds"] for r in trained)
    max_steps = max((p["step"] for c in finished for p in results[c.name]["points"]), default=0)
    evaluations = settings.evaluations(max_steps)
    lines = [_header(status + " " if status else "", config, settings, (cell_seconds, prepare_seconds),
                     len(finished), evaluations), *_before_line(before),
             *matched_markdown(pooled, list(settings.kl_levels), list(settings.suite_levels)),
             *trained_markdown(trained)]
    atomic_write(paths["md"], "\n".join(lines) + "\n" + completions_markdown(cells, results))
    summary = {"unfinished": not done, "config": config, "frontier": settings.to_dict(),
               "wall_seconds": cell_seconds + prepare_seconds, "cell_seconds": cell_seconds,
               "prepare_seconds": prepare_seconds, "evaluations_per_trained_cell": evaluations, "before": before,
               "validation_before": validation_before, "matched": pooled, "as_trained": pool_trained(trained)}
    atomic_write(paths["json"], json.dumps(summary, indent=2, default=float))
    if rows:
        atomic_write(paths["png"], pareto_figure(rows, pooled, title=("UNFINISHED — " if not done else "") + config))
        retention = retention_figure(rows, max_kl=max(settings.kl_levels))
        if retention is not None:
            atomic_write(paths["retention"], retention)
    return paths
