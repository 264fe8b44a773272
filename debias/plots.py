"""`report.png`: training curves, the held-out feature's activation histogram and the gap per profession."""

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
                  gap_before: dict[str, float], gap_after: dict[str, float], title: str = "") -> Path:
    """Write a three-panel PNG; returns its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.6))
    ax = axes[0]
    for name, points in sorted(curves.items()):
        if name.startswith("train/") or name in ("val/kl",):
            steps, values = zip(*points, strict=False)
            ax.plot(steps, values, label=name, marker="." if name.startswith("val/") else None)
    ax.set(xlabel="step", ylabel="value", title="objective terms and held-out KL", yscale="log")
    ax.legend(fontsize=8)

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
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return Path(out)


def pareto_figure(rows: list[dict], title: str = "") -> bytes:
    """PNG bytes: held-out bias-gap reduction against KL, one point per (pooled) cell of the default objective;
    random masks carry their seeds' spread as error bars, marker size grows with k."""
    import io
    import math

    import matplotlib

    from debias.edits import registry

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 5))
    seen = set()
    for r in rows:
        if r["objective"] != "default":
            continue
        colour = registry.colour(r["method"])
        size = 30 + 25 * math.log10(r["k"]) if r.get("k") else 60
        kl = max(r["kl"], 1e-6)
        ax.errorbar(kl, 100 * r["gap_reduction"], xerr=r.get("kl_sd"),
                    yerr=100 * r["gap_reduction_sd"] if r.get("gap_reduction_sd") is not None else None,
                    fmt="none", ecolor=colour, alpha=0.6)
        ax.scatter(kl, 100 * r["gap_reduction"], s=size, color=colour, edgecolor="black", linewidth=0.5,
                   label=r["method"] if r["method"] not in seen else None, zorder=3)
        seen.add(r["method"])
        ax.annotate(r["cell"].replace(" (3 seeds)", ""), (kl, 100 * r["gap_reduction"]), fontsize=6,
                    xytext=(3, 3), textcoords="offset points")
    ax.set_xscale("log")
    ax.axhline(0, color="black", linewidth=0.5)
    ax.set(xlabel="KL(original ‖ edited) on held-out neutral text, nats/token (log)",
           ylabel="held-out bias-gap reduction, %", title=title)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()
