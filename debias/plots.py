"""`report.png`: training curves, the held-out feature's activation histogram and the gap per profession; and
`debias compare`'s `pareto.png` (every method's curves, their frontier and the matched-KL points) and
`retention.png` (held-out statement removal against factual margin kept, per method, under a KL budget)."""

from __future__ import annotations

import csv
from pathlib import Path

import torch


def read_metrics_csv(path: str | Path | None) -> dict[str, list[tuple[int, float]]]:
    """Lightning CSVLogger `metrics.csv` → {column: [(step, value), ...]} (empty when there is no file)."""
    if not path or not Path(path).is_file():
        return {}
    series: dict[str, list[tuple[int, float]]] = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            for key, value in row.items():
                if key not in ("step", "epoch") and value not in ("", None):
                    series.setdefault(key, []).append((int(row["step"]), float(value)))
    return series


@torch.no_grad()
def heldout_feature_acts(module, datamodule) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token activations (real tokens, first feature) on the held-out bias prompts: (original, edited)."""
    out = {}
    for edited in (False, True):
        values = []
        for texts in dict(datamodule.loaders("heldout"))["bias"]:
            if edited:
                batch = module.evaluate_batch(texts, "bias")
            else:
                with module.delta.disabled():
                    batch = module.evaluate_batch(texts, "bias")
            values.append(batch["latents"][..., 0][batch["real"]].float().cpu())
        out[edited] = torch.cat(values)
    return out[False], out[True]


def report_figure(out: str | Path, curves: dict, acts_before: torch.Tensor, acts_after: torch.Tensor,
                  gap_before: dict[str, float], gap_after: dict[str, float], title: str = "",
                  domains: tuple[dict, dict, list[str]] | None = None) -> Path:
    """Write a three-panel PNG (four with `domains`: the held-out statement gap per domain before and after, as
    `statement_gap_by_domain` before, after, and the domains train never saw); returns its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4 if domains else 3, figsize=(21 if domains else 16, 4.6))
    ax = axes[0]
    for name, points in sorted(curves.items()):
        if name.startswith("train/") or name in ("val/kl",):
            steps, values = zip(*points, strict=False)
            ax.plot(steps, values, label=name, marker="." if name.startswith("val/") else None)
    ax.set(xlabel="step", ylabel="value", title="objective terms and held-out KL", yscale="log")
    if ax.lines:
        ax.legend(fontsize=8)
    else:  # an inference-time edit (sae_clamp, steering_vector) trains nothing
        ax.text(0.5, 0.5, "nothing trained", ha="center", va="center", transform=ax.transAxes)

    ax = axes[1]
    top = max(float(acts_before.max()), float(acts_after.max()), 1e-6)
    bins = torch.linspace(0, top, 40).tolist()
    ax.hist(acts_before.tolist(), bins=bins, alpha=0.6, label=f"before (mean {acts_before.mean():.3f})")
    ax.hist(acts_after.tolist(), bins=bins, alpha=0.6, label=f"after (mean {acts_after.mean():.3f})")
    ax.set(xlabel="feature activation per held-out token", ylabel="tokens", yscale="log",
           title="held-out feature activation")
    ax.legend(fontsize=8)

    ax = axes[2]
    names = sorted(gap_before, key=lambda n: gap_before[n])
    y = range(len(names))
    ax.barh([i + 0.2 for i in y], [gap_before[n] for n in names], height=0.4, label="before")
    ax.barh([i - 0.2 for i in y], [gap_after.get(n, float("nan")) for n in names], height=0.4, label="after")
    ax.set_yticks(list(y), names, fontsize=7)
    ax.axvline(0, color="black", lw=0.8)
    ax.set(xlabel="log p(she) − log p(he)", title="held-out margin per profession")
    ax.legend(fontsize=8)
    if domains:
        _domain_panel(axes[3], *domains)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return Path(out)


def _domain_panel(ax, before: dict, after: dict, unseen: list[str]) -> None:
    """Statement gap per attribute domain, before and after, with the after-interval; unseen domains starred."""
    names = [d for d in before if d in after]
    y = range(len(names))
    ax.barh([i + 0.2 for i in y], [before[d]["statement_gap"] for d in names], height=0.4, label="before")
    low = [after[d]["statement_gap"] - after[d]["statement_gap_ci"][0] for d in names]
    high = [after[d]["statement_gap_ci"][1] - after[d]["statement_gap"] for d in names]
    ax.barh([i - 0.2 for i in y], [after[d]["statement_gap"] for d in names], height=0.4, label="after (95%)",
            xerr=[low, high], error_kw={"lw": 0.8})
    ax.set_yticks(list(y), [f"{d} *" if d in unseen else d for d in names], fontsize=7)
    ax.axvline(0, color="black", lw=0.8)
    ax.set(xlabel="statement gap (* = domain train never saw)", title="held-out statement gap per domain")
    ax.legend(fontsize=8)


def frontier(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The Pareto frontier of (KL, gap reduction) points: those no point of lower or equal KL beats, by KL."""
    best, out = float("-inf"), []
    for kl, gain in sorted(points, key=lambda p: (p[0], -p[1])):
        if gain > best:
            out.append((kl, gain))
            best = gain
    return out


def pareto_figure(rows: list[dict], matched: list[dict], title: str = "") -> bytes:
    """PNG bytes: held-out bias-gap reduction against held-out KL. Each cell's curves (one per snapshot, over α,
    later steps darker) in its method's colour (`registry.colour`), the frontier of every point of every method,
    and each method's matched-KL points (`rows.pool_matched`) with their 95% intervals (over seeds, or the held-out
    bootstrap with one seed). `rows`: the `results.csv` rows (`point` = curve for the curves)."""
    import matplotlib

    from debias.edits import registry

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8.5, 5.5))
    curves: dict[tuple, list[dict]] = {}
    for r in rows:
        if r["point"] == "curve" and r["objective"] == "default" and r.get("gap_reduction") is not None:
            curves.setdefault((r["cell"], r["step"]), []).append(r)
    last = {cell: max(step for c, step in curves if c == cell) for cell, _ in curves}
    seen = set()
    for (cell, step), points in curves.items():
        points = sorted(points, key=lambda p: p["alpha"])
        method = points[0]["method"]
        shade = 1.0 if step == last[cell] else 0.35 + 0.5 * step / max(last[cell], 1)
        ax.plot([max(p["kl"], 1e-6) for p in points], [100 * p["gap_reduction"] for p in points], marker=".",
                color=registry.colour(method), alpha=shade, linewidth=1,
                label=method if method not in seen else None)
        seen.add(method)
    edge = frontier([(max(r["kl"], 1e-6), 100 * r["gap_reduction"]) for pts in curves.values() for r in pts])
    if edge:
        ax.step(*zip(*edge, strict=True), where="post", color="black", linestyle="--", linewidth=1,
                label="frontier (all methods)")
    markers: dict[float, str] = {}
    for e in matched:
        if not e["reached"] or e["objective"] != "default" or e["gap_reduction"] is None:
            continue
        gap, kl = e["gap_reduction"], e["kl"]["mean"]
        marker = markers.setdefault(e["level"], "os^Dv"[len(markers) % 5])
        yerr = None
        if gap.get("lo") is not None:
            yerr = [[100 * (gap["mean"] - gap["lo"])], [100 * (gap["hi"] - gap["mean"])]]
        ax.errorbar(max(kl, 1e-6), 100 * gap["mean"], yerr=yerr, fmt=marker, color=registry.colour(e["method"]),
                    markeredgecolor="black", markersize=7, capsize=2, zorder=3)
        ax.annotate(e["group"], (max(kl, 1e-6), 100 * gap["mean"]), fontsize=6, xytext=(3, 3),
                    textcoords="offset points")
    for level, marker in markers.items():
        ax.axvline(level, color="grey", linewidth=0.5, linestyle=":")
        ax.plot([], [], marker, color="grey",
                label=f"matched validation KL {level:g} (95%: t over seeds, 1 seed: held-out bootstrap)")
    ax.set_xscale("log")
    ax.axhline(0, color="black", linewidth=0.5)
    ax.set(xlabel="KL(original ‖ edited) on held-out neutral text, nats/token (log)",
           ylabel="held-out bias-gap reduction, %", title=title)
    ax.legend(fontsize=7, loc="best")
    return _png_bytes(fig)


def retention_frontier(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The (factual kept, statement removal) points that no other point beats on both, by falling factual kept:
    `frontier` with more kept in place of less KL."""
    return [(-lost, removal) for lost, removal in frontier([(-kept, removal) for kept, removal in points])]


def _png_bytes(fig) -> bytes:
    """The figure as PNG bytes (110 dpi, tight layout), closed afterwards."""
    import io

    import matplotlib.pyplot as plt

    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def retention_figure(rows: list[dict], max_kl: float = 0.01, title: str = "") -> bytes | None:
    """PNG bytes: held-out statement-gap reduction against held-out factual margin kept, for every curve point
    (`results.csv` rows with `point` = curve) whose held-out KL is at most `max_kl`, each method's frontier as a
    line. None when no point has both numbers (a spec without statements or factual items)."""
    import matplotlib

    from debias.edits import registry

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_method: dict[str, list[tuple[float, float]]] = {}
    for r in rows:
        if (r["point"] == "curve" and r["objective"] == "default" and r.get("kl") is not None
                and r["kl"] <= max_kl and r.get("factual_kept") is not None
                and r.get("statement_gap_reduction") is not None):
            by_method.setdefault(r["method"], []).append((100 * r["factual_kept"], 100 * r["statement_gap_reduction"]))
    if not by_method:
        return None
    fig, ax = plt.subplots(figsize=(7.5, 5.0))
    for method, points in by_method.items():
        colour = registry.colour(method)
        kept, removal = zip(*points, strict=True)
        ax.scatter(kept, removal, s=10, color=colour, alpha=0.35)
        ax.plot(*zip(*retention_frontier(points), strict=True), color=colour, marker="o", markersize=4,
                label=f"{method} ({len(points)} points)")
    ax.axhline(0, color="black", linewidth=0.5)
    ax.set(xlabel="held-out factual margin kept, %", ylabel="held-out statement-gap reduction, %",
           title=title or f"held-out, every snapshot × α of every seed at KL ≤ {max_kl:g}; "
                          "lines: each method's frontier")
    ax.legend(fontsize=7, loc="best")
    return _png_bytes(fig)
